"""The model behind the server: what runs predictions (onnxruntime or PyTorch) and what draws class maps."""
from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..devices import cores
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
    loaded_from: str | None = None  # MODEL as given to load_served

    @property
    def meta(self):
        return self.predictor.meta

    @property
    def classes(self) -> list[str]:
        return self.meta.classes

    def probabilities(self, images: np.ndarray, tta: str | None = None) -> np.ndarray:
        """uint8 N x C x H x W (already fitted by images.read_image) -> N x K probabilities.

        The same computation as ``nin predict`` (predict.probabilities): the model's own TTA unless
        ``tta`` names one, one forward pass per view."""
        import torch

        from ..prediction import probabilities

        x = torch.from_numpy(images)
        if self.cam_model is not None and self.predictor is self.cam_model:
            x = x.to(next(self.cam_model.parameters()).device)
        return probabilities(self.predictor, x, batch_size=max(1, len(x)), tta=tta).cpu().numpy()

    def recipe(self, *, threads: int) -> "ModelRecipe":
        """What a worker process needs to load this same model again (the checked ONNX file, if any)."""
        onnx = str(self.predictor.path) if self.backend.startswith("onnxruntime") else None
        device = str(next(self.cam_model.parameters()).device) if self.cam_model is not None else "cpu"
        return ModelRecipe(self.loaded_from, self.source, onnx, self.cam_model is not None, device, threads)


@dataclass(frozen=True)
class ModelRecipe:
    """A served model as a worker process loads it: the parent loaded, exported and checked it once."""

    loaded_from: str | None  # MODEL as given (None: the default pretrained)
    source: str
    onnx: str | None  # the ONNX file onnxruntime runs (kept by the parent while it serves)
    cam: bool  # load the PyTorch model too (class maps; or the predictor when onnx is None)
    device: str
    threads: int

    def load(self) -> ServedModel:
        import torch

        from ..onnx import OnnxModel
        from ..hub import load_any

        torch.set_num_threads(self.threads)
        model = None
        if self.cam:
            model = load_any(self.loaded_from, self.device) if self.loaded_from is not None else load_any(None)
        if self.onnx is None:
            return ServedModel(model, model, f"pytorch ({self.device})", self.source, self.loaded_from)
        return ServedModel(OnnxModel(self.onnx, threads=self.threads), model, "onnxruntime (CPU)", self.source,
                           self.loaded_from)


def weights_name(source: str | None) -> str:
    """What ``source`` names, for the start-up lines and /health: the shipped weights' full name
    (``nin_fmnist.fashion_mnist_fast`` for None or ``nin_fmnist``), else the run folder or file as given."""
    from ..hub import DEFAULT, is_pretrained_name, resolve_name

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


def default_threads(workers: int = 1) -> int:
    """Compute threads per worker process.  One worker: all cores but one, which the event loop (HTTP,
    decoding) keeps for itself (onnxruntime's default, 2 spinning threads on 2 cores, lost to 1 thread);
    several workers: the cores shared out, each worker's event loop and compute thread taking turns."""
    if workers <= 1:
        return max(1, cores() - 1)
    return max(1, cores() // workers)


def choose_max_batch(served: ServedModel, candidates: tuple[int, ...] = (16, 8, 4), gain: float = 1.25) -> int:
    """The batch size for ``--max-batch auto``: the largest candidate whose forward pass costs at most
    1/``gain`` of batch 1's time per image, measured here (best of 3 after a warm-up), else 1.

    Batching pays when one image leaves the compute threads idle (small inputs: the fast model) and
    loses when one image already fills them (nin_d2l's 224x224 on a 2-core CPU)."""
    one = seconds_per_image(served, 1)
    for n in sorted(candidates, reverse=True):
        if seconds_per_image(served, n) * gain <= one:
            return n
    return 1


def seconds_per_image(served: ServedModel, n: int) -> float:
    """Seconds per image of a forward pass on ``n`` images: the best of 3, after a warm-up."""
    import time

    c, h, w = served.meta.input_size
    x = np.zeros((n, c, h, w), np.uint8)
    served.probabilities(x)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        served.probabilities(x)
        best = min(best, time.perf_counter() - t)
    return best / n


def load_served(source: str | None, *, backend: str = "auto", device: str = "auto",
                threads: int | None = None, log=None, onnx_dir: str | os.PathLike | None = None) -> ServedModel:
    """Load MODEL (a run folder, .safetensors, .onnx or pretrained name; None: the default pretrained).

    On CPU with ``backend`` auto or onnx, a PyTorch model is exported once to ONNX (dynamic batch),
    checked against PyTorch by export.export_model, and served by onnxruntime (BENCHMARKS.md compares
    it with PyTorch eager).  The file goes to a temporary folder that is removed at once (the session
    holds the graph), or to ``onnx_dir``, kept there for worker processes (``ServedModel.recipe``).
    ``auto`` falls back to PyTorch when onnxruntime is missing or the export fails; class maps always
    use PyTorch.
    """
    import torch

    from ..onnx import OnnxModel
    from ..hub import load_any

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
        return ServedModel(OnnxModel(model.path, threads=threads), None, "onnxruntime (CPU)", name, source)
    torch.set_num_threads(threads)
    dev = next(model.parameters()).device
    if backend == "torch" or dev.type != "cpu":
        if backend == "onnx":
            raise UsageError("--backend onnx runs on the CPU; leave out --device or use --backend torch")
        return ServedModel(model, model, f"pytorch ({dev})", name, source)
    onnx_model = _onnx_of(model, backend, threads, log, onnx_dir)
    if onnx_model is None:
        return ServedModel(model, model, "pytorch (cpu)", name, source)
    return ServedModel(onnx_model, model, "onnxruntime (CPU)", name, source)


def _onnx_of(model, backend: str, threads: int, log, keep_in: str | os.PathLike | None):
    """``model`` exported to ONNX (checked equal to PyTorch) and opened in onnxruntime; None when auto
    falls back to PyTorch (onnxruntime missing, export failed)."""
    from ..onnx import OnnxModel
    from ..export import export_model

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        if backend == "onnx":
            raise UsageError("--backend onnx needs onnxruntime: pip install 'nin[onnx]'") from None
        log("note: onnxruntime is not installed; serving with PyTorch (pip install 'nin[onnx]' is faster on CPU)")
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="nin-serve-") as tmp:
            path = Path(keep_in or tmp) / f"{id(model):x}.onnx"
            export_model(model, path, format="onnx", dynamic_batch=True)  # removed, with ExportError, unless equal
            return OnnxModel(path, threads=threads)
    except NinError as e:
        if backend == "onnx":
            raise
        log(f"note: serving with PyTorch, the ONNX export did not work ({e})")
        return None
