"""``python killable.py ARGS...`` runs ``nin ARGS...`` with hooks the kill-and-resume test observes.

NIN_TEST_EVENTS=FILE      append one line per event, each ending in time.monotonic():
                            "step N T"     an optimizer step begins (N steps were completed before it)
                            "writing N T"  last.ckpt's temp file (step N) is written, not yet renamed
                            "saved N E B T" last.ckpt now holds step N (epoch E, batch B)
NIN_TEST_STEP_SLEEP=S     sleep S seconds at the start of every step: stretches the run without
                          using the CPU and gives every step a known minimum duration
NIN_TEST_SLOW_SAVE=S      sleep S seconds between writing last.ckpt's temp file and renaming it

The hooks wrap nin's own functions and change no number: the weights are the same as without them.
"""
import os
import sys
import time
from pathlib import Path

import nin.training.runfolder as runfolder
import nin.training.trainer as train
from nin.cli import main

_log = open(os.environ["NIN_TEST_EVENTS"], "a", buffering=1)


def event(*parts) -> None:
    _log.write(" ".join(map(str, parts)) + f" {time.monotonic():.6f}\n")
    _log.flush()


_step_sleep = float(os.environ.get("NIN_TEST_STEP_SLEEP", "0"))
_slow_save = float(os.environ.get("NIN_TEST_SLOW_SAVE", "0"))
_pending = {}
_lr_at, _atomic_write, _save_checkpoint = train.lr_at, runfolder.atomic_write, runfolder.save_checkpoint


def lr_at(cfg, step, *args):  # called once at the start of every optimizer step
    event("step", step)
    if _step_sleep:
        time.sleep(_step_sleep)
    return _lr_at(cfg, step, *args)


def atomic_write(path, write):
    if Path(path).name != "last.ckpt":
        return _atomic_write(path, write)

    def slow_write(tmp):
        write(tmp)
        event("writing", _pending["step"])
        if _slow_save:
            time.sleep(_slow_save)

    return _atomic_write(path, slow_write)


def save_checkpoint(path, state):
    _pending["step"] = state["step"]
    _save_checkpoint(path, state)
    event("saved", state["step"], state["epoch"], state["batch"])


train.lr_at, runfolder.atomic_write, runfolder.save_checkpoint = lr_at, atomic_write, save_checkpoint
sys.exit(main(sys.argv[1:]))
