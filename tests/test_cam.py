"""Class activation maps print `nin predict`'s probabilities (the model's own TTA): one number per image.

The shipped fast model's own TTA is flip, so a probability computed without it differs from predict's."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nin.cli import main
from nin.figures import cam_grid_figure, save_cam_figure, save_cam_grid
from nin.inference import predict_logits
from nin.hub import load
from nin.prediction import predict_files

from .tinyrun import QUIET, tiny

FAST = "nin_fmnist.fashion_mnist_fast"


@pytest.fixture(scope="module")
def fast():
    model = load(FAST)
    assert model.meta.tta == "flip"  # the point of these tests: a model whose own TTA is not "none"
    return model


def _png(array: np.ndarray, path: Path) -> Path:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())
    return path


@pytest.fixture(scope="module")
def far_image(fmnist, fast, tmp_path_factory) -> Path:
    """The one of the first 64 test images whose top probability moves most with flip TTA, as a PNG."""
    images = fmnist.test.images[:64]
    plain = predict_logits(fast, images, tta="none").softmax(1)
    flip = predict_logits(fast, images, tta="flip").softmax(1)
    top = flip.argmax(1, keepdim=True)
    gap = (flip.gather(1, top) - plain.gather(1, top)).abs()[:, 0]
    i = int(gap.argmax())
    assert gap[i] > 0.01  # printed to 0.1%, the two numbers differ
    return _png(images[i, 0].numpy(), tmp_path_factory.mktemp("cam") / f"test{i}.png")


def _numbers(line: str) -> str:
    """'path: Bag 97.1%, ...' -> 'Bag 97.1%, ...'"""
    return line.split(": ", 1)[1].strip()


def test_cam_prints_the_probabilities_nin_predict_prints(fast, far_image, tmp_path, capsys):
    image = torch.from_numpy(np.array(Image.open(far_image)))[None]
    flip = predict_logits(fast, image[None], tta="flip").softmax(1)[0].topk(3)  # by hand: the model's TTA
    want = [(fast.classes[c], p) for p, c in zip(flip.values.tolist(), flip.indices.tolist())]
    assert [c for c, _ in predict_files(fast, [far_image], topk=3)[0].top] == [c for c, _ in want]
    top = save_cam_figure(fast, image, tmp_path / "f.png", topk=3)
    assert [c for c, _ in top] == [c for c, _ in want]
    np.testing.assert_allclose([p for _, p in top], [p for _, p in want], atol=1e-6)

    assert main(["predict", FAST, str(far_image), "--topk", "3"]) == 0
    predicted = capsys.readouterr().out.strip()
    assert main(["cam", FAST, str(far_image), "--out", str(tmp_path / "c.png")]) == 0
    drawn = capsys.readouterr().out.strip()
    assert _numbers(drawn) == _numbers(predicted), (drawn, predicted)
    assert _numbers(predicted) == ", ".join(f"{c} {p:.1%}" for c, p in want)


def test_cam_grid_titles_and_accuracy_are_predicts(fmnist, fast, tmp_path):
    images, labels = fmnist.test.images[:32], fmnist.test.labels[:32]
    probs = predict_logits(fast, images, tta="flip").softmax(1)  # nin predict's computation, by hand
    plain = predict_logits(fast, images, tta="none").softmax(1)
    pred = probs.argmax(1)
    want = [f"{fast.classes[c]} {probs[i, c]:.0%}" for i, c in enumerate(pred.tolist())]
    without = [f"{fast.classes[c]} {plain[i, c]:.0%}" for i, c in enumerate(plain.argmax(1).tolist())]
    assert want != without  # some title reads differently without the model's TTA
    fig, none = cam_grid_figure(fast, images)
    assert none is None and [ax.get_title() for ax in fig.axes[:32]] == want
    acc = save_cam_grid(fast, images, labels, tmp_path / "grid.png")
    assert acc == pytest.approx(float((pred == labels).float().mean()))


# guards against: a class-map figure drawing another class's map than its title names
def test_cam_figure_draws_the_chosen_classes_maps(data, tmp_path, monkeypatch):
    import nin.figures as ev  # the figures, and the inference functions they call, as figures sees them
    from nin.hub import load
    from nin.training.trainer import train

    # no TTA: the figures rank by predict's probabilities (the model's own TTA), here the plain logits' order
    train(tiny(data, epochs=1, tta_flip=False), tmp_path / "run", **QUIET)
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
