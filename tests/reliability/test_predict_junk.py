"""`nin predict` on a folder mixing good images and junk: every good one predicted, every bad one named."""
from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nin.cli import main
from nin.modelfile import ModelMeta, save_model
from nin.hub import create_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An untrained nin_fmnist saved as a model folder: predictions need no training."""
    torch.manual_seed(0)
    model = create_model("nin_fmnist", width=8).eval()
    out = tmp_path_factory.mktemp("model")
    save_model(out, model, ModelMeta("nin_fmnist", {"width": 8}, [f"c{i}" for i in range(10)], [1, 28, 28],
                                     "fashion-mnist", {"resize": None, "mean": [0.3], "std": [0.35]}))
    return out


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _mixed_folder(root: Path) -> tuple[list[Path], list[Path]]:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (28, 28), dtype=np.uint8)
    good = {
        "a.png": lambda p: Image.fromarray(grey).save(p),
        "b.JPG": lambda p: Image.fromarray(np.stack([grey] * 3, -1)).save(p, "JPEG"),
        "c.bmp": lambda p: Image.fromarray(grey).resize((40, 90)).save(p),
        "d.gif": lambda p: Image.fromarray(grey).save(p),
        "e.webp": lambda p: Image.fromarray(grey).save(p, lossless=True),
        "f.png": lambda p: Image.frombytes("I;16", (28, 28), (grey.astype("<u2") * 257).tobytes()).save(p),
        "g.jpeg": lambda p: Image.fromarray(grey).convert("CMYK").save(p, "JPEG"),
        "h.png": lambda p: Image.fromarray(np.dstack([grey] * 3 + [grey // 2])).save(p),  # RGBA
        "nested/deeper/i.png": lambda p: Image.fromarray(grey).save(p),
    }
    png = io.BytesIO()
    Image.fromarray(grey).save(png, "PNG")
    png = png.getvalue()
    bad = {
        "empty.png": b"",
        "text.jpg": b"hello, not an image\n",
        "half.png": png[: len(png) // 2],
        "header-only.png": png[:33],
        "noise.webp": bytes(rng.integers(0, 256, 500, dtype=np.uint8)),
        "bomb.png": _png_claiming(100_000, 100_000),
        "lying.gif": png,  # a PNG named .gif decodes fine: it is a good image, see below
        "nested/zero.bmp": b"BM" + bytes(10),
    }
    for name, make in good.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        make(root / name)
    for name, data in bad.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    os.symlink(root / "gone.png", root / "dangling.png")  # a link to nothing
    (root / "notes.txt").write_text("not an image and not an image name: skipped")
    good_paths = [root / n for n in good] + [root / "lying.gif"]
    bad_paths = [root / n for n in bad if n != "lying.gif"] + [root / "dangling.png"]
    return good_paths, bad_paths


def test_predict_folder_with_junk(tmp_path, model_dir, capsys):
    good, bad = _mixed_folder(tmp_path / "photos")
    rc = main(["predict", str(model_dir), str(tmp_path / "photos"), "--json"])
    captured = capsys.readouterr()
    assert rc == 1  # some inputs failed
    results = {r["file"]: r for r in json.loads(captured.out)}
    assert sorted(results) == sorted(map(str, good + bad))  # every image-named file, none twice
    for f in good:
        top = results[str(f)]["top"]
        assert len(top) == 1 and top[0]["class"] in {f"c{i}" for i in range(10)} and 0 < top[0]["prob"] <= 1
    errors = [line for line in captured.err.splitlines() if ": error: " in line]
    assert "Traceback" not in captured.err
    for f in bad:
        assert str(f) in results[str(f)]["error"]  # named in the JSON
        assert sum(str(f) + ":" in line for line in errors) == 1  # and once on stderr
    assert f"{len(bad)} of {len(good) + len(bad)} inputs failed" in captured.err
    assert "notes.txt" not in captured.out + captured.err


def test_junk_does_not_change_the_good_predictions(tmp_path, model_dir, capsys):
    good, _ = _mixed_folder(tmp_path / "photos")
    assert main(["predict", str(model_dir), str(tmp_path / "photos"), "--json", "--topk", "3"]) == 1
    mixed = {r["file"]: r["top"] for r in json.loads(capsys.readouterr().out) if "top" in r}
    assert main(["predict", str(model_dir), *map(str, good), "--json", "--topk", "3"]) == 0
    alone = {r["file"]: r["top"] for r in json.loads(capsys.readouterr().out)}
    assert mixed == alone and len(alone) == len(good)
