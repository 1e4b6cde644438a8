"""Saving and loading trained models: safetensors weights + model.json; nothing is ever unpickled.

A saved model is two files side by side (in a run folder: ``best.safetensors`` + ``model.json``)::

    model.json = {"format": "nin-model/1", "model": "nin_fmnist", "model_kwargs": {...},
                  "classes": [...], "dataset": "fashion-mnist", "input_size": [1, 28, 28],
                  "preprocess": {"resize": null, "mean": [0.286], "std": [0.353]}}

The same JSON is also embedded in the safetensors header (key ``nin.meta``) and, for ONNX exports,
in the ONNX ``metadata_props`` (same key), so a ``.safetensors`` or ``.onnx`` file alone is enough.
A file's embedded copy wins over a model.json lying beside it (which may describe another model);
model.json is read only for weights without one.  Every field is validated when read.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError, ExportError, UsageError
from .evaluation import TTA_CHOICES
from .fsutil import atomic_write

FORMAT = "nin-model/1"
META_KEY = "nin.meta"  # the model.json text, embedded in safetensors / ONNX metadata
WEIGHTS_NAME = "best.safetensors"
META_NAME = "model.json"


MAX_SIDE = 4096  # the largest input side a model.json may ask for


@dataclass
class ModelMeta:
    """What rebuilds a model, turns raw images into its input, and says how it was evaluated."""

    model: str
    model_kwargs: dict
    classes: list[str]
    input_size: list[int]
    dataset: str = ""
    preprocess: dict = field(default_factory=lambda: {"resize": None, "mean": None, "std": None})
    tta: str = "none"  # the test-time augmentation the run's reported accuracy used; eval/predict default to it
    precision: str = "fp32"  # the precision the run evaluated in ("bf16": autocast); `nin eval` can match it
    split: dict | None = None  # for folder datasets: how the held-out test files were chosen (seed, rule, hash)
    info: dict = field(default_factory=dict)  # free-form provenance (recipe, accuracy, command, ...)

    def to_json(self) -> dict:
        doc = {"format": FORMAT, "model": self.model, "model_kwargs": self.model_kwargs,
               "classes": self.classes, "dataset": self.dataset, "input_size": self.input_size,
               "preprocess": self.preprocess, "tta": self.tta, "precision": self.precision}
        if self.split is not None:
            doc["split"] = self.split
        if self.info:
            doc["info"] = self.info
        return doc


def _finite_list(v, n: int | None) -> bool:
    return (isinstance(v, list) and len(v) in ((1, n) if n else (len(v),)) and len(v) > 0
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v))


def validate_meta(data, where: str) -> ModelMeta:
    """A ModelMeta from parsed JSON, every field checked; CheckpointError names ``where`` and the field."""
    from .models import list_models

    def bad(fieldname: str, expected: str):
        got = json.dumps(data.get(fieldname)) if isinstance(data, dict) else "?"
        raise CheckpointError(f"{where}: field {fieldname!r} must be {expected}, got {got[:80]}")

    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: not a nin model description (expected a JSON object)")
    if data.get("format", FORMAT) != FORMAT:
        bad("format", f"{FORMAT!r}")
    if data.get("model") not in list_models():
        raise CheckpointError(f"{where}: cannot build model {data.get('model')!r}: field 'model' must be one of "
                              f"{', '.join(list_models())}")
    kwargs = data.get("model_kwargs", {})
    if not isinstance(kwargs, dict):
        bad("model_kwargs", "a JSON object")
    classes = data.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        bad("classes", "a non-empty list of class names")
    if "num_classes" in kwargs and kwargs["num_classes"] != len(classes):
        bad("classes", f"{kwargs['num_classes']} names (model_kwargs.num_classes)")
    size = data.get("input_size")
    if not (isinstance(size, list) and len(size) == 3 and all(type(v) is int for v in size)
            and size[0] in (1, 3) and all(1 <= v <= MAX_SIDE for v in size[1:])):
        bad("input_size", f"[C, H, W] with C 1 or 3 and H, W in 1..{MAX_SIDE}")
    if "in_chans" in kwargs and kwargs["in_chans"] != size[0]:
        bad("input_size", f"{kwargs['in_chans']} channels first (model_kwargs.in_chans)")
    pre = data.get("preprocess") or {}
    if not isinstance(pre, dict):
        bad("preprocess", "a JSON object")
    resize = pre.get("resize")
    if resize is not None and not (type(resize) is int and 1 <= resize <= MAX_SIDE):
        raise CheckpointError(f"{where}: field 'preprocess.resize' must be null or 1..{MAX_SIDE}, got {resize!r}")
    for key in ("mean", "std"):
        v = pre.get(key)
        if v is not None and not _finite_list(v, size[0]):
            raise CheckpointError(f"{where}: field 'preprocess.{key}' must be null or 1 or {size[0]} finite "
                                  f"numbers, got {json.dumps(v)[:80]}")
    if (pre.get("mean") is None) != (pre.get("std") is None):
        raise CheckpointError(f"{where}: fields 'preprocess.mean' and 'preprocess.std' go together")
    if pre.get("std") is not None and min(pre["std"]) <= 0:
        raise CheckpointError(f"{where}: field 'preprocess.std' must be > 0, got {pre['std']}")
    transform = pre.get("transform", "fit")
    if transform not in ("fit", "imagenet"):
        raise CheckpointError(f"{where}: field 'preprocess.transform' must be 'fit' or 'imagenet', got {transform!r}")
    if data.get("tta", "none") not in TTA_CHOICES:
        bad("tta", f"one of {', '.join(TTA_CHOICES)}")
    if data.get("precision", "fp32") not in ("fp32", "bf16"):
        bad("precision", "'fp32' or 'bf16'")
    if not isinstance(data.get("dataset", ""), str):
        bad("dataset", "a dataset name")
    for key in ("split", "info"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            bad(key, "a JSON object")
    return ModelMeta(model=data["model"], model_kwargs=dict(kwargs), classes=list(classes), input_size=list(size),
                     dataset=data.get("dataset", ""),
                     preprocess={"resize": resize, "mean": pre.get("mean"), "std": pre.get("std"),
                                 **({"transform": transform} if transform != "fit" else {})},
                     tta=data.get("tta", "none"), precision=data.get("precision", "fp32"), split=data.get("split"),
                     info=dict(data.get("info") or {}))


def save_model(out_dir: str | os.PathLike, model: torch.nn.Module, meta: ModelMeta,
               weights_name: str = WEIGHTS_NAME) -> Path:
    """Write ``weights_name`` (safetensors) and model.json into ``out_dir``, each atomically."""
    out_dir = Path(out_dir)
    write_safetensors(model, meta, out_dir / weights_name)
    atomic_write(out_dir / META_NAME, lambda tmp: Path(tmp).write_text(json.dumps(meta.to_json(), indent=2)))
    return out_dir / weights_name


def write_safetensors(model: torch.nn.Module, meta: ModelMeta, out: str | os.PathLike) -> Path:
    """One self-contained .safetensors file: fp32 weights, model.json embedded in the header."""
    from safetensors.torch import save

    out = Path(out)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    text = json.dumps(meta.to_json(), indent=2)
    data = save(state, metadata={"format": FORMAT, META_KEY: text})  # in memory: disk errors are OSErrors
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))
    return out


def _embedded_meta(weights: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            return (f.metadata() or {}).get(META_KEY)
    except Exception:  # unreadable: load() reports it when it reads the tensors
        return None


def _resolve(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(weights, meta json) of a saved model; meta is None when the weights embed their own description."""
    path = Path(path)
    if path.is_dir():
        weights, meta = path / WEIGHTS_NAME, path / META_NAME
    elif path.suffix == ".safetensors":
        if path.is_file() and _embedded_meta(path) is not None:
            return path, None  # its own description wins over a model.json that may describe another model
        weights, meta = path, path.with_suffix(".json")
        if not meta.exists():
            meta = path.with_name(META_NAME)
    elif path.name.endswith(".json"):
        weights, meta = path.with_name(WEIGHTS_NAME), path
    else:
        raise CheckpointError(f"{path}: expected a run folder, a .safetensors file, a model.json, an .onnx file "
                              "or a pretrained name (see `nin models`)")
    for p in (weights, meta):
        if not p.exists():
            raise CheckpointError(f"{p}: not found (a saved model is {WEIGHTS_NAME} + {META_NAME})")
    return weights, meta


def read_meta(path: str | os.PathLike, text: str | None = None) -> ModelMeta:
    """Parse and validate a model.json (or ``text``, its content taken from embedded metadata of ``path``)."""
    try:
        data = json.loads(Path(path).read_text() if text is None else text)
    except (OSError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid nin model.json ({e.__class__.__name__}: {e})") from None
    return validate_meta(data, str(path))


def load(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a trained model (run folder, or .safetensors beside its model.json) in eval mode.

    Returns the model with ``.classes``, ``.meta`` (ModelMeta) attached.  Only safetensors are read.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import create_model
    from .pretrained import is_pretrained_name, pretrained_path

    if is_pretrained_name(path):
        path = pretrained_path(str(path))
    weights, meta_path = _resolve(path)
    if meta_path is None:
        meta_path = weights
        meta = read_meta(weights, _embedded_meta(weights))
    else:
        meta = read_meta(meta_path)
    try:
        model = create_model(meta.model, **meta.model_kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: cannot build model {meta.model!r}: {e}") from None
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({e})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{weights}: weights do not fit {meta.model} ({first})") from None
    model.classes = meta.classes
    model.meta = meta
    return model.to(device).eval()


# --- standalone exports: one safetensors file, ONNX -----------------------------------------
ONNX_TOLERANCE = 1e-4  # max |onnxruntime - PyTorch fp32| accepted by `nin export`
MIN_OPSET = 18  # torch's exporter (dynamo) writes opset 18 and newer; asked for less it silently writes 18


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
        again = load(out)
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
        from .evaluation import preprocess

        checks.append((f"{len(real_images)} real test images", onnx_max_diff(model, om, preprocess(model, real_images))))
    worst = max(d for _, d in checks)
    if not worst <= tolerance:  # NaN fails too
        out.unlink(missing_ok=True)
        summary = "; ".join(f"{d:.2e} on {what}" for what, d in checks)
        raise ExportError(f"{out}: removed, the ONNX model does not match PyTorch (max |onnxruntime - torch| "
                          f"{summary}; allowed {tolerance})")
    return ExportReport(out, format, opset, checks)


def export_onnx(model: torch.nn.Module, meta: ModelMeta, out: str | os.PathLike, *,
                opset: int = 18, dynamic_batch: bool = False) -> Path:
    """Write ``out`` (.onnx): input ``images`` (preprocessed float, N x C x H x W), output ``logits``,
    in exactly ONNX opset ``opset`` (ExportError, nothing written, if the exporter produced another).

    The batch size is 1 unless ``dynamic_batch``.  ``meta`` is embedded as metadata_props[nin.meta].
    Uses torch's dynamo-based exporter (torch.export + onnxscript); nothing is written on failure.
    """
    import contextlib
    import io
    import warnings

    import onnx

    out = Path(out)
    model = model.to("cpu").eval()
    c, h, w = meta.input_size
    # torch.export specialises a batch of 1, so a dynamic batch is traced with 2.
    example = torch.zeros(2 if dynamic_batch else 1, c, h, w)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    noise = io.StringIO()  # the exporter prints tracebacks of its own fallbacks; keep them from the user
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(noise), contextlib.redirect_stderr(noise):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), input_names=["images"], output_names=["logits"],
                                        opset_version=opset, dynamo=True, dynamic_shapes=shapes,
                                        external_data=False, verbose=False)
        proto = program.model_proto
    except Exception as e:  # the exporter raises many kinds; the user needs one line
        raise ExportError(f"{out}: ONNX export failed ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
    real = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if real != opset:
        raise ExportError(f"{out}: not written; torch's exporter cannot write ONNX opset {opset} "
                          f"(it produced opset {real})")
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta.to_json())
    onnx.checker.check_model(proto)
    atomic_write(out, lambda tmp: onnx.save(proto, tmp))
    return out


class OnnxModel:
    """An exported .onnx run by onnxruntime, usable where nin uses a loaded torch model.

    ``model(x)`` takes a preprocessed float tensor N x C x H x W and returns logits (a tensor);
    a file exported with a fixed batch size is run chunk by chunk.  ``.meta``/``.classes`` as load().
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"{self.path}: not found")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise CheckpointError(f"{self.path}: not a readable ONNX model ({str(e).splitlines()[0]})") from None
        text = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if text is not None:
            self.meta = read_meta(self.path, text)
        elif self.path.with_suffix(".json").exists():
            self.meta = read_meta(self.path.with_suffix(".json"))
        elif self.path.with_name(META_NAME).exists():
            self.meta = read_meta(self.path.with_name(META_NAME))
        else:
            raise CheckpointError(f"{self.path}: no nin metadata inside and no {META_NAME} beside it")
        self.classes = self.meta.classes
        self.in_chans = self.meta.input_size[0]
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().to("cpu", torch.float32).contiguous()
        if self.batch is None or x.shape[0] == self.batch:
            return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])
        parts = []
        for i in range(0, x.shape[0], self.batch):
            chunk = x[i:i + self.batch]
            n = chunk.shape[0]
            if n < self.batch:  # pad the last chunk to the fixed batch size
                chunk = torch.cat([chunk, chunk.new_zeros(self.batch - n, *chunk.shape[1:])])
            parts.append(torch.from_numpy(self.session.run(None, {self.input_name: chunk.numpy()})[0][:n]))
        return torch.cat(parts)

    def eval(self) -> "OnnxModel":
        return self


def load_any(path: str | os.PathLike | None = None, device: str | torch.device = "cpu"):
    """load() for a run folder / .safetensors / pretrained name, OnnxModel for a .onnx file;
    None: the default pretrained model (nin.pretrained.DEFAULT)."""
    if path is None:
        from .pretrained import DEFAULT

        path = DEFAULT
    if Path(path).suffix == ".onnx":
        return OnnxModel(path)
    return load(path, device)


def onnx_max_diff(model: torch.nn.Module, onnx_model: OnnxModel, x: torch.Tensor) -> float:
    """max |onnxruntime logits - PyTorch fp32 logits| on the float batch ``x``."""
    with torch.inference_mode():
        ref = model.to("cpu").float().eval()(x)
    return float((onnx_model(x) - ref).abs().max())
