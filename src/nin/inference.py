"""Running a model on uint8 images: its preprocessing, test-time augmentation, batched logits, class maps.

Every model here is used through two calls: ``model(x)`` -> logits and, for class activation maps,
``model.forward_features(x)`` -> one map per class (N x K x h x w) before global average pooling.
Raw images (uint8 N x C x H x W) become model input only through ``data.batchops.to_float_batch`` with the
model's ``meta.preprocess``, so ``nin eval`` and ``nin predict`` see exactly the same numbers.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .errors import UsageError
from .vocab import PRECISIONS, TTA_CHOICES

# "shift": the image and its mirror, each at the 9 positions of a 1-pixel translation (3 x 3), 18 views
SHIFTS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def preprocess(model, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 N x C x H x W -> the float input ``model`` was trained on (its meta.preprocess)."""
    from .data.batchops import to_float_batch

    p = getattr(getattr(model, "meta", None), "preprocess", None) or {}
    return to_float_batch(images, resize=p.get("resize"), mean=p.get("mean"), std=p.get("std"), dtype=dtype)


def resolve_eval_precision(model, precision: str | None) -> str:
    """"run" (or None): what the model's run evaluated with, where this machine can do it; else as given.
    Training evaluates under bf16 autocast where the CPU/GPU supports it; evaluating the same way
    reproduces its reported accuracy to the image (fp32 may differ by a few images)."""
    if precision in (None, "run"):
        precision = getattr(getattr(model, "meta", None), "precision", "fp32")
        if precision == "bf16":
            from .devices import cpu_supports_bf16

            precision = "bf16" if cpu_supports_bf16() else "fp32"
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of: run, {', '.join(PRECISIONS)}")
    if not isinstance(model, torch.nn.Module):
        return "fp32"  # onnxruntime runs the file as exported
    return precision


def tta_logits(model, x: torch.Tensor, tta: str | None = "none") -> torch.Tensor:
    """float32 logits of a preprocessed batch; ``tta="flip"`` averages them with the horizontal mirror's,
    ``tta="shift"`` over the image and its mirror each moved by up to one pixel (SHIFTS), the border
    filled with the background (what a zero pixel preprocesses to), as training's crops pad.
    The one test-time augmentation of nin: training's evaluation, ``nin eval``, predict and serve."""
    check_tta(tta)
    if tta == "shift":
        n, c, h, w = x.shape
        background = preprocess(model, torch.zeros(1, c, 1, 1, dtype=torch.uint8), x.dtype)[..., :1, :1]
        padded = background.to(x.device).expand(n, c, h + 2, w + 2).clone()
        padded[..., 1:-1, 1:-1] = x
        views = [padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in SHIFTS]
        return sum(model(v).float() + model(v.flip(-1)).float() for v in views) / (2 * len(views))
    logits = model(x).float()
    if tta == "flip":
        logits = (logits + model(x.flip(-1)).float()) / 2
    return logits


def check_tta(tta: str | None) -> None:
    if tta not in (None, *TTA_CHOICES):
        raise UsageError(f"unknown test-time augmentation {tta!r}; choose one of: {', '.join(TTA_CHOICES)}")


@contextlib.contextmanager
def evaluating(model):
    """Run a PyTorch model in eval mode (batch-norm running statistics, no dropout), then put its mode
    back: a model fresh from ``create_model(..., pretrained=True)`` is in training mode, as torchvision's
    and timm's are, and its batch norm would otherwise normalise each batch by itself."""
    was = isinstance(model, torch.nn.Module) and model.training
    if was:
        model.eval()
    try:
        yield model
    finally:
        if was:
            model.train()


@torch.inference_mode()
def predict_logits(model, images: torch.Tensor, *, batch_size: int = 256, tta: str | None = None,
                   precision: str = "fp32", progress=None) -> torch.Tensor:
    """Logits (N x K, float32, CPU) for uint8 images, in batches.  ``tta="flip"`` averages the
    logits of the image and its horizontal mirror, ``"shift"`` 18 views (see tta_logits).
    ``precision="bf16"``: as the training loop evaluates (bf16 input and autocast), see
    resolve_eval_precision.  A PyTorch model runs channels_last, as in training, in both precisions: in
    fp32 that halved the time of a 2-core AVX2 CPU (benchmarks/eval_layout.py).
    ``progress(n)``, if given, is called after each batch with the number of images it held."""
    check_tta(tta)
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    torch_model = isinstance(model, torch.nn.Module)
    bf16 = precision == "bf16" and torch_model
    if torch_model:
        model = model.to(memory_format=torch.channels_last)
    out = []
    with evaluating(model):
        for i in range(0, images.shape[0], batch_size):
            x = preprocess(model, images[i:i + batch_size], torch.bfloat16 if bf16 else torch.float32)
            if torch_model:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out.append(tta_logits(model, x, tta).cpu())
            if progress is not None:
                progress(x.shape[0])
    if not out:
        return torch.zeros(0, len(getattr(model, "classes", [])))
    return torch.cat(out)


# --- class activation maps ------------------------------------------------------------------
@torch.inference_mode()
def class_activation_maps(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps N x K x h x w, logits N x K) for a preprocessed float batch.

    NiN's last block already gives one map per class and the head only averages it, so these are
    the class activation maps, no gradient needed: ``maps.mean((2, 3)) == logits``.
    """
    with evaluating(model):
        maps = model.forward_features(x)
        return maps, model.forward_head(maps)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N x K x h x w -> N x K x H x W (bilinear), for overlaying on the input image."""
    return F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)
