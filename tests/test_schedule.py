"""The learning-rate schedule (recipes.lr_at) against its formulas and edges, and the lr the optimizer
really steps with.  (The recipes' own schedules: tests/test_train.py.)"""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nin.training.recipes import TrainConfig, lr_at
from nin.training.runfolder import read_metrics

from .tinyrun import QUIET, tiny


# guards against: a warm-up or cosine curve off the formula
def test_cosine_schedule_by_formula():
    cfg = TrainConfig(epochs=4, schedule="cosine", warmup_epochs=1.0)
    spe = 10
    for step in range(40):
        got = lr_at(cfg, step, spe, 0.1)
        if step < 10:
            want = 0.1 * (step + 1) / 10
        else:
            want = 0.1 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 30))
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), step


# guards against: a one-step warm-up skipped straight into the schedule
def test_lr_a_one_step_warm_up_gives_that_step_the_full_lr():
    cfg = TrainConfig(epochs=1, warmup_epochs=0.1, schedule="cosine")  # 10 steps: warm-up = step 0 only
    assert lr_at(cfg, 0, 10, 0.2) == pytest.approx(0.2)  # (0 + 1) / 1 of the lr, not a cosine value
    assert lr_at(cfg, 1, 10, 0.2) == pytest.approx(0.2)  # the cosine starts at its top
    assert lr_at(cfg, 4, 10, 0.2) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 3 / 9)))


# guards against: a step drop delayed past a warm-up that ends on a milestone
def test_lr_step_schedule_drops_on_the_first_step_after_a_warm_up_that_ends_at_a_milestone():
    cfg = TrainConfig(epochs=3, warmup_epochs=1.0, schedule="step", step_epochs=(1, 2))
    want = [0.1 * (s + 1) / 5 for s in range(5)] + [0.01] * 5 + [0.001] * 5  # 5 steps an epoch
    assert [lr_at(cfg, s, 5, 0.1) for s in range(15)] == pytest.approx(want)


# guards against: cosine progress divided by a padded length when few steps follow the warm-up
def test_lr_cosine_progress_divides_by_the_true_post_warm_up_length_even_when_short():
    cfg = TrainConfig(epochs=1, warmup_epochs=0.25, schedule="cosine")  # 2 steps: warm-up 0.5, then 1.5
    assert lr_at(cfg, 0, 2, 1.0) == pytest.approx(1.0)
    assert lr_at(cfg, 1, 2, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5 / 1.5)))


# issue 20 item 3, guards against: a schedule (any steps, warm-up, kind) that overshoots --lr or goes negative
@settings(max_examples=300, deadline=None)
@given(steps=st.integers(1, 400), epochs=st.integers(1, 12), warm=st.floats(0, 12),
       schedule=st.sampled_from(["constant", "onecycle", "cosine", "step"]), peak=st.floats(1e-4, 10))
def test_lr_never_exceeds_the_peak(steps, epochs, warm, schedule, peak):
    from nin.training.recipes import TrainConfig, lr_at

    cfg = TrainConfig(epochs=epochs, warmup_epochs=min(warm, epochs), schedule=schedule, step_epochs=(1,))
    lrs = [lr_at(cfg, s, steps, peak) for s in range(epochs * steps)]
    assert max(lrs) <= peak * (1 + 1e-12) and min(lrs) >= 0


# issue 20 item 3, guards against: the last step of a fractional warm-up overshooting the peak lr
def test_a_fractional_warm_up_never_overshoots_the_lr():
    from nin.training.recipes import get_recipe, lr_at

    cfg = get_recipe("fast")  # warm-up 0.5 epoch, peak 0.2
    for spe in (1, 3, 235):
        assert max(lr_at(cfg, s, spe, 0.2) for s in range(cfg.epochs * spe)) <= 0.2


# guards against: the optimizer stepping with another lr than lr_at's, or an epoch row recording another
def test_every_step_gets_the_schedules_lr(data, monkeypatch):
    """The lr the optimizer steps with is lr_at's for that step (onecycle, fractional warm-up)."""
    import nin.training.engine as engine

    cfg = tiny(data, epochs=2, schedule="onecycle", warmup_epochs=0.5, lr=0.3, optimizer="sgd")  # the spy is SGD's
    used = []
    real = engine.torch.optim.SGD.step

    def spy(self, *a, **k):
        used.append(self.param_groups[0]["lr"])
        return real(self, *a, **k)

    monkeypatch.setattr(engine.torch.optim.SGD, "step", spy)
    import nin.training.trainer as t

    t.train(cfg, data.parent / "lr-run", **QUIET)
    assert used == [pytest.approx(lr_at(cfg, s, 4, 0.3)) for s in range(8)] and max(used) <= 0.3
    # the lr reported for an epoch is the one its last step used (4 steps an epoch, then 1 step an epoch)
    rows = read_metrics(data.parent / "lr-run")
    assert [r["lr"] for r in rows] == [used[3], used[7]]  # exactly: the row records the applied value
    used.clear()
    t.train(tiny(data, epochs=3, limit_train=64, schedule="onecycle", warmup_epochs=2.0, lr=0.3, optimizer="sgd"),
            data.parent / "lr-run-1", **QUIET)
    rows = read_metrics(data.parent / "lr-run-1")
    assert len(used) == 3 and used[0] < used[1]  # the first epoch's single step is still warming up
    assert [r["lr"] for r in rows] == [pytest.approx(u) for u in used]
