"""Where models come from: the weights that ship inside the package (``nin_fmnist.fashion_mnist_fast`` and
friends), ``create_model(name, pretrained=...)``, and ``load``/``load_any`` for names, files and ONNX.

Names follow timm's ``architecture.tag``.  Each file is a self-contained safetensors (the model
description embedded, as ``nin export --format safetensors`` writes it) in ``nin/weights/``;
``weights/index.json`` lists them with their sha256, size, accuracy and the command that made them,
so listing needs no tensor.  Nothing is downloaded and nothing is unpickled.

``tools/publish_weights.py`` is how a file gets here (``make weights`` runs the recipes and publishes them).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .errors import CheckpointError, UnknownModelError, UsageError
from .models import build_model, list_models

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
INDEX = WEIGHTS_DIR / "index.json"
DEFAULT = "nin_fmnist.fashion_mnist_fast"  # what `nin predict IMAGE` and `nin serve` use with no model


def _index() -> dict:
    try:
        return json.loads(INDEX.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise CheckpointError(f"{INDEX}: not valid JSON ({e})") from None


def list_pretrained(model: str | None = None) -> list[str]:
    """The shipped weights' names (of one architecture if ``model`` is given), defaults first."""
    idx = _index()
    names = [n for n in idx if model is None or n.split(".")[0] == model]
    return sorted(names, key=lambda n: (not idx[n].get("default", False), n))


def pretrained_info(name: str) -> dict:
    """The index entry of a shipped weights file: file, sha256, bytes, params, accuracy, command, ..."""
    idx = _index()
    if name in idx:
        return idx[name]
    arch = [n for n in list_pretrained(name)] if "." not in name else []
    if arch:  # an architecture name: its default weights
        return idx[arch[0]]
    known = ", ".join(idx) or "none are installed"
    raise UsageError(f"no pretrained weights named {name!r}; shipped: {known}")


def resolve_name(name: str) -> str:
    """The full name ('arch.tag') for a full name or an architecture with shipped weights."""
    return pretrained_info(name)["name"]


def is_pretrained_name(text: str | os.PathLike | None) -> bool:
    if text is None:
        return False
    text = str(text)
    return not os.path.exists(text) and (text in _index() or bool(list_pretrained(text)) and "." not in text)


def pretrained_path(name: str, *, verify: bool = True) -> Path:
    """The shipped file of ``name``, its sha256 checked against the index (a damaged install is refused)."""
    info = pretrained_info(name)
    path = WEIGHTS_DIR / info["file"]
    if not path.is_file():
        raise CheckpointError(f"{path}: the pretrained weights {info['name']!r} are listed but not installed")
    if verify:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != info["sha256"]:
            raise CheckpointError(f"{path}: sha256 {digest[:12]}... does not match the index "
                                  f"({info['sha256'][:12]}...): the file is damaged; reinstall nin")
    return path


def _class_map_and_input_keys(model) -> tuple[set[str], set[str]]:
    """(keys of the class-map layers, keys of the first conv) in ``model.state_dict()``: the last conv with
    the batch norms after it (their first dimension is the class), and the conv that reads the input."""
    from torch import nn

    named = list(model.named_modules())
    convs = [i for i, (_, m) in enumerate(named) if isinstance(m, nn.Conv2d)]
    last = named[convs[-1]:]
    class_mods = [(n, m) for n, m in last if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm))]
    first = named[convs[0]][0]
    own = model.state_dict()
    class_keys = {k for n, _ in class_mods for k in own if k.rsplit(".", 1)[0] == n and own[k].ndim >= 1}
    input_keys = {k for k in own if k.rsplit(".", 1)[0] == first and k.endswith("weight")}
    return class_keys, input_keys


def _last_block_keys(model) -> set[str]:
    """Keys of the last block of ``model.features`` that holds weights (the class-map block)."""
    blocks = [(str(i), m) for i, m in enumerate(getattr(model, "features", [])) if any(True for _ in m.parameters())]
    if not blocks:
        return set()
    prefix = f"features.{blocks[-1][0]}."
    return {k for k in model.state_dict() if k.startswith(prefix)}


def _class_rows(model, state, own, class_keys, source, source_classes, classes, class_map):
    """(note, rows): the weights' class-map rows for ``classes`` by name (rows None: as they are), or a note
    that the class-map layer starts fresh (none of ``classes`` is the weights', or another number of them
    with no names to match)."""
    import torch

    from .classes import ClassMismatch, match_classes, normalize, read_class_map

    if source_classes is not None and classes is not None:
        known = {normalize(c) for c in source_classes} | {normalize(k) for k in read_class_map(class_map)}
        if not any(normalize(c) in known for c in classes):
            return (f"none of the {len(classes)} classes is a class of {source} ({', '.join(source_classes)}): "
                    "its class-map layer starts fresh (a new task)"), None
        try:
            return "", torch.tensor(match_classes(list(classes), list(source_classes), class_map,
                                                  where="the dataset"), dtype=torch.long)
        except ClassMismatch as e:
            raise ClassMismatch(f"{source}: {e}") from None
    if any(state[k].shape != own[k].shape for k in class_keys):
        return f"the class-map layer starts fresh: {model.num_classes} classes, the weights have another number", None
    return "", None


def transfer_weights(model, state: dict, source: str, *, source_classes: list[str] | None = None,
                     classes: list[str] | None = None, class_map=None) -> str:
    """Copy ``state`` (a trained model of the same architecture) into ``model``; returns a note for the
    user ("" when every tensor was copied as it is).  Nothing is left at its random init silently:

    - the class-map layers are taken class by class, **by name** when both class lists are known
      (``nin.classes``: reordered to ``classes``, or a subset of them); when none of ``classes`` is a
      class of the weights, or the number of classes differs and no names are known, they start fresh
      (a new task, said in the note); some matching and some not is an error listing those that do not;
    - a first conv trained on 1 channel takes 3 (or 3 -> 1) as timm adapts it: the weights repeated and
      scaled (or summed), so a grey image in every channel gives what the grey image gave;
    - any other tensor of another shape is an error (UsageError) naming it: another width or depth."""
    import torch

    own = model.state_dict()
    if set(state) != set(own):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise UsageError(f"{source}: its weights are not of this architecture ({len(missing)} tensor(s) missing, "
                         f"e.g. {(missing or extra)[0]!r}; {len(extra)} unknown)")
    class_keys, input_keys = _class_map_and_input_keys(model)
    note, rows = _class_rows(model, state, own, class_keys, source, source_classes, classes, class_map)
    # a fresh class-map layer: so does every tensor of its block whose size is the number of classes
    fresh = class_keys | {k for k in _last_block_keys(model) if state[k].shape != own[k].shape} if note else set()
    copied = {}
    for k, v in state.items():
        if k in fresh:
            continue
        if k in class_keys and rows is not None:
            v = v[rows]
        if v.shape != own[k].shape:
            if k in input_keys and v.ndim == 4 and v.shape[0] == own[k].shape[0] and v.shape[2:] == own[k].shape[2:]:
                c_src, c_dst = v.shape[1], own[k].shape[1]
                if c_src == 1:
                    v = v.repeat(1, c_dst, 1, 1) / c_dst
                elif c_dst == 1:
                    v = v.sum(1, keepdim=True)
                else:
                    raise UsageError(f"{source}: its first conv reads {c_src} channels; cannot adapt it to {c_dst}")
            else:
                raise UsageError(f"{source}: tensor {k!r} is {tuple(v.shape)} in the weights but "
                                 f"{tuple(own[k].shape)} in this model: another width or shape (give the "
                                 "weights' own model options, or drop the weights)")
        copied[k] = v
    with torch.no_grad():
        for k, v in copied.items():
            own[k].copy_(v)
    return note


# --- models from names, files and ONNX ----------------------------------------------------------
def create_model(name: str, *, pretrained: bool | str = False, **kwargs):
    """Build a registered model.  ``pretrained=True`` loads nin's shipped weights (``nin models`` lists
    them): for a full name like "nin_fmnist.fashion_mnist_best" those, for an architecture the shipped
    weights that fit the requested options (the default first: ``width=64`` finds the width-64 weights);
    ``pretrained="fashion_mnist_best"`` (a tag, or a full name) names them.  The model is then built with
    the weights' options, overridden by ``kwargs``.  Another ``num_classes`` starts the class-map layer
    fresh (a fine-tuning start); ``in_chans=3`` adapts a grey first conv as timm does.  Weights that do
    not fit the requested model are an error: ``pretrained`` never returns random weights."""
    arch, _, tag = name.partition(".")
    if arch not in list_models():
        raise UnknownModelError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    if isinstance(pretrained, str) and pretrained:
        wanted = pretrained if "." in pretrained else f"{arch}.{pretrained}"
        if tag and wanted != name:
            raise UsageError(f"create_model({name!r}, pretrained={pretrained!r}): two different weights named")
        tag = wanted.partition(".")[2]
        if wanted.partition(".")[0] != arch:
            raise UsageError(f"pretrained={pretrained!r} are not weights of {arch}")
    elif tag and not pretrained:
        raise UsageError(f"{name!r} names shipped weights: create_model({name!r}, pretrained=True), or "
                         f"create_model({arch!r}) for an untrained {arch}")
    if not pretrained:
        return build_model(arch, **kwargs)

    candidates = [f"{arch}.{tag}"] if tag else list_pretrained(arch)
    if not candidates:
        raise UsageError(f"no shipped weights for {arch}; shipped: {', '.join(list_pretrained()) or 'none'}")
    problems = []
    for full in candidates:
        info = pretrained_info(full)  # an unknown name: one error listing the shipped ones
        own = dict(info.get("model_kwargs", {}))
        if "width" in kwargs:  # nin_fmnist: a width asked for replaces the weights' per-block widths
            own.pop("widths", None)
        model = build_model(arch, **{**own, **kwargs})
        shipped = load(pretrained_path(full))
        try:
            note = transfer_weights(model, shipped.state_dict(), full)
        except UsageError as e:
            problems.append(f"{full} ({info.get('model_kwargs')}): {str(e).split(': ', 1)[-1]}")
            continue
        if model.num_classes == shipped.num_classes and model.in_chans == shipped.in_chans:
            model.classes, model.meta = shipped.classes, shipped.meta
        if note:
            import warnings

            warnings.warn(f"{full}: {note}", stacklevel=2)
        return model
    raise UsageError(f"no shipped weights of {arch} fit {kwargs}: " + "; ".join(problems)
                     + ". Give the weights' own options, or pretrained=False for an untrained model")


def load(path: str | os.PathLike, device="cpu"):
    """A trained model in eval mode, with ``.classes`` and ``.meta``: a shipped weights name (see
    ``nin models``), a run folder, a .safetensors or a model.json (modelfile.load_file)."""
    from .modelfile import load_file

    if is_pretrained_name(path):
        path = pretrained_path(str(path))
    return load_file(path, device)


def load_any(path: str | os.PathLike | None = None, device="cpu"):
    """``load`` for a name / run folder / .safetensors, an onnxruntime model (onnx.OnnxModel) for a .onnx file;
    None: the default shipped model (DEFAULT)."""
    if path is None:
        path = DEFAULT
    if Path(path).suffix == ".onnx":
        from .onnx import OnnxModel

        return OnnxModel(path)
    return load(path, device)
