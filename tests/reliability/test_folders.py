"""Image-folder datasets (issue 20): eval uses the run's own held-out files; surprises in a folder are said."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nin.cli import main

from .common import one_error_line


def _noise_folder(root: Path, n_per_class: int = 12, classes=("a", "b", "c"), size=12) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


FOLDER_ARGS = ["--limit-train", "256", "--batch-size", "8", "--eval-batch-size", "64", "--epochs", "2",
               "--warmup-epochs", "0", "--model-kwargs", '{"width": 4}', "--quiet", "--no-tta-flip"]


# issue 20 items 1 and 8, guards against: eval of a folder run on other files than it held out, or a relative path
def test_eval_of_a_folder_run_uses_its_own_held_out_files(tmp_path, capsys, monkeypatch):
    _noise_folder(tmp_path / "imgs")
    monkeypatch.chdir(tmp_path)  # a relative folder:imgs
    run = tmp_path / "run"
    assert main(["train", "--dataset", "folder:imgs", "--seed", "1", "--out", str(run), *FOLDER_ARGS]) == 0
    meta = json.loads((run / "model.json").read_text())
    assert meta["dataset"] == f"folder:{tmp_path / 'imgs'}"  # 8: absolute
    assert meta["split"]["seed"] == 1 and meta["split"]["test_files"] == 6  # round(20% of 12) per class
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # 8: evaluated from another directory
    capsys.readouterr()
    assert main(["eval", str(run), "--json", "--precision", "run"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["n"] == 6 and "held out by seed 1" in doc["split"]
    # the run's own held-out images: what the run reported for its saved model (the closing evaluation's,
    # with the recipe's flip TTA, else the last epoch's)
    reported = meta["info"].get("tta_test_acc", last["test_acc"])
    assert round(doc["accuracy"] * 6) == round(reported * 6)
    # the folder changes: the held-out files can no longer be proven the same -> refuse, one line
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(tmp_path / "imgs" / "a" / "new.png")
    assert main(["eval", str(run)]) == 2
    assert "not the ones the run held out" in one_error_line(capsys.readouterr().err, "eval")


# issue 20 item 19, guards against: an empty class folder, nested images or a symlinked folder passing in silence
def test_folder_surprises_are_said(tmp_path, capsys):
    from nin.data.datasets import load_dataset
    from nin.errors import DatasetError
    from nin.prediction import collect_files

    root = _noise_folder(tmp_path / "imgs")
    (root / "empty").mkdir()
    with pytest.raises(DatasetError, match="'empty' holds no images"):
        load_dataset(f"folder:{root}")
    (root / "empty").rmdir()
    (root / "a" / "deeper").mkdir()
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(root / "a" / "deeper" / "x.png")
    load_dataset(f"folder:{root}")
    assert "1 image(s) in subfolders are not read" in capsys.readouterr().err
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "link").symlink_to(root / "b")
    said = []
    collect_files([tmp_path / "pics"], warn=said.append)
    assert said and "symbolic link" in said[0]
