"""The model file: safetensors weights + model.json (ModelMeta, validated), saved and loaded; nothing is ever unpickled.

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

from .errors import CheckpointError
from .vocab import PRECISIONS, TRANSFORMS, TTA_CHOICES
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


def _valid_preprocess(pre, channels: int, where: str) -> dict:
    """model.json's ``preprocess`` checked (resize, mean/std per channel, transform), as ModelMeta keeps it."""
    if not isinstance(pre, dict):
        raise CheckpointError(f"{where}: field 'preprocess' must be a JSON object, got {json.dumps(pre)[:80]}")
    resize = pre.get("resize")
    if resize is not None and not (type(resize) is int and 1 <= resize <= MAX_SIDE):
        raise CheckpointError(f"{where}: field 'preprocess.resize' must be null or 1..{MAX_SIDE}, got {resize!r}")
    for key in ("mean", "std"):
        v = pre.get(key)
        if v is not None and not _finite_list(v, channels):
            raise CheckpointError(f"{where}: field 'preprocess.{key}' must be null or 1 or {channels} finite "
                                  f"numbers, got {json.dumps(v)[:80]}")
    if (pre.get("mean") is None) != (pre.get("std") is None):
        raise CheckpointError(f"{where}: fields 'preprocess.mean' and 'preprocess.std' go together")
    if pre.get("std") is not None and min(pre["std"]) <= 0:
        raise CheckpointError(f"{where}: field 'preprocess.std' must be > 0, got {pre['std']}")
    transform = pre.get("transform", "fit")
    if transform not in TRANSFORMS:
        raise CheckpointError(f"{where}: field 'preprocess.transform' must be 'fit' or 'imagenet', got {transform!r}")
    return {"resize": resize, "mean": pre.get("mean"), "std": pre.get("std"),
            **({"transform": transform} if transform != "fit" else {})}


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
    pre = _valid_preprocess(data.get("preprocess") or {}, size[0], where)
    if data.get("tta", "none") not in TTA_CHOICES:
        bad("tta", f"one of {', '.join(TTA_CHOICES)}")
    if data.get("precision", "fp32") not in PRECISIONS:
        bad("precision", "'fp32' or 'bf16'")
    if not isinstance(data.get("dataset", ""), str):
        bad("dataset", "a dataset name")
    for key in ("split", "info"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            bad(key, "a JSON object")
    return ModelMeta(model=data["model"], model_kwargs=dict(kwargs), classes=list(classes), input_size=list(size),
                     dataset=data.get("dataset", ""),
                     preprocess=pre,
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


def load_file(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a saved model (run folder, a .safetensors with its description embedded or beside it, or a
    model.json) in eval mode, with ``.classes`` and ``.meta`` (ModelMeta) attached.  Only safetensors are
    read.  ``nin.load`` (hub.load) also takes the shipped weights' names."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file as read_tensors

    from .models import build_model

    weights, meta_path = _resolve(path)
    if meta_path is None:
        meta_path = weights
        meta = read_meta(weights, _embedded_meta(weights))
    else:
        meta = read_meta(meta_path)
    try:
        model = build_model(meta.model, **meta.model_kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: cannot build model {meta.model!r}: {e}") from None
    try:
        state = read_tensors(str(weights))
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
