"""nin serve's parts alone, without a server: reading an upload, checking the key, the batch queue's
keys, choosing --max-batch.  (Issue 33: these were closures inside create_app, testable only through it.)"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

pytest.importorskip("python_multipart")

from nin.errors import ImageError  # noqa: E402
from nin.serve.upload import ApiError, check_key, image_error, read_body, upload_file  # noqa: E402


class FakeRequest:
    """What read_body uses of a Starlette request: headers and an async stream of chunks."""

    def __init__(self, chunks: list[bytes], headers: dict | None = None) -> None:
        self.chunks, self.headers, self.read = chunks, headers or {}, 0

    async def stream(self):
        for c in self.chunks:
            self.read += len(c)
            yield c


def read(request: FakeRequest, limit: int) -> bytes:
    return asyncio.run(read_body(request, limit, limit_flag=" (--max-upload-mb 1)"))


def test_check_key():
    check_key({}, None)  # no key configured: everything passes
    check_key({"x-api-key": "s3cret"}, "s3cret")
    check_key({"authorization": "Bearer s3cret "}, "s3cret")
    for headers in ({}, {"x-api-key": "wrong"}, {"authorization": "Basic s3cret"}, {"x-api-key": "s3cre"}):
        with pytest.raises(ApiError) as e:
            check_key(headers, "s3cret")
        assert (e.value.status, e.value.reason, e.value.headers) == (401, "api_key", {"WWW-Authenticate": "Bearer"})
        assert e.value.message == "missing or wrong API key (send it as X-API-Key or Authorization: Bearer)"


def test_read_body_counts_what_arrives():
    assert read(FakeRequest([b"ab", b"cd"]), 4) == b"abcd"
    # no Content-Length, or a false one: counted while reading
    for headers in ({}, {"content-length": "3"}):
        with pytest.raises(ApiError) as e:
            read(FakeRequest([b"abc", b"de"], headers), 4)
        assert (e.value.status, e.value.reason, e.value.headers) == (413, "too_large", {"Connection": "close"})
        assert e.value.message == "the body is over the limit of 4 bytes (--max-upload-mb 1)"
    # declared over the limit: read on and dropped (the client finishes sending and reads the 413) ...
    req = FakeRequest([b"x" * 10] * 3, {"content-length": "30"})
    with pytest.raises(ApiError) as e:
        read(req, 4)
    assert req.read == 30 and e.value.message == "the body is 30 bytes, over the limit of 4 bytes (--max-upload-mb 1)"
    # ... unless it is declared far larger than any body worth reading
    req = FakeRequest([b"x" * 10], {"content-length": str(10 ** 12)})
    with pytest.raises(ApiError) as e:
        read(req, 4)
    assert req.read == 0 and e.value.status == 413


def test_upload_file_raw_or_multipart():
    assert upload_file(b"PNG...", "image/png") == (b"PNG...", "upload")
    form = (b"--xx\r\nContent-Disposition: form-data; name=\"file\"; filename=\"shirt.png\"\r\n"
            b"Content-Type: image/png\r\n\r\nPNG...\r\n--xx--\r\n")
    assert upload_file(form, "multipart/form-data; boundary=xx") == (b"PNG...", "shirt.png")
    unnamed = b"--xx\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nPNG\r\n--xx--\r\n"
    assert upload_file(unnamed, "multipart/form-data; boundary=xx") == (b"PNG", "upload")
    empty = b"--xx\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n\r\n--xx--\r\n"
    for body, ctype, words in ((b"", "image/png", "upload: empty body"),
                               (empty, "multipart/form-data; boundary=xx", "a.png: empty body"),
                               (b"x", "multipart/form-data", "without a boundary")):
        with pytest.raises(ApiError) as e:
            upload_file(body, ctype)
        assert e.value.status == 400 and words in e.value.message, e.value.message


def test_image_error_statuses():
    cases = {"x: 9000x9000 pixels is over the limit of 40,000,000": (413, "too_many_pixels"),
             "x: not an image file Pillow can read": (415, "not_an_image"),
             "x: truncated image": (400, "bad_image")}
    for text, (status, reason) in cases.items():
        e = image_error(ImageError(text))
        assert (e.status, e.reason, e.message) == (status, reason, text)


def test_batches_take_one_key_in_arrival_order():
    from nin.serve.batching import Batcher

    calls = []

    def infer(images, key):
        calls.append((key, images[:, 0, 0, 0].tolist()))
        return images[:, 0, 0, :1].astype(np.float32) + (100 if key == "flip" else 0)

    async def go():
        b = Batcher(infer, max_batch=3)
        b.start()
        keys = ["none", "flip", "none", "none", "flip", "none", "none"]
        futures = [b.predict(np.full((1, 1, 1), i, np.uint8), k) for i, k in enumerate(keys)]
        out = await asyncio.gather(*futures)
        await b.stop()
        return keys, out
    keys, out = asyncio.run(go())
    assert [float(o[0]) for o in out] == [i + (100 if k == "flip" else 0) for i, k in enumerate(keys)]
    assert all(len(ids) <= 3 for _, ids in calls)
    for key, ids in calls:  # each batch one key, oldest first
        assert all(keys[i] == key for i in ids) and ids == sorted(ids)
    assert sorted(i for _, ids in calls for i in ids) == list(range(7))


def test_choose_max_batch_takes_the_largest_batch_that_pays(monkeypatch):
    import nin.serve.model as model

    for per_image, chosen in (({1: 1.0, 4: 0.5, 8: 0.7, 16: 0.9}, 8),   # 16 costs 0.9 > 1/1.25: not enough
                              ({1: 1.0, 4: 0.9, 8: 0.85, 16: 0.81}, 1),  # nin_d2l on 2 cores: batching loses
                              ({1: 1.0, 4: 0.5, 8: 0.3, 16: 0.1}, 16)):
        monkeypatch.setattr(model, "seconds_per_image", lambda served, n, t=per_image: t[n])
        assert model.choose_max_batch(object()) == chosen
