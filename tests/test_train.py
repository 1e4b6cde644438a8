import csv
import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from nin.cli import main
from nin.errors import UsageError
from nin.training.recipes import RECIPES, TrainConfig, get_recipe, lr_at
from nin.training.runfolder import load_checkpoint
from nin.training.trainer import TrainingDiverged, train

from .fakedata import fake_fashion_dir, has_real_fmnist
from .tinyrun import QUIET, tiny

# A tiny, quick configuration of the fast recipe on made-up IDX files (tests write them).
TINY = dict(model_kwargs={"width": 8}, epochs=2, batch_size=64, limit_train=512, eval_batch_size=256,
            warmup_epochs=0.0, quiet=None)


def tiny_cfg(data_dir, **kw):
    base = {k: v for k, v in TINY.items() if k != "quiet"}
    return get_recipe("fast", data_dir=str(data_dir), **{**base, **kw})


def test_d2l_recipe_is_the_seed():
    cfg = get_recipe("d2l")
    # d2l.train_ch6 + load_data_fashion_mnist(batch_size=128, resize=224), lr 0.1, 10 epochs
    assert (cfg.model, cfg.dataset, cfg.resize, cfg.normalize) == ("nin_d2l", "fashion-mnist", 224, False)
    assert (cfg.lr, cfg.epochs, cfg.batch_size, cfg.momentum, cfg.weight_decay) == (0.1, 10, 128, 0.0, 0.0)
    assert (cfg.schedule, cfg.warmup_epochs, cfg.label_smoothing, cfg.init) == ("constant", 0.0, 0.0, "xavier")
    assert (cfg.crop_padding, cfg.flip, cfg.tta_flip, cfg.final_tta) == (0, False, False, "same")


def test_final_tta_is_an_option_and_only_best_uses_shift():
    assert {name: get_recipe(name).final_tta for name in RECIPES if get_recipe(name).final_tta != "same"} == \
        {"fast": "flip", "best": "shift"}  # fast: epochs without TTA, the saved model once with flip
    # --model of another network drops the recipe's network options (fast's widths are nin_fmnist's)
    assert get_recipe("fast", model="nin_imagenet").model_kwargs == {}
    assert get_recipe("fast", model="nin_fmnist").model_kwargs == {"widths": [16, 64, 96]}
    assert get_recipe("best", final_tta="flip").final_tta == "flip"
    with pytest.raises(UsageError, match="--final-tta"):
        get_recipe("fast", final_tta="shfit").validate()


def test_kaiming_init_scales_for_relu():
    """--init kaiming: every conv weight uniform with std sqrt(2 / fan_in) (He); xavier: sqrt(2 / (fan_in
    + fan_out)), as d2l's init_weights.  Biases are left as PyTorch initialised them."""
    from nin.hub import create_model
    from nin.training.trainer import init_weights

    for scheme, want in (("kaiming", lambda fi, fo: math.sqrt(2 / fi)),
                         ("xavier", lambda fi, fo: math.sqrt(2 / (fi + fo)))):
        torch.manual_seed(0)
        model = create_model("nin_d2l")
        biases = [m.bias.clone() for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        init_weights(model, scheme)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        for conv, b in zip(convs, biases):
            w = conv.weight
            fan_in, fan_out = w[0].numel(), w.shape[0] * w[0, 0].numel()
            bound = math.sqrt(3) * want(fan_in, fan_out)
            assert w.abs().max() <= bound + 1e-6
            if w.numel() >= 10_000:  # enough draws for the sample std to be within 3%
                assert w.std().item() == pytest.approx(want(fan_in, fan_out), rel=0.03)
            assert torch.equal(conv.bias, b)
    with pytest.raises(UsageError, match="--init must be default, xavier or kaiming"):
        dataclasses.replace(get_recipe("d2l"), init="he").validate()


def test_d2l_stable_is_the_books_with_a_linear_class_block_cosine_lr_batch_64_and_clipping():
    book, stable = get_recipe("d2l").to_dict(), get_recipe("d2l-stable").to_dict()
    changed = {k: (book[k], stable[k]) for k in book if book[k] != stable[k]}
    assert changed == {"recipe": ("d2l", "d2l-stable"), "model_kwargs": ({}, {"class_block_relus": "none"}),
                       "schedule": ("constant", "cosine"), "batch_size": (128, 64), "clip_grad_norm": (0.0, 1.0)}


@pytest.mark.parametrize("name", list(RECIPES))
def test_recipes_validate_and_round_trip(name):
    cfg = get_recipe(name)
    cfg.validate()
    again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_lr_schedules():
    cfg = TrainConfig(epochs=2, schedule="onecycle", warmup_epochs=0.5)
    lrs = [lr_at(cfg, s, 10, 1.0) for s in range(20)]
    assert lrs[0] == pytest.approx(0.2) and lrs[4] == pytest.approx(1.0)  # warm-up over 5 steps
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.07
    step = TrainConfig(epochs=3, schedule="step", step_epochs=(1, 2))
    assert [lr_at(step, s, 10, 1.0) for s in (0, 10, 25)] == pytest.approx([1.0, 0.1, 0.01])
    assert lr_at(TrainConfig(schedule="constant"), 123, 10, 0.1) == 0.1


@pytest.mark.parametrize("field,value,flag", [("lr", 0.0, "--lr"), ("lr", -1.0, "--lr"),
                                              ("batch_size", 0, "--batch-size"), ("epochs", 0, "--epochs"),
                                              ("schedule", "linear", "--schedule"),
                                              ("clip_grad_norm", -1.0, "--clip-grad-norm")])
def test_bad_options_are_usage_errors(field, value, flag):
    cfg = dataclasses.replace(get_recipe("fast"), **{field: value})
    with pytest.raises(UsageError, match=flag):
        cfg.validate()


def test_run_folder_contents_and_config_round_trip(tmp_path):
    data = fake_fashion_dir(tmp_path / "data")
    out = tmp_path / "run"
    final = train(tiny_cfg(data), out, quiet=True, log=lambda *a, **k: None)
    for name in ("config.json", "metrics.csv", "metrics.jsonl", "curves.png", "last.ckpt",
                 "best.safetensors", "model.json"):
        assert (out / name).exists(), name
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert set(rows[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "lr",
                            "images_per_sec", "seconds", "images"}
    jsonl = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert jsonl[-1]["test_acc"] == pytest.approx(final["test_acc"])
    saved = json.loads((out / "config.json").read_text())
    assert TrainConfig.from_dict(saved["config"]) == tiny_cfg(data)
    assert saved["versions"]["torch"] == torch.__version__
    meta = json.loads((out / "model.json").read_text())
    assert meta["model"] == "nin_fmnist" and meta["model_kwargs"]["width"] == 8 and len(meta["classes"]) == 10
    assert set(load_file(out / "best.safetensors")) == set(torch.load(out / "last.ckpt", weights_only=True)["model"])
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_existing_run_folder_is_never_overwritten(tmp_path, capsys):
    data = fake_fashion_dir(tmp_path / "data")
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.csv").write_text("precious")
    rc = main(["train", "--data-dir", str(data), "--out", str(out), "--limit-train", "64", "--epochs", "1",
               "--quiet", "--model-kwargs", '{"width": 8}'])
    assert rc == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.csv").read_text() == "precious"


def _weights(run):
    return torch.load(run / "last.ckpt", weights_only=True)["model"]


@pytest.mark.parametrize("stop", ["epoch", "mid-epoch"])
def test_resume_is_bit_identical(tmp_path, stop):
    data = fake_fashion_dir(tmp_path / "data")
    cfg = tiny_cfg(data, epochs=2, model_kwargs={"width": 8, "drop_rate": 0.2})  # dropout: RNG matters
    full = train(cfg, tmp_path / "full", quiet=True, log=lambda *a, **k: None)
    steps_per_epoch = 512 // 64
    cut = steps_per_epoch if stop == "epoch" else steps_per_epoch + 3
    # a run stopped after `cut` steps (at an epoch end, or mid-epoch via the --save-every checkpoint)
    part = dataclasses.replace(cfg, max_steps=cut)
    train(part, tmp_path / "part", quiet=True, log=lambda *a, **k: None)
    if stop == "mid-epoch":
        st = load_checkpoint(tmp_path / "part" / "last.ckpt")
        assert (st["epoch"], st["step"]) == (1, cut)
    # resuming uses the saved config; lift the step limit as a user would by finishing the run
    ck = tmp_path / "part" / "last.ckpt"
    st = torch.load(ck, weights_only=True)
    st["config"]["max_steps"] = None
    torch.save(st, ck)
    resumed = train(None, resume=tmp_path / "part", quiet=True, log=lambda *a, **k: None)
    for k, v in _weights(tmp_path / "full").items():
        assert torch.equal(v, _weights(tmp_path / "part")[k]), k
    assert resumed["test_acc"] == full["test_acc"]
    assert resumed["train_loss"] == full["train_loss"]


def test_nan_guard_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    data = fake_fashion_dir(tmp_path / "data")
    out = tmp_path / "run"
    train(tiny_cfg(data, epochs=1), out, quiet=True, log=lambda *a, **k: None)
    before = (out / "last.ckpt").read_bytes()
    # inject: the loss becomes NaN from the first step of the resumed epoch
    import nin.training.trainer as t

    real = t.F.cross_entropy
    monkeypatch.setattr(t.F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    st = torch.load(out / "last.ckpt", weights_only=True)
    st["config"]["epochs"] = 2
    torch.save(st, out / "last.ckpt")
    before = (out / "last.ckpt").read_bytes()
    with pytest.raises(TrainingDiverged, match="loss became nan.*last good checkpoint"):
        train(None, resume=out, quiet=True, log=lambda *a, **k: None)
    assert (out / "last.ckpt").read_bytes() == before


def test_plateau_warning(tmp_path, monkeypatch, capsys):
    data = fake_fashion_dir(tmp_path / "data")
    import nin.training.trainer as t

    # inject: constant logits (the seed's dead class-map ReLU) -> loss ln(10) for the whole epoch
    real = t.F.cross_entropy
    monkeypatch.setattr(t.F, "cross_entropy", lambda logits, y, **k: real(logits * 0, y, **k) + 0 * logits.sum())
    train(tiny_cfg(data, epochs=1, label_smoothing=0.0), tmp_path / "run", quiet=True, log=lambda *a, **k: None)
    err = capsys.readouterr().err
    assert f"ln(10) = {math.log(10):.3f}" in err and "d2l-stable" in err


def test_cli_train_dry_run_writes_nothing(tmp_path, capsys):
    data = fake_fashion_dir(tmp_path / "data")
    rc = main(["train", "--data-dir", str(data), "--dry-run", "--out", str(tmp_path / "run"),
               "--model-kwargs", '{"width": 8}'])
    assert rc == 0
    assert "dry run" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_resize_smaller_than_model_accepts(tmp_path, capsys):
    data = fake_fashion_dir(tmp_path / "data")
    rc = main(["train", "--recipe", "d2l", "--data-dir", str(data), "--resize", "32", "--dry-run"])
    assert rc == 2
    assert "smallest input it accepts is 1x67x67" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not has_real_fmnist(), reason="real Fashion-MNIST not installed")
def test_fast_recipe_learns_real_fashion_mnist(tmp_path):
    """A short real run: the fast recipe on 10,000 real training images reaches >= 80% test accuracy."""
    cfg = get_recipe("fast", limit_train=10_000, epochs=2, model_kwargs={"width": 32})
    final = train(cfg, tmp_path / "run", quiet=True, log=lambda *a, **k: None)
    assert final["test_acc"] >= 0.80


# guards against: --dry-run training or evaluating more than one batch, or a real run evaluating fewer
def test_dry_run_takes_one_step_and_evaluates_one_batch_of_each_split(data, tmp_path, monkeypatch):
    """--dry-run is a smoke check, so its line says "1 train batch ... 1 test batch": one optimizer step, and the
    test and validation evaluations each cut to their first batch; a real run evaluates every batch."""
    import nin.training.trainer as t

    real, limits = t.loader_eval, []

    def spy(model, loader, amp_dtype, tta, max_batches=None, max_images=None):
        limits.append(max_batches)
        return real(model, loader, amp_dtype, tta, max_batches, max_images)

    monkeypatch.setattr(t, "loader_eval", spy)
    lines = []
    row = t.train(tiny(data, epochs=1, val_split=64, eval_batch_size=32), None, dry_run=True, quiet=True,
                  log=lines.append)
    assert limits == [1, 1] and row["images"] == 64
    assert len(lines) == 1 and lines[0].startswith("dry run: 1 train batch") and "nothing written" in lines[0]
    limits.clear()
    t.train(tiny(data, epochs=1, val_split=64, eval_batch_size=32), tmp_path / "run", **QUIET)
    assert limits == [None, None]
