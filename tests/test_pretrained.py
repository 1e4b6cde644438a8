"""The weights that ship inside the package: intact, as accurate as they say, usable by name everywhere."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

import nin
from nin.cli import main
from nin.hub import DEFAULT, WEIGHTS_DIR, list_pretrained, pretrained_info

from .fakedata import fake_fashion_dir

SHIPPED = list_pretrained()


def test_the_default_model_ships():
    assert DEFAULT in SHIPPED and pretrained_info("nin_fmnist")["name"] == DEFAULT


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_file_is_intact_and_describes_itself(name):
    info = pretrained_info(name)
    path = WEIGHTS_DIR / info["file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == info["sha256"]
    assert path.stat().st_size == info["bytes"]
    model = nin.load(name)
    assert model.meta.model == info["model"] and sum(p.numel() for p in model.parameters()) == info["params"]
    for key in ("command", "recipe", "config", "nin_version", "git_commit", "date", "accuracy", "params"):
        assert key in model.meta.info, key
    assert model.meta.info["command"].startswith("nin train --recipe")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_accuracy_is_what_the_metadata_states_to_the_image(name, fmnist):
    from nin.devices import cpu_supports_bf16
    from nin.evaluation import evaluate

    info = pretrained_info(name)
    model = nin.load(name)
    n = len(fmnist.test)
    # at 224 x 224 (nin_d2l) one pass over the 10,000 images costs a minute or two of a 2-core CPU: there
    # only the test-time augmentation the model evaluates with is checked again (publish measured both)
    ttas = ("none", "flip") if info["input_size"][-1] <= 64 else (model.meta.tta,)
    for precision in ("fp32", "bf16") if cpu_supports_bf16() else ("fp32",):
        for tta in ttas:
            got = evaluate(model, fmnist.test, tta=tta, precision=precision).accuracy
            assert round(got * n) == round(info["accuracy"][precision][tta] * n), (precision, tta, got)


def test_a_damaged_install_is_refused(tmp_path, monkeypatch):
    import shutil

    import nin.hub as pre
    from nin.errors import CheckpointError

    fake = tmp_path / "weights"
    shutil.copytree(WEIGHTS_DIR, fake)
    f = fake / pretrained_info(DEFAULT)["file"]
    data = bytearray(f.read_bytes())
    data[-5] ^= 0xFF
    f.write_bytes(bytes(data))
    monkeypatch.setattr(pre, "WEIGHTS_DIR", fake)
    monkeypatch.setattr(pre, "INDEX", fake / "index.json")
    with pytest.raises(CheckpointError, match="sha256"):
        pre.pretrained_path(DEFAULT)


def test_names_work_in_python(tmp_path):
    m = nin.create_model("nin_fmnist", pretrained=True)
    ref = nin.load(DEFAULT)
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(m.eval()(x), ref(x))
    full = nin.create_model(DEFAULT, pretrained=True)
    torch.testing.assert_close(full.eval()(x), ref(x))
    with pytest.warns(UserWarning, match="the class-map layer starts fresh: 5 classes"):  # said, not silent
        five = nin.create_model("nin_fmnist", pretrained=True, num_classes=5)  # a fine-tuning start
    assert five.num_classes == 5
    kept = five.state_dict()["features.0.0.weight"]
    assert torch.equal(kept, ref.state_dict()["features.0.0.weight"])
    assert nin.list_pretrained() == SHIPPED


def test_predict_with_no_model_equals_eval_on_the_same_100_images(fmnist, tmp_path, capsys):
    from nin.data.datasets import Split
    from nin.evaluation import evaluate

    images, labels = fmnist.test.images[:100], fmnist.test.labels[:100]
    for i, img in enumerate(images):
        Image.fromarray(img[0].numpy()).save(tmp_path / f"{i:03d}.png")
    assert main(["predict", str(tmp_path), "--json"]) == 0  # no model named: the default shipped one
    preds = json.loads(capsys.readouterr().out)
    model = nin.load(DEFAULT)
    top = [model.classes.index(p["top"][0]["class"]) for p in preds]
    result = evaluate(model, Split(images, labels), precision="fp32")
    assert sum(int(t == int(y)) for t, y in zip(top, labels)) == round(result.accuracy * 100)
    # and the per-image predictions are the evaluation's
    from nin.inference import predict_logits

    assert top == predict_logits(model, images, tta=model.meta.tta).argmax(1).tolist()


def test_cli_takes_names(tmp_path, capsys):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(img)
    assert main(["predict", DEFAULT, str(img)]) == 0
    assert main(["cam", DEFAULT, str(img), "--out", str(tmp_path / "c.png")]) == 0
    assert main(["export", DEFAULT, "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")]) == 0
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert DEFAULT in out and "shipped weights" in out


def test_init_from_a_shipped_model(tmp_path):
    from nin.training.recipes import get_recipe
    from nin.training.trainer import set_up

    data = fake_fashion_dir(tmp_path / "data", n_train=64, n_test=32)
    s = set_up(get_recipe("fast", data_dir=str(data), init_from=DEFAULT, limit_train=64))
    ref = nin.load(DEFAULT).state_dict()
    assert all(torch.equal(v.float(), ref[k].float()) for k, v in s.model.state_dict().items())


@pytest.mark.slow
def test_the_fast_weights_retrain_from_their_recorded_command(fmnist, tmp_path):
    """`nin train --recipe fast` again: within 0.3 points of the shipped accuracy (bit for bit on this machine
    with the same thread count, which the README states)."""
    from nin.evaluation import evaluate
    from nin.training.recipes import TrainConfig
    from nin.training.trainer import train

    info = pretrained_info("nin_fmnist.fashion_mnist_fast")
    cfg = TrainConfig.from_dict({**info_config(info), "data_dir": None})
    train(cfg, tmp_path / "again", quiet=True, log=lambda *a, **k: None)
    again = nin.load(tmp_path / "again")
    acc = evaluate(again, fmnist.test, tta="none", precision="fp32").accuracy
    assert abs(acc - info["accuracy"]["fp32"]["none"]) <= 0.003


def info_config(info: dict) -> dict:
    return nin.load(info["name"]).meta.info["config"]


# guards against: a model fresh from create_model (training mode, as torchvision's) predicting with each
# batch's own batch-norm statistics: near-uniform probabilities for a single image
def test_predict_with_a_created_model_uses_its_running_statistics():
    from pathlib import Path

    shirt = str(Path(__file__).resolve().parents[1] / "docs" / "shirt.png")
    model = nin.create_model("nin_fmnist", pretrained=True)
    assert model.training  # as torchvision and timm return them
    created = nin.predict(model, shirt, topk=3)[0].top
    loaded = nin.predict(nin.load(DEFAULT), shirt, topk=3)[0].top
    assert [c for c, _ in created] == [c for c, _ in loaded]
    assert [p for _, p in created] == pytest.approx([p for _, p in loaded], abs=1e-6)
    assert created[0][1] > 0.5 and model.training  # and its mode is given back
