"""Saving and loading trained models: safetensors weights + model.json; nothing is ever unpickled.

A saved model is two files side by side (in a run folder: ``best.safetensors`` + ``model.json``)::

    model.json = {"format": "nin-model/1", "model": "nin_fmnist", "model_kwargs": {...},
                  "classes": [...], "dataset": "fashion-mnist", "input_size": [1, 28, 28],
                  "preprocess": {"resize": null, "mean": [0.286], "std": [0.353]}}

The same JSON is also embedded in the safetensors header (key ``nin.meta``) and, for ONNX exports,
in the ONNX ``metadata_props`` (same key), so a ``.safetensors`` or ``.onnx`` file alone is enough.
A model.json beside a .safetensors file wins over the embedded copy.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError, NinError

FORMAT = "nin-model/1"
META_KEY = "nin.meta"  # the model.json text, embedded in safetensors / ONNX metadata
WEIGHTS_NAME = "best.safetensors"
META_NAME = "model.json"


def atomic_write(path: str | os.PathLike, write) -> None:
    """Write through ``write(tmp_path)`` into a temp file beside ``path``, fsync, then rename.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    A failed write (full disk, unwritable folder) raises NinError naming ``path``, and removes the temp file.
    """
    path = Path(path)
    tmp, replaced = None, False
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        replaced = True
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as e:
        if tmp is not None and not replaced and os.path.exists(tmp):
            os.unlink(tmp)
        if not isinstance(e, OSError):
            raise
        kept = "" if replaced or not path.exists() else f"; the previous {path.name} is unchanged"
        raise NinError(f"{path}: cannot write ({e.strerror or e}){kept}") from None


@dataclass
class ModelMeta:
    """What rebuilds a model and turns raw images into its input."""

    model: str
    model_kwargs: dict
    classes: list[str]
    input_size: list[int]
    dataset: str = ""
    preprocess: dict = field(default_factory=lambda: {"resize": None, "mean": None, "std": None})

    def to_json(self) -> dict:
        return {"format": FORMAT, "model": self.model, "model_kwargs": self.model_kwargs,
                "classes": self.classes, "dataset": self.dataset, "input_size": self.input_size,
                "preprocess": self.preprocess}


def save_model(out_dir: str | os.PathLike, model: torch.nn.Module, meta: ModelMeta,
               weights_name: str = WEIGHTS_NAME) -> Path:
    """Write ``weights_name`` (safetensors) and model.json into ``out_dir``, each atomically."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    text = json.dumps(meta.to_json(), indent=2)
    data = save(state, metadata={"format": FORMAT, META_KEY: text})  # in memory: disk errors are OSErrors
    atomic_write(out_dir / weights_name, lambda tmp: Path(tmp).write_bytes(data))
    atomic_write(out_dir / META_NAME, lambda tmp: Path(tmp).write_text(text))
    return out_dir / weights_name


def _embedded_meta(weights: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            return (f.metadata() or {}).get(META_KEY)
    except Exception:  # unreadable: load() reports it when it reads the tensors
        return None


def _resolve(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(weights, meta json) of a saved model; meta is None when only the embedded copy exists."""
    path = Path(path)
    if path.is_dir():
        weights, meta = path / WEIGHTS_NAME, path / META_NAME
    elif path.suffix == ".safetensors":
        weights, meta = path, path.with_suffix(".json")
        if not meta.exists():
            meta = path.with_name(META_NAME)
        if not meta.exists() and path.exists() and _embedded_meta(path) is not None:
            return path, None
    elif path.name.endswith(".json"):
        weights, meta = path.with_name(WEIGHTS_NAME), path
    else:
        raise CheckpointError(f"{path}: expected a run folder, a .safetensors file or a model.json")
    for p in (weights, meta):
        if not p.exists():
            raise CheckpointError(f"{p}: not found (a saved model is {WEIGHTS_NAME} + {META_NAME})")
    return weights, meta


def read_meta(path: str | os.PathLike, text: str | None = None) -> ModelMeta:
    """Parse a model.json (or ``text``, its content taken from embedded metadata of ``path``)."""
    try:
        data = json.loads(Path(path).read_text() if text is None else text)
        return ModelMeta(model=data["model"], model_kwargs=dict(data.get("model_kwargs", {})),
                         classes=list(data["classes"]), input_size=list(data["input_size"]),
                         dataset=data.get("dataset", ""),
                         preprocess=dict(data.get("preprocess") or {}))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a valid nin model.json ({e.__class__.__name__}: {e})") from None


def load(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a trained model (run folder, or .safetensors beside its model.json) in eval mode.

    Returns the model with ``.classes``, ``.meta`` (ModelMeta) attached.  Only safetensors are read.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models import create_model

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


class ExportError(CheckpointError):
    """An export could not be written, or does not reproduce the PyTorch model."""


def export_safetensors(model: torch.nn.Module, meta: ModelMeta, out: str | os.PathLike) -> Path:
    """One self-contained .safetensors file: fp32 weights, model.json embedded in the header."""
    from safetensors.torch import save

    out = Path(out)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous()
             for k, v in model.state_dict().items()}
    text = json.dumps(meta.to_json(), indent=2)
    data = save(state, metadata={"format": FORMAT, META_KEY: text})  # in memory: disk errors are OSErrors
    atomic_write(out, lambda tmp: Path(tmp).write_bytes(data))
    return out


def export_onnx(model: torch.nn.Module, meta: ModelMeta, out: str | os.PathLike, *,
                opset: int = 18, dynamic_batch: bool = False) -> Path:
    """Write ``out`` (.onnx): input ``images`` (preprocessed float, N x C x H x W), output ``logits``.

    The batch size is 1 unless ``dynamic_batch``.  ``meta`` is embedded as metadata_props[nin.meta].
    Uses torch's dynamo-based exporter (torch.export + onnxscript).
    """
    import warnings

    import onnx

    out = Path(out)
    model = model.to("cpu").eval()
    c, h, w = meta.input_size
    # torch.export specialises a batch of 1, so a dynamic batch is traced with 2.
    example = torch.zeros(2 if dynamic_batch else 1, c, h, w)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example,), input_names=["images"], output_names=["logits"],
                                        opset_version=opset, dynamo=True, dynamic_shapes=shapes,
                                        external_data=False, verbose=False)
        proto = program.model_proto
    except Exception as e:  # the exporter raises many kinds; the user needs one line
        raise ExportError(f"{out}: ONNX export failed ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None
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


def load_any(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """load() for a run folder / .safetensors, OnnxModel for a .onnx file."""
    if Path(path).suffix == ".onnx":
        return OnnxModel(path)
    return load(path, device)


def onnx_max_diff(model: torch.nn.Module, onnx_model: OnnxModel, x: torch.Tensor) -> float:
    """max |onnxruntime logits - PyTorch fp32 logits| on the float batch ``x``."""
    with torch.inference_mode():
        ref = model.to("cpu").float().eval()(x)
    return float((onnx_model(x) - ref).abs().max())
