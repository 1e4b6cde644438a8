"""nin: Network in Network image classifiers with PyTorch.

Imports are lazy so that `nin --help` does not pay for importing torch.
"""
from __future__ import annotations

__version__ = "0.1.0"

# public name -> the module that defines it.  No public name is also a submodule's name (a submodule
# import sets the package attribute of its name): so the training package is nin.training, not nin.train,
# and the module of predict_files is nin.prediction, not nin.predict.
_LAZY = {
    "create_model": "nin.hub", "list_models": "nin.models", "model_info": "nin.models",
    "nin_block": "nin.models", "NiN": "nin.models",
    "load_dataset": "nin.data.datasets", "BatchLoader": "nin.data.loader",
    "train": "nin.api", "TrainResult": "nin.api", "summary": "nin.api", "plot_history": "nin.api",
    "predict": "nin.api", "Prediction": "nin.prediction",
    "show_cam": "nin.api", "TrainConfig": "nin.training.recipes",
    "get_recipe": "nin.training.recipes", "RECIPES": "nin.training.recipes",
    "evaluate": "nin.evaluation", "predict_files": "nin.prediction", "read_image": "nin.data.images",
    "load": "nin.hub", "save_model": "nin.modelfile", "export_model": "nin.export",
    "list_pretrained": "nin.hub",
    "NinError": "nin.errors", "UsageError": "nin.errors", "DatasetError": "nin.errors",
    "CheckpointError": "nin.errors", "ImageError": "nin.errors", "TrainingDiverged": "nin.errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nin' has no attribute {name!r}")
