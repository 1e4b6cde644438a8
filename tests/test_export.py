"""Saving/loading (safetensors only) and ONNX export, checked against the PyTorch model itself."""
import json
import pickle
import shutil

import pytest
import torch

from nin.cli import main
from nin.errors import CheckpointError
from nin.modelfile import META_NAME, write_safetensors
from nin.onnx import OnnxModel, export_onnx
from nin.hub import load, load_any

from .tinyrun import QUIET, tiny


@pytest.fixture(scope="module")
def run(small_run, fmnist):
    path, model, meta = small_run
    return path, model, meta, fmnist


def _logits(model, x):
    with torch.no_grad():
        return model(x)


def test_load_gives_the_same_model_in_eval_mode(run):
    path, model, meta, _ = run
    x = torch.randn(4, 1, 28, 28)
    for where in (path, path / "best.safetensors", path / META_NAME):
        loaded = load(where)
        assert not loaded.training
        assert loaded.classes == meta.classes and loaded.meta == meta
        torch.testing.assert_close(_logits(loaded, x), _logits(model, x), rtol=0, atol=0)


def test_single_safetensors_file_carries_its_meta(run, tmp_path):
    path, model, meta, _ = run
    lone = tmp_path / "alone" / "weights.safetensors"
    lone.parent.mkdir()
    shutil.copy(path / "best.safetensors", lone)  # no model.json beside it: the embedded copy is used
    assert load(lone).meta == meta
    write_safetensors(model, meta, tmp_path / "m.safetensors")
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(_logits(load(tmp_path / "m.safetensors"), x), _logits(model, x), rtol=0, atol=0)


def test_load_never_unpickles(run, tmp_path, monkeypatch):
    path, model, _, _ = run
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(path / META_NAME, bad / META_NAME)
    (bad / "best.safetensors").write_bytes(pickle.dumps(model.state_dict()))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    with pytest.raises(CheckpointError, match="best.safetensors"):
        load(bad)


@pytest.mark.parametrize("damage", ["missing", "bad_json", "wrong_model", "no_weights"])
def test_load_errors_name_the_file(run, tmp_path, damage):
    path = run[0]
    bad = tmp_path / "r"
    shutil.copytree(path, bad)
    if damage == "missing":
        bad = tmp_path / "nowhere"
    elif damage == "bad_json":
        (bad / META_NAME).write_text("{not json")
    elif damage == "wrong_model":
        data = json.loads((bad / META_NAME).read_text())
        data["model_kwargs"]["width"] = 16  # the weights are width 8
        (bad / META_NAME).write_text(json.dumps(data))
    else:
        (bad / "best.safetensors").unlink()
    with pytest.raises(CheckpointError, match=str(bad.name)):
        load(bad)


@pytest.fixture(scope="module")
def onnx_dynamic(run, tmp_path_factory):
    _, model, meta, _ = run
    return export_onnx(model, meta, tmp_path_factory.mktemp("onnx") / "m.onnx", dynamic_batch=True)


def test_onnx_matches_pytorch_on_random_and_real_images(run, onnx_dynamic):
    from nin.inference import preprocess

    _, model, meta, ds = run
    om = OnnxModel(onnx_dynamic)
    assert om.meta == meta and om.batch is None
    random = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    real = preprocess(om, ds.test.images[:256])
    for x in (random, real):
        ref = _logits(model, x)
        assert (om(x) - ref).abs().max().item() <= 1e-4
    assert torch.equal(om(real).argmax(1), _logits(model, real).argmax(1))


def test_onnx_static_batch_runs_any_number_of_images(run, tmp_path):
    _, model, meta, _ = run
    om = OnnxModel(export_onnx(model, meta, tmp_path / "b1.onnx", dynamic_batch=False))
    assert om.batch == 1
    x = torch.randn(3, 1, 28, 28)
    assert (om(x) - _logits(model, x)).abs().max().item() <= 1e-4


def test_onnx_reads_meta_from_model_json_when_not_embedded(run, onnx_dynamic, tmp_path):
    import onnx

    proto = onnx.load(str(onnx_dynamic))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "plain.onnx"))
    with pytest.raises(CheckpointError, match="plain.onnx"):
        OnnxModel(tmp_path / "plain.onnx")
    shutil.copy(run[0] / META_NAME, tmp_path / META_NAME)
    assert load_any(tmp_path / "plain.onnx").meta == run[2]


def test_cli_export_onnx_and_safetensors(run, tmp_path, capsys):
    path, model, meta, _ = run
    out = tmp_path / "cli.onnx"
    assert main(["export", str(path), "--format", "onnx", "--dynamic-batch", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "random batch" in printed and "real test images" in printed
    x = torch.randn(5, 1, 28, 28)
    assert (OnnxModel(out)(x) - _logits(model, x)).abs().max().item() <= 1e-4
    st = tmp_path / "cli.safetensors"
    assert main(["export", str(path), "--format", "safetensors", "--out", str(st)]) == 0
    torch.testing.assert_close(_logits(load(st), x), _logits(model, x), rtol=0, atol=0)


def test_cli_export_bad_run_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert "nothing" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# guards against: an ONNX file that disagrees with the model left behind
def test_export_refuses_and_removes_a_file_that_differs(data, tmp_path, capsys, monkeypatch):
    import nin.export as ex
    from nin.training.trainer import train

    train(tiny(data, epochs=1), tmp_path / "run", **QUIET)
    monkeypatch.setattr(ex, "onnx_max_diff", lambda *a: 0.5)  # inject: onnxruntime disagrees with torch
    out = tmp_path / "bad.onnx"
    assert main(["export", str(tmp_path / "run"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "removed, the ONNX model does not match" in err and not out.exists()
