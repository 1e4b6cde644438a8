"""Checkpoints and run files are written atomically: temp file + fsync + rename (+ folder fsync).

A process killed in the middle of a write, or a write that fails (full disk), leaves the previous
file whole and loadable.  A full disk is a clear one-line error, not a traceback.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nin.cli import main
from nin.fsutil import atomic_write
from nin.training.runfolder import load_checkpoint, save_checkpoint

from .common import TINY_ARGS, one_error_line


def _fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def test_write_order_is_temp_fsync_rename_then_folder_fsync(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", _fd_path(fd))), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(("replace", str(a), str(b))), real_replace(a, b))[1])
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, {"model": {"w": torch.arange(3.0)}})
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync"]
    tmp = calls[0][1]
    assert Path(tmp).parent == tmp_path and Path(tmp).name.startswith(".last.ckpt.") and tmp.endswith(".tmp")
    assert calls[1] == ("replace", tmp, str(path))  # the temp file, synced, becomes the checkpoint
    assert calls[2] == ("fsync", str(tmp_path))  # then the rename itself is made durable
    assert torch.equal(load_checkpoint_raw(path)["model"]["w"], torch.arange(3.0))


def load_checkpoint_raw(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "last.ckpt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}})
    old = path.read_bytes()

    def dies_halfway(tmp):
        Path(tmp).write_bytes(old[: len(old) // 2])
        raise KeyboardInterrupt  # any interruption between the first byte and the rename

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, dies_halfway)
    assert path.read_bytes() == old and os.listdir(tmp_path) == ["last.ckpt"]


KILLED_WRITER = textwrap.dedent("""
    import sys, time, torch
    from pathlib import Path
    from nin.training import runfolder
    path = Path(sys.argv[1])
    runfolder.save_checkpoint(path, {"model": {"w": torch.full((50_000,), 1.0)}, "version": 1})
    real = Path.write_bytes
    def torn(self, data):  # the second save writes half its bytes, then hangs until killed
        with open(self, "wb") as f:
            f.write(data[: len(data) // 2]); f.flush()
        print("half", flush=True)
        time.sleep(60)
    Path.write_bytes = torn
    runfolder.save_checkpoint(path, {"model": {"w": torch.full((50_000,), 2.0)}, "version": 2})
""")


def test_sigkill_in_the_middle_of_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "half"  # the new checkpoint is half on disk
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    temps = list(tmp_path.glob(".last.ckpt.*.tmp"))
    assert len(temps) == 1 and temps[0].stat().st_size > 0  # the torn write, under a temp name
    state = load_checkpoint_raw(path)  # the previous checkpoint, whole
    assert state["version"] == 1 and torch.equal(state["model"]["w"], torch.full((50_000,), 1.0))


# --- full disk ----------------------------------------------------------------------------------
def test_full_disk_simulated_keeps_the_previous_checkpoint(tmp_path, data_dir, capsys, monkeypatch):
    """ENOSPC part-way through writing last.ckpt: one clear error, exit 1, the previous last.ckpt
    (here the one written before the first step) intact and loadable, no temp file left."""
    real = Path.write_bytes
    writes = []

    def enospc(self, data):
        if self.name.startswith(".last.ckpt."):
            writes.append(self)
            if len(writes) == 2:
                real(self, data[:100])  # the disk fills up part-way through the second checkpoint
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", enospc)
    run = tmp_path / "run"
    rc = main(["train", "--data-dir", str(data_dir), "--out", str(run), "--max-steps", "2", *TINY_ARGS])
    assert rc == 1 and len(writes) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"{run / 'last.ckpt'}: cannot write (No space left on device)" in line
    assert "the previous last.ckpt is unchanged" in line
    assert not list(run.glob(".*.tmp"))
    assert load_checkpoint(run / "last.ckpt")["step"] == 0


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=64k tmpfs "$1"', "sh", "/tmp"],
                       capture_output=True, timeout=30)
    return r.returncode == 0


# Runs inside a private mount namespace (unshare -rm), so the tmpfs vanishes with it.
FULL_DISK = """
mount -t tmpfs -o size=120k tmpfs "$MNT" || exit 99
"$PY" -m nin train --data-dir "$DATA" --out "$MNT/run" "$@" >/dev/null 2>"$LOGS/err1"; echo "rc1=$?"
ls -A "$MNT/run" | tr '\\n' ' '; echo
"$PY" -c "import sys; from nin.training.runfolder import load_checkpoint; print('step', load_checkpoint(sys.argv[1])['step'])" \\
    "$MNT/run/last.ckpt"
mount -o remount,size=20m "$MNT" || exit 98
"$PY" -m nin train --resume "$MNT/run" --quiet >/dev/null 2>"$LOGS/err2"; echo "rc2=$?"
ls -A "$MNT/run" | tr '\\n' ' '; echo
"""


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a tmpfs here (no user namespaces)")
def test_full_disk_on_a_small_tmpfs_then_resume_after_freeing_space(tmp_path, data_dir):
    """A real full disk: a 120 KB tmpfs holds the first checkpoint (step 0) but fills up during the
    first epoch's saves.  Then the tmpfs grows (space freed) and --resume finishes the run."""
    (tmp_path / "mnt").mkdir()
    env = {**os.environ, "MNT": str(tmp_path / "mnt"), "PY": sys.executable, "DATA": str(data_dir),
           "LOGS": str(tmp_path), "OMP_NUM_THREADS": "1", "MPLCONFIGDIR": str(tmp_path / "mpl")}
    # matplotlib announces on stderr when it first builds its font cache: build it before, outside the test
    subprocess.run([sys.executable, "-c", "import matplotlib.font_manager"], env=env, capture_output=True, timeout=120)
    r = subprocess.run(["unshare", "-rm", "bash", "-c", FULL_DISK, "bash", *TINY_ARGS], env=env,
                       capture_output=True, text=True, timeout=240)
    if r.returncode in (98, 99):
        pytest.skip("mount failed inside the namespace")
    out = r.stdout.splitlines()
    assert out[0] == "rc1=1", r.stdout + r.stderr + (tmp_path / "err1").read_text()
    line = one_error_line((tmp_path / "err1").read_text(), "train")
    assert "cannot write (No space left on device)" in line and str(tmp_path / "mnt" / "run") in line
    files = out[1].split()
    assert "last.ckpt" in files and not [f for f in files if f.endswith(".tmp")], files  # no torn files
    assert out[2] == "step 0", r.stdout + r.stderr  # the checkpoint taken before the first step loads
    assert out[3] == "rc2=0", r.stdout + (tmp_path / "err2").read_text()  # space freed: --resume finishes
    assert {"last.ckpt", "best.safetensors", "model.json", "metrics.csv", "curves.png"} <= set(out[4].split())


# issue 20 item 6, guards against: atomic writes leaving files 0600 whatever the umask
def test_written_files_honour_the_umask(tmp_path, data_dir):
    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        assert main(["train", "--data-dir", str(data_dir), "--out", str(run), *TINY_ARGS]) == 0
    finally:
        os.umask(old)
    for name in ("config.json", "metrics.csv", "last.ckpt", "best.safetensors", "model.json", "curves.png"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, name
