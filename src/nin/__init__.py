"""nin: Network in Network image classifiers with PyTorch.

Imports are lazy so that `nin --help` does not pay for importing torch.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "create_model": "nin.models", "list_models": "nin.models", "model_info": "nin.models",
    "nin_block": "nin.models", "NiN": "nin.models",
    "load_dataset": "nin.data", "BatchLoader": "nin.data",
    "train": "nin.api", "TrainResult": "nin.api", "summary": "nin.api", "plot_history": "nin.api",
    "show_cam": "nin.api", "TrainConfig": "nin.recipes", "get_recipe": "nin.recipes",
    "evaluate": "nin.evaluation",
    "load": "nin.export", "save_model": "nin.export",
    "NinError": "nin.errors", "UsageError": "nin.errors", "DatasetError": "nin.errors",
    "CheckpointError": "nin.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nin' has no attribute {name!r}")
