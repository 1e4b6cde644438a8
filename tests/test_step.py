"""One optimizer step (engine.train_step, make_optimizer) against steps taken by hand: the loss, clipping,
the counts, autocast, weight decay, Nesterov, and the random seed of each step."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from nin.training.recipes import TrainConfig

from .tinyrun import QUIET, tiny


# guards against: a step whose loss is not label-smoothed cross-entropy (eps ignored or misweighted)
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_train_step_loss_is_label_smoothed_cross_entropy(eps):
    from nin.training.engine import train_step

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    x, y = torch.randn(7, 3, 2, 2), torch.randint(0, 5, (7,))
    with torch.no_grad():
        logp = net(x).log_softmax(1)
    # by hand: (1 - eps) * NLL of the label + eps * mean over classes of -log p
    want = ((1 - eps) * -logp[torch.arange(7), y] + eps * -logp.mean(1)).mean()
    sums = torch.zeros(3, dtype=torch.float64)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss, _ = train_step(net, opt, scaler, x, y, lr=0.0, amp_dtype=None, label_smoothing=eps, sums=sums)
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert sums[2].item() == 7 and sums[0].item() == pytest.approx(want.item() * 7, rel=1e-6)


# guards against: clipping per parameter, clipping when off, or clipping a gradient already short enough
@pytest.mark.parametrize("clip", [0.0, 0.05, 1e6])
def test_train_step_clips_the_global_gradient_norm(clip):
    """One plain-SGD step against a step taken by hand: the gradient (all parameters together) is scaled
    to norm ``clip`` when longer, left alone when shorter or when clipping is off."""
    from nin.training.engine import train_step

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    x, y = torch.randn(7, 3, 2, 2), torch.randint(0, 5, (7,))
    ref = [p.detach().clone().requires_grad_() for p in net.parameters()]
    loss = torch.nn.functional.cross_entropy(x.flatten(1) @ ref[0].T + ref[1], y)
    grads = torch.autograd.grad(loss, ref)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    assert 0.05 < norm < 1e6  # so the three cases are: off, clipped, not clipped
    scale = min(1.0, clip / norm.item()) if clip > 0 else 1.0
    want = [p.detach() - 0.5 * scale * g for p, g in zip(ref, grads)]
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    train_step(net, opt, torch.amp.GradScaler("cpu", enabled=False), x, y, lr=0.5, amp_dtype=None,
               label_smoothing=0.0, sums=torch.zeros(3, dtype=torch.float64), clip_grad_norm=clip)
    for p, w in zip(net.parameters(), want):
        torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)


# guards against: a train accuracy counted over the wrong axis (argmax not per sample)
def test_train_step_counts_correct_predictions_per_sample():
    from nin.training.engine import train_step

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    x, y = torch.randn(9, 3, 2, 2), torch.randint(0, 5, (9,))
    with torch.no_grad():
        want = int((net(x).numpy().argmax(axis=1) == y.numpy()).sum())  # numpy's row-wise argmax
    sums = torch.zeros(3, dtype=torch.float64)
    train_step(net, opt, torch.amp.GradScaler("cpu", enabled=False), x, y, lr=0.0, amp_dtype=None,
               label_smoothing=0.0, sums=sums)
    assert sums[1].item() == want and sums[2].item() == 9


# guards against: autocast in the device's default dtype instead of the one asked for
def test_train_step_autocasts_to_the_requested_dtype():
    from nin.training.engine import train_step

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    x, y = torch.randn(4, 3, 2, 2), torch.randint(0, 5, (4,))
    for dtype in (torch.float16, torch.bfloat16, None):  # float16 is not CPU autocast's default (bfloat16)
        _, logits = train_step(net, opt, torch.amp.GradScaler("cpu", enabled=False), x, y, lr=0.0,
                               amp_dtype=dtype, label_smoothing=0.0, sums=torch.zeros(3, dtype=torch.float64))
        assert logits.dtype == (dtype or torch.float32)


# guards against: --clip-grad-norm dropped on its way from the recipe to the step
def test_recipes_clip_reaches_the_step(data, monkeypatch):
    import nin.training.trainer as t
    from nin.training.recipes import get_recipe

    assert get_recipe("d2l-stable").clip_grad_norm == 1.0 and get_recipe("d2l").clip_grad_norm == 0.0
    seen = []
    real = t.train_step
    monkeypatch.setattr(t, "train_step", lambda *a, **k: seen.append(k["clip_grad_norm"]) or real(*a, **k))
    t.train(tiny(data, epochs=1, limit_train=64, clip_grad_norm=2.5), None, dry_run=True, **QUIET)
    assert seen and set(seen) == {2.5}


# guards against: --label-smoothing dropped on its way from the recipe to the step
def test_recipes_smoothing_reaches_the_step(data, monkeypatch):
    import nin.training.trainer as t

    seen = []
    real = t.train_step
    monkeypatch.setattr(t, "train_step", lambda *a, **k: seen.append(k["label_smoothing"]) or real(*a, **k))
    t.train(tiny(data, epochs=1, limit_train=64, label_smoothing=0.25), None, dry_run=True, **QUIET)
    assert seen == [0.25]


# guards against: dropout draws that depend on history, so a resumed run draws differently
def test_each_step_seeds_the_random_draws_from_the_seed_epoch_and_batch(data, monkeypatch):
    """Dropout and other draws in step (epoch e, batch b) come from torch.manual_seed(step_seed(seed, e, b,
    rank)) -- so a resumed run draws what the uninterrupted one did -- after the run's own seed."""
    import nin.training.trainer as t
    from nin.training.engine import step_seed

    calls, real = [], torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda s: (calls.append(s), real(s))[1])
    t.train(tiny(data, epochs=2, seed=3), data.parent / "seeded-run", **QUIET)
    assert calls == [3] + [step_seed(3, e, b, 0) for e in range(2) for b in range(4)]
    assert len(set(calls)) == len(calls)


# guards against: weight decay on biases and BN affines, or on no parameter at all
def test_optimizer_decays_weights_but_not_biases_or_norm_affines():
    from nin.training.engine import make_optimizer

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 2, 1),
                              torch.nn.Flatten(), torch.nn.Linear(2, 2))  # 4-d, 1-d and 2-d parameters
    before = [p.detach().clone() for p in net.parameters()]
    cfg = TrainConfig(weight_decay=0.5, momentum=0.0)
    opt = make_optimizer(net, cfg, 0.1, torch.device("cpu"))
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero gradient: only weight decay moves a parameter, p <- p - lr * wd * p
    for p, p0 in zip(net.parameters(), before):
        want = p0 * (1 - 0.1 * 0.5) if p0.ndim > 1 else p0
        assert torch.allclose(p.detach(), want), p0.shape


# guards against: Nesterov ignored when asked, used when not, or asked of torch with momentum 0
@pytest.mark.parametrize("nesterov,momentum,want", [(True, 0.9, True), (False, 0.9, False), (True, 0.0, False)])
def test_optimizer_uses_nesterov_only_when_asked_and_with_momentum(nesterov, momentum, want):
    """--nesterov with momentum: one step from a zero velocity is p - lr * (1 + m) * g (Nesterov), plain
    momentum's first step is p - lr * g; --nesterov with momentum 0 is plain SGD (torch refuses Nesterov there)."""
    from nin.training.engine import make_optimizer

    net = torch.nn.Conv2d(1, 2, 3)
    p0 = [p.detach().clone() for p in net.parameters()]
    opt = make_optimizer(net, TrainConfig(nesterov=nesterov, momentum=momentum), 0.1, torch.device("cpu"))
    assert all(g["nesterov"] is want for g in opt.param_groups)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    for p, q in zip(net.parameters(), p0):
        torch.testing.assert_close(p.detach(), q - 0.1 * ((1 + momentum) if want else 1.0))


# --- --optimizer muon -----------------------------------------------------------------------------
def _quintic_by_svd(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Muon's Newton-Schulz result computed on the singular values: U p(...p(S / |G|_F)) V^T, float64."""
    from nin.training.muon import NS_COEFFICIENTS

    a, b, c = NS_COEFFICIENTS
    u, s, vt = torch.linalg.svd(g.double(), full_matrices=False)
    s = s / g.double().norm()
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return u @ torch.diag(s) @ vt


# guards against: a Newton-Schulz iteration that is not Muon's quintic (coefficients, normalisation, the
# transpose of a tall matrix) or that leaves the singular values far from 1
@pytest.mark.parametrize("shape", [(16, 9), (64, 144), (10, 96), (96, 96)])
def test_orthogonalize_is_the_quintic_on_the_singular_values(shape):
    from nin.training.muon import orthogonalize

    torch.manual_seed(0)
    g = torch.randn(*shape)
    got = orthogonalize(g)
    assert got.dtype == torch.float32 and got.shape == g.shape
    torch.testing.assert_close(got.double(), _quintic_by_svd(g), atol=2e-4, rtol=1e-3)
    s = torch.linalg.svdvals(got.double())
    assert 0.45 < s.min() and s.max() < 1.25, s  # Muon's "about orthogonal": every direction moves alike


# guards against: Muon applied to biases/BN (or not to the filters), a step that ignores --muon-lr,
# --muon-momentum or the filters' fixed norm, and the other group not following SGD's rule
def test_muon_steps_the_filters_by_hand_and_the_rest_as_sgd():
    from nin.training.engine import make_optimizer, train_step
    from nin.training.muon import ConvMuon, orthogonalize

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Conv2d(4, 3, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    cfg = TrainConfig(optimizer="muon", lr=0.2, muon_lr=0.05, muon_momentum=0.6, momentum=0.9, nesterov=True,
                      weight_decay=5e-4)
    opt = make_optimizer(net, cfg, 0.2, torch.device("cpu"))
    assert isinstance(opt, ConvMuon)
    filters = [p for p in net.parameters() if p.ndim == 4]
    rest = [p for p in net.parameters() if p.ndim == 1]
    assert [g["params"] for g in opt.param_groups] == [filters, rest]
    x, y = torch.randn(6, 1, 5, 5), torch.randint(0, 3, (6,))
    bufs = {}
    for step, lr in enumerate([0.1, 0.2]):  # the schedule's lr; the filters' is lr * 0.05 / 0.2
        before = [p.detach().clone() for p in net.parameters()]
        train_step(net, opt, torch.amp.GradScaler("cpu", enabled=False), x, y, lr=lr, amp_dtype=None,
                   label_smoothing=0.0, sums=torch.zeros(3, dtype=torch.float64))
        for p, p0 in zip(net.parameters(), before):
            g = p.grad
            buf = bufs[id(p)] = g.clone() if step == 0 else bufs[id(p)] * (0.6 if p.ndim == 4 else 0.9) + g
            if p.ndim == 4:  # Nesterov momentum 0.6, orthogonalised, on the filters renormalised to sqrt(out)
                w = p0 * (len(p0) ** 0.5 / p0.norm())
                want = w - lr * 0.25 * orthogonalize((g + 0.6 * buf).reshape(len(g), -1)).view_as(p)
            else:  # biases and batch norm: SGD, Nesterov 0.9, no weight decay
                want = p0 - lr * (g + 0.9 * buf)
            torch.testing.assert_close(p.detach(), want)
    assert abs(filters[0].detach().norm() - 2.0) < 0.2  # the step keeps the bank near sqrt(4)


# guards against: --optimizer muon breaking a resume (its momentum lost or its groups rebuilt otherwise)
def test_muon_run_resumes_bit_identically(data, tmp_path):
    from nin.training.trainer import train

    cfg = tiny(data, epochs=2, optimizer="muon", muon_lr=0.05, momentum=0.9, nesterov=True)
    train(cfg, tmp_path / "full", **QUIET)
    train(dataclasses.replace(cfg, max_steps=5), tmp_path / "part", **QUIET)
    train(None, resume=tmp_path / "part", **QUIET)
    a = torch.load(tmp_path / "full" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "part" / "last.ckpt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    sgd = tiny(data, epochs=2, momentum=0.9, nesterov=True)
    train(sgd, tmp_path / "sgd", **QUIET)
    c = torch.load(tmp_path / "sgd" / "last.ckpt", weights_only=True)
    assert not all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])  # the option does something
