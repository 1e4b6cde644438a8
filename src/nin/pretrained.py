"""Trained weights that ship inside the package: ``nin_fmnist.fashion_mnist_fast`` and friends.

Names follow timm's ``architecture.tag``.  Each file is a self-contained safetensors (the model
description embedded, as ``nin export --format safetensors`` writes it) in ``nin/weights/``;
``weights/index.json`` lists them with their sha256, size, accuracy and the command that made them,
so listing needs no tensor.  Nothing is downloaded and nothing is unpickled.

``publish(run_dir, name, command)`` is how a file gets here: it evaluates the run's model on the
real test set (without TTA, with flip TTA and with the model's own, in fp32 and bf16) and writes the file and
its index entry; ``make weights`` runs the recipes and publishes them.
"""
from __future__ import annotations

import hashlib
import json
import os
from datetime import date
from pathlib import Path

from .errors import CheckpointError, UsageError

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


def load_pretrained(name: str | None = None, device="cpu"):
    """The shipped model ``name`` (default: DEFAULT) in eval mode, as ``nin.load`` returns a run's."""
    from .export import load

    return load(pretrained_path(name or DEFAULT), device)


def publish(run_dir: str | os.PathLike, name: str, command: str, *, default: bool = False,
            data_dir: str | None = None) -> dict:
    """Copy a finished run's model into the package as ``name`` with its provenance and accuracy."""
    import dataclasses

    from .data import load_dataset
    from .engine import cpu_supports_bf16
    from .evaluation import evaluate
    from .export import load, write_safetensors
    from .fsutil import atomic_write
    from .runfolder import _git_commit
    from . import __version__

    run_dir = Path(run_dir)
    model = load(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    ds = load_dataset(model.meta.dataset, data_dir)
    accuracy = {}
    for precision in ("fp32", "bf16"):
        # the model's own TTA too (shift: 18 views, measured in bf16 only where the CPU runs it natively)
        own = (model.meta.tta,) if precision == "fp32" or cpu_supports_bf16() else ()
        accuracy[precision] = {tta: evaluate(model, ds.test, tta=tta, precision=precision).accuracy
                               for tta in dict.fromkeys(("none", "flip", *own))}
    arch = name.split(".")[0]
    if arch != model.meta.model:
        raise UsageError(f"{name}: the name's architecture is {arch!r} but the run trained {model.meta.model!r}")
    params = sum(p.numel() for p in model.parameters())
    info = {**model.meta.info, "name": name, "dataset": model.meta.dataset, "recipe": config["config"]["recipe"],
            "config": config["config"], "command": command, "nin_version": __version__,
            "git_commit": config.get("git_commit") or _git_commit(), "date": date.today().isoformat(),
            "test_images": len(ds.test), "accuracy": accuracy, "params": params}
    meta = dataclasses.replace(model.meta, dataset=model.meta.dataset.split(":")[0], split=None, info=info)
    WEIGHTS_DIR.mkdir(exist_ok=True)
    path = write_safetensors(model, meta, WEIGHTS_DIR / f"{name}.safetensors")
    entry = {"name": name, "file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
             "bytes": path.stat().st_size, "model": model.meta.model, "model_kwargs": model.meta.model_kwargs,
             "params": params, "input_size": model.meta.input_size, "dataset": meta.dataset,
             "recipe": info["recipe"], "command": command, "accuracy": accuracy, "tta": model.meta.tta,
             "precision": model.meta.precision, "date": info["date"], "git_commit": info["git_commit"],
             "default": default}
    idx = _index()
    if default:
        for other in idx.values():
            if other["model"] == entry["model"]:
                other["default"] = False
    idx[name] = entry
    atomic_write(INDEX, lambda tmp: Path(tmp).write_text(json.dumps(idx, indent=2) + "\n"))
    return entry


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

    from .classes import ClassMismatch, match_classes, normalize

    own = model.state_dict()
    if set(state) != set(own):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise UsageError(f"{source}: its weights are not of this architecture ({len(missing)} tensor(s) missing, "
                         f"e.g. {(missing or extra)[0]!r}; {len(extra)} unknown)")
    class_keys, input_keys = _class_map_and_input_keys(model)
    note, rows = "", None
    if source_classes is not None and classes is not None:
        known = {normalize(c) for c in source_classes}
        from .classes import read_class_map
        mapped = {normalize(k) for k in read_class_map(class_map)}
        if not any(normalize(c) in known or normalize(c) in mapped for c in classes):
            note = (f"none of the {len(classes)} classes is a class of {source} ({', '.join(source_classes)}): "
                    "its class-map layer starts fresh (a new task)")
        else:
            try:
                rows = torch.tensor(match_classes(list(classes), list(source_classes), class_map,
                                                  where="the dataset"), dtype=torch.long)
            except ClassMismatch as e:
                raise ClassMismatch(f"{source}: {e}") from None
    elif any(state[k].shape != own[k].shape for k in class_keys):
        note = f"the class-map layer starts fresh: {model.num_classes} classes, the weights have another number"
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


def main(argv: list[str] | None = None) -> int:
    """``python -m nin.pretrained RUN NAME --command "..." [--default]``: publish a run's model (make weights)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m nin.pretrained", description=main.__doc__)
    p.add_argument("run")
    p.add_argument("name", help="architecture.tag, e.g. nin_fmnist.fashion_mnist_fast")
    p.add_argument("--command", required=True, help="the command that trained the run (recorded)")
    p.add_argument("--default", action="store_true", help="the architecture's default weights")
    args = p.parse_args(argv)
    entry = publish(args.run, args.name, args.command, default=args.default)
    acc = entry["accuracy"]
    print(f"{entry['file']}: {entry['bytes']:,} bytes, test accuracy fp32 {acc['fp32']['none']:.4f} "
          f"(flip TTA {acc['fp32']['flip']:.4f}), bf16 {acc['bf16']['none']:.4f} ({acc['bf16']['flip']:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
