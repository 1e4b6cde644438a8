"""Tests that catch a broken training run: each guards a behaviour a planted bug once slipped past.

Fast (seconds each), on made-up data, independent references only: no number here comes from nin.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from nin.cli import main
from nin.devices import cpu_supports_bf16
from nin.training.recipes import TrainConfig, get_recipe, lr_at
from nin.training.runfolder import METRIC_FIELDS, read_metrics

from .fakedata import fake_fashion_dir

QUIET = dict(quiet=True, log=lambda *a, **k: None)


def tiny(data, **kw):
    base = dict(model_kwargs={"width": 4}, epochs=2, batch_size=64, limit_train=256, eval_batch_size=256,
                warmup_epochs=0.0, data_dir=str(data))
    return get_recipe("fast", **{**base, **kw})


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return fake_fashion_dir(tmp_path_factory.mktemp("data"), n_train=512, n_test=128)


# --- the step: label smoothing ------------------------------------------------------------------
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


# --- the step: gradient clipping --------------------------------------------------------------
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


def test_recipes_clip_reaches_the_step(data, monkeypatch):
    import nin.training.trainer as t
    from nin.training.recipes import get_recipe

    assert get_recipe("d2l-stable").clip_grad_norm == 1.0 and get_recipe("d2l").clip_grad_norm == 0.0
    seen = []
    real = t.train_step
    monkeypatch.setattr(t, "train_step", lambda *a, **k: seen.append(k["clip_grad_norm"]) or real(*a, **k))
    t.train(tiny(data, epochs=1, limit_train=64, clip_grad_norm=2.5), None, dry_run=True, **QUIET)
    assert seen and set(seen) == {2.5}


def test_recipes_smoothing_reaches_the_step(data, monkeypatch):
    import nin.training.trainer as t

    seen = []
    real = t.train_step
    monkeypatch.setattr(t, "train_step", lambda *a, **k: seen.append(k["label_smoothing"]) or real(*a, **k))
    t.train(tiny(data, epochs=1, limit_train=64, label_smoothing=0.25), None, dry_run=True, **QUIET)
    assert seen == [0.25]


# --- schedules ------------------------------------------------------------------------------------
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


def test_every_step_gets_the_schedules_lr(data, monkeypatch):
    """The lr the optimizer steps with is lr_at's for that step (onecycle, fractional warm-up)."""
    import nin.training.engine as engine

    cfg = tiny(data, epochs=2, schedule="onecycle", warmup_epochs=0.5, lr=0.3)
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
    t.train(tiny(data, epochs=3, limit_train=64, schedule="onecycle", warmup_epochs=2.0, lr=0.3),
            data.parent / "lr-run-1", **QUIET)
    rows = read_metrics(data.parent / "lr-run-1")
    assert len(used) == 3 and used[0] < used[1]  # the first epoch's single step is still warming up
    assert [r["lr"] for r in rows] == [pytest.approx(u) for u in used]


# --- the saved model: classes, selection ------------------------------------------------------------
def test_model_json_classes_are_the_datasets_in_order(tmp_path):
    rng = np.random.default_rng(0)
    names = ["zebra", "Apple", "mango", "10", "2"]
    for n in names:
        (tmp_path / "f" / n).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / "f" / n / f"{i}.png")
    from nin.data.datasets import load_dataset
    from nin.training.trainer import train

    ds = load_dataset(f"folder:{tmp_path / 'f'}")
    assert ds.classes == sorted(names)
    train(get_recipe("fast", dataset=f"folder:{tmp_path / 'f'}", epochs=1, batch_size=8, model_kwargs={"width": 4},
                     warmup_epochs=0.0), tmp_path / "run", **QUIET)
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["classes"] == ds.classes
    # and a label means the same class: the model's prediction for class k's images counts as class k
    from nin.evaluation import evaluate
    from nin.hub import load

    result = evaluate(load(tmp_path / "run"), ds.test)
    assert result.confusion.sum(1).tolist() == torch.bincount(ds.test.labels, minlength=5).tolist()


def test_without_validation_the_final_epochs_weights_are_saved(data, tmp_path):
    from nin.training.trainer import train

    train(tiny(data, epochs=2), tmp_path / "run", **QUIET)
    best = load_file(tmp_path / "run" / "best.safetensors")
    final = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["model"]
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k].float()) for k in best)
    info = json.loads((tmp_path / "run" / "model.json").read_text())["info"]
    assert info["selected"] == "final epoch" and info["epoch"] == 2
    rows = read_metrics(tmp_path / "run")
    assert [sorted(r) for r in rows] == [sorted(METRIC_FIELDS)] * 2  # the documented columns, no more, no fewer
    assert all(r["val_acc"] is None and r["val_loss"] is None for r in rows)


def test_validation_chooses_even_when_the_test_set_peaks_elsewhere(data, tmp_path, monkeypatch):
    """Test accuracy made to peak at epoch 1, validation at epoch 2 (and tied at 3): the epoch-2 weights are saved, and
    they are exactly the weights a run that stopped after epoch 2 ends with (constant lr: same steps)."""
    import nin.training.trainer as t

    real = t.loader_eval
    fake = {"test": iter([0.9, 0.1, 0.1]), "val": iter([0.2, 0.8, 0.8])}  # a tie: the first epoch to reach it

    def rigged(model, loader, *a, **k):
        acc, loss = real(model, loader, *a, **k)
        return next(fake["val" if loader is t._current.val_loader else "test"]), loss

    orig_set_up = t.set_up

    def remember(cfg):
        s = orig_set_up(cfg)
        t._current = s
        return s

    monkeypatch.setattr(t, "loader_eval", rigged)
    monkeypatch.setattr(t, "set_up", remember)
    cfg = tiny(data, epochs=3, val_split=64, schedule="constant", warmup_epochs=0.0)
    t.train(cfg, tmp_path / "three", **QUIET)
    monkeypatch.setattr(t, "loader_eval", real)
    t.train(dataclasses.replace(cfg, epochs=2), tmp_path / "two", **QUIET)
    saved = load_file(tmp_path / "three" / "best.safetensors")
    two = torch.load(tmp_path / "two" / "last.ckpt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], two[k].float()) for k in saved)
    info = json.loads((tmp_path / "three" / "model.json").read_text())["info"]
    assert info["selected"] == "best validation accuracy" and info["epoch"] == 2
    rows = read_metrics(tmp_path / "three")
    assert [r["val_acc"] for r in rows] == [0.2, 0.8, 0.8] and all(r["val_loss"] is not None for r in rows)


def test_validation_split_is_stratified_disjoint_and_seeded():
    from nin.data.datasets import Split
    from nin.training.trainer import split_validation

    labels = torch.arange(10).repeat_interleave(torch.tensor([50, 50, 50, 50, 50, 30, 30, 30, 30, 30]))
    ids = torch.arange(len(labels))
    split = Split(ids[:, None, None, None].to(torch.int32), labels)  # the "image" is its index
    tr, va = split_validation(split, 40, seed=3)
    assert len(va) == 40 and len(tr) == len(labels) - 40
    got = set(va.images.flatten().tolist())
    assert got.isdisjoint(tr.images.flatten().tolist())
    counts = torch.bincount(va.labels, minlength=10).tolist()
    assert counts == [5, 5, 5, 5, 5, 3, 3, 3, 3, 3]  # 10% of each class
    assert set(split_validation(split, 40, seed=3)[1].images.flatten().tolist()) == got
    assert set(split_validation(split, 40, seed=4)[1].images.flatten().tolist()) != got


@pytest.mark.parametrize("sizes,n,quota", [
    ([50, 30, 20], 7, [4, 2, 1]),    # 3.5, 2.1, 1.4: floors 3, 2, 1; the one left goes to the largest remainder
    ([10, 45, 45], 9, [1, 4, 4]),    # 0.9, 4.05, 4.05: the small class, whose remainder is largest, gets it
])
def test_validation_quotas_are_largest_remainders(sizes, n, quota):
    from nin.data.datasets import Split
    from nin.training.trainer import split_validation

    labels = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    split = Split(torch.zeros(len(labels), 1, 1, 1, dtype=torch.uint8), labels)
    assert torch.bincount(split_validation(split, n, seed=0)[1].labels, minlength=len(sizes)).tolist() == quota


def test_validation_split_bounds_are_one_to_all_but_one():
    from nin.data.datasets import Split
    from nin.errors import UsageError
    from nin.training.trainer import split_validation

    split = Split(torch.zeros(20, 1, 1, 1, dtype=torch.uint8), torch.arange(2).repeat(10))
    assert len(split_validation(split, 1, seed=0)[1]) == 1 and len(split_validation(split, 19, seed=0)[1]) == 19
    for n in (0, 20):
        with pytest.raises(UsageError, match=rf"--val-split must be between 1 and 19 \(the training images\), got {n}$"):
            split_validation(split, n, seed=0)


def test_evaluate_defaults_to_the_runs_own_tta(fmnist):
    """nin.evaluate(model, split) with no tta evaluates as the run reported (its meta.tta), not without it.
    On real images: on noise the shipped model predicts one class whichever way round it sees them."""
    import nin
    from nin.data.datasets import Split

    model = nin.load("nin_fmnist.fashion_mnist_fast")
    assert model.meta.tta == "flip"
    test = Split(fmnist.test.images[:1000], fmnist.test.labels[:1000])
    default, flip, none = (nin.evaluate(model, test, tta=t) for t in (None, "flip", "none"))
    assert default.tta == "flip" and (default.confusion == flip.confusion).all()
    assert (default.confusion != none.confusion).any()  # flip changes some predictions of these images
# --- EMA -------------------------------------------------------------------------------------------
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


# --- resume refuses another run's checkpoint ------------------------------------------------------
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


# --- cam, eval --tta, eval .onnx, export refusal ------------------------------------------------------
def test_cam_figure_draws_the_chosen_classes_maps(data, tmp_path, monkeypatch):
    import nin.evaluation as ev
    from nin.hub import load
    from nin.training.trainer import train

    train(tiny(data, epochs=1), tmp_path / "run", **QUIET)
    model = load(tmp_path / "run")
    image = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (1, 28, 28), dtype=np.uint8))
    drawn = []
    monkeypatch.setattr(ev, "_overlay", lambda ax, img, cam, title: drawn.append((cam.clone(), title)))
    top = ev.save_cam_figure(model, image, tmp_path / "c.png", topk=3)
    maps, logits = ev.class_activation_maps(model, ev.preprocess(model, image[None]))
    order = logits[0].argsort(descending=True)[:3].tolist()
    want = ev.upsample_maps(maps, (28, 28))[0]
    assert [t for t, _ in top] == [model.classes[c] for c in order]
    for (cam, title), c in zip(drawn, order):
        torch.testing.assert_close(cam, want[c])
        assert title.startswith(model.classes[c])
    drawn.clear()
    ev.save_cam_grid(model, image[None].repeat(2, 1, 1, 1), [0, 1], tmp_path / "g.png")
    pred = int(logits.argmax())
    torch.testing.assert_close(drawn[0][0], want[pred])


def test_eval_tta_flip_and_onnx(data, tmp_path, capsys):
    from nin.inference import predict_logits
    from nin.hub import load
    from nin.data.datasets import load_dataset
    from nin.training.trainer import train

    train(tiny(data, epochs=1, tta_flip=True), tmp_path / "run", **QUIET)
    model = load(tmp_path / "run")
    ds = load_dataset("fashion-mnist", data)
    x = ds.test.images
    plain = predict_logits(model, x)
    mirrored = predict_logits(model, x.flip(-1))
    want = ((plain + mirrored) / 2).argmax(1)
    for tta, expect in (("flip", want), ("none", plain.argmax(1))):
        assert main(["eval", str(tmp_path / "run"), "--data-dir", str(data), "--tta", tta, "--precision", "fp32",
                     "--json"]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["tta"] == tta
        assert doc["accuracy"] == pytest.approx((expect == ds.test.labels).float().mean().item())
    assert main(["export", str(tmp_path / "run"), "--dynamic-batch", "--out", str(tmp_path / "m.onnx")]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "m.onnx"), "--data-dir", str(data), "--tta", "none", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["accuracy"] == pytest.approx((plain.argmax(1) == ds.test.labels).float().mean().item(), abs=1 / 128)


def test_export_refuses_and_removes_a_file_that_differs(data, tmp_path, capsys, monkeypatch):
    import nin.modelfile as ex
    from nin.training.trainer import train

    train(tiny(data, epochs=1), tmp_path / "run", **QUIET)
    monkeypatch.setattr(ex, "onnx_max_diff", lambda *a: 0.5)  # inject: onnxruntime disagrees with torch
    out = tmp_path / "bad.onnx"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "removed, the ONNX model does not match" in err and not out.exists()


# --- a run from its recorded config reproduces itself; eval reproduces the run ------------------------
def test_eval_reproduces_the_runs_reported_accuracy(data, tmp_path, capsys):
    from nin.training.trainer import train

    final = train(tiny(data, epochs=1, tta_flip=True), tmp_path / "run", **QUIET)
    assert main(["eval", str(tmp_path / "run"), "--data-dir", str(data), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tta"] == "flip" and doc["n"] == 128
    assert round(doc["accuracy"] * 128) == round(final["test_acc"] * 128)  # to the image


def test_epoch_rows_are_the_models_own_evaluation_of_every_image(data, tmp_path):
    """Each epoch's test and validation numbers (accuracy and loss, metrics.jsonl) are the evaluation of that
    epoch's weights over the whole split with the run's TTA and precision, computed here independently from
    the saved files with predict_logits (the selected epoch from best.safetensors, the last from last.ckpt).
    Several eval batches per split, so an evaluation cut to its first batch shows."""
    import nin
    from nin.data.datasets import load_dataset
    from nin.inference import predict_logits
    from nin.training.trainer import split_validation, train

    data = fake_fashion_dir(tmp_path / "data", n_train=512, n_test=128, columns=True)  # a mirror is another class
    cfg = tiny(data, epochs=4, flip=False, crop_padding=2, tta_flip=True, val_split=64, eval_batch_size=32,
               limit_train=None, model_kwargs={"width": 8}, batch_size=32, lr=0.05, schedule="constant")
    train(cfg, tmp_path / "run", **QUIET)
    rows = read_metrics(tmp_path / "run")
    info = json.loads((tmp_path / "run" / "model.json").read_text())["info"]
    assert [sorted(r) for r in rows] == [sorted(METRIC_FIELDS)] * 4
    ds = load_dataset("fashion-mnist", data)
    splits = {"test": ds.test, "val": split_validation(ds.train, 64, cfg.seed)[1]}
    best = nin.load(tmp_path / "run")
    last = nin.load(tmp_path / "run")
    last.load_state_dict(torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["model"])
    # precision "auto" trains and evaluates in bf16 only where the CPU has native bf16 (AMX, AVX512-BF16)
    expected = "bf16" if cpu_supports_bf16() else "fp32"
    assert best.meta.tta == "flip" and best.meta.precision == expected

    def scores(model, split, tta):
        logits = predict_logits(model, split.images, tta=tta, precision=expected)
        return (logits.argmax(1) == split.labels).float().mean().item(), F.cross_entropy(logits, split.labels).item()

    for model, row in ((best, rows[info["epoch"] - 1]), (last, rows[-1])):
        for name, split in splits.items():
            acc, loss = scores(model, split, "flip")
            assert row[f"{name}_acc"] == pytest.approx(acc, abs=1e-9), name
            assert row[f"{name}_loss"] == pytest.approx(loss, rel=1e-3), name
            # the check can tell: without the flip, or on the first batch only, the loss is another by more
            # than the match's tolerance (how much more depends on the thread count's arithmetic: 0.4% at one)
            assert abs(scores(model, split, "none")[1] - loss) > 2e-3 * loss, name
            assert abs(scores(model, type(split)(split.images[:32], split.labels[:32]), "flip")[1] - loss) > 2e-3 * loss


def test_closing_evaluation_scores_the_chosen_model_once_with_the_final_tta(data, tmp_path, capsys, monkeypatch):
    """--final-tta shift: the per-epoch rows keep flip TTA, the saved model (the validation-best epoch, here
    made to be epoch 2 of 3) is evaluated once with shift TTA, its model.json says so, and nin eval reproduces
    that number by default.  Checked against shift TTA computed here from the saved weights and from the last
    epoch's; a run stopped during that evaluation does it when resumed, and only it."""
    import nin
    import nin.training.trainer as t
    from nin.data.datasets import load_dataset
    from nin.inference import predict_logits
    from nin.modelfile import save_model
    from nin.training.trainer import train

    real, orig_set_up, fake_val = t.loader_eval, t.set_up, iter([0.2, 0.8, 0.1])

    def rigged(model, loader, *a, **k):  # only the validation accuracy is made up: it chooses epoch 2
        acc, loss = real(model, loader, *a, **k)
        return (next(fake_val), loss) if loader is t._current.val_loader else (acc, loss)

    def remember(cfg):
        t._current = orig_set_up(cfg)
        return t._current

    monkeypatch.setattr(t, "loader_eval", rigged)
    monkeypatch.setattr(t, "set_up", remember)
    data = fake_fashion_dir(tmp_path / "data", n_train=512, n_test=128, columns=True)
    cfg = tiny(data, epochs=3, flip=False, tta_flip=True, final_tta="shift", val_split=64, limit_train=None,
               model_kwargs={"width": 8}, batch_size=32, lr=0.05, schedule="constant")
    final = train(cfg, tmp_path / "run", **QUIET)
    monkeypatch.setattr(t, "loader_eval", real)
    best = nin.load(tmp_path / "run")
    last = nin.load(tmp_path / "run")
    last.load_state_dict(torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["model"])
    assert best.meta.info["epoch"] == 2
    ds = load_dataset("fashion-mnist", data)
    expected = "bf16" if cpu_supports_bf16() else "fp32"
    shift = predict_logits(best, ds.test.images, tta="shift", precision=expected).argmax(1)
    flip = predict_logits(best, ds.test.images, tta="flip", precision=expected).argmax(1)
    want = (shift == ds.test.labels).float().mean().item()
    # so the check can tell the two TTAs apart, and the chosen epoch from the last
    assert want != (flip == ds.test.labels).float().mean().item()
    assert want != (predict_logits(last, ds.test.images, tta="shift", precision=expected).argmax(1)
                    == ds.test.labels).float().mean().item()
    assert best.meta.tta == "shift" and final["tta"] == "shift"
    assert best.meta.info["tta_test_acc"] == pytest.approx(want, abs=1e-9) == final["tta_test_acc"]
    rows = read_metrics(tmp_path / "run")
    chosen = rows[best.meta.info["epoch"] - 1]
    assert best.meta.info["test_acc"] == chosen["test_acc"]  # the epoch's own (flip) number is kept beside it
    assert main(["eval", str(tmp_path / "run"), "--data-dir", str(data), "--json", "--precision", expected]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tta"] == "shift" and round(doc["accuracy"] * 128) == round(want * 128)
    # killed during the closing evaluation: model.json still says flip; the resume evaluates and stops
    save_model(tmp_path / "run", best, dataclasses.replace(best.meta, tta="flip"))
    lines = []
    again = train(None, resume=tmp_path / "run", log=lines.append)
    assert again["tta_test_acc"] == pytest.approx(want, abs=1e-9) and nin.load(tmp_path / "run").meta.tta == "shift"
    assert len(read_metrics(tmp_path / "run")) == 3 and "closing evaluation" in " ".join(lines)
    lines.clear()
    train(None, resume=tmp_path / "run", log=lines.append)
    assert "nothing to do" in " ".join(lines)


# --- the odd images: one reader for datasets and predict ----------------------------------------------
def test_folder_dataset_and_predict_see_the_same_pixels(tmp_path):
    """16-bit, palette, RGBA, CMYK, EXIF-rotated and non-square images in a folder dataset: its tensors are
    exactly what predict feeds the network for the same files."""
    from nin.data.datasets import load_dataset
    from nin.data.images import read_image

    rng = np.random.default_rng(1)
    root = tmp_path / "odd"
    for c in ("x", "y"):
        (root / c).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / c / "rgb.png")
        Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(root / c / "grey16.png")
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).convert("P").save(root / c / "pal.png")
        Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), "RGBA").save(root / c / "rgba.png")
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).convert("CMYK").save(root / c / "cmyk.jpg")
        Image.fromarray(rng.integers(0, 255, (10, 20, 3), dtype=np.uint8)).save(root / c / "wide.png")
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 on display
        Image.fromarray(rng.integers(0, 255, (20, 10, 3), dtype=np.uint8)).save(root / c / "rot.jpg", exif=exif)
    ds = load_dataset(f"folder:{root}", seed=0)
    c, h, w = ds.image_size
    assert (c, h, w) == (3, 20, 20)
    from nin.data.datasets import folder_split

    train_files, test_files, _, _ = folder_split(root, 0)
    for split, files in ((ds.train, train_files), (ds.test, test_files)):
        for img, (path, label) in zip(split.images, files):
            want = torch.from_numpy(read_image(path, c, (h, w)))
            assert torch.equal(img, want), path
    # a 16-bit grey value is scaled, not clipped: 30000 -> round(30000 * 255 / 65535) = 117
    Image.fromarray(np.full((4, 4), 30000, np.uint16)).save(tmp_path / "g16.png")
    assert read_image(tmp_path / "g16.png", 1, (4, 4)).max() == 117


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


# --- the lr schedule's edges: survivors of the mutation run (benchmarks/results/mutation-*.md) ------------
def test_lr_a_one_step_warm_up_gives_that_step_the_full_lr():
    cfg = TrainConfig(epochs=1, warmup_epochs=0.1, schedule="cosine")  # 10 steps: warm-up = step 0 only
    assert lr_at(cfg, 0, 10, 0.2) == pytest.approx(0.2)  # (0 + 1) / 1 of the lr, not a cosine value
    assert lr_at(cfg, 1, 10, 0.2) == pytest.approx(0.2)  # the cosine starts at its top
    assert lr_at(cfg, 4, 10, 0.2) == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 3 / 9)))


def test_lr_step_schedule_drops_on_the_first_step_after_a_warm_up_that_ends_at_a_milestone():
    cfg = TrainConfig(epochs=3, warmup_epochs=1.0, schedule="step", step_epochs=(1, 2))
    want = [0.1 * (s + 1) / 5 for s in range(5)] + [0.01] * 5 + [0.001] * 5  # 5 steps an epoch
    assert [lr_at(cfg, s, 5, 0.1) for s in range(15)] == pytest.approx(want)


def test_lr_cosine_progress_divides_by_the_true_post_warm_up_length_even_when_short():
    cfg = TrainConfig(epochs=1, warmup_epochs=0.25, schedule="cosine")  # 2 steps: warm-up 0.5, then 1.5
    assert lr_at(cfg, 0, 2, 1.0) == pytest.approx(1.0)
    assert lr_at(cfg, 1, 2, 1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5 / 1.5)))


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


def test_train_step_autocasts_to_the_requested_dtype():
    from nin.training.engine import train_step

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5))
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    x, y = torch.randn(4, 3, 2, 2), torch.randint(0, 5, (4,))
    for dtype in (torch.float16, torch.bfloat16, None):  # float16 is not CPU autocast's default (bfloat16)
        _, logits = train_step(net, opt, torch.amp.GradScaler("cpu", enabled=False), x, y, lr=0.0,
                               amp_dtype=dtype, label_smoothing=0.0, sums=torch.zeros(3, dtype=torch.float64))
        assert logits.dtype == (dtype or torch.float32)


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


# --- random erasing (--erase): boxes by the paper's rule, applied before crop and flip --------------
def _boxes(mask: torch.Tensor) -> list[tuple[int, int, int, int] | None]:
    """(y0, x0, h, w) of each image's erased pixels, or None; asserts they form one filled rectangle."""
    out = []
    for m in mask:
        if not m.any():
            out.append(None)
            continue
        ys, xs = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        y0, x0, h, w = int(ys[0]), int(xs[0]), len(ys), len(xs)
        assert int(ys[-1]) - y0 + 1 == h and int(xs[-1]) - x0 + 1 == w  # contiguous rows and columns
        assert int(m.sum()) == h * w  # and the whole box, nothing else
        out.append((y0, x0, h, w))
    return out


def test_erase_boxes_follow_the_random_erasing_rule():
    from nin.data.batchops import erase_boxes

    n, h, w = 4000, 28, 28
    g = torch.Generator().manual_seed(0)
    boxes = _boxes(erase_boxes(n, h, w, g, 0.3))
    on = [b for b in boxes if b is not None]
    assert 0.27 < len(on) / n < 0.33  # each image erased with probability p
    areas = np.array([bh * bw for _, _, bh, bw in on]) / (h * w)
    ratios = np.array([bh / bw for _, _, bh, bw in on])
    assert areas.min() > 0.01 and areas.max() < 0.45  # 2-40% of the image, up to rounding and clamping
    assert 0.18 < areas.mean() < 0.24  # uniform in [0.02, 0.40]: mean 0.21 (clamping trims a little)
    assert ratios.min() > 0.2 and ratios.max() < 5  # 0.3-3.3, up to rounding small boxes to whole pixels
    assert 0.9 < np.exp(np.log(ratios).mean()) < 1.1  # log-uniform aspect ratio in [0.3, 3.3]: centred on 1
    ys = np.array([y0 + bh / 2 for y0, _, bh, _ in on])
    xs = np.array([x0 + bw / 2 for _, x0, _, bw in on])
    assert abs(ys.mean() - h / 2) < 1.0 and abs(xs.mean() - w / 2) < 1.0  # placed uniformly: centred on average
    # every position a box fits in is drawn: some boxes touch each edge
    heights, widths = np.array([b[2] for b in on]), np.array([b[3] for b in on])
    assert abs(heights.mean() - widths.mean()) < 0.5  # the ratio's range is symmetric in log: h and w alike
    small = [b for b in on if b[2] < h - 2 and b[3] < w - 2]  # boxes that can move (not clamped to the side)
    assert min(y0 for y0, _, _, _ in small) == 0 and max(y0 + bh for y0, _, bh, _ in small) == h
    assert min(x0 for _, x0, _, _ in small) == 0 and max(x0 + bw for _, x0, _, bw in small) == w
    assert all(y0 >= 0 and x0 >= 0 and y0 + bh <= h and x0 + bw <= w for y0, x0, bh, bw in on)
    assert not erase_boxes(50, h, w, g, 0.0).any() and all(b is not None for b in _boxes(erase_boxes(50, h, w, g, 1.0)))


def test_erase_boxes_match_a_per_image_reference_of_the_same_draws():
    """Box by box against a loop over the images with the same generator's draws (erased or not, area,
    log aspect ratio, then the top-left corner drawn uniformly over the places the box fits): a box that
    could start past the last fitting row or column, and is then clipped, shows here."""
    from nin.data.batchops import erase_boxes

    n, h, w, p = 600, 12, 9, 0.8
    got = erase_boxes(n, h, w, torch.Generator().manual_seed(3), p)
    g = torch.Generator().manual_seed(3)
    on, u_area, u_ratio, u_y, u_x = (torch.rand(n, generator=g) for _ in range(5))
    want = torch.zeros(n, h, w, dtype=torch.bool)
    for k in range(n):
        if not on[k] < p:
            continue
        area = (0.02 + 0.38 * u_area[k]) * h * w
        r = (math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * u_ratio[k]).exp()
        bh = min(max(int((area * r).sqrt().round()), 1), h)
        bw = min(max(int((area / r).sqrt().round()), 1), w)
        y0 = int(u_y[k] * (h - bh + 1))  # one of the h - bh + 1 rows where the box fits
        x0 = int(u_x[k] * (w - bw + 1))
        assert 0 <= y0 <= h - bh and 0 <= x0 <= w - bw
        want[k, y0:y0 + bh, x0:x0 + bw] = True
    assert torch.equal(got, want)


def test_augment_erases_to_zero_before_cropping_and_flipping():
    """augment() against a reference written with loops: the same draws from the same generator
    (crop rows, crop columns, flips, then the erasing boxes), erased pixels 0, then pad, crop, flip."""
    from nin.data.batchops import augment, erase_boxes

    x = torch.randint(1, 256, (16, 2, 10, 12), dtype=torch.uint8)
    got = augment(x, torch.Generator().manual_seed(7), crop_padding=2, flip=True, erase=0.7)
    g = torch.Generator().manual_seed(7)
    dy = torch.randint(0, 5, (16,), generator=g)
    dx = torch.randint(0, 5, (16,), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    mask = erase_boxes(16, 10, 12, g, 0.7)
    want = torch.zeros_like(x)
    for k in range(16):
        img = x[k].clone()
        img[:, mask[k]] = 0
        padded = F.pad(img, (2, 2, 2, 2))
        crop = padded[:, int(dy[k]):int(dy[k]) + 10, int(dx[k]):int(dx[k]) + 12]
        want[k] = crop.flip(-1) if flips[k] else crop
    assert mask.any() and torch.equal(got, want)
    assert torch.equal(augment(x, torch.Generator().manual_seed(7), erase=0.0), x)  # nothing asked, nothing done


def test_epoch_lines_print_the_rows_numbers(data, tmp_path, capsys):
    """What a user reads each epoch is the metrics row: every number of the line against metrics.jsonl,
    the val column with a validation split, the closing examples/sec from the epochs' own seconds."""
    import re

    from nin.training.trainer import train

    lines = []
    final = train(tiny(data, val_split=64), tmp_path / "run", quiet=False, log=lines.append)
    rows = read_metrics(tmp_path / "run")
    epoch_lines = [x for x in lines if x.startswith("epoch ")]
    assert len(epoch_lines) == len(rows) == 2
    for line, r in zip(epoch_lines, rows):
        m = re.fullmatch(r"epoch +(\d+)/2  loss ([\d.]+)  train acc ([\d.]+)  val acc ([\d.]+)  test acc ([\d.]+)  "
                         r"lr (\S+)  (\d+) img/s  ([\d.]+) s", line)
        assert m, line
        assert int(m[1]) == r["epoch"]
        for got, key in zip(m.groups()[1:5], ("train_loss", "train_acc", "val_acc", "test_acc")):
            assert float(got) == pytest.approx(r[key], abs=5e-5), key
        assert float(m[6]) == pytest.approx(r["lr"], rel=1e-2) and float(m[8]) == pytest.approx(r["seconds"], abs=0.05)
        assert abs(int(m[7]) - r["images_per_sec"]) <= 0.5
    images = sum(r["images"] for r in rows)
    assert final["examples_per_sec"] == pytest.approx(images / sum(r["seconds"] for r in rows), rel=1e-6)
    assert f"{final['examples_per_sec']:.1f} examples/sec on cpu" in lines  # the book's closing line
    assert "stayed at ln" not in capsys.readouterr().err  # a run that learns gets no plateau warning
    lines.clear()
    train(tiny(data, epochs=1), tmp_path / "noval", quiet=False, log=lines.append)  # no validation split
    assert [x for x in lines if x.startswith("epoch ")][0].count("val acc") == 0


def test_evaluate_limit_precision_and_labels(data):
    """evaluate(): ``limit`` counts images across the batches of a stream, precision "run" is the run's,
    labels outside the classes are refused, a model without a description evaluates without TTA."""
    import nin
    from nin.data.datasets import load_dataset
    from nin.errors import UsageError
    from nin.inference import predict_logits

    model = nin.load("nin_fmnist.fashion_mnist_fast")
    test = load_dataset("fashion-mnist", data).test
    x, y = test.images[:100], test.labels[:100]
    whole = nin.evaluate(model, test, limit=70, tta="none")
    batches = [(x[i:i + 30], y[i:i + 30]) for i in range(0, 100, 30)]  # 30 + 30 + 30 + 10
    streamed = nin.evaluate(model, iter(batches), limit=70, tta="none")
    assert whole.n == streamed.n == 70 and (whole.confusion == streamed.confusion).all()
    pred = predict_logits(model, x[:70], tta="none").argmax(1)
    assert whole.confusion.trace() == int((pred == y[:70]).sum())
    assert nin.evaluate(model, test, limit=1, tta="none").n == 1
    with pytest.raises(UsageError, match="limit must be at least 1, got 0"):
        nin.evaluate(model, test, limit=0)
    run = nin.evaluate(model, test, precision="run")
    # the shipped run evaluated in bf16; "run" matches it where this CPU has native bf16, else fp32
    assert model.meta.precision == "bf16" and run.compute == ("bf16" if cpu_supports_bf16() else "fp32")
    pred = predict_logits(model, test.images, tta="flip", precision=run.compute).argmax(1)
    assert run.confusion.trace() == int((pred == test.labels).sum())
    assert nin.evaluate(model, test, precision="fp32").compute == "fp32"
    with pytest.raises(UsageError, match="the labels go up to 10 but the model knows 10 classes"):
        nin.evaluate(model, iter([(x[:5], torch.tensor([0, 1, 2, 3, 10]))]))
    plain = nin.create_model("nin_fmnist")  # no .meta: evaluated as it is
    plain.classes = model.classes
    assert nin.evaluate(plain, test).tta == "none"


# --- the progress bar -------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_counts_the_epochs_batches_and_shows_the_running_numbers(data, monkeypatch):
    """On a terminal each epoch draws a tqdm bar: 'epoch E/N', batches done of the epoch's total, and the
    running loss, accuracy, images/s and lr; on anything else (a log file, CI) no bar at all."""
    import re

    import nin.training.trainer as t

    import time

    real = t.train_step
    # tqdm redraws at most every 0.1 s: slow the steps down so that each one is drawn
    monkeypatch.setattr(t, "train_step", lambda *a, **k: time.sleep(0.12) or real(*a, **k))
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    final = t.train(tiny(data, epochs=2, limit_train=128, batch_size=32), None, log=lambda *a, **k: None)
    text = term.getvalue()
    for epoch in (1, 2):
        assert f"epoch {epoch}/2" in text
    assert "4/4" in text and "batch" in text  # 128 images in batches of 32, the epoch's total known up front
    last = re.findall(r"loss (\d+\.\d+) acc (\d+\.\d+) (\d+) img/s lr ([\d.e-]+)", text)
    assert last, text[-500:]
    assert float(last[-1][0]) == pytest.approx(final["train_loss"], abs=1e-3)  # the epoch's mean, as reported
    assert float(last[-1][1]) == pytest.approx(final["train_acc"], abs=1e-3)
    assert int(last[-1][2]) > 0
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: nothing drawn
    t.train(tiny(data, epochs=1, limit_train=64, batch_size=32), None, log=lambda *a, **k: None)
    assert "epoch 1/1" not in sys.stderr.getvalue()


# --- the in-memory loader passes its augmentation settings and per-batch seed through ------------------
@pytest.mark.parametrize("rank,kw", [
    (0, dict(crop_padding=2, flip=True, erase=0.6)), (1, dict(crop_padding=2, flip=True, erase=0.6)),
    (0, dict(flip=True)), (0, dict(crop_padding=1)), (0, dict(erase=0.9))])
def test_batch_loader_augments_each_batch_with_its_settings_and_its_own_draws(rank, kw):
    """Every batch is augment() of its images with the loader's crop/flip/erase settings (each alone, or
    all) and a generator seeded by (seed, epoch, batch, rank), then converted in the loader's dtype:
    exactly, batch by batch, over two epochs."""
    from nin.data.loader import BatchLoader
    from nin.data.datasets import Split
    from nin.data.batchops import seed_mix, augment, to_float_batch

    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (40, 1, 12, 12), dtype=torch.uint8, generator=g)
    split = Split(images, torch.arange(40) % 10)
    dtype = torch.bfloat16 if rank else torch.float32
    loader = BatchLoader(split, 8, shuffle=True, seed=5, rank=rank, world_size=2, dtype=dtype, **kw)
    for epoch in (0, 1):
        idx = loader.epoch_indices(epoch)
        for b, (x, y) in enumerate(loader.iterate(epoch)):
            i = idx[b * 8:(b + 1) * 8]
            want = augment(images[i], torch.Generator().manual_seed(seed_mix(5, epoch, b, rank)), **kw)
            assert x.dtype == dtype and torch.equal(x, to_float_batch(want, dtype=dtype)), (epoch, b)
            assert torch.equal(y, split.labels[i]), (epoch, b)
    # and the augmentation is really there: some pixels differ from the images as stored
    x, _ = next(loader.iterate(0))
    assert not torch.equal(x, to_float_batch(images[loader.epoch_indices(0)[:8]], dtype=dtype))


def test_to_float_batch_refuses_anything_but_uint8_batches():
    from nin.data.batchops import to_float_batch

    for bad in (torch.zeros(2, 1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.uint8)):
        with pytest.raises(ValueError, match=r"expected a uint8 N x C x H x W tensor, got torch\.\w+ \(.*4, 4\)"):
            to_float_batch(bad)
    with pytest.raises(ValueError, match=r"^give both mean and std, or neither$"):
        to_float_batch(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), mean=(0.5,))


# --- the options' limits: TrainConfig.validate and check_option -----------------------------------------
def _refused(cfg, message):
    from nin.errors import UsageError

    with pytest.raises(UsageError) as e:
        cfg.validate()
    assert str(e.value) == message


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
])
def test_every_option_limit_accepts_its_bounds_and_refuses_past_them_by_name(name, ok, bad, message):
    """The documented limits exactly: the bound itself passes, one step past it is refused with a message that
    names the flag, the bound and the value given."""
    base = get_recipe("fast")
    for v in ok:
        dataclasses.replace(base, **{name: v}).validate()
    for v, msg in zip(bad, message, strict=True):
        _refused(dataclasses.replace(base, **{name: v}), msg)


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


# --- several processes: every rank evaluates rank 0's model ------------------------------------------------
def test_under_ddp_every_rank_takes_rank_0s_bn_statistics_before_evaluating(data, monkeypatch):
    """epoch_metrics with several processes broadcasts every buffer of the evaluated model from rank 0, before
    any evaluation reads it (the ranks' own BN running statistics differ: their batches differ).  Here the
    broadcast is a stand-in that writes "rank 0's" values into the buffer, so the evaluation must see them."""
    import torch.distributed as dist

    import nin.training.trainer as t
    from nin.training.engine import Dist

    s = t.set_up(tiny(data, epochs=1))
    s = dataclasses.replace(s, d=Dist(rank=1, world_size=2))
    buffers = {id(b): b for b in s.eval_model.buffers()}
    got, evaluated = [], []

    def broadcast(tensor, src, *a, **k):
        assert id(tensor) in buffers and src == 0, (type(tensor), src)
        assert not evaluated  # before the evaluation reads the model
        got.append(id(tensor))
        tensor.copy_(torch.full_like(tensor, 7))  # rank 0's values arrive

    real = t.loader_eval

    def spy(model, *a, **k):
        evaluated.append(all(bool((b == 7).all()) for b in model.buffers()))
        return real(model, *a, **k)

    monkeypatch.setattr(dist, "broadcast", broadcast)
    monkeypatch.setattr(t, "all_reduce_sum", lambda x, d: x)
    monkeypatch.setattr(t, "loader_eval", spy)
    st = t.TrainState(sums=torch.tensor([2.0, 1.0, 4.0], dtype=torch.float64))
    row = t.epoch_metrics(s, st)
    assert sorted(got) == sorted(buffers) and len(got) == len(buffers) > 0
    assert evaluated == [True] and row["train_loss"] == 0.5 and row["train_acc"] == 0.25


def test_dry_run_takes_one_step_and_evaluates_one_batch_of_each_split(data, tmp_path, monkeypatch):
    """--dry-run is a smoke check, so its line says "1 train batch ... 1 test batch": one optimizer step, and the
    test and validation evaluations each cut to their first batch; a real run evaluates every batch."""
    import nin.training.trainer as t

    real, limits = t.loader_eval, []

    def spy(model, loader, amp_dtype, tta, max_batches=None):
        limits.append(max_batches)
        return real(model, loader, amp_dtype, tta, max_batches)

    monkeypatch.setattr(t, "loader_eval", spy)
    lines = []
    row = t.train(tiny(data, epochs=1, val_split=64, eval_batch_size=32), None, dry_run=True, quiet=True,
                  log=lines.append)
    assert limits == [1, 1] and row["images"] == 64
    assert len(lines) == 1 and lines[0].startswith("dry run: 1 train batch") and "nothing written" in lines[0]
    limits.clear()
    t.train(tiny(data, epochs=1, val_split=64, eval_batch_size=32), tmp_path / "run", **QUIET)
    assert limits == [None, None]


# --- one epoch: the step's random seed, the NaN check -------------------------------------------------
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


def test_augment_without_a_crop_draws_the_flips_or_boxes_first():
    """The documented draw order (crop rows, crop columns, flips, erasing boxes) skips what is off: without a
    crop the flips are the generator's first draws, without crop and flip the boxes are."""
    from nin.data.batchops import augment, erase_boxes

    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (16, 1, 6, 6), dtype=torch.uint8, generator=g)
    flips = torch.rand(16, generator=torch.Generator().manual_seed(9)) < 0.5
    want = torch.where(flips[:, None, None, None], x.flip(-1), x)
    assert 0 < int(flips.sum()) < 16
    assert torch.equal(augment(x, torch.Generator().manual_seed(9), flip=True), want)
    mask = erase_boxes(16, 6, 6, torch.Generator().manual_seed(9), 0.7)
    assert mask.any()
    assert torch.equal(augment(x, torch.Generator().manual_seed(9), erase=0.7), x.masked_fill(mask[:, None], 0))


def test_on_epoch_gets_the_rows_so_far_and_epoch_seconds_are_the_epochs_own(data, tmp_path):
    """train(on_epoch=f) (the notebook's live plot) calls f after every epoch with the history so far, the rows
    metrics.jsonl holds; each row's seconds are that epoch's own (they add up to less than the whole call)."""
    import time

    from nin.training.trainer import train

    seen = []
    t0 = time.perf_counter()
    train(tiny(data, epochs=3), tmp_path / "run", on_epoch=lambda rows: seen.append([dict(r) for r in rows]),
          **QUIET)
    wall = time.perf_counter() - t0
    rows = read_metrics(tmp_path / "run")
    assert [len(h) for h in seen] == [1, 2, 3]
    for h in seen:
        assert [r["epoch"] for r in h] == [r["epoch"] for r in rows[:len(h)]]
        assert all(a["test_acc"] == b["test_acc"] and a["train_loss"] == b["train_loss"] for a, b in zip(h, rows))
    assert 0 < sum(r["seconds"] for r in rows) < wall
    assert all(r["images_per_sec"] == pytest.approx(r["images"] / r["seconds"]) for r in rows)


def test_tensorboard_gets_each_epochs_numbers(data, tmp_path, monkeypatch):
    """--tensorboard writes every epoch's train/test numbers, lr and speed as scalars at that epoch (a stand-in
    SummaryWriter records them: the tensorboard package is an optional extra)."""
    import types

    from nin.training.trainer import train

    calls = []

    class Writer:
        def __init__(self, logdir):
            calls.append(("logdir", logdir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    train(tiny(data, epochs=2), tmp_path / "run", tensorboard=True, **QUIET)
    rows = read_metrics(tmp_path / "run")
    assert calls[0] == ("logdir", str(tmp_path / "run" / "tensorboard"))
    want = [(k, r[k], r["epoch"]) for r in rows
            for k in ("train_loss", "train_acc", "test_acc", "lr", "images_per_sec")]
    assert calls[1:] == want


def test_tta_logits_refuses_an_unknown_augmentation_by_name():
    from nin.errors import UsageError
    from nin.inference import tta_logits

    with pytest.raises(UsageError, match=r"^unknown test-time augmentation 'rot90'; choose one of: none, flip, shift$"):
        tta_logits(torch.nn.Identity(), torch.zeros(1, 1, 2, 2), "rot90")


def test_to_float_batch_normalizes_each_channel_without_a_resize_and_resizes_non_square_images():
    """Per-channel (x / 255 - mean) / std on 3 channels at the input's size, with the arithmetic in the given
    dtype (x * scale + bias, each rounded to it, as documented) and within that dtype's rounding of float64's
    exact answer; a non-square image is resized to the square side asked for; a mean or std of the wrong
    length is refused by name."""
    import torch.nn.functional as F

    from nin.data.batchops import to_float_batch

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=g)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    m64, s64 = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    exact = (x.double() / 255 - m64.view(1, 3, 1, 1)) / s64.view(1, 3, 1, 1)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 0.05)):
        got = to_float_batch(x, mean=mean, std=std, dtype=dtype)
        scale, bias = (1 / (255 * s64)).to(dtype), (-m64 / s64).to(dtype)
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got, x.to(dtype) * scale.view(1, 3, 1, 1) + bias.view(1, 3, 1, 1))
        torch.testing.assert_close(got.double(), exact, atol=tol, rtol=0)
    wide = torch.randint(0, 256, (2, 3, 6, 9), dtype=torch.uint8, generator=g)
    for side in (6, 9):  # equal to one side only: still resized to side x side
        ref = F.interpolate(wide.double() / 255, size=(side, side), mode="bilinear", antialias=True)
        torch.testing.assert_close(to_float_batch(wide, resize=side, dtype=torch.float64), ref, atol=1e-12, rtol=0)
    for kw, name in ((dict(mean=(0.1, 0.2), std=std), "mean"), (dict(mean=mean, std=(1.0, 2.0)), "std")):
        with pytest.raises(ValueError, match=rf"^{name} has 2 values for 3 channels$"):
            to_float_batch(x, **kw)


def test_epoch_seconds_cover_every_step_even_across_mid_epoch_checkpoints(data, tmp_path, monkeypatch):
    """With a checkpoint after every step (--save-every), each epoch's reported seconds still add up all its
    steps: at least the time spent inside them, at most the whole call's wall time."""
    import time

    import nin.training.trainer as t

    real, inside = t.train_step, []

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = real(*a, **k)
        inside.append(time.perf_counter() - t0)
        return out

    monkeypatch.setattr(t, "train_step", timed)
    w0 = time.perf_counter()
    t.train(tiny(data, epochs=2, save_every=1e-9), tmp_path / "run", **QUIET)
    wall = time.perf_counter() - w0
    rows = read_metrics(tmp_path / "run")
    assert len(inside) == 8
    for e, r in enumerate(rows):
        assert sum(inside[4 * e:4 * e + 4]) <= r["seconds"] <= wall, (e, r["seconds"])


def test_sigterm_stops_a_training_as_ctrl_c_does(data, tmp_path):
    """`kill PID` (SIGTERM) mid-run: exit 130, status.json "interrupted" naming it, last.ckpt resumable."""
    import signal
    import subprocess
    import time

    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "nin", "train", "--data-dir", str(data), "--epochs", "50",
                          "--warmup-epochs", "0", "--quiet", "--out", str(run)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() and time.monotonic() < deadline:  # one epoch done: mid-run
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "nin train: interrupted" in err and "Traceback" not in err, err
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "interrupted" and "SIGTERM" in status["reason"]
    assert torch.load(run / "last.ckpt", weights_only=True)["config"]["epochs"] == 50  # intact: resumable
