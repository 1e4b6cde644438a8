"""Datasets and loaders: the formats (``datasets``), image files (``images``), whole-batch operations
(``batchops``), the in-memory loader (``loader``), streaming from files (``stream``) and WebDataset shards
(``shards``).  ``open_dataset`` and ``make_loader`` are the one entry point for every kind."""
from __future__ import annotations

# name -> the submodule that defines it, imported on first use: `nin --help` reads nin.data.images's limits
# without importing torch (batchops and the loaders need it).
_LAZY = {**dict.fromkeys(["to_float_batch", "resize_matrix", "erase_boxes", "augment", "alternating_flips",
                          "seed_mix", "epoch_order", "num_batches"], "batchops"),
         **dict.fromkeys(["DATASETS", "Split", "Dataset", "load_dataset", "find_dataset", "search_dirs"], "datasets"),
         "BatchLoader": "loader"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DATASETS", "Split", "Dataset", "load_dataset", "find_dataset", "search_dirs", "to_float_batch",
           "resize_matrix", "erase_boxes", "augment", "alternating_flips", "seed_mix", "BatchLoader", "epoch_order",
           "num_batches", "open_dataset", "make_loader"]


# --- one entry point for every dataset and loader -----------------------------------------------
_STREAM_ONLY = ("in_chans", "size", "transform", "eval_resize", "workers", "max_bad", "on_bad", "prefetch")


def open_dataset(name: str, data_dir=None, *, seed: int = 0, stream: bool | None = None, memory_budget=None,
                 device="cpu", download: bool = False):
    """The dataset in memory (``Dataset``: uint8 tensors) or as files to stream (``stream.StreamDataset``).

    ``wds:DIR`` always streams; ``folder:PATH`` streams with ``stream=True``, or with ``stream=None`` when
    its decoded size exceeds ``memory_budget`` (``stream.choose_path``); the built-in datasets load."""
    from .datasets import load_dataset

    if name.startswith("wds:"):
        from .shards import open_shards
        return open_shards(name)
    if name.startswith("folder:"):
        from .stream import choose_path, open_folder
        if stream or (stream is None and choose_path(name, memory_budget, device=device, seed=seed) == "stream"):
            return open_folder(name[len("folder:"):], seed)
    elif stream:
        from ..errors import UsageError
        raise UsageError(f"--stream reads folder:PATH or wds:DIR; {name} is loaded into memory")
    return load_dataset(name, data_dir, download=download, seed=seed)


def make_loader(split, batch_size: int, **kw):
    """``BatchLoader`` for an in-memory ``Split``, ``stream.StreamLoader`` for a ``FileSplit``,
    ``shards.ShardLoader`` for a ``ShardSplit``: the same keyword arguments (the streaming ones, listed
    in ``_STREAM_ONLY``, are ignored in memory, where only the "fit" transform exists)."""
    from .datasets import Split
    from .loader import BatchLoader
    from .stream import FileSplit, StreamLoader

    if isinstance(split, Split):
        if kw.get("transform", "fit") != "fit":
            from ..errors import UsageError
            raise UsageError(f"the {kw['transform']} transform needs the streaming path (--stream)")
        return BatchLoader(split, batch_size, **{k: v for k, v in kw.items() if k not in _STREAM_ONLY})
    if kw.pop("alt_flip", False):
        from ..errors import UsageError
        raise UsageError("--alt-flip needs the images in memory; a streamed collection draws a flip per image "
                         "(drop --alt-flip, or --no-stream for a folder that fits --memory-budget)")
    if isinstance(split, FileSplit):
        return StreamLoader(split, batch_size, **kw)
    from .shards import ShardLoader
    return ShardLoader(split, batch_size, **kw)
