"""Publish a finished run's model into the package as shipped weights: ``python tools/publish_weights.py RUN NAME
--command "..." [--default]`` (``make weights`` runs the recipes and this).

It evaluates the run's model on the real test set (without TTA, with flip TTA and with the model's own, in
fp32 and bf16 where the CPU runs it natively) and writes ``src/nin/weights/NAME.safetensors`` and its entry in
``weights/index.json`` (sha256, size, accuracy, the command that made it).  A maintainer's tool, not part of
the package.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from datetime import date
from pathlib import Path

from nin.errors import UsageError


def publish(run_dir: str | os.PathLike, name: str, command: str, *, default: bool = False,
            data_dir: str | None = None) -> dict:
    """Copy a finished run's model into the package as ``name`` with its provenance and accuracy."""
    from nin import __version__
    from nin.data import load_dataset
    from nin.devices import cpu_supports_bf16
    from nin.evaluation import evaluate
    from nin.fsutil import atomic_write
    from nin.hub import INDEX, WEIGHTS_DIR, _index, load
    from nin.modelfile import write_safetensors
    from nin.training.runfolder import _git_commit

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


def main(argv: list[str] | None = None) -> int:
    """``python tools/publish_weights.py RUN NAME --command "..." [--default]``: publish a run's model."""
    import argparse

    p = argparse.ArgumentParser(prog="python tools/publish_weights.py", description=main.__doc__)
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
