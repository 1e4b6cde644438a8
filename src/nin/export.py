"""``nin export``: a model written as ONNX or as one .safetensors, and proved to reproduce the model
(a file that fails its check is removed)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ExportError, UsageError
from .modelfile import load_file, write_safetensors
from .onnx import ONNX_TOLERANCE, MIN_OPSET, OnnxModel, export_onnx, onnx_max_diff

@dataclass
class ExportReport:
    path: Path
    format: str
    opset: int | None = None
    checks: list[tuple[str, float]] = field(default_factory=list)  # (what, max |onnxruntime - torch|)


def export_model(model: torch.nn.Module, out: str | os.PathLike, *, format: str = "onnx", opset: int = 18,
                 dynamic_batch: bool = False, real_images: torch.Tensor | None = None,
                 tolerance: float = ONNX_TOLERANCE) -> ExportReport:
    """Write ``model`` (with its ``.meta``) as ONNX or one .safetensors, and prove the file reproduces it.

    safetensors: the file is read back and every tensor compared.  ONNX: onnxruntime's logits against
    PyTorch's on a random batch and on ``real_images`` (uint8, preprocessed as the model's meta says)
    within ``tolerance``.  A file that fails its check is removed and ExportError raised: no caller is
    left with an export that silently differs from the model."""
    out = Path(out)
    meta = model.meta
    if format == "safetensors":
        write_safetensors(model, meta, out)
        again = load_file(out)
        mine, theirs = model.state_dict(), again.state_dict()
        if mine.keys() != theirs.keys() or not all(torch.equal(mine[k].cpu().float(), theirs[k].float())
                                                   for k in mine):
            out.unlink(missing_ok=True)
            raise ExportError(f"{out}: removed, the written weights differ from the model's")
        return ExportReport(out, format)
    if format != "onnx":
        raise UsageError(f"unknown export format {format!r}; choose onnx or safetensors")
    if opset < MIN_OPSET:
        raise UsageError(f"--opset {opset}: torch's ONNX exporter writes opset {MIN_OPSET} or newer")
    om = OnnxModel(export_onnx(model, meta, out, opset=opset, dynamic_batch=dynamic_batch))
    gen = torch.Generator().manual_seed(0)
    checks = [("a random batch of 8", onnx_max_diff(model, om, torch.randn(8, *meta.input_size, generator=gen)))]
    if real_images is not None and len(real_images):
        from .inference import preprocess

        checks.append((f"{len(real_images)} real test images", onnx_max_diff(model, om, preprocess(model, real_images))))
    worst = max(d for _, d in checks)
    if not worst <= tolerance:  # NaN fails too
        out.unlink(missing_ok=True)
        summary = "; ".join(f"{d:.2e} on {what}" for what, d in checks)
        raise ExportError(f"{out}: removed, the ONNX model does not match PyTorch (max |onnxruntime - torch| "
                          f"{summary}; allowed {tolerance})")
    return ExportReport(out, format, opset, checks)
