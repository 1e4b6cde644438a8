"""What a run reports each epoch: the metrics rows (the model's own evaluation of every image), the printed
lines, the progress bar, on_epoch (the notebook's live plot), TensorBoard, the epoch's seconds."""
from __future__ import annotations

import io
import json
import sys

import pytest
import torch
import torch.nn.functional as F

from nin.devices import cpu_supports_bf16
from nin.training.runfolder import METRIC_FIELDS, read_metrics

from .fakedata import fake_fashion_dir
from .tinyrun import QUIET, tiny


# guards against: epoch numbers from a partial split, without the run's TTA, or of other weights
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


# guards against: an epoch line printing other numbers than metrics.jsonl holds
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


class _Terminal(io.StringIO):
    def isatty(self):
        return True


# guards against: a progress bar with wrong counts or numbers, or one drawn into a log file
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


# guards against: on_epoch (the notebook's live plot) missing epochs, or seconds counting more than the epoch
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


# guards against: --tensorboard writing other numbers or epochs than the rows
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


# guards against: an epoch's seconds leaving out the steps before a mid-epoch checkpoint
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


# guards against: a cheap curve's subset accuracy passed off as the model's, or the last epoch cut short
def test_curve_test_images_cuts_only_the_curve(tmp_path):
    """--curve-test-images N: the epochs before the last are evaluated on the first N test images (the row
    says so, and its accuracy is that of N images), the last epoch on all of them; with a validation split
    the saved model's reported test accuracy is of the whole test set, whichever epoch was chosen."""
    import nin
    from nin.data.datasets import load_dataset
    from nin.evaluation import evaluate
    from nin.training.trainer import train

    data = fake_fashion_dir(tmp_path / "data", n_train=512, n_test=100)
    lines = []
    train(tiny(data, epochs=3, curve_test_images=30, eval_batch_size=16, val_split=64), tmp_path / "run",
          quiet=False, log=lines.append)
    rows = read_metrics(tmp_path / "run")
    assert [r.get("test_images") for r in rows] == [30, 30, None]
    assert all(abs(r["test_acc"] * 30 - round(r["test_acc"] * 30)) < 1e-9 for r in rows[:2])
    assert [" (first 30)" in x for x in lines if x.startswith("epoch ")] == [True, True, False]
    model = nin.load(tmp_path / "run")
    full = evaluate(model, load_dataset("fashion-mnist", data).test, tta=model.meta.tta,
                    precision=model.meta.precision).accuracy
    info = model.meta.info
    assert info.get("tta_test_acc", info["test_acc"]) == pytest.approx(full, abs=1e-9)
    if info["epoch"] < 3:  # chosen at a curve's epoch: measured once more, on every test image
        assert "tta_test_acc" in info and info["test_acc"] is None
