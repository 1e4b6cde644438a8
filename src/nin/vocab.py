"""The words a model file, a recipe and the command line share, each defined once.

Adding a test-time augmentation is a change to ``TTA_CHOICES`` plus its implementation in
``inference.tta_logits``; every option, check and model.json field that names TTAs derives from it.
Imports no torch, so the command line's ``--help`` can use it.
"""
from __future__ import annotations

from .errors import UsageError

TTA_CHOICES = ("none", "flip", "shift")  # the views averaged at test time (see inference.tta_logits)
TTA_REQUESTS = ("run", *TTA_CHOICES)     # eval/predict/serve: "run" is the model's own (model.json's tta)
PRECISIONS = ("fp32", "bf16")            # the arithmetic an evaluation runs in
TRANSFORMS = ("fit", "imagenet")         # how an image becomes the input (model.json's preprocess.transform)


def resolve_tta(meta, requested: str | None) -> str:
    """The TTA to use: the model's own (``meta.tta``, what its reported accuracy used) for ``None`` or
    "run", else ``requested``, checked.  The one rule of eval, predict, cam, serve and the Python API."""
    if requested in (None, "run"):
        return getattr(meta, "tta", None) or "none"
    if requested not in TTA_CHOICES:
        raise UsageError(f"unknown test-time augmentation {requested!r}; choose one of: {', '.join(TTA_REQUESTS)}")
    return requested
