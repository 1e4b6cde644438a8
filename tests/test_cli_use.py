"""Using a model from the command line says what it does: mistyped model names, stdin, eval's progress,
export names, class names in any script, tiny images (issue 32, items 8, 12, 14)."""
from __future__ import annotations

import io
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nin.cli import main

from .reliability.common import one_error_line


def _png(path: Path, size=(28, 28), value: int = 120) -> Path:
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)).save(path)
    return path


def _folder_and_model(root: Path, classes: list[str], n_per_class: int = 8) -> tuple[Path, Path]:
    """(an image folder with one subfolder per class, a small untrained nin_fmnist saved for those classes)."""
    from nin.modelfile import ModelMeta, save_model
    from nin.hub import create_model

    data = root / "images"
    for k, c in enumerate(classes):
        (data / c).mkdir(parents=True)
        for i in range(n_per_class):
            _png(data / c / f"{i}.png", value=10 * k + i)
    torch.manual_seed(0)
    model = create_model("nin_fmnist", num_classes=len(classes), width=4)
    meta = ModelMeta("nin_fmnist", {"num_classes": len(classes), "width": 4}, list(classes), [1, 28, 28],
                     f"folder:{data}", {"resize": None, "mean": None, "std": None})
    (root / "model").mkdir()
    save_model(root / "model", model.eval(), meta)
    return data, root / "model"


# issue 32 item 8: a mistyped model name is an error before anything is predicted, with the name meant
def test_predict_refuses_a_mistyped_model_name(tmp_path, capsys):
    img = _png(tmp_path / "shirt.png")
    assert main(["predict", "nin_fmnist.fashion_mnist_bset", str(img)]) == 2
    cap = capsys.readouterr()
    line = one_error_line(cap.err, "predict")
    assert "nin_fmnist.fashion_mnist_bset" in line and "did you mean nin_fmnist.fashion_mnist_best?" in line, line
    assert cap.out == ""
    # a missing image named first is still one failed input among the others, not a model
    assert main(["predict", str(tmp_path / "missing.png"), str(img)]) == 1
    cap = capsys.readouterr()
    assert "missing.png: no such file" in cap.err and cap.out.startswith(f"{img}: ")


# issue 32 item 8: a run folder that has no saved model yet is not a folder of images to predict
def test_predict_refuses_a_run_folder_without_a_model(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "status.json").write_text('{"state": "running"}')
    img = _png(tmp_path / "shirt.png")
    assert main(["predict", str(run), str(img)]) == 2
    cap = capsys.readouterr()
    assert "no saved model yet" in one_error_line(cap.err, "predict") and cap.out == ""


# issue 32 item 8 (and 15): `nin predict -` reads one image from standard input
def test_predict_reads_an_image_from_stdin(tmp_path, capsys, monkeypatch):
    img = _png(tmp_path / "shirt.png")
    assert main(["predict", "--json", "--topk", "3", str(img)]) == 0
    from_file = json.loads(capsys.readouterr().out)[0]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(img.read_bytes())))
    assert main(["predict", "--json", "--topk", "3", "-"]) == 0
    from_stdin = json.loads(capsys.readouterr().out)[0]
    assert from_stdin == {**from_file, "file": "-"}


# issue 32 item 12: nin eval draws a progress bar on a terminal (stderr), nothing otherwise; same results
def test_eval_shows_progress_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    data, model = _folder_and_model(tmp_path, ["a", "b", "c"])
    argv = ["eval", str(model), "--data", f"folder:{data}", "--json", "--batch-size", "2"]
    assert main(argv) == 0
    plain = capsys.readouterr()
    assert "img" not in plain.err and "%" not in plain.err, plain.err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(argv) == 0
    tty = capsys.readouterr()
    assert "eval" in tty.err and "img" in tty.err and "%|" in tty.err, tty.err
    assert json.loads(tty.out) == json.loads(plain.out)


# issue 32 item 12: evaluate's progress hook is told of every image, and changes nothing
def test_evaluate_reports_progress(tmp_path):
    from nin.data.datasets import load_dataset
    from nin.evaluation import evaluate
    from nin.hub import load

    data, model_dir = _folder_and_model(tmp_path, ["a", "b", "c"])
    model, ds = load(model_dir), load_dataset(f"folder:{data}")
    seen = []
    with_hook = evaluate(model, ds.test, batch_size=2, tta="none", progress=seen.append, classes=ds.classes)
    without = evaluate(model, ds.test, batch_size=2, tta="none", classes=ds.classes)
    assert sum(seen) == len(ds.test) == with_hook.n and len(seen) == -(-len(ds.test) // 2)
    assert (with_hook.confusion == without.confusion).all()


# issue 32 item 14: an export's file name says its format: a .pt name is refused, the suffix chooses
def test_export_name_must_say_its_format(tmp_path, capsys):
    from nin.hub import load

    for argv in (["--out", str(tmp_path / "x.pt")], ["--format", "safetensors", "--out", str(tmp_path / "x.onnx")]):
        assert main(["export", "nin_fmnist.fashion_mnist_fast", *argv]) == 2
        assert "--out" in one_error_line(capsys.readouterr().err, "export")
    assert list(tmp_path.iterdir()) == []
    out = tmp_path / "m.safetensors"
    assert main(["export", "nin_fmnist.fashion_mnist_fast", "--out", str(out)]) == 0
    assert "fp32 weights" in capsys.readouterr().out
    assert load(out).meta.model == "nin_fmnist"  # a safetensors file, as its name says


# issue 32 item 14: class names matplotlib's fonts cannot draw (CJK) leak no warning from nin eval
def test_eval_of_cjk_class_names_warns_nothing(tmp_path, capsys):
    data, model = _folder_and_model(tmp_path, ["外套", "包", "靴子"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["eval", str(model), "--data", f"folder:{data}", "--out", str(tmp_path / "eval")]) == 0
    cap = capsys.readouterr()
    assert not [w for w in caught if "Glyph" in str(w.message)], [str(w.message) for w in caught]
    assert "Glyph" not in cap.err and "warning" not in cap.err.lower(), cap.err
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 0 and "外套" in cap.out


# issue 32 item 14: an image far below the model's size is predicted with a note saying so
def test_predict_notes_a_tiny_image(tmp_path, capsys):
    dot, fair = _png(tmp_path / "dot.png", size=(1, 1)), _png(tmp_path / "fair.png", size=(20, 30))
    assert main(["predict", str(dot), str(fair)]) == 0
    cap = capsys.readouterr()
    notes = [line for line in cap.err.splitlines() if line.strip()]
    assert notes == [f"note: {dot} is 1x1, upscaled to 28x28; the prediction may mean little"], cap.err
    assert main(["predict", "--json", str(dot), str(fair)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "upscaled to 28x28" in doc[0]["note"] and "note" not in doc[1]
