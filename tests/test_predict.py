"""Image files -> predictions: formats, colour modes, sizes, bad files, and agreement with `nin eval`."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nin.cli import main
from nin.inference import predict_logits
from nin.onnx import export_onnx
from nin.hub import load
from nin.prediction import ImageError, predict_files, read_image

N = 64  # Fashion-MNIST test images written as files


@pytest.fixture(scope="module")
def run(small_run, fmnist, tmp_path_factory):
    """The shared small run + its first N Fashion-MNIST test images as PNGs."""
    ds = fmnist
    root = tmp_path_factory.mktemp("predict")
    shutil.copytree(small_run[0], root / "run")
    images = root / "images"
    images.mkdir()
    for i in range(N):
        Image.fromarray(ds.test.images[i, 0].numpy(), "L").save(images / f"{i:03d}.png")
    return root, load(root / "run"), ds


def _expected_top1(model, ds):
    return [model.classes[i] for i in predict_logits(model, ds.test.images[:N]).argmax(1).tolist()]


def test_png_predictions_equal_in_memory_evaluation(run):
    root, model, ds = run
    results = predict_files(model, [root / "images"], topk=3)
    assert [r.file for r in results] == [str(root / "images" / f"{i:03d}.png") for i in range(N)]
    assert [r.top[0][0] for r in results] == _expected_top1(model, ds)
    assert len(set(r.top[0][0] for r in results)) > 1  # not a constant predictor
    probs = predict_logits(model, ds.test.images[:1]).softmax(1)[0].topk(3)
    np.testing.assert_allclose([p for _, p in results[0].top], probs.values.tolist(), rtol=1e-5)


def test_onnx_predict_gives_the_same_top1(run, capsys):
    root, model, ds = run
    onnx_path = export_onnx(model, model.meta, root / "m.onnx", dynamic_batch=False)  # batch 1, run in a loop
    assert main(["predict", str(onnx_path), str(root / "images"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["top"][0]["class"] for r in out] == _expected_top1(model, ds)


def _grey(ds, i=0):
    return ds.test.images[i, 0].numpy()


@pytest.mark.parametrize("fmt,mode", [("PNG", "L"), ("BMP", "L"), ("WEBP", "L"), ("GIF", "L"), ("PNG", "RGB"),
                                      ("PNG", "RGBA"), ("PNG", "I;16"), ("PNG", "P"), ("TIFF", "LA")])
def test_lossless_formats_and_modes_read_back_exactly(run, tmp_path, fmt, mode):
    _, _, ds = run
    g = _grey(ds)
    if mode == "L":
        im = Image.fromarray(g, "L")
    elif mode in ("RGB", "P"):
        im = Image.fromarray(np.stack([g] * 3, -1), "RGB")
        im = im.quantize(256) if mode == "P" and len(np.unique(g)) <= 256 else im
    elif mode == "RGBA":
        im = Image.fromarray(np.stack([g, g, g, np.full_like(g, 255)], -1), "RGBA")
    elif mode == "LA":
        im = Image.fromarray(np.stack([g, np.full_like(g, 255)], -1), "LA")
    else:
        im = Image.frombytes("I;16", (28, 28), (g.astype("<u2") * 257).tobytes())  # 16-bit grey
    path = tmp_path / f"x.{fmt.lower()}"
    im.save(path, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    np.testing.assert_array_equal(read_image(path, 1, (28, 28))[0], g)


def test_jpeg_any_size_and_rgb_models(run, tmp_path):
    _, _, ds = run
    g = _grey(ds)
    big = Image.fromarray(g, "L").resize((280, 280), Image.Resampling.NEAREST).convert("RGB")
    big.save(tmp_path / "big.jpg", quality=95)
    back = read_image(tmp_path / "big.jpg", 1, (28, 28))[0].astype(int)
    assert np.abs(back - g).mean() < 12  # downscaled back to 28 x 28: close to the original
    rgb = read_image(tmp_path / "big.jpg", 3, (32, 32))  # a 3-channel model with another size
    assert rgb.shape == (3, 32, 32) and rgb.dtype == np.uint8


def test_aspect_ratio_is_kept_with_black_padding(tmp_path):
    Image.new("L", (56, 28), 200).save(tmp_path / "wide.png")
    a = read_image(tmp_path / "wide.png", 1, (28, 28))[0]
    assert (a[7:21] == 200).all() and (a[:7] == 0).all() and (a[21:] == 0).all()


def test_invert_and_transparency(tmp_path):
    dark_on_white = np.full((28, 28), 255, np.uint8)
    dark_on_white[10:18, 10:18] = 30
    Image.fromarray(dark_on_white, "L").save(tmp_path / "photo.png")
    np.testing.assert_array_equal(read_image(tmp_path / "photo.png", 1, (28, 28), invert=True)[0],
                                  255 - dark_on_white)
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[5:10, 5:10] = (255, 255, 255, 255)  # a white square; the rest fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    plain = read_image(tmp_path / "t.png", 1, (28, 28))[0]
    assert plain[5:10, 5:10].min() == 255 and plain.sum() == 25 * 255  # transparent -> black background
    dark = rgba.copy()
    dark[5:10, 5:10] = (0, 0, 0, 255)
    Image.fromarray(dark, "RGBA").save(tmp_path / "d.png")
    inv = read_image(tmp_path / "d.png", 1, (28, 28), invert=True)[0]
    assert inv[5:10, 5:10].min() == 255 and inv.sum() == 25 * 255  # with --invert too


def _bad_files(tmp_path, run):
    root = run[0]
    good = root / "images" / "000.png"
    data = good.read_bytes()
    bad = {"empty.png": b"", "text.jpg": b"hello, not an image\n", "cut.png": data[: len(data) // 2]}
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
    Image.new("L", (300, 300)).save(tmp_path / "huge.png")
    return good, [tmp_path / n for n in [*bad, "huge.png"]] + [tmp_path / "missing.png"]


def test_bad_files_are_reported_and_the_rest_predicted(run, tmp_path):
    good, bad = _bad_files(tmp_path, run)
    results = predict_files(run[1], [good, *bad], max_pixels=250 * 250)
    assert results[0].file == str(good) and results[0].error is None and results[0].top
    errors = {r.file: r.error for r in results[1:]}
    assert sorted(errors) == sorted(map(str, bad))
    for f, e in errors.items():
        assert e and f in e
    with pytest.raises(ImageError, match="huge.png.*limit"):
        read_image(tmp_path / "huge.png", 1, (28, 28), max_pixels=250 * 250)


def test_cli_predict_exit_code_and_messages(run, tmp_path):
    good, bad = _bad_files(tmp_path, run)
    cmd = [sys.executable, "-m", "nin", "predict", str(run[0] / "run"), str(good), *map(str, bad),
           "--max-pixels", str(250 * 250), "--topk", "2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    for f in bad:
        assert f.name in r.stderr
    assert r.stdout.startswith(str(good)) and len(r.stdout.strip().splitlines()) == 1


def test_help_does_not_import_torch():
    code = "import sys, nin.cli; nin.cli.build_parser(); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
