"""The model behind the server: what runs predictions (onnxruntime or PyTorch) and what draws class maps."""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import NinError, UsageError

BACKENDS = ("auto", "onnx", "torch")


@dataclass
class ServedModel:
    """``predictor`` answers /v1/predict (an OnnxModel or a torch model); ``cam_model`` (a torch model,
    or None for an .onnx file) draws class activation maps.  Both carry the same ``meta``."""

    predictor: object
    cam_model: object | None
    backend: str  # shown in /v1/model and the page: "onnxruntime (CPU)", "pytorch (cuda:0)", ...
    source: str

    @property
    def meta(self):
        return self.predictor.meta

    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 N x C x H x W (already fitted by images.read_image) -> N x K probabilities.

        The same computation as ``nin predict`` (predict.probabilities), one forward pass."""
        import torch

        from ..prediction import probabilities

        x = torch.from_numpy(images)
        if self.cam_model is not None and self.predictor is self.cam_model:
            x = x.to(next(self.cam_model.parameters()).device)
        return probabilities(self.predictor, x, batch_size=max(1, len(x))).cpu().numpy()


def weights_name(source: str | None) -> str:
    """What ``source`` names, for the start-up lines and /health: the shipped weights' full name
    (``nin_fmnist.fashion_mnist_fast`` for None or ``nin_fmnist``), else the run folder or file as given."""
    from ..pretrained import DEFAULT, is_pretrained_name, resolve_name

    if source is None:
        return DEFAULT
    return resolve_name(source) if is_pretrained_name(source) else str(source)


def reported_accuracy(meta) -> dict | None:
    """The model's test accuracy as recorded with its own TTA (``meta.tta``): ``{"value", "tta",
    "precision"}``, or None when the description does not record that number.

    Shipped weights record ``info.accuracy`` as ``{"fp32": {"none": .., "flip": .., ...}, "bf16": {...}}``
    (the fp32 one, with the model's TTA, is taken) or a single number; a run folder records ``test_acc``
    (training's last evaluation, with the run's TTA and precision) and, after a closing evaluation with
    ``--final-tta``, ``tta_test_acc`` with the TTA model.json names."""
    import math

    info = meta.info or {}
    tta = meta.tta or "none"

    def number(v) -> float | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1
        return float(v) if ok else None

    acc = info.get("accuracy")
    if isinstance(acc, dict):
        table = acc.get("fp32")
        value = number(table.get(tta)) if isinstance(table, dict) else number(table)
        return {"value": value, "tta": tta, "precision": "fp32"} if value is not None else None
    if number(acc) is not None:
        return {"value": number(acc), "tta": tta, "precision": meta.precision}
    for key in ("tta_test_acc", "test_acc"):
        if number(info.get(key)) is not None:
            return {"value": number(info[key]), "tta": tta, "precision": meta.precision}
    return None


def default_threads() -> int:
    """Compute threads: all cores but one, which the event loop (HTTP, decoding) keeps for itself.

    On 2 cores, onnxruntime with 1 thread answered 1.0-1.6x the requests/s of its default (2 threads,
    spinning while they wait) at 64 clients: the forward pass and the event loop no longer fight."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def load_served(source: str | None, *, backend: str = "auto", device: str = "auto",
                threads: int | None = None, log=None) -> ServedModel:
    """Load MODEL (a run folder, .safetensors, .onnx or pretrained name; None: the default pretrained).

    On CPU with ``backend`` auto or onnx, a PyTorch model is exported once to ONNX (dynamic batch)
    in a temporary folder, checked against PyTorch by export.export_model, and served by onnxruntime:
    BENCHMARKS.md measures it 4.5x faster than PyTorch eager for the fast model.  ``auto`` falls back
    to PyTorch when onnxruntime is missing or the export fails; class maps always use PyTorch.
    """
    import torch

    from ..export import OnnxModel, export_model, load_any

    log = log or (lambda m: print(m, file=sys.stderr))
    threads = threads or default_threads()
    if backend not in BACKENDS:
        raise UsageError(f"unknown --backend {backend!r}; choose one of: {', '.join(BACKENDS)}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    name = weights_name(source)
    model = load_any(source, device) if source is not None else load_any(None)
    if isinstance(model, OnnxModel):
        if backend == "torch":
            raise UsageError(f"{source}: an .onnx file runs on onnxruntime; give the run folder for --backend torch")
        model = OnnxModel(model.path, threads=threads)
        return ServedModel(model, None, "onnxruntime (CPU)", name)
    torch.set_num_threads(threads)
    dev = next(model.parameters()).device
    if backend == "torch" or dev.type != "cpu":
        if backend == "onnx":
            raise UsageError("--backend onnx runs on the CPU; leave out --device or use --backend torch")
        return ServedModel(model, model, f"pytorch ({dev})", name)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        if backend == "onnx":
            raise UsageError("--backend onnx needs onnxruntime: pip install 'nin[onnx]'") from None
        log("note: onnxruntime is not installed; serving with PyTorch (pip install 'nin[onnx]' is faster on CPU)")
        return ServedModel(model, model, "pytorch (cpu)", name)
    try:
        with tempfile.TemporaryDirectory(prefix="nin-serve-") as tmp:
            path = Path(tmp) / "model.onnx"
            export_model(model, path, format="onnx", dynamic_batch=True)  # removed, with ExportError, unless equal
            onnx_model = OnnxModel(path, threads=threads)  # the session holds the graph; the file can go
    except NinError as e:
        if backend == "onnx":
            raise
        log(f"note: serving with PyTorch, the ONNX export did not work ({e})")
        return ServedModel(model, model, "pytorch (cpu)", name)
    return ServedModel(onnx_model, model, "onnxruntime (CPU)", name)
