"""Regression tests for the defects a demanding new user found (issue 20); each names its item number."""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from nin.cli import main

from .common import TINY_ARGS, one_error_line, snapshot


def _noise_folder(root: Path, n_per_class: int = 12, classes=("a", "b", "c"), size=12) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


FOLDER_ARGS = ["--limit-train", "256", "--batch-size", "8", "--eval-batch-size", "64", "--epochs", "2",
               "--warmup-epochs", "0", "--model-kwargs", '{"width": 4}', "--quiet", "--no-tta-flip"]


# 1 + 8: the evaluation split is exactly the one the run held out, whatever the seed; paths are absolute
def test_1_8_eval_uses_the_runs_own_held_out_files(tmp_path, capsys, monkeypatch):
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
    assert round(doc["accuracy"] * 6) == round(last["test_acc"] * 6)  # the run's own held-out images
    # the folder changes: the held-out files can no longer be proven the same -> refuse, one line
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(tmp_path / "imgs" / "a" / "new.png")
    assert main(["eval", str(run)]) == 2
    assert "not the ones the run held out" in one_error_line(capsys.readouterr().err, "eval")


# 2: public names work twice, in any order, and after `from nin import *`
def test_2_public_names_survive_submodule_imports():
    code = """
import nin, importlib
from nin import *
for name in nin.__all__:
    assert getattr(nin, name) is not None, name
for mod in ("nin.training.trainer", "nin.evaluation", "nin.modelfile", "nin.training.recipes", "nin.data", "nin.models", "nin.prediction"):
    importlib.import_module(mod)
for name in nin.__all__:
    obj = getattr(nin, name)
    assert not isinstance(obj, type(nin)), (name, obj)   # never a module
assert callable(nin.train) and callable(nin.evaluate) and callable(nin.get_recipe) and callable(nin.load)
cfg = nin.get_recipe("fast"); cfg2 = nin.TrainConfig(); m = nin.create_model("nin_fmnist", width=4)
assert callable(nin.train) and callable(nin.evaluate)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


# 3: the learning rate never exceeds --lr, for any steps per epoch, warm-up and schedule
@settings(max_examples=300, deadline=None)
@given(steps=st.integers(1, 400), epochs=st.integers(1, 12), warm=st.floats(0, 12),
       schedule=st.sampled_from(["constant", "onecycle", "cosine", "step"]), peak=st.floats(1e-4, 10))
def test_3_lr_never_exceeds_the_peak(steps, epochs, warm, schedule, peak):
    from nin.training.recipes import TrainConfig, lr_at

    cfg = TrainConfig(epochs=epochs, warmup_epochs=min(warm, epochs), schedule=schedule, step_epochs=(1,))
    lrs = [lr_at(cfg, s, steps, peak) for s in range(epochs * steps)]
    assert max(lrs) <= peak * (1 + 1e-12) and min(lrs) >= 0


def test_3_fractional_warmup_examples():
    from nin.training.recipes import get_recipe, lr_at

    cfg = get_recipe("fast")  # warm-up 0.5 epoch, peak 0.2
    for spe in (1, 3, 235):
        assert max(lr_at(cfg, s, spe, 0.2) for s in range(cfg.epochs * spe)) <= 0.2


# 4: --max-steps leaves a usable model and a run that continues
def test_4_max_steps_keeps_a_model_and_resumes(tmp_path, data_dir, capsys):
    run = tmp_path / "ms"
    base = [a for a in TINY_ARGS if a != "--quiet"]
    assert main(["train", "--data-dir", str(data_dir), "--out", str(run), *base, "--epochs", "2",
                 "--max-steps", "2", "--quiet"]) == 0
    assert (run / "best.safetensors").exists()
    assert json.loads((run / "status.json").read_text())["state"] == "stopped"
    assert main(["eval", str(run), "--data-dir", str(data_dir)]) == 0
    assert main(["train", "--resume", str(run), "--max-steps", "5", "--quiet"]) == 0
    assert torch.load(run / "last.ckpt", weights_only=True)["step"] == 5
    assert main(["train", "--resume", str(run), "--quiet"]) == 0  # to the end
    ck = torch.load(run / "last.ckpt", weights_only=True)
    assert (ck["epoch"], ck["step"]) == (2, 8)
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


# 5: model.json is validated field by field; --json never prints NaN
@pytest.mark.parametrize("field,value,says", [
    ("preprocess", {"resize": None, "mean": [0.3], "std": [0.0]}, "preprocess.std"),
    ("preprocess", {"resize": None, "mean": [float("nan")], "std": [0.3]}, "preprocess.mean"),
    ("preprocess", {"resize": None, "mean": None, "std": None, "transform": "stretch"}, "preprocess.transform"),
    ("classes", ["only one"], "field 'classes'"),
    ("input_size", [1, 28], "field 'input_size'"),
    ("input_size", [1, 30000, 30000], "field 'input_size'"),
    ("tta", "sideways", "field 'tta'"),
])
def test_5_malformed_model_json_is_one_line(finished_run, tmp_path, capsys, field, value, says):
    meta = json.loads((finished_run / "model.json").read_text())
    meta[field] = value
    (finished_run / "model.json").write_text(json.dumps(meta))
    (tmp_path / "x.png").write_bytes((finished_run / "curves.png").read_bytes())
    for argv, cmd in ((["predict", str(finished_run / "model.json"), str(tmp_path / "x.png")], "predict"),
                      (["eval", str(finished_run / "model.json")], "eval")):
        assert main(argv) == 1
        line = one_error_line(capsys.readouterr().err, cmd)
        assert str(finished_run / "model.json") in line and says in line, line


def test_5_json_output_has_no_nan(finished_run, tmp_path, capsys):
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


# 6: written files honour the umask (0644 under 022), atomically as before
def test_6_files_honour_the_umask(tmp_path, data_dir):
    old = os.umask(0o022)
    try:
        run = tmp_path / "run"
        assert main(["train", "--data-dir", str(data_dir), "--out", str(run), *TINY_ARGS]) == 0
    finally:
        os.umask(old)
    for name in ("config.json", "metrics.csv", "last.ckpt", "best.safetensors", "model.json", "curves.png"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o644, name


# 7: a run folder in use is locked; the lock of a dead process is taken over
def test_7_second_writer_is_refused_then_takes_over(finished_run, capsys):
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from nin.training.runfolder import lock
f = lock({str(finished_run)!r}); print("locked", flush=True); time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(finished_run)
        assert main(["train", "--resume", str(finished_run), "--quiet"]) == 2
        line = one_error_line(capsys.readouterr().err, "train")
        assert f"in use by process {holder.pid}" in line, line
        assert snapshot(finished_run) == before
    finally:
        holder.kill()
        holder.wait()
    assert main(["train", "--resume", str(finished_run), "--quiet"]) == 0  # finished: nothing to do, no error
    assert "nothing to do" in capsys.readouterr().out


# 9 + 11: tracebacks where one line is promised
def test_9_out_is_a_file(tmp_path, data_dir, finished_run, capsys):
    afile = tmp_path / "afile"
    afile.write_text("keep")
    assert main(["train", "--data-dir", str(data_dir), "--out", str(afile), *TINY_ARGS]) == 2
    assert "is a file" in one_error_line(capsys.readouterr().err, "train")
    assert main(["eval", str(finished_run), "--data-dir", str(data_dir), "--out", str(afile)]) == 2
    assert "is a file" in one_error_line(capsys.readouterr().err, "eval")
    assert afile.read_text() == "keep"


# 10: a read-only run folder: the results are printed, one warning line, exit 0
def test_10_eval_on_a_folder_it_cannot_write(finished_run, data_dir, capsys, monkeypatch):
    import nin.fsutil

    real = nin.fsutil.atomic_write

    def refuse(path, write):
        if "eval" in str(path):
            raise nin.errors.NinError(f"{path}: cannot write (Read-only file system)")
        return real(path, write)

    import nin.errors
    monkeypatch.setattr(nin.fsutil, "atomic_write", refuse)  # evaluation imports it at each call
    assert main(["eval", str(finished_run), "--data-dir", str(data_dir)]) == 0
    cap = capsys.readouterr()
    assert "accuracy" in cap.out and "Traceback" not in cap.err
    assert [line for line in cap.err.splitlines() if line.strip()][0].startswith("warning:")


def _numeric_cases():
    """Every numeric option of every subcommand, with the values that must be refused."""
    run, img = "{run}", "{img}"
    subs = {
        "summary": (["summary", "nin_fmnist"], ["--batch-size", "--input-size"]),
        "eval": (["eval", run, "--data-dir", "{data}"], ["--batch-size", "--limit"]),
        "predict": (["predict", run, img], ["--topk", "--max-pixels"]),
        "cam": (["cam", run, img], ["--topk"]),
        "cam-grid": (["cam", run, "--data-dir", "{data}"], ["--grid"]),
        "export": (["export", run, "--out", "{tmp}/x.onnx"], ["--opset"]),
        "data": (["data", "info", "--data-dir", "{data}"], ["--seed"]),
    }
    from nin.training.recipes import TrainConfig
    import dataclasses
    train_flags = [f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(TrainConfig)
                   if str(f.type).split(" ")[0] in ("int", "float") and f.name != "recipe"]
    subs["train"] = (["train", "--data-dir", "{data}", "--out", "{tmp}/newrun", *TINY_ARGS], train_flags)
    zero_ok = {"--crop-padding", "--val-split", "--seed", "--save-every", "--weight-decay", "--momentum",
               "--label-smoothing", "--ema", "--warmup-epochs", "--erase", "--workers", "--max-bad",
               "--clip-grad-norm", "--min-steps-per-epoch"}
    cases = []
    for name, (argv, flags) in subs.items():
        for flag in flags:
            for value in ("0", "-1", "nan", "1e400", "99999999999999999999"):
                if value == "0" and flag in zero_ok:
                    continue
                cases.append((name, argv, flag, value))
    return cases


@pytest.mark.parametrize("name,argv,flag,value", _numeric_cases(),
                         ids=[f"{c[0]} {c[2]} {c[3]}" for c in _numeric_cases()])
def test_11_every_numeric_option_is_validated(tmp_path, finished_run, data_dir, capsys, name, argv, flag, value):
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(img)
    fill = {"{run}": str(finished_run), "{img}": str(img), "{data}": str(data_dir), "{tmp}": str(tmp_path)}
    argv = [fill.get(a, a.replace("{tmp}", str(tmp_path))) for a in argv]
    extra = [flag, value, value, value] if flag == "--input-size" else [flag, value]
    before = snapshot(finished_run)
    try:
        code = main([*argv, *extra])
    except SystemExit as e:  # argparse: refused while parsing
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert "Traceback" not in err and len([x for x in err.splitlines() if x.strip()]) == 1, err
    assert flag in err or flag.lstrip("-").replace("-", "_") in err, err
    assert snapshot(finished_run) == before
    assert not (tmp_path / "newrun").exists()


# 12: an opset the exporter cannot write is refused; the file holds the opset reported
def test_12_opset_is_real(finished_run, tmp_path, capsys):
    import onnx

    out = tmp_path / "m.onnx"
    with pytest.raises(SystemExit) as e:
        main(["export", str(finished_run), "--opset", "7", "--out", str(out)])
    assert e.value.code == 2 and "--opset: must be >= 18" in capsys.readouterr().err and not out.exists()
    assert main(["export", str(finished_run), "--opset", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    model = onnx.load(out)
    real = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert real == 20 and "ONNX opset 20" in printed.out and "Traceback" not in printed.err


# 13: a closed pipe is not a traceback
def test_13_broken_pipe_is_quiet(finished_run, tmp_path):
    for i in range(300):
        Image.fromarray(np.full((28, 28), i % 256, np.uint8)).save(tmp_path / f"{i:03d}.png")
    p = subprocess.Popen([sys.executable, "-m", "nin", "predict", str(finished_run), str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()  # as `| head -1` does
    err = p.stderr.read().decode()
    p.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


# 14: an input too large for memory is called that, not "too small"
def test_14_summary_of_a_huge_input_talks_about_memory(capsys):
    assert main(["summary", "nin_fmnist", "--input-size", "1", "20000", "20000"]) == 0
    out = capsys.readouterr().out
    assert "smallest" not in out and "GiB of fp32 activations" in out


# 15: a server that accepts but never answers: a timeout and a progress line, not a hang
def test_15_download_times_out(tmp_path, monkeypatch, capsys):
    import nin.data.datasets as datasets
    from nin.errors import DatasetError

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    port = srv.getsockname()[1]
    held = []
    threading.Thread(target=lambda: held.append(srv.accept()), daemon=True).start()
    monkeypatch.setitem(datasets._DOWNLOADS, "mnist", ("MNIST/raw", [
        (f"http://127.0.0.1:{port}/train-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz", "0" * 32)]))
    monkeypatch.setenv("NIN_DOWNLOAD_TIMEOUT", "1")
    t = time.monotonic()
    with pytest.raises(DatasetError, match="download into"):
        datasets.load_dataset("mnist", tmp_path, download=True)
    assert time.monotonic() - t < 30
    assert f"downloading http://127.0.0.1:{port}/" in capsys.readouterr().err
    srv.close()


# 16 + 17: --grid is capped; cam prints no NumPy warning
def test_16_17_cam_grid_cap_and_no_warning(finished_run, data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["cam", str(finished_run), "--grid", "2200", "--data-dir", str(data_dir)])
    assert e.value.code == 2 and "--grid" in capsys.readouterr().err
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(img)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["cam", str(finished_run), str(img), "--out", str(tmp_path / "c.png")]) == 0


# 18: a .safetensors with its own description is read by it, whatever model.json lies beside it
def test_18_embedded_metadata_wins(finished_run, tmp_path):
    from nin.hub import load

    out = tmp_path / "mine.safetensors"
    assert main(["export", str(finished_run), "--format", "safetensors", "--out", str(out)]) == 0
    other = json.loads((finished_run / "model.json").read_text())
    other["classes"] = [f"other{i}" for i in range(10)]
    (tmp_path / "model.json").write_text(json.dumps(other))
    assert load(out).classes == json.loads((finished_run / "model.json").read_text())["classes"]


# 19: an empty class folder is an error, nested images a warning; predict warns about symlinked folders
def test_19_folder_surprises_are_said(tmp_path, capsys):
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


# 20: the package tells type checkers it is typed
def test_20_py_typed():
    import importlib.resources

    assert importlib.resources.files("nin").joinpath("py.typed").is_file()
