"""The run folder: config.json, metrics.csv/.jsonl, curves.png, last.ckpt, the model, status.json, a lock.

Every file is written atomically (``fsutil.atomic_write``) and loads without executing code.  While a
process trains in a folder it holds an advisory lock on ``.lock`` (released by the kernel on any
exit, so a killed run leaves no stale lock); a second process gets one clear error naming the PID.
``status.json`` says why the run stopped (running, finished, stopped, diverged, interrupted; a
"running" run whose process is gone was killed)."""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from ..errors import CheckpointError, RunLocked, UsageError
from ..fsutil import atomic_write

CKPT_FORMAT = "nin-ckpt/1"
METRIC_FIELDS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr",
                 "images_per_sec", "seconds", "images"]


def prepare(out: str | os.PathLike, resume: bool) -> Path:
    """Create the run folder; refuse to reuse one that holds a run unless resuming."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: is a file, not a folder; choose another --out")
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
    from .. import __version__

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
    if any(r.get("val_acc") is not None for r in history):
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


def load_checkpoint(path: Path, state_keys: tuple[str, ...] = ()) -> dict:
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
    missing = [k for k in (*CKPT_KEYS, *state_keys) if k not in state]
    if missing or not isinstance(state["config"], dict) or not isinstance(state["model"], dict):
        raise CheckpointError(f"{path}: an incomplete nin checkpoint (missing {', '.join(missing) or 'config/model'})")
    return state


CKPT_KEYS = ("model", "optimizer", "world_size", "config")  # the training state's keys: trainer.TrainState


def load_for_resume(run: str | os.PathLike, state_keys: tuple[str, ...] = ()) -> dict:
    """The run's last.ckpt, checked against its config.json; removes temp files a killed write left.

    A last.ckpt copied in from a run of another model (model, its arguments, dataset, input size or
    seed differ from the folder's config.json) is refused: resuming it would overwrite this run's
    best.safetensors and metrics with another run's.  (Other fields, e.g. --epochs, may be edited.)"""
    run = Path(run)
    if not run.is_dir():
        raise CheckpointError(f"{run}: no such run folder")
    path = run / "last.ckpt"
    state = load_checkpoint(path, state_keys)
    if (run / "config.json").exists():
        folder = read_config(run)
        ckpt = json.loads(json.dumps(state["config"]))
        differ = [k for k in ("model", "model_kwargs", "dataset", "resize", "seed") if folder.get(k) != ckpt.get(k)]
        if differ:
            raise CheckpointError(f"{path}: belongs to another run ({', '.join(differ)} differ from "
                                  f"{run / 'config.json'})")
    for tmp in run.glob(".*.tmp"):  # a write killed before its rename; the real file is intact
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only folder: harmless, and a run that must write says so (Run.status)
            pass
    return state


# --- the lock and the status ----------------------------------------------------------------------
LOCK_NAME, STATUS_NAME = ".lock", "status.json"


def _lock_holder(path: Path) -> int | None:
    """The PID holding an flock on ``path`` (Linux's /proc/locks), or None if unknown."""
    try:
        ino = os.stat(path).st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(ino):
                return int(parts[4])
    except (OSError, ValueError):
        pass
    return None


def lock(run: Path):
    """Hold an exclusive advisory lock on RUN/.lock; RunLocked (one line naming the PID) if a live process
    holds it.  Returns the open file: the lock lasts until it is closed or the process ends."""
    import fcntl

    path = Path(run) / LOCK_NAME
    f = open(path, "a")  # never truncated or rewritten: the folder's files stay as they were
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _lock_holder(path)
        f.close()
        who = f"process {holder}" if holder else "another process"
        raise RunLocked(f"{run}: the run folder is in use by {who} (nin train is running there); wait for it "
                        "to finish or stop it first") from None
    return f


def write_status(run: Path, state: str, reason: str = "", **extra) -> None:
    import time

    doc = {"state": state, "reason": reason, "pid": os.getpid(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           **extra}
    atomic_write(Path(run) / STATUS_NAME, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2)))


def read_status(run: str | os.PathLike) -> dict | None:
    """status.json, with state "killed" for a run marked running whose process is gone (None: no file)."""
    path = Path(run) / STATUS_NAME
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if doc.get("state") == "running" and (Path(run) / LOCK_NAME).exists():
        import fcntl

        with open(Path(run) / LOCK_NAME, "a") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)
                doc = {**doc, "state": "killed", "reason": "the training process ended without a word "
                       "(killed, or the machine stopped); resume it with nin train --resume"}
            except BlockingIOError:
                pass
    return doc


def _unwritable(folder: Path) -> str | None:
    """Why no file can be created in ``folder`` (None: one can; the probe is removed at once)."""
    import tempfile

    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", suffix=".tmp", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return e.strerror or str(e)
    return None


# --- one run folder, as the training loop writes it -------------------------------------------------
class Run:
    """The folder a training process writes (main process only): locked for the run's life.

    A resumed run whose folder cannot be written (read-only) is opened without its lock: a finished run
    then says so and writes nothing; one that has training left stops at its first write, the
    "running" status, before any step (``status``), with one line naming the folder."""

    def __init__(self, path: Path, lock_file, writer=None, cannot_write: str | None = None) -> None:
        self.path, self._lock, self.writer, self.selected = path, lock_file, writer, "no model yet"
        self.cannot_write = cannot_write  # why the folder cannot be written (None: it can)

    @classmethod
    def open(cls, path, setup, *, fresh: bool, tensorboard: bool = False) -> "Run":
        path = prepare(path, resume=not fresh) if fresh else Path(path)
        try:
            run = cls(path, lock(path))
        except OSError as e:  # no .lock can be created or opened: a read-only folder (EROFS, EACCES)
            if fresh:
                raise UsageError(f"{path}: cannot write the run folder ({e.strerror or e})") from None
            run = cls(path, None, cannot_write=e.strerror or str(e))
        if not fresh and run.cannot_write is None:
            run.cannot_write = _unwritable(path)  # .lock opened, but new files may still be refused
        if setup.streamed:  # streamed collections: list unreadable images
            from ..data.stream import write_bad_files

            setup.on_bad_files(lambda bad: write_bad_files(path / "bad_files.txt", bad))
        if fresh:
            cfg = setup.cfg.to_dict()
            if cfg.get("data_dir"):
                cfg["data_dir"] = str(Path(cfg["data_dir"]).expanduser().resolve())
            write_config(path, cfg, {"device": str(setup.device), "precision": str(setup.amp_dtype or "fp32"),
                                     "world_size": setup.dist.world_size, "data_source": setup.ds.source,
                                     "data_path": "stream" if setup.streamed else "memory",
                                     "model_kwargs": setup.meta.model_kwargs})
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                run.close()
                raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            run.writer = SummaryWriter(str(path / "tensorboard"))
        return run

    def kept(self) -> str:
        last = self.path / "last.ckpt"
        return f"; the last good checkpoint {last} is kept" if last.exists() else ""

    def checkpoint(self, state: dict | None) -> None:
        """Write ``state`` (``Setup.state_dict``: None when the weights are not finite) as last.ckpt."""
        if state is not None:
            save_checkpoint(self.path / "last.ckpt", state)

    def save_model(self, setup, state, why: str, row: dict | None = None) -> None:
        """The model a user gets (best.safetensors + model.json): the weights evaluated (EMA when on).
        ``row`` is the metrics of those weights (default: the last finished epoch's)."""
        import dataclasses

        from ..modelfile import save_model

        last = row if row is not None else (state.history[-1] if state.history else {})
        info = {"selected": why, "epoch": last.get("epoch"), "step": state.step, "recipe": setup.cfg.recipe,
                "val_acc": last.get("val_acc"),
                "test_acc": None if last.get("test_images") else last.get("test_acc")}  # a subset's is no model's
        save_model(self.path, setup.eval_model, dataclasses.replace(setup.meta, info=info))
        self.selected = f"{why}, epoch {last.get('epoch')}" if last.get("epoch") else why

    def epoch_done(self, setup, state, row: dict) -> None:
        write_metrics(self.path, state.history)
        plot_curves(self.path, state.history, f"{setup.cfg.recipe}: {setup.cfg.model} on {setup.cfg.dataset}")
        self.checkpoint(setup.state_dict(state))
        if self.writer is not None:
            for k in ("train_loss", "train_acc", "val_acc", "test_acc", "lr", "images_per_sec"):
                if row.get(k) is not None:
                    self.writer.add_scalar(k, row[k], row["epoch"])
            self.writer.flush()

    def stopped_at_max_steps(self, setup, state, row: dict) -> None:
        """--max-steps ended the run mid-epoch: keep the exact point and a usable model."""
        self.checkpoint(setup.state_dict(state))
        if setup.val_loader is None or not (self.path / "best.safetensors").exists():
            self.save_model(setup, state, f"step {state.step} (stopped by --max-steps)", {**row, "epoch": None})
        self.status("stopped", f"--max-steps {setup.cfg.max_steps} at epoch {state.epoch + 1}, batch {state.batch}",
                    epoch=state.epoch, step=state.step)

    def status(self, state: str, reason: str, **extra) -> None:
        if self.cannot_write is not None and state == "running":  # training starts: it must write here
            raise UsageError(f"{self.path}: the run has training left but its folder cannot be written "
                             f"({self.cannot_write}); make it writable, or copy it and resume the copy")
        try:
            write_status(self.path, state, reason, **extra)
        except Exception:  # the status is a note; never let it hide the real error
            pass

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self._lock is not None:
            self._lock.close()
            self._lock = None
