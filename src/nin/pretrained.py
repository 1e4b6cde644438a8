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


def load_matching(model, state: dict, source: str) -> list[str]:
    """Copy every tensor of ``state`` whose name and shape fit ``model``; the rest keep their init.
    Returns the names left out (e.g. a class-map conv of another width when num_classes differs).
    Refuses a state that shares no tensor with the model (another architecture)."""
    import torch

    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not fits:
        raise UsageError(f"{source}: no weight fits {type(model).__name__} (another architecture?)")
    with torch.no_grad():
        for k, v in fits.items():
            own[k].copy_(v)
    return sorted(set(own) - set(fits))


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
