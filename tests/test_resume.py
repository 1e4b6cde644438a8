"""--resume: another run's checkpoint is refused; a mid-epoch checkpoint resumes bit-identically.
(Raising --epochs: tests/test_resume_options.py; kills: tests/reliability/test_kill_resume.py.)"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from nin.cli import main

from .tinyrun import QUIET, tiny


# guards against: --resume continuing from another run's checkpoint (data, size, seed, model)
@pytest.mark.parametrize("field,value", [("dataset", "mnist"), ("resize", 32), ("seed", 7),
                                         ("model_kwargs", {"width": 5})])
def test_resume_refuses_another_runs_checkpoint(data, tmp_path, capsys, field, value):
    from nin.training.trainer import train

    train(tiny(data, epochs=1), tmp_path / "run", **QUIET)
    ck = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    ck["config"][field] = value
    torch.save(ck, tmp_path / "run" / "last.ckpt")
    assert main(["train", "--resume", str(tmp_path / "run"), "--quiet"]) == 1
    assert f"belongs to another run ({field}" in capsys.readouterr().err


# guards against: a mid-epoch checkpoint at the wrong batch, so a resume trains other steps
def test_save_every_checkpoints_hold_their_exact_position_and_resume_bit_identically(data, tmp_path, monkeypatch):
    import shutil

    import nin.training.runfolder as rf
    from nin.training.trainer import train

    cfg = tiny(data, epochs=2, model_kwargs={"width": 4, "drop_rate": 0.2})
    train(cfg, tmp_path / "full", **QUIET)
    saved = []
    real = rf.save_checkpoint

    def spy(path, state):
        real(path, state)
        saved.append((state["step"], state["epoch"], state["batch"]))
        shutil.copy(path, tmp_path / f"ck-{state['step']}-{len(saved)}")

    monkeypatch.setattr(rf, "save_checkpoint", spy)
    train(dataclasses.replace(cfg, save_every=1e-9), tmp_path / "part", **QUIET)  # a save after every step
    monkeypatch.setattr(rf, "save_checkpoint", real)
    mid = [(s, e, b) for s, e, b in saved if b not in (0,)]
    assert mid, saved
    for step, epoch, batch in saved:
        assert batch == step - epoch * 4, (step, epoch, batch)
    # resume from a mid-epoch checkpoint (epoch 2, batch 1): same weights as the uninterrupted run
    step, epoch, batch = next(x for x in mid if x[1] == 1)
    i = saved.index((step, epoch, batch)) + 1
    shutil.copy(tmp_path / f"ck-{step}-{i}", tmp_path / "part" / "last.ckpt")
    train(None, resume=tmp_path / "part", **QUIET)
    a = torch.load(tmp_path / "full" / "last.ckpt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "last.ckpt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
