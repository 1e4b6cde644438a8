"""Nothing a user has is overwritten or left half-written: packs into a used folder, resumes of read-only
run folders, a training whose output pipe closes (issue 32, items 5-7)."""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nin.cli import main

from .common import TINY_ARGS, one_error_line, snapshot


def _epochs(n: int, quiet: bool = True) -> list[str]:
    """TINY_ARGS with ``n`` epochs (and without --quiet unless ``quiet``)."""
    args = [a for a in TINY_ARGS if quiet or a != "--quiet"]
    args[args.index("--epochs") + 1] = str(n)
    return args


def _image_folder(root: Path, n_per_class: int = 10, classes=("a", "b", "c")) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.fixture
def earlier_pack(tmp_path, capsys) -> tuple[Path, Path]:
    """(image folder, a folder holding a pack of it in 5 + 2 small shards and a file of the user's)."""
    pytest.importorskip("webdataset")
    src = _image_folder(tmp_path / "images")
    out = tmp_path / "shards"
    assert main(["data", "pack", f"folder:{src}", "--out", str(out), "--shard-size", "5"]) == 0
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    return src, out


# issue 32 item 5: a pack into a folder that holds files is refused, and nothing there changes
def test_pack_refuses_a_folder_that_is_not_empty(earlier_pack, capsys):
    src, out = earlier_pack
    before = snapshot(out)
    assert main(["data", "pack", f"folder:{src}", "--out", str(out), "--shard-size", "50"]) == 2
    line = one_error_line(capsys.readouterr().err, "data")
    assert str(out) in line and "not empty" in line and "--overwrite" in line, line
    assert snapshot(out) == before


# issue 32 item 5: --overwrite replaces the earlier pack's shards and index (no stale shard stays beside the
# new index) and keeps the user's other files
def test_pack_overwrite_replaces_only_its_own_files(earlier_pack, capsys):
    from nin.data.shards import open_shards

    src, out = earlier_pack
    assert len(list(out.glob("train-*.tar"))) == 5
    assert main(["data", "pack", f"folder:{src}", "--out", str(out), "--shard-size", "50", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "notes.txt", "train-000000.tar", "val-000000.tar"]
    assert (out / "notes.txt").read_text() == "mine"
    index = json.loads((out / "index.json").read_text())
    assert [s["file"] for s in index["splits"]["train"]["shards"]] == ["train-000000.tar"]
    ds = open_shards(f"wds:{out}")
    assert len(ds.train) + len(ds.test) == 30


# issue 32 item 5: an --overwrite pack that fails while writing leaves the earlier pack as it was
def test_pack_overwrite_that_fails_keeps_the_earlier_pack(earlier_pack, capsys, monkeypatch):
    import nin.data.shards as shards
    from nin.errors import NinError

    src, out = earlier_pack
    before = snapshot(out)
    real, calls = shards._write_shard, []

    def fail_on_the_second(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise NinError("disk full (injected)")
        return real(*args, **kw)

    monkeypatch.setattr(shards, "_write_shard", fail_on_the_second)
    assert main(["data", "pack", f"folder:{src}", "--out", str(out), "--shard-size", "5", "--overwrite"]) == 1
    assert "injected" in one_error_line(capsys.readouterr().err, "data")
    assert snapshot(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no staging folder left behind


def _read_only(monkeypatch, folder: Path) -> None:
    """Make ``folder`` read-only for this process, as a read-only mount is: every call that would create,
    change, rename or remove a file under it fails with EROFS.  (Tests run as root, which file modes do
    not stop, and mounting needs privileges a test does not have.)"""
    root = Path(folder).resolve()

    def inside(path) -> bool:
        if isinstance(path, int):
            return False
        p = Path(os.fsdecode(path))
        p = (p.parent.resolve() / p.name) if p.name else p.resolve()
        return p == root or root in p.parents

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    real_open, real_os_open = builtins.open, os.open

    def open_(file, mode="r", *args, **kw):
        if any(c in mode for c in "wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kw)

    def os_open(path, flags, *args, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND) and inside(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kw)

    def guard(real):
        def call(*paths, **kw):
            for p in paths[:2]:
                if inside(p):
                    refuse(p)
            return real(*paths, **kw)
        return call

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    for name in ("replace", "rename", "unlink", "remove", "mkdir", "rmdir", "chmod"):
        monkeypatch.setattr(os, name, guard(getattr(os, name)))


# issue 32 item 6: resuming a finished run from a read-only folder says it is finished: no traceback, no lock
def test_resume_of_a_finished_run_in_a_read_only_folder(finished_run, capsys, monkeypatch):
    before = snapshot(finished_run)
    _read_only(monkeypatch, finished_run)
    assert main(["train", "--resume", str(finished_run)]) == 0
    cap = capsys.readouterr()
    assert "already finished" in cap.out and "nothing to do" in cap.out, cap.out
    assert "Traceback" not in cap.err and "Errno" not in cap.err, cap.err
    monkeypatch.undo()
    assert snapshot(finished_run) == before


# issue 32 item 6: a run with training left in a read-only folder: one line naming the folder, before any step
def test_resume_of_an_unfinished_run_in_a_read_only_folder(tmp_path, data_dir, capsys, monkeypatch):
    run = tmp_path / "run"
    # two epochs of 4 steps, stopped after 2 steps of the first
    assert main(["train", "--data-dir", str(data_dir), "--out", str(run), *_epochs(2), "--max-steps", "2"]) == 0
    capsys.readouterr()
    before = snapshot(run)
    _read_only(monkeypatch, run)
    assert main(["train", "--resume", str(run)]) == 2
    cap = capsys.readouterr()
    line = one_error_line(cap.err, "train")
    assert str(run) in line and "cannot be written" in line and "Read-only file system" in line, line
    assert "training" not in cap.out
    monkeypatch.undo()
    assert snapshot(run) == before


# issue 32 item 7: `nin train ... | head -1`: the reader goes away, the run goes on to its end
def test_training_whose_output_pipe_closes_finishes(tmp_path, data_dir):
    run = tmp_path / "run"
    args = _epochs(2, quiet=False)  # two epochs, with their lines
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}  # each line reaches the pipe at once
    p = subprocess.Popen([sys.executable, "-m", "nin", "train", "--data-dir", str(data_dir), "--out", str(run),
                          *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    first = p.stdout.readline().decode()
    p.stdout.close()  # as `| head -1` does after its line
    err = p.stderr.read().decode()
    assert p.wait(timeout=600) == 0, err
    assert first.startswith("training "), first
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert (run / "best.safetensors").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2


# issue 20 item 10, guards against: eval failing (results lost) on a run folder it cannot write
def test_eval_on_a_folder_it_cannot_write_prints_and_warns(finished_run, data_dir, capsys, monkeypatch):
    import nin.fsutil

    real = nin.fsutil.atomic_write

    def refuse(path, write):
        if "eval" in str(path):
            raise nin.errors.NinError(f"{path}: cannot write (Read-only file system)")
        return real(path, write)

    import nin.errors
    monkeypatch.setattr(nin.fsutil, "atomic_write", refuse)  # evaluation imports it at each call
    assert main(["eval", str(finished_run), "--data-dir", str(data_dir)]) == 0
    cap = capsys.readouterr()
    assert "accuracy" in cap.out and "Traceback" not in cap.err
    assert [line for line in cap.err.splitlines() if line.strip()][0].startswith("warning:")
