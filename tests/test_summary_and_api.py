"""`nin summary` of shipped weights, run folders and --model-kwargs; `nin.predict` in the Python API."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import nin
from nin.cli import main
from nin.errors import UsageError

from .fakedata import learnable_images
from .reliability.common import one_error_line

FAST = "nin_fmnist.fashion_mnist_fast"


def table(capsys, *argv) -> list[str]:
    assert main(["summary", *argv]) == 0
    return capsys.readouterr().out.splitlines()


def params_line(lines: list[str]) -> str:
    return next(line for line in lines if line.startswith("Total parameters"))


@pytest.fixture
def saved_run(tmp_path) -> Path:
    """A saved (untrained) width-4 nin_fmnist as a run folder writes it."""
    from nin.modelfile import ModelMeta, save_model
    from nin.hub import create_model

    run = tmp_path / "run"
    run.mkdir()
    meta = ModelMeta("nin_fmnist", {"num_classes": 10, "in_chans": 1, "width": 4}, [f"c{i}" for i in range(10)],
                     [1, 28, 28], "fashion-mnist", {"resize": None, "mean": [0.5], "std": [0.25]})
    save_model(run, create_model("nin_fmnist", width=4).eval(), meta)
    return run


# --- nin summary -------------------------------------------------------------------------------------
# issue 32 item 15
def test_summary_takes_model_kwargs_shipped_names_and_run_folders(capsys, saved_run):
    wide = table(capsys, "nin_fmnist", "--model-kwargs", '{"width": 64}')
    assert wide == str(nin.summary("nin_fmnist", width=64)).splitlines()
    assert params_line(wide) != params_line(table(capsys, "nin_fmnist"))
    best = table(capsys, "nin_fmnist.fashion_mnist_best")  # the shipped width-64 weights: the same table
    assert best[0].startswith("nin_fmnist(") and "width=64" in best[0] and "nin_fmnist.fashion_mnist_best" in best[0]
    assert best[1:] == wide[1:]

    narrow = str(nin.summary("nin_fmnist", width=4)).splitlines()
    for where in (saved_run, saved_run / "best.safetensors"):
        lines = table(capsys, str(where))
        assert str(where) in lines[0] and lines[1:] == narrow[1:]
    assert str(nin.summary(saved_run)).splitlines()[1:] == narrow[1:]  # the API takes the same
    assert table(capsys, str(saved_run), "--batch-size", "3")[1].endswith("3 x 4 x 28 x 28")


@pytest.mark.parametrize("argv, says", [
    (["nin_fmnist", "--model-kwargs", '{"widht": 64}'], "--model-kwargs {'widht': 64} do not fit nin_fmnist"),
    (["nin_fmnist", "--model-kwargs", "[64]"], "--model-kwargs must be a JSON object"),
    (["nin_fmnist", "--model-kwargs", '{"width": 0}'], "width"),
    (["nin_fmnist.fashion_mnist_best", "--model-kwargs", '{"width": 8}'], "its weights fix the architecture"),
    (["nin_fmnist.fashion_mnist_bset"], "'nin_fmnist.fashion_mnist_bset' is not a registered model"),
    (["model.onnx"], "an ONNX file"),
])
# issue 32 item 15
def test_summary_refuses_in_one_line(capsys, argv, says):
    assert main(["summary", *argv]) == 2
    line = one_error_line(capsys.readouterr().err, "summary")
    assert says in line, line


# --- nin.predict ---------------------------------------------------------------------------------------
@pytest.fixture
def pictures(tmp_path) -> tuple[Path, torch.Tensor]:
    """Six 28 x 28 grey PNGs in a folder (and their pixels), plus one broken file."""
    x, _ = learnable_images(6, 3)
    folder = tmp_path / "pics"
    folder.mkdir()
    for i, a in enumerate(x):
        Image.fromarray(a).save(folder / f"{i}.png")
    (folder / "9-broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return folder, torch.from_numpy(x)[:, None]


# issue 32 item 15
def test_nin_predict_is_the_function_not_the_module():
    assert callable(nin.predict) and nin.predict.__module__ == "nin.api" and "predict" in nin.__all__
    importlib.import_module("nin.prediction")  # importing the module behind it must not replace it
    assert callable(nin.predict) and nin.predict.__module__ == "nin.api"
    assert "topk" in nin.predict.__doc__ and "tta" in nin.predict.__doc__
    assert nin.predict_files is importlib.import_module("nin.prediction").predict_files


# issue 32 item 15
def test_nin_predict_gives_what_nin_predict_prints(pictures, capsys):
    folder, x = pictures
    got = nin.predict(FAST, folder, topk=3)
    assert main(["predict", FAST, str(folder), "--topk", "3", "--json"]) == 1  # the broken file fails
    printed = json.loads(capsys.readouterr().out)
    assert [p.to_json() for p in got] == printed
    assert got[-1].error and "9-broken.png" in got[-1].error and got[-1].top == []
    assert [len(p.top) for p in got[:-1]] == [3] * 6

    model = nin.load(FAST)
    for images in (x, x.numpy()):  # pixels at the model's size: the same answers as the files
        pixels = nin.predict(model, images, topk=3)
        assert [p.file for p in pixels] == [f"image[{i}]" for i in range(6)]
        for p, f in zip(pixels, got):
            assert [c for c, _ in p.top] == [c for c, _ in f.top]
            assert np.allclose([v for _, v in p.top], [v for _, v in f.top], atol=1e-6)
    one = nin.predict(model, x[2, 0])  # one H x W image
    assert len(one) == 1 and one[0].top[0][0] == got[2].top[0][0]
    from nin.prediction import probabilities

    plain = probabilities(model, x, tta="none")
    assert [p.top[0][1] for p in nin.predict(model, x, tta="none")] == pytest.approx(plain.max(1).values.tolist())


@pytest.mark.parametrize("call, says", [
    (lambda x: nin.predict(FAST, torch.zeros(2, 1, 32, 32, dtype=torch.uint8)), "1 x 28 x 28"),
    (lambda x: nin.predict(FAST, x.float()), "uint8"),
    (lambda x: nin.predict(FAST, x, topk=0), "topk"),
    (lambda x: nin.predict(FAST, x, tta="mirror"), "mirror"),
    (lambda x: nin.predict(nin.create_model("nin_fmnist"), x), "class names"),
    (lambda x: nin.predict(FAST, [x]), "image files and folders"),
])
# issue 32 item 15
def test_nin_predict_refuses_clearly(pictures, call, says):
    with pytest.raises(UsageError, match=says):
        call(pictures[1])
