"""Accuracy, confusion matrix, precision/recall and class activation maps, against direct computations."""
import csv
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from nin.cli import main
from nin.devices import cpu_supports_bf16
from nin.evaluation import EvalResult, confusion_matrix, evaluate, save_confusion_csv
from nin.inference import class_activation_maps, predict_logits
from nin.figures import save_cam_figure, save_cam_grid, save_confusion_png
from nin.errors import UsageError
from nin.hub import load
from nin.hub import create_model
from nin.models import list_models

from .tinyrun import QUIET, tiny


@pytest.fixture(scope="module")
def run(small_run, fmnist):
    path, _, _ = small_run
    return path, load(path), fmnist


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), max_size=60))
def test_confusion_matrix_counts_pairs(pairs):
    cm = confusion_matrix([t for t, _ in pairs], [p for _, p in pairs], 5)
    expected = np.zeros((5, 5), dtype=np.int64)
    for t, p in pairs:
        expected[t, p] += 1
    np.testing.assert_array_equal(cm, expected)


def test_precision_recall_and_most_confused_by_hand():
    # rows: true a, b, c; columns: predicted a, b, c
    r = EvalResult(["a", "b", "c"], np.array([[5, 3, 0], [1, 4, 0], [2, 0, 0]]))
    assert r.n == 15 and r.accuracy == pytest.approx(9 / 15)
    np.testing.assert_allclose(r.precision, [5 / 8, 4 / 7, 0.0])  # c is never predicted: 0, not NaN
    np.testing.assert_allclose(r.recall, [5 / 8, 4 / 5, 0.0])
    assert r.most_confused(10) == [("a", "b", 3), ("c", "a", 2), ("b", "a", 1)]


def test_evaluate_matches_a_direct_computation(run):
    _, model, ds = run
    x, y = ds.test.images[:1000], ds.test.labels[:1000]
    mean, std = model.meta.preprocess["mean"][0], model.meta.preprocess["std"][0]
    with torch.no_grad():
        direct = model((x.float() / 255 - mean) / std).argmax(1)
    result = evaluate(model, ds.test, limit=1000, batch_size=300)
    assert result.accuracy == pytest.approx((direct == y).float().mean().item())
    assert result.accuracy > 0.3  # the few training steps learned something: the test can tell models apart
    np.testing.assert_array_equal(result.confusion, confusion_matrix(y.numpy(), direct.numpy(), 10))


def test_flip_tta_averages_mirrored_logits(run):
    _, model, ds = run
    x = ds.test.images[:50]
    plain = predict_logits(model, x)
    mirrored = predict_logits(model, x.flip(-1))
    torch.testing.assert_close(predict_logits(model, x, tta="flip"), (plain + mirrored) / 2)


def test_shift_tta_averages_18_moved_views_padded_with_background(run):
    """tta="shift" against views made on the raw images: each moved by (dy, dx) in {-1, 0, 1}^2 with a
    border of zero pixels (the background, as training's crops pad), and mirrored; 18 logits averaged.
    The model normalises (a zero pixel is not 0.0 once preprocessed), so a wrong fill would show."""
    _, model, ds = run
    assert model.meta.preprocess["mean"][0] > 0.1
    x = ds.test.images[:40]
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))
    views = [torch.from_numpy(padded[..., 1 + dy:29 + dy, 1 + dx:29 + dx].copy())
             for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    assert sum(bool((v != x).any()) for v in views) == 8  # each of the 8 moves changes the images
    expected = sum(predict_logits(model, v) + predict_logits(model, v.flip(-1)) for v in views) / 18
    shifted = predict_logits(model, x, tta="shift", batch_size=16)
    torch.testing.assert_close(shifted, expected, rtol=1e-4, atol=1e-4)
    assert (shifted - predict_logits(model, x, tta="flip")).abs().max() > 1e-3  # another number than flip's
    assert evaluate(model, ds.test, limit=40, tta="shift").confusion.trace() == int((shifted.argmax(1) ==
                                                                                    ds.test.labels[:40]).sum())
    with pytest.raises(UsageError, match="unknown test-time augmentation 'crop'; choose one of: none, flip, shift"):
        predict_logits(model, x, tta="crop")


def test_confusion_files(run, tmp_path):
    _, model, ds = run
    result = evaluate(model, ds.test, limit=300)
    save_confusion_csv(result, tmp_path / "c.csv")
    save_confusion_png(result, tmp_path / "c.png")
    rows = list(csv.reader(open(tmp_path / "c.csv")))
    assert rows[0][1:] == result.classes and [r[0] for r in rows[1:]] == result.classes
    np.testing.assert_array_equal(np.array([r[1:] for r in rows[1:]], dtype=int), result.confusion)
    assert Image.open(tmp_path / "c.png").format == "PNG"


def test_cli_eval_json(run, tmp_path, capsys):
    path, model, ds = run
    assert main(["eval", str(path), "--limit", "500", "--json", "--out", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["accuracy"] == pytest.approx(evaluate(model, ds.test, limit=500).accuracy)
    assert out["n"] == 500 and len(out["per_class"]) == 10
    assert (tmp_path / "confusion.png").exists() and (tmp_path / "confusion.csv").exists()
    assert main(["eval", str(path), "--limit", "100", "--tta", "shift", "--json", "--out", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tta"] == "shift" and out["accuracy"] == evaluate(model, ds.test, limit=100, tta="shift").accuracy


@pytest.mark.parametrize("native_bf16", [False, True])
def test_cli_eval_says_when_a_bf16_run_is_evaluated_in_fp32(fmnist, tmp_path, capsys, monkeypatch, native_bf16):
    """The shipped best run evaluated in bf16. Where the CPU has native bf16, `nin eval` matches it silently;
    where it has not (AVX2 only), it evaluates in fp32 and one note on stderr says so, since the number may
    then differ from the reported one by a few images."""
    import nin.devices

    monkeypatch.setattr(nin.devices, "cpu_supports_bf16", lambda: native_bf16)
    assert main(["eval", "nin_fmnist.fashion_mnist_best", "--tta", "none", "--limit", "300", "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert f"precision: {'bf16' if native_bf16 else 'fp32'};" in out.splitlines()[0]
    assert ("this CPU has no native bf16" in err) is not native_bf16
    assert main(["eval", "nin_fmnist.fashion_mnist_best", "--tta", "none", "--limit", "300", "--precision", "fp32",
                 "--out", str(tmp_path)]) == 0
    assert "native bf16" not in capsys.readouterr().err  # asked for fp32: nothing to explain


@pytest.mark.parametrize("name", list_models())
def test_cam_spatial_mean_is_the_logits(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    x = torch.randn(2, *model.default_input_size)
    maps, logits = class_activation_maps(model, x)
    assert maps.shape[:2] == (2, model.num_classes) and maps.shape[2] > 1  # really spatial maps
    with torch.no_grad():
        torch.testing.assert_close(maps.mean((2, 3)), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, maps.mean((2, 3)), rtol=1e-5, atol=1e-5)


def test_cam_pictures(run, tmp_path):
    _, model, ds = run
    image = ds.test.images[0]
    top = save_cam_figure(model, image, tmp_path / "one.png", topk=3)
    probs = predict_logits(model, image[None]).softmax(1)[0]
    expected = probs.topk(3)
    assert [c for c, _ in top] == [model.classes[i] for i in expected.indices.tolist()]
    np.testing.assert_allclose([p for _, p in top], expected.values.tolist(), rtol=1e-5)
    acc = save_cam_grid(model, ds.test.images[:6], ds.test.labels[:6], tmp_path / "grid.png")
    pred = predict_logits(model, ds.test.images[:6]).argmax(1)
    assert acc == pytest.approx((pred == ds.test.labels[:6]).float().mean().item())
    for f in ("one.png", "grid.png"):
        assert Image.open(tmp_path / f).size[0] > 200


# guards against: nin.evaluate without tta evaluating without the run's own TTA
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


# guards against: limit miscounted across a stream, precision 'run' ignored, labels past the classes accepted
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
    # the shipped best run evaluated in bf16; "run" matches it where this CPU has native bf16, else fp32
    bf16_model = nin.load("nin_fmnist.fashion_mnist_best")
    run = nin.evaluate(bf16_model, test, precision="run", tta="flip", limit=2000)
    assert bf16_model.meta.precision == "bf16" and run.compute == ("bf16" if cpu_supports_bf16() else "fp32")
    pred = predict_logits(bf16_model, test.images[:2000], tta="flip", precision=run.compute).argmax(1)
    assert run.confusion.trace() == int((pred == test.labels[:2000]).sum())
    assert model.meta.precision == "bf16"  # the shipped fast run trained in bf16 too (an AMX Xeon)
    assert nin.evaluate(model, test, precision="run", limit=10).compute == ("bf16" if cpu_supports_bf16() else "fp32")
    assert nin.evaluate(model, test, precision="fp32").compute == "fp32"
    with pytest.raises(UsageError, match="the labels go up to 10 but the model knows 10 classes"):
        nin.evaluate(model, iter([(x[:5], torch.tensor([0, 1, 2, 3, 10]))]))
    plain = nin.create_model("nin_fmnist")  # no .meta: evaluated as it is
    plain.classes = model.classes
    assert nin.evaluate(plain, test).tta == "none"


# guards against: nin eval --tta flip not averaging the mirror, or an .onnx evaluating differently
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


# guards against: nin eval of a run disagreeing with the accuracy the run reported
def test_eval_reproduces_the_runs_reported_accuracy(data, tmp_path, capsys):
    from nin.training.trainer import train

    final = train(tiny(data, epochs=1, tta_flip=True), tmp_path / "run", **QUIET)
    assert main(["eval", str(tmp_path / "run"), "--data-dir", str(data), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tta"] == "flip" and doc["n"] == 128
    assert round(doc["accuracy"] * 128) == round(final["test_acc"] * 128)  # to the image


# guards against: an unknown TTA name silently evaluated as no TTA
def test_tta_logits_refuses_an_unknown_augmentation_by_name():
    from nin.errors import UsageError
    from nin.inference import tta_logits

    with pytest.raises(UsageError, match=r"^unknown test-time augmentation 'rot90'; choose one of: none, flip, shift$"):
        tta_logits(torch.nn.Identity(), torch.zeros(1, 1, 2, 2), "rot90")
