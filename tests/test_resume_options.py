"""Gaps a user hits right after a first run: raising --epochs on --resume, --val-split with --stream,
a class too small to have a test image."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import nin
from nin.cli import main
from nin.errors import UsageError

from .fakedata import fake_fashion_dir, learnable_images
from .reliability.common import one_error_line

# the fast recipe (onecycle) shrunk: 128 images, width 4
TINY = ["--limit-train", "128", "--batch-size", "32", "--eval-batch-size", "256", "--epochs", "1",
        "--warmup-epochs", "0", "--model-kwargs", '{"width": 4}', "--quiet"]


pytestmark = pytest.mark.usefixtures("isolated")  # no test sees the user's $NIN_DATA or ~/.cache/nin


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return fake_fashion_dir(tmp_path_factory.mktemp("data"), n_train=128, n_test=64)


def png_folder(root: Path, counts: dict[str, int]) -> Path:
    """28 x 28 grey PNGs, ``counts[name]`` in each class folder."""
    x, _ = learnable_images(sum(counts.values()), 0)
    i = 0
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for _ in range(n):
            Image.fromarray(x[i]).save(root / name / f"{i:03d}.png")
            i += 1
    return root


# --- --resume RUN --epochs N -------------------------------------------------------------------
# issue 32 item 15
def test_resume_raises_the_epochs_of_a_finished_onecycle_run(data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data-dir", str(data), "--out", str(run), *TINY]) == 0
    capsys.readouterr()
    steps = torch.load(run / "last.ckpt", weights_only=True)["step"]  # one epoch's
    peak = json.loads((run / "config.json").read_text())["config"]["lr"]
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    err = capsys.readouterr().err
    # halfway through a 2-epoch onecycle without warm-up, the lr is half its peak
    assert f"note: --epochs 2 (was 1): the onecycle lr schedule is recomputed for 2 epochs, so from step {steps} " \
           f"the lr is {peak / 2:.3g} (the 1-epoch schedule had 0 there)" in err, err
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    doc = json.loads((run / "config.json").read_text())
    assert doc["config"]["epochs"] == 2 and doc["epochs_raised"] == [{"from": 1, "to": 2, "at_step": steps}]
    assert torch.load(run / "last.ckpt", weights_only=True)["config"]["epochs"] == 2
    assert json.loads((run / "status.json").read_text())["state"] == "finished"

    assert main(["train", "--resume", str(run), "--epochs", "1"]) == 2  # never lowered
    line = one_error_line(capsys.readouterr().err, "train")
    assert "--epochs 1" in line and "2-epoch run" in line, line
    assert main(["train", "--resume", str(run), "--lr", "0.5"]) == 2
    assert "only --max-steps and --epochs may be given" in one_error_line(capsys.readouterr().err, "train")

    result = nin.train(resume=run, epochs=3, quiet=True, live=False)  # the Python API, the same
    assert [r["epoch"] for r in result.history] == [1, 2, 3] and result.config.epochs == 3
    assert json.loads((run / "config.json").read_text())["config"]["epochs"] == 3
    with pytest.raises(UsageError, match="saved config"):
        nin.train(resume=run, epochs=4, lr=0.1)


# issue 32 item 15
def test_raising_the_epochs_of_a_constant_schedule_is_the_longer_run(data, tmp_path, capsys):
    """The lr of a constant schedule does not depend on --epochs, so 1 epoch + 1 more by --resume is
    bit for bit the 2-epoch run (on the CPU), and no note is printed."""
    args = ["--data-dir", str(data), *TINY, "--schedule", "constant", "--lr", "0.05"]
    assert main(["train", "--out", str(tmp_path / "a"), *args]) == 0
    assert main(["train", "--resume", str(tmp_path / "a"), "--epochs", "2", "--quiet"]) == 0
    assert "lr schedule" not in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path / "b"), *args, "--epochs", "2"]) == 0
    a, b = (load_file(tmp_path / r / "best.safetensors") for r in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- --val-split with --stream -------------------------------------------------------------------
# issue 32 item 15
def test_val_split_holds_out_the_same_files_when_streaming(tmp_path, capsys):
    from nin.data import open_dataset
    from nin.data.images import read_image
    from nin.training.recipes import get_recipe
    from nin.training.trainer import _splits

    root = png_folder(tmp_path / "photos", {"bag": 10, "boot": 10, "coat": 10})
    name = f"folder:{root}"
    cfg = get_recipe("fast", dataset=name, val_split=6)
    memory = _splits(cfg, open_dataset(name, stream=False))
    stream = _splits(cfg, open_dataset(name, stream=True))
    for m, s in zip(memory, stream):  # train, then validation: the same images in the same order
        assert s.labels.tolist() == m.labels.tolist()
        pixels = np.stack([read_image(s.paths[i], 1, (28, 28)) for i in range(len(s))])
        assert np.array_equal(pixels, m.images.numpy())
    assert sorted(np.bincount(stream[1].labels).tolist()) == [2, 2, 2]  # stratified

    run = tmp_path / "run"
    assert main(["train", "--dataset", name, "--stream", "--workers", "0", "--val-split", "6", "--out", str(run),
                 *TINY]) == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["val_acc"] is not None for r in rows)
    assert json.loads((run / "model.json").read_text())["info"]["selected"] == "best validation accuracy"

    shards = tmp_path / "shards"
    assert main(["data", "pack", name, "--out", str(shards), "--shard-size", "8"]) == 0
    capsys.readouterr()
    assert main(["train", "--dataset", f"wds:{shards}", "--val-split", "6", "--out", str(tmp_path / "w"),
                 *TINY]) == 2
    line = one_error_line(capsys.readouterr().err, "train")
    assert "--val-split" in line and f"wds:{shards}" in line and "folder:PATH" in line, line


# --- a class too small for the test split ----------------------------------------------------------
# issue 32 item 15
def test_a_class_without_a_test_image_is_named(tmp_path, capsys):
    root = png_folder(tmp_path / "few", {"bag": 6, "boot": 1, "coat": 2})
    assert main(["data", "info", f"folder:{root}"]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "no test image" in line]
    assert len(warning) == 1, err
    assert "'boot' (1 image), 'coat' (2 images)" in warning[0] and "'bag'" not in warning[0]
    assert "at least 3 images" in warning[0]

    split = tmp_path / "split"
    png_folder(split / "train", {"bag": 3, "boot": 3})
    png_folder(split / "val", {"bag": 2})
    assert main(["data", "info", f"folder:{split}"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"no test image for class\(es\) 'boot' \(3 images\): \S+val holds no images of it", err), err
