"""Malformed dataset files, damaged or foreign checkpoints and weights, pickle payloads.

Each gives one clear error line naming the file, exit code 1 (not a traceback), no run folder is
created or changed, and no pickle payload ever runs (each payload would create a folder if it did).
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from nin.cli import main
from nin.hub import create_model

from ..fakedata import idx_bytes, learnable_images
from .common import TINY_ARGS, one_error_line, snapshot


# --- dataset files --------------------------------------------------------------------------------
def _fmnist(root: Path, n_train=60, n_test=20) -> Path:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        x, y = learnable_images(n, 0)
        (raw / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(x)))
        (raw / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(y)))
    return raw


def _replace(folder: Path, stem: str, data: bytes, gz: bool = False) -> Path:
    for old in folder.glob(stem + "*"):
        old.unlink()
    path = folder / (stem + (".gz" if gz else ""))
    path.write_bytes(data)
    return path


GOOD = idx_bytes(np.zeros((60, 28, 28), np.uint8))
IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"

# (case, file stem, content, gzip it?, what the message says)
IDX_CASES = [
    ("empty", IMAGES, b"", False, "the file is empty"),
    ("truncated gz", IMAGES, gzip.compress(GOOD)[:-40], False, "not a valid gzip file"),
    ("gz of nothing", IMAGES, b"\x1f\x8b\x08\x00garbage", False, "not a valid gzip file"),
    ("wrong magic", IMAGES, b"\x01\x00\x08\x03" + GOOD[4:], True, "not an IDX file"),
    ("not idx", IMAGES, b"GIF89a" + bytes(100), False, "not an IDX file"),
    ("wrong ndim", IMAGES, b"\x00\x00\x08\x02" + GOOD[4:], True, "2 dimensions, expected 3"),
    ("data type", IMAGES, b"\x00\x00\x0d\x03" + GOOD[4:], True, "0x0d not supported"),
    ("header cut", IMAGES, GOOD[:9], False, "ends inside the IDX header"),
    ("zero dim", IMAGES, GOOD[:4] + bytes(4) + GOOD[8:], True, "include a zero"),
    ("huge dims", IMAGES, GOOD[:4] + b"\xff\xff\xff\xff" * 3, True, "implausibl"),
    ("wrong dims", IMAGES, GOOD[:12] + (27).to_bytes(4, "big") + GOOD[16:], True, "longer"),
    ("truncated raw", IMAGES, GOOD[:-1], False, "truncated"),
    ("extra bytes", IMAGES, GOOD + b"\x00", True, "longer"),
    ("count differs", IMAGES, idx_bytes(np.zeros((59, 28, 28), np.uint8)), True, "59"),
    ("label out of range", LABELS, idx_bytes(np.array([1, 2, 10] + [0] * 57, np.uint8)), True,
     "label 10 at record 2 is out of range"),
    ("labels are images", LABELS, GOOD, True, "3 dimensions, expected 1"),
]


@pytest.mark.parametrize("case,stem,data,gz,message", IDX_CASES, ids=[c[0] for c in IDX_CASES])
def test_malformed_idx_files(tmp_path, capsys, case, stem, data, gz, message):
    raw = _fmnist(tmp_path / "data")
    bad = _replace(raw, stem, gzip.compress(data) if gz else data, gz)
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(tmp_path / "data"), "--out", str(out), *TINY_ARGS]) == 1
    line = one_error_line(capsys.readouterr().err, "train")
    assert str(bad) in line and message in line, line
    assert not out.exists()  # the data is checked before the run folder is created


def _cifar10(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rec = np.zeros((4, 1 + 3072), np.uint8)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        (folder / name).write_bytes(rec.tobytes())
    (folder / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)))
    return folder


def _svhn(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name in ("train", "test"):
        scipy.io.savemat(folder / f"{name}_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": [[1], [2]]})
    return folder


def _image_folder(root: Path) -> Path:
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), i).save(root / cls / f"{i}.png")
    return root


OTHER_CASES = [  # (case, dataset, make the folder, damage it -> the bad path, message)
    ("cifar cut short", "cifar10", _cifar10,
     lambda d: _replace(d, "data_batch_3.bin", b"\x00" * 5000), "cut short"),
    ("cifar label", "cifar10", _cifar10,
     lambda d: _replace(d, "test_batch.bin", b"\x0b" + bytes(3072)), "label 11 at record 0"),
    ("cifar empty", "cifar10", _cifar10, lambda d: _replace(d, "data_batch_1.bin", b""), "the file is empty"),
    ("cifar names", "cifar10", _cifar10,
     lambda d: _replace(d, "batches.meta.txt", b"cat\ndog\n"), "2 class names, expected 10"),
    ("cifar names binary", "cifar10", _cifar10,
     lambda d: _replace(d, "batches.meta.txt", b"\xff\xfe\x00bad"), "cannot read class names"),
    ("svhn not mat", "svhn", _svhn,
     lambda d: _replace(d, "train_32x32.mat", b"MATLAB? no" * 20), "not a readable MATLAB file"),
    ("svhn labels", "svhn", _svhn,
     lambda d: (scipy.io.savemat(d / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": [[0], [11]]}),
                d / "test_32x32.mat")[1], "labels must be integers 1..10"),
    ("svhn no X", "svhn", _svhn,
     lambda d: (scipy.io.savemat(d / "train_32x32.mat", {"Z": np.zeros(3)}), d / "train_32x32.mat")[1],
     "expected variables X and y"),
    ("folder broken image", "folder", _image_folder,
     lambda d: _replace(d / "b", "1.png", b"\x89PNG\r\n\x1a\nnot really"), "not a readable image"),
    ("folder empty image", "folder", _image_folder, lambda d: _replace(d / "a", "0.png", b""), "not a readable image"),
]


@pytest.mark.parametrize("case,name,make,damage,message", OTHER_CASES, ids=[c[0] for c in OTHER_CASES])
def test_malformed_cifar_svhn_and_image_folder_files(tmp_path, capsys, case, name, make, damage, message):
    folder = make(tmp_path / "data")
    bad = damage(folder)
    dataset = f"folder:{folder}" if name == "folder" else name
    out = tmp_path / "run"
    assert main(["train", "--dataset", dataset, "--data-dir", str(folder), "--out", str(out), *TINY_ARGS]) == 1
    line = one_error_line(capsys.readouterr().err, "train")
    assert str(bad) in line and message in line, line
    assert not out.exists()


# issue 32 item 13
def test_an_in_memory_folder_names_every_unreadable_file_and_the_way_round_them(tmp_path, capsys):
    """Every file is decoded before the error: one line with the count, the first few named, and the
    option that trains anyway; following it trains and lists them all in bad_files.txt."""
    import re

    root = tmp_path / "photos"
    x, _ = learnable_images(24, 0)
    for i in range(24):
        (root / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(root / "ab"[i % 2] / f"{i:02d}.png")
    bad = [root / "a" / "00.png", root / "a" / "06.png", root / "b" / "03.png", root / "b" / "11.png",
           root / "b" / "17.png"]
    bad[0].write_bytes(b"")
    for f in bad[1:]:
        f.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "run"
    argv = ["train", "--dataset", f"folder:{root}", "--out", str(out), *TINY_ARGS]
    assert main([*argv, "--no-stream"]) == 1
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"{root}: 5 of 24 image files could not be read" in line, line
    named = [f for f in bad if f"{f}: not a readable image (" in line]
    assert len(named) == 3 and "and 2 more" in line, line
    assert not out.exists()
    fraction = re.search(r"--stream --max-bad ([0-9.]+)", line).group(1)
    assert main([*argv, "--stream", "--max-bad", fraction, "--workers", "0"]) == 0
    listed = (out / "bad_files.txt").read_text().splitlines()
    assert sorted(entry.split("\t")[0] for entry in listed) == sorted(map(str, bad))


def test_data_damaged_under_a_run_being_resumed_leaves_the_run_alone(tmp_path, finished_run, data_dir, capsys):
    data = shutil.copytree(data_dir, tmp_path / "data-copy")
    bad = _replace(data / "FashionMNIST" / "raw", "t10k-labels-idx1-ubyte", b"\x00\x00\x08\x01\x00\x00", True)
    st = torch.load(finished_run / "last.ckpt", weights_only=True)
    st["config"].update(data_dir=str(data), epochs=2)  # the run reads the copy, and has an epoch to go
    torch.save(st, finished_run / "last.ckpt")
    before = snapshot(finished_run)
    assert main(["train", "--resume", str(finished_run), "--quiet"]) == 1
    assert str(bad) in one_error_line(capsys.readouterr().err, "train")
    assert snapshot(finished_run) == before


# --- checkpoints ----------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs os.mkdir(marker)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _ckpt(run: Path) -> dict:
    return torch.load(run / "last.ckpt", weights_only=True)


def _wider_model_state() -> dict:
    return create_model("nin_fmnist", num_classes=10, in_chans=1, width=16).state_dict()


def _another_model(run):  # a last.ckpt copied in from a run of another model
    st = _ckpt(run)
    st["model"], st["config"]["model_kwargs"] = _wider_model_state(), {"width": 16}
    return st


def _tensors_do_not_fit(run):  # the config says width 8, the tensors are width 16
    st = _ckpt(run)
    st["model"] = _wider_model_state()
    return st


def _incomplete(run):
    st = _ckpt(run)
    del st["optimizer"], st["step"]
    return st


CKPT_CASES = [  # (case, new last.ckpt: bytes or a state to torch.save, what the message says)
    ("truncated", lambda run: (run / "last.ckpt").read_bytes()[:3000], "not a loadable nin checkpoint"),
    ("truncated tail", lambda run: (run / "last.ckpt").read_bytes()[:-200], "not a loadable nin checkpoint"),
    ("empty", lambda run: b"", "not a loadable nin checkpoint"),
    ("text", lambda run: b"this is not a checkpoint\n" * 10, "not a loadable nin checkpoint"),
    ("plain state_dict", lambda run: _wider_model_state(), "not a nin checkpoint"),
    ("tensor", lambda run: torch.zeros(3), "not a nin checkpoint"),
    ("another model", _another_model, "belongs to another run (model_kwargs differ"),
    ("tensors do not fit", _tensors_do_not_fit, "does not fit nin_fmnist"),
    ("incomplete", _incomplete, "incomplete nin checkpoint (missing optimizer, step)"),
]


@pytest.mark.parametrize("case,make,message", CKPT_CASES, ids=[c[0] for c in CKPT_CASES])
def test_bad_last_ckpt_on_resume(finished_run, capsys, case, make, message):
    content = make(finished_run)
    if isinstance(content, bytes):
        (finished_run / "last.ckpt").write_bytes(content)
    else:
        torch.save(content, finished_run / "last.ckpt")
    before = snapshot(finished_run)
    assert main(["train", "--resume", str(finished_run), "--quiet"]) == 1
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"{finished_run / 'last.ckpt'}: " in line and message in line, line
    assert snapshot(finished_run) == before  # nothing in the run folder changed, nothing added


@pytest.mark.parametrize("where", ["inside a torch checkpoint", "a bare pickle"])
def test_pickle_payload_in_last_ckpt_never_runs(tmp_path, finished_run, capsys, where):
    marker = tmp_path / "payload-ran"
    if where == "inside a torch checkpoint":
        st = _ckpt(finished_run)
        st["history"] = [Payload(marker)]
        torch.save(st, finished_run / "last.ckpt")
        # the control: an unsafe load of this very file runs the payload
        torch.load(finished_run / "last.ckpt", weights_only=False)
    else:
        (finished_run / "last.ckpt").write_bytes(pickle.dumps({"format": "nin-ckpt/1", "x": Payload(marker)}, protocol=2))
        pickle.loads((finished_run / "last.ckpt").read_bytes())
    assert marker.is_dir()
    marker.rmdir()
    before = snapshot(finished_run)
    assert main(["train", "--resume", str(finished_run), "--quiet"]) == 1
    line = one_error_line(capsys.readouterr().err, "train")
    assert f"{finished_run / 'last.ckpt'}: not a loadable nin checkpoint" in line
    assert not marker.exists()
    assert snapshot(finished_run) == before


def test_resume_without_a_checkpoint(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nowhere"), "--quiet"]) == 1
    assert "nowhere: no such run folder" in one_error_line(capsys.readouterr().err, "train")
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty"), "--quiet"]) == 1
    assert "last.ckpt: no checkpoint to resume from" in one_error_line(capsys.readouterr().err, "train")
    assert os.listdir(tmp_path / "empty") == []


# --- saved models (best.safetensors + model.json), as predict / eval / export read them ----------
def _weights_cases(run: Path, marker: Path):
    weights = (run / "best.safetensors").read_bytes()
    wider = create_model("nin_fmnist", num_classes=10, in_chans=1, width=16)
    from safetensors.torch import save

    return {
        "truncated": ("best.safetensors", weights[: len(weights) // 2], "not a readable safetensors file"),
        "empty": ("best.safetensors", b"", "not a readable safetensors file"),
        "pickle payload": ("best.safetensors", pickle.dumps(Payload(marker), protocol=2), "not a readable safetensors file"),
        "torch file": ("best.safetensors", (run / "last.ckpt").read_bytes(), "not a readable safetensors file"),
        "another model": ("best.safetensors", save(wider.state_dict()), "weights do not fit nin_fmnist"),
        "model.json garbage": ("model.json", b"{not json", "not a valid nin model.json"),
        "model.json unknown model": ("model.json", (run / "model.json").read_bytes().replace(
            b'"nin_fmnist"', b'"resnet50"'), "cannot build model 'resnet50'"),
    }


@pytest.mark.parametrize("case", ["truncated", "empty", "pickle payload", "torch file", "another model",
                                  "model.json garbage", "model.json unknown model"])
@pytest.mark.parametrize("command", ["predict", "eval", "export"])
def test_bad_saved_model(tmp_path, finished_run, data_dir, capsys, case, command):
    marker = tmp_path / "payload-ran"
    name, content, message = _weights_cases(finished_run, marker)[case]
    (finished_run / name).write_bytes(content)
    Image.new("L", (28, 28), 128).save(tmp_path / "x.png")
    before = snapshot(finished_run)
    argv = {"predict": ["predict", str(finished_run), str(tmp_path / "x.png")],
            "eval": ["eval", str(finished_run), "--data-dir", str(data_dir)],
            "export": ["export", str(finished_run), "--format", "safetensors"]}[command]
    assert main(argv) == 1
    line = one_error_line(capsys.readouterr().err, command)
    assert f"{finished_run / name}: " in line and message in line, line
    assert not marker.exists()
    assert snapshot(finished_run) == before


# issue 20 item 5, guards against: a malformed model.json field failing with a traceback, or unnamed
@pytest.mark.parametrize("field,value,says", [
    ("preprocess", {"resize": None, "mean": [0.3], "std": [0.0]}, "preprocess.std"),
    ("preprocess", {"resize": None, "mean": [float("nan")], "std": [0.3]}, "preprocess.mean"),
    ("preprocess", {"resize": None, "mean": None, "std": None, "transform": "stretch"}, "preprocess.transform"),
    ("classes", ["only one"], "field 'classes'"),
    ("input_size", [1, 28], "field 'input_size'"),
    ("input_size", [1, 30000, 30000], "field 'input_size'"),
    ("tta", "sideways", "field 'tta'"),
])
def test_a_malformed_model_json_is_one_line_naming_the_field(finished_run, tmp_path, capsys, field, value, says):
    meta = json.loads((finished_run / "model.json").read_text())
    meta[field] = value
    (finished_run / "model.json").write_text(json.dumps(meta))
    (tmp_path / "x.png").write_bytes((finished_run / "curves.png").read_bytes())
    for argv, cmd in ((["predict", str(finished_run / "model.json"), str(tmp_path / "x.png")], "predict"),
                      (["eval", str(finished_run / "model.json")], "eval")):
        assert main(argv) == 1
        line = one_error_line(capsys.readouterr().err, cmd)
        assert str(finished_run / "model.json") in line and says in line, line


# issue 20 item 5, guards against: --json printing NaN (not JSON) for a model with non-finite weights
def test_predict_json_never_prints_nan(finished_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    w = load_file(finished_run / "best.safetensors")
    w = {k: (v * float("nan") if v.is_floating_point() else v) for k, v in w.items()}
    save_file(w, finished_run / "best.safetensors")  # no embedded description: model.json is read
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(img)
    main(["predict", str(finished_run), str(img), "--json"])
    out = capsys.readouterr().out
    doc = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert "error" in doc[0] and "non-finite" in doc[0]["error"]


# issue 20 item 18, guards against: a stray model.json beside a .safetensors overriding its own description
def test_a_safetensors_own_description_wins_over_model_json(finished_run, tmp_path):
    from nin.hub import load

    out = tmp_path / "mine.safetensors"
    assert main(["export", str(finished_run), "--format", "safetensors", "--out", str(out)]) == 0
    other = json.loads((finished_run / "model.json").read_text())
    other["classes"] = [f"other{i}" for i in range(10)]
    (tmp_path / "model.json").write_text(json.dumps(other))
    assert load(out).classes == json.loads((finished_run / "model.json").read_text())["classes"]
