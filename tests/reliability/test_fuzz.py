"""Hypothesis fuzzing of the IDX parser and of image decoding: 1,000 examples each, clean errors only.

Inputs are valid files with random damage (bytes flipped, cut, inserted, header fields rewritten)
as well as raw bytes: the parser either returns exactly what the header describes, or raises the
one error type that names the file (DatasetError / ImageError).  Anything else fails the test.
"""
from __future__ import annotations

import gzip
import io
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from nin.data.datasets import read_idx
from nin.errors import DatasetError
from nin.prediction import ImageError, read_image

from ..fakedata import idx_bytes

EXAMPLES = 1000
_counter = itertools.count()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def _damage(draw, data: bytes) -> bytes:
    """Zero to four edits: overwrite a byte, cut the tail, insert bytes, or rewrite a 4-byte field."""
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "u32"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "u32":
            data[pos:pos + 4] = draw(st.sampled_from([0, 1, 27, 28, 255, 65536, 2**31, 2**32 - 1])).to_bytes(4, "big")
    return bytes(data)


@st.composite
def idx_files(draw):
    ndim = draw(st.sampled_from([1, 3]))
    shape = (draw(st.integers(1, 5)),) + ((draw(st.integers(1, 6)), draw(st.integers(1, 6))) if ndim == 3 else ())
    array = np.arange(int(np.prod(shape)), dtype=np.uint8).reshape(shape)
    source = draw(st.one_of(st.just(idx_bytes(array)), st.binary(max_size=64)))
    data = _damage(draw, source)
    gz = draw(st.booleans())
    blob = gzip.compress(data) if gz else data
    if gz and draw(st.booleans()):
        blob = _damage(draw, blob)  # damage the compressed stream too
    return blob, data, gz, draw(st.sampled_from([1, 3]))


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=idx_files())
def test_fuzz_idx_parser(scratch, case):
    blob, data, gz, ndim = case
    path = scratch / f"f{next(_counter)}-idx3-ubyte{'.gz' if gz else ''}"
    path.write_bytes(blob)
    try:
        a = read_idx(path, ndim)
    except DatasetError as e:
        assert str(path) in str(e)
    else:  # accepted: exactly the array the (possibly damaged) header and body describe
        raw = gzip.decompress(blob) if blob[:2] == b"\x1f\x8b" else blob
        assert raw[:4] == bytes([0, 0, 8, ndim]) and a.dtype == np.uint8 and a.ndim == ndim
        dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
        assert list(a.shape) == dims and a.tobytes() == raw[4 + 4 * ndim:]
    finally:
        path.unlink()


def _encode(fmt: str, mode: str, size: tuple[int, int]) -> bytes:
    rng = np.random.default_rng(size[0] * 31 + size[1])
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8), "L")
    if mode != "L":
        im = im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


FORMATS = [("PNG", "L", ".png"), ("PNG", "RGBA", ".png"), ("PNG", "P", ".png"), ("JPEG", "RGB", ".jpg"),
           ("JPEG", "L", ".jpeg"), ("BMP", "RGB", ".bmp"), ("GIF", "P", ".gif"), ("WEBP", "RGB", ".webp"),
           ("TIFF", "L", ".png"), ("PPM", "RGB", ".png")]  # any suffix: Pillow goes by the content
SEEDS = {(f, m, s): _encode(f, m, s) for f, m, _ in FORMATS for s in [(28, 28), (7, 40)]}


@st.composite
def image_files(draw):
    fmt, mode, suffix = draw(st.sampled_from(FORMATS))
    seed = SEEDS[(fmt, mode, draw(st.sampled_from([(28, 28), (7, 40)])))]
    data = draw(st.one_of(st.just(seed), st.binary(max_size=200)))
    return _damage(draw, data), suffix, draw(st.sampled_from([1, 3])), draw(st.booleans())


@pytest.mark.filterwarnings("ignore::UserWarning:PIL.*")  # Pillow notes on damaged TIFF tags / EXIF
@settings(max_examples=EXAMPLES, deadline=None)
@given(case=image_files())
def test_fuzz_image_decoding(scratch, case):
    data, suffix, chans, invert = case
    path = scratch / f"i{next(_counter)}{suffix}"
    path.write_bytes(data)
    try:
        a = read_image(path, chans, (28, 28), invert=invert, max_pixels=4_000_000)
    except ImageError as e:
        assert str(path) in str(e)
    else:
        assert a.dtype == np.uint8 and a.shape == (chans, 28, 28)
    finally:
        path.unlink()


def test_the_fuzzers_see_both_outcomes(scratch):
    """The damage is not so heavy that nothing ever parses: undamaged seeds decode, noise does not."""
    for (fmt, mode, size), data in SEEDS.items():
        path = scratch / f"seed.{fmt.lower()}"
        path.write_bytes(data)
        assert read_image(path, 1, (28, 28)).shape == (1, 28, 28), (fmt, mode, size)
    path = scratch / "seed-idx"
    path.write_bytes(idx_bytes(np.zeros((2, 3, 4), np.uint8)))
    assert read_idx(path, 3).shape == (2, 3, 4)


def test_undamaged_files_decode_exactly_and_damaged_ones_are_refused(scratch):
    """Both outcomes, checked: every lossless seed at the model's size decodes to its exact pixels; every
    seed cut to half its length, or with its first 16 bytes zeroed, is refused with the file named."""
    for (fmt, mode, size), data in SEEDS.items():
        path = scratch / f"exact.{fmt.lower()}"
        path.write_bytes(data)
        if size == (28, 28) and fmt != "JPEG" and mode in ("L", "P"):
            rng = np.random.default_rng(size[0] * 31 + size[1])
            want = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            if mode == "P":  # the palette image of a grey image: its grey values back
                want = np.asarray(Image.fromarray(want, "L").convert("P").convert("L"))
            assert np.array_equal(read_image(path, 1, (28, 28))[0], want), (fmt, mode)
        for damaged in (data[: len(data) // 2], b"\0" * 16 + data[16:]):
            path.write_bytes(damaged)
            with pytest.raises(ImageError, match=str(path)):
                read_image(path, 1, (28, 28))
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = scratch / "exact-idx"
    path.write_bytes(idx_bytes(array))
    assert np.array_equal(read_idx(path, 3), array)
    path.write_bytes(idx_bytes(array)[:-1])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(path, 3)
