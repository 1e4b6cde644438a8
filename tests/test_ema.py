"""The exponential moving average of the weights (--ema): timm's rule, and the average saved and resumed."""
from __future__ import annotations

import dataclasses

import torch
from safetensors.torch import load_file

from .tinyrun import QUIET, tiny


# guards against: an EMA off timm's warm-up decay, copying BN statistics, or touching the live model
def test_ema_follows_timms_rule():
    """Parameters and float buffers (BN running statistics) move towards the model's by 1 - d, with
    d = min(decay, (1 + t) / (10 + t)); integer buffers (batches seen) are copied; the model is untouched."""
    from nin.training.engine import Ema

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    ema = Ema(model, 0.9)
    ref = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        model.train()(torch.randn(4, 1, 3, 3, generator=g))  # moves the running statistics
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        live = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ema.update(model, step)
        d = min(0.9, (1 + step) / (10 + step))
        ref = {k: d * ref[k] + (1 - d) * live[k] if live[k].is_floating_point() else live[k] for k in ref}
        assert all(torch.equal(model.state_dict()[k], live[k]) for k in live)
    got = ema.module.state_dict()
    assert set(got) == set(ref) and "1.num_batches_tracked" in got
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], msg=k)
    assert int(got["1.num_batches_tracked"]) == 5
    assert not torch.allclose(got["1.running_mean"], model.state_dict()["1.running_mean"])  # averaged, not copied


# guards against: the live weights saved instead of the average, or the average lost on resume
def test_ema_run_saves_and_resumes_the_average(data, tmp_path):
    from nin.training.trainer import train

    cfg = tiny(data, epochs=2, ema=0.9)
    train(cfg, tmp_path / "full", **QUIET)
    train(dataclasses.replace(cfg, max_steps=5), tmp_path / "part", **QUIET)
    train(None, resume=tmp_path / "part", **QUIET)
    a, b = load_file(tmp_path / "full" / "best.safetensors"), load_file(tmp_path / "part" / "best.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ck = torch.load(tmp_path / "full" / "last.ckpt", weights_only=True)
    assert any(not torch.equal(ck["ema"][k], ck["model"][k]) for k in ck["model"] if ck["model"][k].is_floating_point())
    assert all(torch.equal(a[k], ck["ema"][k].float()) for k in a)  # the saved model is the average
