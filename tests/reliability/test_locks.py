"""A run folder in use is locked against a second writer (issue 20 item 7)."""
from __future__ import annotations

import subprocess
import sys

from nin.cli import main

from .common import one_error_line, snapshot


# issue 20 item 7, guards against: two processes writing one run folder, or a dead process's lock never released
def test_a_second_writer_is_refused_then_takes_over_a_dead_lock(finished_run, capsys):
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from nin.training.runfolder import lock
f = lock({str(finished_run)!r}); print("locked", flush=True); time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(finished_run)
        assert main(["train", "--resume", str(finished_run), "--quiet"]) == 2
        line = one_error_line(capsys.readouterr().err, "train")
        assert f"in use by process {holder.pid}" in line, line
        assert snapshot(finished_run) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", "--resume", str(finished_run), "--quiet"]) == 0  # finished: nothing to do, no error
    assert "nothing to do" in capsys.readouterr().out
