"""What happens on NaN: the run stops with one clear error, exit 1, and last.ckpt stays the last
good checkpoint -- never one holding non-finite weights -- and no NaN model becomes best.safetensors."""
from __future__ import annotations

import json

import pytest
import torch

import nin.models
from nin.cli import main
from nin.training.runfolder import load_checkpoint

from ..tinyrun import QUIET, tiny
from .common import TINY_ARGS, one_error_line


@pytest.mark.parametrize("bad_step", [3, 4])  # 4 = the epoch's last step (256 images / 64)
def test_nan_weights_are_never_checkpointed(tmp_path, data_dir, monkeypatch, capsys, bad_step):
    """Gradients turn NaN at one step while that step's loss is still finite; a checkpoint is due
    after every step (--save-every 0.00001 minutes).  The NaN weights must not be saved."""
    real = nin.models.build_model
    seen = []

    def poisoned(*args, **kwargs):
        model = real(*args, **kwargs)

        def hook(grad):
            seen.append(1)
            return grad * float("nan") if len(seen) == bad_step else grad

        next(model.parameters()).register_hook(hook)
        return model

    monkeypatch.setattr(nin.models, "build_model", poisoned)
    out = tmp_path / "run"
    rc = main(["train", "--data-dir", str(data_dir), "--out", str(out), "--save-every", "0.00001",
               *TINY_ARGS[:TINY_ARGS.index("--epochs")], "--epochs", "2", *TINY_ARGS[TINY_ARGS.index("--epochs") + 2:]])
    assert rc == 1
    line = one_error_line(capsys.readouterr().err, "train")
    # a mid-epoch step: the next step's loss is NaN; the epoch's last step: caught before evaluation
    assert ("loss became nan" if bad_step == 3 else "the weights became NaN or infinite at epoch 1, step 4") in line
    assert f"the last good checkpoint {out / 'last.ckpt'} is kept" in line
    st = load_checkpoint(out / "last.ckpt")
    assert st["step"] == bad_step - 1
    assert all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())
    assert all(torch.isfinite(v).all() for v in st["optimizer"]["state"][0].values())
    assert not (out / "best.safetensors").exists() and not (out / "metrics.csv").exists()  # no NaN epoch


# guards against: a NaN loss noticed late, or reported at another epoch or step than it happened
@pytest.mark.parametrize("bad", [3, 4])
def test_a_nan_loss_on_cpu_stops_the_run_at_that_very_step(data, tmp_path, monkeypatch, bad):
    """On the CPU the loss is checked after every step: a loss that turns NaN at step k (mid-epoch, or the
    epoch's last) stops the run naming epoch 1, step k, and status.json records the same."""
    import nin.training.trainer as t
    from nin.errors import TrainingDiverged

    real, n = t.train_step, []

    def poisoned(*a, **k):
        loss, out = real(*a, **k)
        n.append(1)
        return (loss * float("nan") if len(n) == bad else loss), out

    monkeypatch.setattr(t, "train_step", poisoned)
    with pytest.raises(TrainingDiverged, match=rf"loss became nan at epoch 1, step {bad};"):
        t.train(tiny(data, epochs=2), tmp_path / "run", **QUIET)
    assert len(n) == bad
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "diverged" and status["reason"] == f"loss became nan at epoch 1, step {bad}"
