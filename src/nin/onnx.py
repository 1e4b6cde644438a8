"""ONNX: writing a model as an .onnx file (torch's dynamo exporter, the model.json embedded) and running one
with onnxruntime where nin uses a loaded torch model (``OnnxModel``)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .errors import CheckpointError, ExportError
from .fsutil import atomic_write
from .modelfile import META_KEY, META_NAME, ModelMeta, read_meta

# --- standalone exports: one safetensors file, ONNX -----------------------------------------
ONNX_TOLERANCE = 1e-4  # max |onnxruntime - PyTorch fp32| accepted by `nin export`


MIN_OPSET = 18  # torch's exporter (dynamo) writes opset 18 and newer; asked for less it silently writes 18


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


def onnx_max_diff(model: torch.nn.Module, onnx_model: OnnxModel, x: torch.Tensor) -> float:
    """max |onnxruntime logits - PyTorch fp32 logits| on the float batch ``x``."""
    with torch.inference_mode():
        ref = model.to("cpu").float().eval()(x)
    return float((onnx_model(x) - ref).abs().max())
