"""TrainConfig.validate: every option's limits, and the options that depend on each other.  (The command
line's refusals: tests/reliability/test_bad_options.py.)"""
from __future__ import annotations

import dataclasses
import math

import pytest

from nin.training.recipes import get_recipe


def _refused(cfg, message):
    from nin.errors import UsageError

    with pytest.raises(UsageError) as e:
        cfg.validate()
    assert str(e.value) == message


# guards against: an option limit off by one, or a message that does not name flag, bound and value
@pytest.mark.parametrize("name,ok,bad,message", [
    # >= lo (and <= hi), with the unit where the option has one
    ("epochs", [1, 100_000], [0, 100_001], ["--epochs must be >= 1, got 0", "--epochs must be <= 100000, got 100001"]),
    ("save_every", [0.0, 1e6], [-0.5, 2e6], ["--save-every must be >= 0 minutes, got -0.5",
                                              "--save-every must be <= 1000000.0 minutes, got 2000000.0"]),
    ("crop_padding", [0, 64], [-1, 65], ["--crop-padding must be >= 0, got -1", "--crop-padding must be <= 64, got 65"]),
    # > lo (open), <= hi
    ("lr", [1e-12, 100], [0, -1.0, 100.5], ["--lr must be > 0, got 0", "--lr must be > 0, got -1.0",
                                            "--lr must be <= 100, got 100.5"]),
    # [lo, hi)
    ("momentum", [0.0, 0.999], [1.0, -0.1], ["--momentum must be in [0, 1), got 1.0",
                                             "--momentum must be in [0, 1), got -0.1"]),
    ("label_smoothing", [0.0, 0.5], [1, -1e-9], ["--label-smoothing must be in [0, 1), got 1",
                                                  "--label-smoothing must be in [0, 1), got -1e-09"]),
    # no upper limit
    ("warmup_epochs", [0.0], [-1.0], ["--warmup-epochs must be >= 0, got -1.0"]),
    # not finite
    ("weight_decay", [0.0, 1.0], [math.nan, math.inf, 1.5], ["--weight-decay must be a finite number, got nan",
                                                          "--weight-decay must be a finite number, got inf",
                                                          "--weight-decay must be <= 1, got 1.5"]),
    # optional: None is always allowed
    ("max_steps", [None, 1], [0], ["--max-steps must be >= 1, got 0"]),
    # choices: three or fewer are listed with "or", more as "one of"
    ("schedule", ["constant", "onecycle", "cosine", "step"], ["linear"],
     ["--schedule must be one of constant, onecycle, cosine, step, got 'linear'"]),
    ("init", ["default", "xavier", "kaiming"], ["he"], ["--init must be default, xavier or kaiming, got 'he'"]),
    ("optimizer", ["sgd", "muon"], ["adam"], ["--optimizer must be sgd or muon, got 'adam'"]),
    ("muon_momentum", [0.0, 0.95], [1.0], ["--muon-momentum must be in [0, 1), got 1.0"]),
])
def test_every_option_limit_accepts_its_bounds_and_refuses_past_them_by_name(name, ok, bad, message):
    """The documented limits exactly: the bound itself passes, one step past it is refused with a message that
    names the flag, the bound and the value given."""
    base = get_recipe("fast")
    for v in ok:
        dataclasses.replace(base, **{name: v}).validate()
    for v, msg in zip(bad, message, strict=True):
        _refused(dataclasses.replace(base, **{name: v}), msg)


# guards against: warm-up past the run, step milestones outside it, --resize with the imagenet crop accepted
def test_options_that_depend_on_each_other_are_checked_together():
    base = get_recipe("fast", epochs=4)
    dataclasses.replace(base, warmup_epochs=4.0).validate()  # the whole run may warm up
    _refused(dataclasses.replace(base, warmup_epochs=4.5), "--warmup-epochs must be in [0, epochs], got 4.5")
    dataclasses.replace(base, schedule="step", step_epochs=(1, 4)).validate()
    for steps in ((0,), (2, 5)):
        _refused(dataclasses.replace(base, schedule="step", step_epochs=steps),
                 f"--step-epochs must lie in 1..4 (--epochs), got {list(steps)}")
    dataclasses.replace(base, transform="imagenet").validate()
    _refused(dataclasses.replace(base, transform="imagenet", resize=64),
             "--transform imagenet crops to --crop-size; drop --resize")
    dataclasses.replace(base, transform="fit", resize=64).validate()


# guards against: --muon-lr / --muon-momentum given with the SGD optimizer being silently unused
def test_muon_values_without_the_muon_optimizer_are_refused_by_name(capsys):
    from nin.cli import main

    for flags in (["--muon-lr", "0.05"], ["--muon-momentum", "0.9"], ["--muon-lr", "0.05", "--muon-momentum", "0.9"]):
        assert main(["train", "--recipe", "best", *flags, "--print-config"]) == 2  # best: SGD
        err = capsys.readouterr().err
        named = " and ".join(f for f in flags if f.startswith("--"))
        assert err == (f"nin train: error: {named} set the Muon optimizer's values; the sgd optimizer takes none "
                       "(add --optimizer muon, or drop them)\n")
        assert main(["train", "--recipe", "best", *flags, "--optimizer", "muon", "--print-config"]) == 0
        assert '"optimizer": "muon"' in capsys.readouterr().out
        assert main(["train", "--recipe", "fast", *flags, "--optimizer", "sgd", "--print-config"]) == 2
        capsys.readouterr()
        assert main(["train", "--recipe", "fast", *flags, "--print-config"]) == 0  # fast trains with Muon
        assert '"optimizer": "muon"' in capsys.readouterr().out
