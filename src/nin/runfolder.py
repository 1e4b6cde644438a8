"""The run folder: config.json, metrics.csv/.jsonl, curves.png and last.ckpt (atomic, safe to load)."""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from .errors import CheckpointError, UsageError
from .fsutil import atomic_write

CKPT_FORMAT = "nin-ckpt/1"
METRIC_FIELDS = ["epoch", "train_loss", "train_acc", "test_acc", "lr", "images_per_sec", "seconds"]


def prepare(out: str | os.PathLike, resume: bool) -> Path:
    """Create the run folder; refuse to reuse one that holds a run unless resuming."""
    out = Path(out)
    if not resume and out.exists() and any(out.iterdir()):
        raise UsageError(f"{out}: the folder already holds a run; use --resume {out} to continue it, "
                         f"or --out to choose another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{out}: cannot write the run folder ({e.strerror or e})") from None
    return out


def _git_commit() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def write_config(out: Path, cfg: dict, extra: dict) -> None:
    from . import __version__

    doc = {"config": cfg, **extra,
           "versions": {"nin": __version__, "torch": torch.__version__, "python": platform.python_version()},
           "git_commit": _git_commit(), "machine": platform.machine(), "cpu_count": os.cpu_count()}
    atomic_write(out / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2)))


def read_config(run: Path) -> dict:
    path = Path(run) / "config.json"
    try:
        return json.loads(path.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot read the run's config ({e})") from None


def write_metrics(out: Path, history: list[dict]) -> None:
    """Rewrite both metric files from the full history (so a resumed run never duplicates rows)."""
    def write_csv(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(history)

    atomic_write(out / "metrics.csv", write_csv)
    atomic_write(out / "metrics.jsonl",
                 lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in history)))


def read_metrics(out: str | os.PathLike) -> list[dict]:
    """The per-epoch rows write_metrics wrote (empty if the run has not finished an epoch)."""
    f = Path(out) / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def curves_figure(history: list[dict], title: str = "", *, epochs: int | None = None):
    """train loss, train acc, test acc (and val acc when recorded) against epoch on one axis, like the
    book's Animator.  A matplotlib Figure without pyplot: no global backend is chosen or changed, so it
    is safe inside a notebook.  ``epochs`` fixes the x axis to the whole run (the live figure)."""
    from matplotlib.figure import Figure

    xs = [r["epoch"] for r in history]
    fig = Figure(figsize=(4.5, 3.2), dpi=120)
    ax = fig.add_subplot()
    ax.plot(xs, [r["train_loss"] for r in history], "-", label="train loss")
    ax.plot(xs, [r["train_acc"] for r in history], "m--", label="train acc")
    ax.plot(xs, [r["test_acc"] for r in history], "g-.", label="test acc")
    if any("val_acc" in r for r in history):
        val = [(r["epoch"], r["val_acc"]) for r in history if r.get("val_acc") is not None]
        ax.plot([e for e, _ in val], [v for _, v in val], "c:", label="val acc")
    ax.set_xlabel("epoch")
    ax.set_xlim(0.5, max([*xs, epochs or 0, 1]) + 0.5)
    ax.grid(True, alpha=0.3)
    if history:
        ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_curves(out: Path, history: list[dict], title: str) -> None:
    """Write the run's curves.png (``curves_figure``)."""
    fig = curves_figure(history, title)
    atomic_write(Path(out) / "curves.png", lambda tmp: fig.savefig(tmp, format="png"))


def save_checkpoint(path: Path, state: dict) -> None:
    """torch.save of tensors and plain containers only, so it loads with weights_only=True.

    Serialised in memory first: a full disk then fails as an OSError (a clear NinError from
    atomic_write) rather than torch's opaque RuntimeError, and the previous last.ckpt is kept."""
    buf = io.BytesIO()
    torch.save({"format": CKPT_FORMAT, **state}, buf)
    data = buf.getvalue()
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def load_checkpoint(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no checkpoint to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:  # truncated zip, pickle payloads refused by the weights-only unpickler, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise CheckpointError(f"{path}: not a loadable nin checkpoint ({first[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path}: not a nin checkpoint (expected format {CKPT_FORMAT})")
    missing = [k for k in CKPT_KEYS if k not in state]
    if missing or not isinstance(state["config"], dict) or not isinstance(state["model"], dict):
        raise CheckpointError(f"{path}: an incomplete nin checkpoint (missing {', '.join(missing) or 'config/model'})")
    return state


CKPT_KEYS = ("model", "optimizer", "epoch", "batch", "step", "sums", "epoch_seconds", "best_acc", "history",
             "train_seconds", "world_size", "config")


def load_for_resume(run: str | os.PathLike) -> dict:
    """The run's last.ckpt, checked against its config.json; removes temp files a killed write left.

    A last.ckpt copied in from a run of another model (model, its arguments, dataset, input size or
    seed differ from the folder's config.json) is refused: resuming it would overwrite this run's
    best.safetensors and metrics with another run's.  (Other fields, e.g. --epochs, may be edited.)"""
    run = Path(run)
    if not run.is_dir():
        raise CheckpointError(f"{run}: no such run folder")
    path = run / "last.ckpt"
    state = load_checkpoint(path)
    if (run / "config.json").exists():
        folder = read_config(run)
        ckpt = json.loads(json.dumps(state["config"]))
        differ = [k for k in ("model", "model_kwargs", "dataset", "resize", "seed") if folder.get(k) != ckpt.get(k)]
        if differ:
            raise CheckpointError(f"{path}: belongs to another run ({', '.join(differ)} differ from "
                                  f"{run / 'config.json'})")
    for tmp in run.glob(".*.tmp"):  # a write killed before its rename; the real file is intact
        tmp.unlink(missing_ok=True)
    return state
