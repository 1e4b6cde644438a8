"""nin serve: every endpoint and every error through the ASGI app, predictions equal to `nin predict`'s,
a real server process under load (2,000 requests from 64 clients, junk included) and SIGTERM, and a
real headless Chromium using the page."""
from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CI = os.environ.get("CI", "").lower() == "true"
if not CI:  # under CI the serve extra is installed (Makefile): a missing one must fail, not skip
    pytest.importorskip("fastapi")
    pytest.importorskip("python_multipart")
    pytest.importorskip("prometheus_client")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402


from .browser import chrome
from nin.cli import main
from nin.export import export_model
from nin.hub import load
from nin.prediction import predict_files
from nin.serve import create_app, load_served

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SRC = str(Path(__file__).resolve().parents[1] / "src")
FAST = "nin_fmnist.fashion_mnist_fast"  # shipped weights whose own TTA is flip


def shipped_accuracy(name: str) -> tuple[float, str]:
    """(fp32 test accuracy with the model's own TTA, that TTA), read from the package's index.json."""
    import nin

    entry = json.loads((Path(nin.__file__).parent / "weights" / "index.json").read_text())[name]
    return entry["accuracy"]["fp32"][entry["tta"]], entry["tta"]


# --- fixtures --------------------------------------------------------------------------------
def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def run(small_run):
    return small_run[0]


@pytest.fixture(scope="module")
def images(fmnist, tmp_path_factory) -> list[Path]:
    """20 Fashion-MNIST test images as PNG, a colour JPEG of another size, and a large (>256 KB) PNG."""
    d = tmp_path_factory.mktemp("serve_images")
    files = []
    for i in range(20):
        p = d / f"test{i:02d}.png"
        p.write_bytes(png_bytes(fmnist.test.images[i, 0].numpy()))
        files.append(p)
    rng = np.random.default_rng(0)
    colour = np.zeros((60, 45, 3), np.uint8)
    colour[10:50, 8:38] = (200, 120, 40)
    (d / "photo.jpg").write_bytes(png_bytes(colour, "JPEG"))
    (d / "large.png").write_bytes(png_bytes(rng.integers(0, 255, (400, 300, 3), dtype=np.uint8)))
    assert (d / "large.png").stat().st_size > 256 * 1024  # decoded in a thread, not on the event loop
    return files + [d / "photo.jpg", d / "large.png"]


@pytest.fixture(scope="module")
def torch_model(run):
    return load(run)


@pytest.fixture(scope="module")
def client(run):
    app = create_app(load_served(str(run), backend="torch"), topk=5)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def shipped_client():
    """The shipped fast weights (own TTA: flip) on PyTorch."""
    with TestClient(create_app(load_served(FAST, backend="torch"))) as c:
        yield c


@pytest.fixture(scope="module")
def strict(run):
    """Tight limits and an API key."""
    app = create_app(load_served(str(run), backend="torch"), max_upload_mb=0.05, max_pixels=10_000,
                     api_key="s3cret")
    with TestClient(app) as c:
        yield c


def as_dict(top: list[dict]) -> dict[str, float]:
    return {t["class"]: t["prob"] for t in top}


def assert_same_prediction(answer: dict, expected, tol: float) -> None:
    got = as_dict(answer["top"])
    want = dict(expected.top)
    assert got.keys() == want.keys(), (got, want)
    for c in want:
        assert got[c] == pytest.approx(want[c], abs=tol)


# --- predict ---------------------------------------------------------------------------------
def test_predict_equals_nin_predict_raw_and_multipart(client, torch_model, images):
    expected = predict_files(torch_model, images, topk=5)
    for path, want in zip(images, expected):
        raw = client.post("/v1/predict", content=path.read_bytes(), headers={"content-type": "image/png"})
        form = client.post("/v1/predict", files={"file": (path.name, path.read_bytes(), "image/png")})
        assert raw.status_code == form.status_code == 200
        assert form.json()["file"] == path.name and raw.json()["file"] == "upload"
        assert [t["class"] for t in raw.json()["top"]] == [c for c, _ in want.top]
        assert_same_prediction(raw.json(), want, 1e-6)
        assert_same_prediction(form.json(), want, 1e-6)


def test_topk_invert_and_preview(client, torch_model, images):
    body = images[0].read_bytes()
    assert len(client.post("/v1/predict?topk=3", content=body).json()["top"]) == 3
    assert len(client.post("/v1/predict?topk=1000", content=body).json()["top"]) == 10  # all classes
    inverted = predict_files(torch_model, images[:1], topk=10, invert=True)[0]
    assert_same_prediction(client.post("/v1/predict?topk=10&invert=true", content=body).json(), inverted, 1e-6)
    preview = client.post("/v1/predict?preview=true", content=body).json()["input"]
    assert preview.startswith("data:image/png;base64,")
    import base64

    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(preview.split(",", 1)[1]))))
    assert np.array_equal(seen, np.asarray(Image.open(images[0])))  # a 28x28 image is used as is


@pytest.fixture(scope="module")
def onnx_file(torch_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_model(torch_model, out, format="onnx", dynamic_batch=True)
    return out


def test_onnx_model_answers_as_nin_predict_and_has_no_cam(onnx_file, images):
    from nin.hub import load_any

    served = load_served(str(onnx_file))
    assert served.backend.startswith("onnxruntime") and served.cam_model is None
    expected = predict_files(load_any(onnx_file), images, topk=10)
    with TestClient(create_app(served)) as c:
        for path, want in zip(images, expected):
            assert_same_prediction(c.post("/v1/predict?topk=10", content=path.read_bytes()).json(), want, 1e-6)
        r = c.post("/v1/cam", content=images[0].read_bytes())
        assert r.status_code == 501 and "PyTorch" in r.json()["error"]
        assert c.get("/v1/model").json()["cam"] is False


# --- errors ----------------------------------------------------------------------------------
def _chunks(data: bytes, size: int = 4096):
    for i in range(0, len(data), size):
        yield data[i:i + size]


@pytest.mark.parametrize("body, ctype, status, words", [
    (b"", "image/png", 400, "empty body"),
    (b"hello, I am not a picture", "text/plain", 415, "not an image file"),
    ("truncated", "image/png", 400, "truncated"),
    (b"--xx\r\nContent-Disposition: form-data; name=\"other\"\r\n\r\nabc\r\n--xx--\r\n",
     "multipart/form-data; boundary=xx", 400, "without a file"),
    (b"whatever", "multipart/form-data", 400, "boundary"),
])
def test_bad_bodies_are_json_errors(client, images, body, ctype, status, words):
    if body == "truncated":
        body = images[-1].read_bytes()[:5000]
    r = client.post("/v1/predict", content=body, headers={"content-type": ctype})
    assert r.status_code == status and words in r.json()["error"], r.text
    assert client.post("/v1/predict", content=images[0].read_bytes()).status_code == 200  # nothing left broken


def test_size_limits(strict, images):
    key = {"X-API-Key": "s3cret"}
    big = images[-1].read_bytes()  # ~360 KB, limit 50 KB
    r = strict.post("/v1/predict", content=big, headers=key)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    # no Content-Length (chunked): refused while reading, by counting
    r = strict.post("/v1/predict", content=_chunks(big), headers=key)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]
    # a small file with too many pixels (limit 10,000): a decompression bomb in miniature
    bomb = png_bytes(np.zeros((200, 200), np.uint8))
    assert len(bomb) < 2000
    r = strict.post("/v1/predict", content=bomb, headers=key)
    assert r.status_code == 413 and "200x200 pixels is over the limit" in r.json()["error"]
    assert strict.post("/v1/predict", content=images[0].read_bytes(), headers=key).status_code == 200


def test_api_key(strict, images):
    body = images[0].read_bytes()
    for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
        r = strict.post("/v1/predict", content=body, headers=headers)
        assert r.status_code == 401 and "API key" in r.json()["error"]
        assert r.headers["www-authenticate"] == "Bearer"
    assert strict.post("/v1/predict", content=body, headers={"X-API-Key": "s3cret"}).status_code == 200
    assert strict.post("/v1/predict", content=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert strict.get("/v1/model").status_code == 401 and strict.get("/metrics").status_code == 401
    assert strict.get("/metrics", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert strict.get("/health").status_code == 200 and strict.get("/").status_code == 200  # open


@pytest.mark.parametrize("query", ["topk=0", "topk=abc", "format=gif", "invert=maybe"])
def test_bad_parameters_are_400(client, images, query):
    r = client.post(f"/v1/cam?{query}", content=images[0].read_bytes())
    assert r.status_code == 400 and r.json()["error"].split(":")[0] in query


@pytest.mark.parametrize("query", ["topk=0", "topk=abc", "topk=", "topk=1001", "topk=2.5", "topk=1e3", "topk=5.",
                                   "topk=%D9%A3", "invert=maybe", "invert=", "invert=%20true", "topk=3&topk=0"])
def test_predicts_own_parameter_checks_say_what_fastapi_says(client, images, query):
    """/v1/predict reads its query itself (for speed); /v1/cam still goes through FastAPI's validation:
    the same bad value gets the same 400 and the same words from both."""
    body = images[0].read_bytes()
    ours, fastapis = client.post(f"/v1/predict?{query}", content=body), client.post(f"/v1/cam?{query}", content=body)
    assert ours.status_code == fastapis.status_code == 400
    assert ours.json() == fastapis.json()


def test_predict_takes_the_values_fastapi_would(client, images):
    body = images[0].read_bytes()
    for query, (k, preview) in {"topk=5.0": (5, False), "topk=%202&preview=YES": (2, True), "topk=+3&preview=on": (3, True),
                                "preview=0&x=1": (5, False), "topk=1&topk=4": (4, False), "topk=1_0": (10, False),
                                "preview=t": (5, True)}.items():
        answer = client.post(f"/v1/predict?{query}", content=body).json()
        assert len(answer["top"]) == k and ("input" in answer) == preview, query
    r = client.post("/v1/predict?tta=bogus", content=body)
    assert r.status_code == 400 and r.json()["error"] == "tta: Input should be 'run', 'none', 'flip' or 'shift'"


def test_unknown_routes_and_methods_are_json(client):
    assert client.get("/v1/nothing").json() == {"error": "Not Found"}
    r = client.get("/v1/predict")
    assert r.status_code == 405 and "error" in r.json()


# --- batching and the queue ------------------------------------------------------------------
class SlowServed:
    """A ServedModel whose forward pass takes 50 ms, to fill the queue."""

    def __init__(self, served):
        self.inner = served

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def probabilities(self, images, tta=None):
        time.sleep(0.05)
        return self.inner.probabilities(images, tta)


async def _concurrent(app, bodies: list[bytes], path: str = "/v1/predict?topk=10"):
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await asyncio.gather(*(c.post(path, content=b) for b in bodies))


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(run, torch_model, images):
    served = load_served(str(run), backend="torch")
    expected = predict_files(torch_model, images[:20], topk=10)
    app = create_app(SlowServed(served), max_batch=8)
    answers = asyncio.run(_concurrent(app, [p.read_bytes() for p in images[:20]] * 2))
    for r, want in zip(answers, expected * 2):
        assert r.status_code == 200
        assert_same_prediction(r.json(), want, 1e-5)
    sizes = app.state.batcher.stats.sizes
    assert max(sizes) > 1 and max(sizes) <= 8 and sum(k * v for k, v in sizes.items()) == 40

    one = create_app(SlowServed(served), max_batch=1)
    asyncio.run(_concurrent(one, [p.read_bytes() for p in images[:6]]))
    assert set(one.state.batcher.stats.sizes) == {1}


def test_full_queue_answers_503_with_retry_after(run, images):
    app = create_app(SlowServed(load_served(str(run), backend="torch")), max_batch=1, max_queue=2)
    answers = asyncio.run(_concurrent(app, [images[0].read_bytes()] * 12))
    codes = sorted(r.status_code for r in answers)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}
    busy = next(r for r in answers if r.status_code == 503)
    assert busy.headers["retry-after"] == "1" and "busy" in busy.json()["error"]


# --- class maps, model, health, metrics, page ------------------------------------------------
def test_cam_png_is_the_nin_cam_figure(client, torch_model, images, tmp_path):
    from nin.cli import main as nin

    path = images[3]
    r = client.post("/v1/cam?topk=3", files={"file": (path.name, path.read_bytes(), "image/png")})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert nin(["cam", str(Path(client.app.state.served.source)), str(path), "--out", str(tmp_path / "c.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), np.asarray(Image.open(tmp_path / "c.png")))


def test_cam_json_maps_average_to_the_logits(client, torch_model, images):
    import torch

    from nin.inference import class_activation_maps, preprocess
    from nin.data.images import read_image

    body = images[5].read_bytes()
    doc = client.post("/v1/cam?format=json&topk=2", content=body).json()
    x = torch.from_numpy(read_image(body, 1, (28, 28)))[None]
    maps, logits = class_activation_maps(torch_model, preprocess(torch_model, x))
    assert doc["map_size"] == list(maps.shape[2:]) and len(doc["top"]) == 2
    predicted = client.post("/v1/predict?topk=2", content=body).json()["top"]
    for t, p in zip(doc["top"], predicted):
        assert t["class"] == p["class"] and t["prob"] == pytest.approx(p["prob"], abs=1e-5)
        c = torch_model.classes.index(t["class"])
        assert np.allclose(t["map"], maps[0, c].numpy(), atol=1e-4)


def test_model_and_health(client, small_run):
    doc = client.get("/v1/model").json()
    meta = small_run[2]
    assert doc["model"] == "nin_fmnist" and doc["classes"] == meta.classes and doc["input_size"] == [1, 28, 28]
    assert doc["backend"] == "pytorch (cpu)" and doc["cam"] is True and doc["max_upload_bytes"] == 10 * 2 ** 20
    assert client.get("/health").json()["status"] == "ok"


def test_model_reports_the_test_accuracy_with_its_own_tta_and_health_names_the_weights(client, shipped_client,
                                                                                      small_run):
    """Item 9/10 of issue 32: /v1/model gave the shipped weights' whole accuracy table as `accuracy` (the page
    showed 'NaN%'); /health named only the architecture."""
    value, tta = shipped_accuracy(FAST)
    doc = shipped_client.get("/v1/model").json()
    got = (doc["accuracy"], doc["accuracy_tta"], doc["accuracy_precision"])
    assert got == (value, tta, "fp32") == (0.9304, "flip", "fp32")
    assert doc["weights"] == FAST and shipped_client.get("/health").json()["weights"] == FAST
    run_doc = client.get("/v1/model").json()  # a model.json that records no accuracy: nothing, not a guess
    assert run_doc["accuracy"] is None and run_doc["accuracy_tta"] is None
    assert client.get("/health").json() == {"status": "ok", "model": "nin_fmnist", "weights": str(small_run[0]),
                                            "queued": 0}


def test_reported_accuracy_of_each_shipped_model_and_of_a_run():
    import dataclasses

    from nin.modelfile import ModelMeta
    from nin.hub import load
    from nin.hub import list_pretrained
    from nin.serve.model import reported_accuracy

    for name in list_pretrained():
        value, tta = shipped_accuracy(name)
        assert reported_accuracy(load(name).meta) == {"value": value, "tta": tta, "precision": "fp32"}
    meta = ModelMeta("nin_fmnist", {}, [str(i) for i in range(10)], [1, 28, 28], "fashion-mnist", {}, tta="flip",
                     precision="bf16")
    run = dataclasses.replace(meta, info={"test_acc": 0.91, "val_acc": 0.5})  # a run folder's model.json
    assert reported_accuracy(run) == {"value": 0.91, "tta": "flip", "precision": "bf16"}
    closed = dataclasses.replace(run, tta="shift", info={"test_acc": 0.91, "tta_test_acc": 0.93})  # --final-tta
    assert reported_accuracy(closed) == {"value": 0.93, "tta": "shift", "precision": "bf16"}
    assert reported_accuracy(dataclasses.replace(meta, info={"accuracy": 0.8})) == {
        "value": 0.8, "tta": "flip", "precision": "bf16"}
    for unknown in ({}, {"accuracy": {"fp32": {"none": 0.9}}}, {"accuracy": "high"}, {"test_acc": None}):
        assert reported_accuracy(dataclasses.replace(meta, info=unknown)) is None, unknown


def test_cam_probabilities_are_predicts_with_the_models_tta(shipped_client, images, tmp_path):
    """Item 11 of issue 32: /v1/cam showed a probability without the model's TTA beside /v1/predict's with it."""
    from nin.hub import load

    model = load(FAST)
    files = images[:6] + images[-2:]
    expected = predict_files(model, files, topk=3)  # nin predict: flip TTA, the model's own
    for path, want in zip(files, expected):
        body = path.read_bytes()
        cam = shipped_client.post("/v1/cam?format=json&topk=3", content=body).json()
        assert_same_prediction(cam, want, 1e-6)
        assert [t["class"] for t in cam["top"]] == [c for c, _ in want.top]
        assert cam["top"] == [{**t, "map": c["map"]} for t, c in zip(
            shipped_client.post("/v1/predict?topk=3", content=body).json()["top"], cam["top"])]
    path = images[0]
    r = shipped_client.post("/v1/cam?topk=3", files={"file": (path.name, path.read_bytes(), "image/png")})
    assert main(["cam", FAST, str(path), "--out", str(tmp_path / "c.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(r.content))), np.asarray(Image.open(tmp_path / "c.png")))


def test_metrics(client, images):
    from prometheus_client.parser import text_string_to_metric_families

    def samples():
        text = client.get("/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def count(handler, status, method="POST"):
        key = ("http_requests_total", (("handler", handler), ("method", method), ("status", str(status))))
        return now.get(key, 0) - before.get(key, 0)

    before = samples()
    for _ in range(3):
        client.post("/v1/predict", content=images[0].read_bytes())
    client.post("/v1/predict", content=b"junk")
    client.post("/v1/predict?topk=0", content=images[0].read_bytes())
    client.post("/v1/models/nin_fmnist/predict", content=images[0].read_bytes())
    client.get("/v1/nothing")
    client.get("/metrics")  # a scrape is not counted
    now = samples()
    # each request once, under its route's template (or "none"), with its status
    assert count("/v1/predict", 200) == 3 and count("/v1/predict", 415) == 1 and count("/v1/predict", 400) == 1
    assert count("/v1/models/{name}/predict", 200) == 1 and count("none", 404, "GET") == 1
    assert not any(k[0] == "http_requests_total" and ("handler", "/metrics") in k[1] for k in now)
    latency = ("http_request_duration_seconds_count", (("handler", "/v1/predict"), ("method", "POST")))
    assert now[latency] - before.get(latency, 0) == 5
    errors = ("nin_request_errors_total", (("reason", "not_an_image"),))
    assert now[errors] - before.get(errors, 0) == 1
    assert {"nin_batch_size_bucket", "nin_inference_seconds_count", "nin_queue_depth"} <= {k[0] for k in now}


def test_page_and_its_assets_are_all_local(client):
    import re

    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    refs = re.findall(r'(?:src|href)="([^"]+)"', r.text)
    assert refs and all(u.startswith("/") or u.startswith("data:") for u in refs), refs
    for asset in ("/static/app.js", "/static/style.css"):
        a = client.get(asset)
        assert a.status_code == 200 and "http://" not in a.text and "https://" not in a.text
    assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 200


def test_livez_and_readyz(run):
    app = create_app(load_served(str(run), backend="torch"))
    outside = TestClient(app)  # no lifespan: not warmed up, not taking requests
    assert outside.get("/livez").json() == {"status": "ok"}
    r = outside.get("/readyz")
    assert r.status_code == 503 and r.json() == {"status": "not ready"}
    with TestClient(app) as c:
        assert c.get("/readyz").json() == {"status": "ready"} and c.get("/livez").status_code == 200
    assert outside.get("/readyz").status_code == 503  # stopped


def test_openapi_documents_the_upload_and_the_parameters(client):
    """Issue 37: a generated client needs the upload's fields and the query parameters in /openapi.json."""
    from nin.vocab import TTA_REQUESTS

    doc = client.get("/openapi.json").json()
    for path in ("/v1/predict", "/v1/models/{name}/predict", "/v1/cam"):
        op = doc["paths"][path]["post"]
        content = op["requestBody"]["content"]
        form = content["multipart/form-data"]["schema"]
        assert form["required"] == ["file"] and form["properties"]["file"] == {"type": "string", "format": "binary"}
        assert content["image/*"]["schema"]["format"] == "binary"
    params = {p["name"]: p for p in doc["paths"]["/v1/predict"]["post"]["parameters"]}
    assert set(params) == {"topk", "invert", "preview", "tta"}
    topk = params["topk"]["schema"]["anyOf"][0]
    assert topk["minimum"] == 1 and topk["maximum"] == 1000
    assert params["tta"]["schema"]["anyOf"][0]["enum"] == list(TTA_REQUESTS)
    assert {p["name"] for p in doc["paths"]["/v1/cam"]["post"]["parameters"]} == {"topk", "invert", "format", "model"}


def test_per_request_tta_equals_nin_predict_with_that_tta(shipped_client, images):
    """Issue 37: ?tta= per request (the shipped fast weights' own is flip); each answer is `nin predict --tta`'s."""
    from nin.hub import load

    model = load(FAST)
    files = images[:4] + images[-2:]
    for tta in ("none", "flip", "shift"):
        expected = predict_files(model, files, topk=10, tta=tta)
        for path, want in zip(files, expected):
            answer = shipped_client.post(f"/v1/predict?topk=10&tta={tta}", content=path.read_bytes()).json()
            assert answer["tta"] == tta
            assert_same_prediction(answer, want, 1e-6)
    own = shipped_client.post("/v1/predict?topk=10", content=files[0].read_bytes()).json()
    assert own["tta"] == "flip" and own == shipped_client.post("/v1/predict?topk=10&tta=run",
                                                                content=files[0].read_bytes()).json()
    r = shipped_client.post("/v1/predict?tta=rotate", content=files[0].read_bytes())
    assert r.status_code == 400 and r.json()["error"].startswith("tta: Input should be 'run', 'none', 'flip'")


def test_concurrent_requests_with_different_tta_never_share_a_batch(run, torch_model, images):
    served = load_served(str(run), backend="torch")
    app = create_app(SlowServed(served), max_batch=8)
    bodies = [p.read_bytes() for p in images[:12]]
    paths = [f"/v1/predict?topk=10&tta={'flip' if i % 2 else 'none'}" for i in range(12)]

    async def go():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return await asyncio.gather(*(c.post(p, content=b) for p, b in zip(paths, bodies)))
    answers = asyncio.run(go())
    for i, r in enumerate(answers):
        want = predict_files(torch_model, images[i:i + 1], topk=10, tta="flip" if i % 2 else "none")[0]
        assert_same_prediction(r.json(), want, 1e-5)
    sizes = app.state.batcher.stats.sizes
    assert max(sizes) > 1 and sum(k * v for k, v in sizes.items()) == 12


def test_several_models_on_one_server(run, torch_model, images):
    """Issue 37: `nin serve A B`: /v1/models lists both; /v1/models/NAME/predict answers with that one."""
    from nin.hub import load

    app = create_app([load_served(str(run), backend="torch"), load_served(FAST, backend="torch")],
                     names=["small", "fast"], max_batch=[4, 1])
    with TestClient(app) as c:
        listed = c.get("/v1/models").json()["models"]
        assert [(m["name"], m["weights"], m["max_batch"]) for m in listed] == [("small", str(run), 4), ("fast", FAST, 1)]
        body = images[5].read_bytes()
        for name, model in (("small", torch_model), ("fast", load(FAST))):
            want = predict_files(model, images[5:6], topk=10)[0]
            assert_same_prediction(c.post(f"/v1/models/{name}/predict?topk=10", content=body).json(), want, 1e-6)
        assert_same_prediction(c.post("/v1/predict?topk=10", content=body).json(),
                               predict_files(torch_model, images[5:6], topk=10)[0], 1e-6)
        assert c.get("/v1/model?model=fast").json()["weights"] == FAST
        r = c.post("/v1/models/nope/predict", content=body)
        assert r.status_code == 404 and r.json()["error"] == "no model named 'nope' here; GET /v1/models lists: small, fast"


def test_cli_refuses_bad_options(run, capsys):
    assert main(["serve", str(run), "--max-batch", "0"]) == 2
    assert "--max-batch must be at least 1" in capsys.readouterr().err
    assert main(["serve", str(run), "--backend", "onnx", "--device", "cpu", "--max-upload-mb", "0"]) == 2
    capsys.readouterr()
    for flags, words in ((["--max-batch", "many"], "--max-batch must be at least 1 (or auto), got many"),
                         (["--workers", "0"], "--workers must be at least 1, got 0"),
                         (["--workers", "2", "--device", "cuda"], "--workers above 1 runs on the CPU"),
                         ([str(run), "--threads", "0"], "--threads must be at least 1, got 0")):
        assert main(["serve", str(run), *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"nin serve: error: {words}") and err.count("\n") == 1, err
    assert main(["serve", str(run), str(run), "--port", "0"]) == 2  # two models, one name
    assert "two models would both be called" in capsys.readouterr().err


def test_cli_port_out_of_range_or_in_use_is_one_line_and_exit_2(run, capsys, monkeypatch):
    """Item 10 of issue 32: --port 99999 served on a random port; a port in use gave uvicorn's log and exit 3."""
    import nin.serve

    def never(*a, **k):
        raise AssertionError("nin serve started serving")
    monkeypatch.setattr(nin.serve, "run_server", never)
    for port in ("99999", "65536", "-1"):
        assert main(["serve", str(run), "--port", port]) == 2
        err = capsys.readouterr().err
        assert err == f"nin serve: error: --port must be between 0 and 65535 (0: any free port), got {port}\n"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(run), "--port", str(port)]) == 2
        err = capsys.readouterr().err
    assert err.startswith(f"nin serve: error: port {port} on 127.0.0.1 is in use (")
    assert err.count("\n") == 1 and "--port" in err and "Traceback" not in err


# --- a real server process -------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, *args: str, timeout: float = 90):
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen([sys.executable, "-m", "nin", "serve", *args, "--port", str(self.port)],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nin serve exited {self.proc.returncode}: {self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("nin serve did not start")

    def output_until(self, text: str, lines: int = 50) -> list[str]:
        """The server's output lines (stdout and stderr) up to the first one containing ``text``."""
        out = []
        while len(out) < lines:
            line = self.proc.stdout.readline()
            if not line:
                break
            out.append(line.rstrip("\n"))
            if text in line:
                return out
        raise AssertionError(f"{text!r} not in the server's output: {out}")

    def workers(self) -> list:
        """The worker processes (psutil), or the server itself when it serves alone."""
        import psutil

        me = psutil.Process(self.proc.pid)
        workers = [c for c in me.children() if "spawn_main" in " ".join(c.cmdline())]  # not the resource tracker
        return workers or [me]

    def rss(self) -> int:
        """Memory of every worker."""
        return sum(p.memory_info().rss for p in self.workers())

    def cpu_seconds(self) -> list[float]:
        return [sum(p.cpu_times()[:2]) for p in self.workers()]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture(scope="module")
def server(run):
    s = ServerProcess(str(run))  # backend auto: onnxruntime, exported at start-up
    yield s
    s.stop()


@pytest.fixture(scope="module")
def shipped_server():
    s = ServerProcess(FAST, "--backend", "torch")
    yield s
    s.stop()


def test_start_up_names_the_weights_and_says_loading(shipped_server):
    lines = shipped_server.output_until("http://")
    assert lines[0] == f"nin serve: loading {FAST} ..."
    assert f"nin serve: {FAST} (nin_fmnist, 10 classes, input 1x28x28) on pytorch (cpu)" in lines[-2]
    assert lines[-1].startswith(f"nin serve: http://127.0.0.1:{shipped_server.port}/ ")
    assert httpx.get(shipped_server.url + "/health").json()["weights"] == FAST


def test_urllib_client_reads_the_413_of_a_body_over_the_limit(shipped_server, images):
    """Item 10 of issue 32: urllib sends the whole body before it reads the answer; a 21 MB body got a
    connection reset.  The server reads and drops the rest (up to a bound), answers 413 and closes."""
    import urllib.error
    import urllib.request

    body = os.urandom(21 * 2 ** 20)
    chunked = (body[i:i + 2 ** 20] for i in range(0, len(body), 2 ** 20))  # no Content-Length: counted
    for data, words in ((body, f"the body is {len(body):,} bytes, over the limit of {10 * 2 ** 20:,} bytes"),
                        (chunked, f"the body is over the limit of {10 * 2 ** 20:,} bytes")):
        req = urllib.request.Request(shipped_server.url + "/v1/predict", data=data,
                                     headers={"Content-Type": "image/png"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert e.value.code == 413 and e.value.headers["connection"] == "close"
        assert json.loads(e.value.read())["error"].startswith(words)
    ok = urllib.request.urlopen(urllib.request.Request(shipped_server.url + "/v1/predict",
                                                       data=images[0].read_bytes()), timeout=60)
    assert ok.status == 200 and json.loads(ok.read())["top"]


async def _load(port: int, jobs: list[tuple[int, bytes]], clients: int) -> list[tuple[int, int, bytes]]:
    """POST each (id, body) to /v1/predict?topk=10 over ``clients`` keep-alive connections.

    A minimal HTTP/1.1 client: far cheaper per request than httpx, so the 2 cores go to the server."""
    queue = list(reversed(jobs))
    out = []

    async def worker():
        reader = writer = None
        while queue:
            i, body = queue.pop()
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST /v1/predict?topk=10 HTTP/1.1\r\nHost: t\r\nContent-Type: image/png\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
            data = await reader.readexactly(int(headers["content-length"]))
            out.append((i, int(lines[0].split()[1]), data))
            if headers.get("connection") == "close":
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(clients)))
    return out


def test_real_server_under_load(server, torch_model, images):
    """2,000 requests from 64 concurrent clients, one in ten junk, to the default server (a worker per
    core): no 5xx, every answer is its own image's, every worker answered a share, and the memory after
    is within 10% of the memory before.  /metrics sums every worker's counters."""
    assert len(server.workers()) == max(1, len(os.sched_getaffinity(0)))
    good = images[:20]
    expected = predict_files(torch_model, good, topk=10)
    junk = [(b"", 400), (b"not an image at all", 415), (good[0].read_bytes()[:300], 400)]
    bodies = [p.read_bytes() for p in good]
    asyncio.run(_load(server.port, [(i % 20, bodies[i % 20]) for i in range(300)], 64))  # warm-up
    before, cpu_before = server.rss(), server.cpu_seconds()
    jobs = [(-1 - (i // 10) % 3, junk[(i // 10) % 3][0]) if i % 10 == 9 else (i % 20, bodies[i % 20])
            for i in range(2000)]
    t = time.perf_counter()
    answers = asyncio.run(_load(server.port, jobs, 64))
    seconds = time.perf_counter() - t
    after, cpu = server.rss(), [b - a for a, b in zip(cpu_before, server.cpu_seconds())]
    assert len(answers) == 2000
    assert min(cpu) > 0.1 * sum(cpu), f"CPU seconds per worker: {cpu}"  # the port is shared, not one worker's
    for i, status, data in answers:
        assert status < 500, data
        if i >= 0:
            assert status == 200
            assert_same_prediction(json.loads(data), expected[i], 1e-5)
        else:
            assert status == junk[-1 - i][1], data
    assert after <= before * 1.10, f"RSS grew from {before / 2**20:.0f} to {after / 2**20:.0f} MiB"
    # a client that goes away halfway through its body is not an internal error
    c = socket.create_connection(("127.0.0.1", server.port))
    c.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Length: 5000\r\n\r\n" + bodies[0][:100])
    c.close()
    time.sleep(0.3)
    metrics = httpx.get(server.url + "/metrics").text
    assert 'status="500"' not in metrics and 'nin_request_errors_total{reason="client_disconnect"} 1.0' in metrics
    served = sum(float(line.split()[-1]) for line in metrics.splitlines()
                 if line.startswith('http_requests_total{handler="/v1/predict",method="POST",status="200"}'))
    assert served >= 2000 * 0.9 + 300  # every worker's answers, whichever worker read /metrics
    print(f"\n2,000 requests from 64 clients in {seconds:.1f} s ({2000 / seconds:.0f}/s, shared test machine)")


def test_sigterm_drains_requests_in_flight_and_exits_0(run, images):
    """SIGTERM to `nin serve` (a worker per core by default): every worker answers the requests it holds,
    then all exit, and the server exits 0."""
    s = ServerProcess(str(run), "--backend", "torch")
    try:
        body = images[0].read_bytes()
        s.output_until("http://")  # every worker listens (the first answers /health before the others)
        workers = s.workers()
        assert len(workers) == max(1, len(os.sched_getaffinity(0)))
        conns = []
        for _ in range(6):  # requests whose body is only half sent when SIGTERM arrives
            c = socket.create_connection(("127.0.0.1", s.port))
            c.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body)
                      + body[:len(body) // 2])
            conns.append(c)
        time.sleep(0.3)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert s.proc.poll() is None  # still draining
        for c in conns:
            c.sendall(body[len(body) // 2:])
            c.settimeout(10)
            reply = b""
            while b"}" not in reply:
                chunk = c.recv(65536)
                if not chunk:
                    break
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200"), reply
            c.close()
        assert s.proc.wait(20) == 0
        assert not any(w.is_running() for w in workers)
    finally:
        s.stop()


def test_a_killed_worker_is_replaced_and_the_server_keeps_answering(run, images):
    """A worker killed under it (out of memory, a crash in a native library): once it is gone (connections
    waiting on its own socket go with it) the other answers every request, a new worker takes the dead
    one's place and answers alone once the other is killed too, and SIGTERM still drains every worker and
    exits 0.  (Before, one dead worker stopped the server.)"""
    s = ServerProcess(str(run), "--backend", "torch", "--workers", "2")
    try:
        body = images[0].read_bytes()
        s.output_until("http://")
        first, second = s.workers()
        want = httpx.post(s.url + "/v1/predict", content=body, timeout=30).json()["top"]
        first.kill()
        first.wait(10)
        assert all(httpx.post(s.url + "/v1/predict", content=body, timeout=30).json()["top"] == want
                   for _ in range(10))  # the second worker answers while the first is replaced
        said = s.output_until("answers again")
        assert any(f"worker nin-serve-0 (pid {first.pid}) exited with -9; starting another" in line for line in said)
        pids = {w.pid for w in s.workers()}
        assert len(pids) == 2 and first.pid not in pids and second.pid in pids
        second.kill()
        second.wait(10)
        assert all(httpx.post(s.url + "/v1/predict", content=body, timeout=30).json()["top"] == want
                   for _ in range(10))  # the replacement alone
        s.output_until("answers again")
        workers = s.workers()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0
        assert not any(w.is_running() for w in workers)
    finally:
        s.stop()


# --- a real browser --------------------------------------------------------------------------


def test_browser_uploads_an_image_and_shows_the_apis_top_class(shipped_server, images, tmp_path):
    """The page of the shipped fast weights: its header's accuracy (item 9 of issue 32: it said 'NaN%'),
    a prediction as the API's, an error said once that clears the previous prediction, a drawing."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = shipped_server
    path = images[7]
    api = httpx.post(server.url + "/v1/predict", content=path.read_bytes()).json()["top"][0]
    value, tta = shipped_accuracy(FAST)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is no picture")
    browser = chrome("1200,820")
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda b: "nin_fmnist" in b.find_element(By.ID, "model-info").text)
        header = browser.find_element(By.ID, "model-info").text
        start = f"nin_fmnist · {FAST} · 10 classes · input 1×28×28 · pytorch (cpu) · "
        assert header == start + f"test accuracy {100 * value:.2f}% ({tta} TTA)"
        assert header.endswith("test accuracy 93.04% (flip TTA)")
        browser.find_element(By.ID, "file").send_keys(str(path))
        wait.until(lambda b: b.find_element(By.ID, "cam-class").text)  # prediction and class map drawn
        assert browser.find_element(By.ID, "top-class").text == api["class"]
        assert browser.find_element(By.ID, "top-prob").text == f"{100 * api['prob']:.1f}%"
        assert path.name in browser.find_element(By.ID, "file-name").text
        assert len(browser.find_elements(By.CSS_SELECTOR, "#bars li")) == 5
        shot = tmp_path / "serve.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("NIN_SERVE_SCREENSHOT"):  # how docs/serve.png was made
            browser.save_screenshot(os.environ["NIN_SERVE_SCREENSHOT"])
        # a file that is no image: its error, once, and the previous prediction gone
        browser.find_element(By.ID, "file").send_keys(str(broken))
        wait.until(lambda b: b.find_element(By.ID, "error").is_displayed())
        assert browser.find_element(By.ID, "error").text == "broken.png: not an image file Pillow can read"
        assert not browser.find_element(By.ID, "result").is_displayed()
        assert browser.find_element(By.ID, "empty").is_displayed()
        assert api["class"] not in browser.find_element(By.TAG_NAME, "main").text
        # drawing on the canvas classifies the drawing
        canvas = browser.find_element(By.ID, "draw")
        ActionChains(browser).move_to_element_with_offset(canvas, -60, -80).click_and_hold() \
            .move_by_offset(40, 60).move_by_offset(40, 60).move_by_offset(30, 20).release().perform()
        wait.until(lambda b: "drawing.png" in b.find_element(By.ID, "file-name").text)
        assert not browser.find_element(By.ID, "error").is_displayed()
        # the failed upload's 415 is the one error the browser logs (a network error, not a script's)
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"
                  and not ("/v1/predict" in e["message"] and "415" in e["message"])]
        assert not severe, severe  # no blocked asset, no script error
    finally:
        browser.quit()


BEST = "nin_fmnist.fashion_mnist_best"  # shipped weights whose own TTA is shift


def test_page_has_one_model_menu_hidden_and_disabled_unless_the_server_holds_several(shipped_client):
    """The page's HTML holds the model menu once, hidden and disabled: app.js shows it only when
    GET /v1/models lists more than one model (a one-model server's page looks as it always did)."""
    from html.parser import HTMLParser

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.open, self.label_text = [], [], ""

        def handle_starttag(self, tag, attrs):
            self.tags.append((tag, dict(attrs), [t for t, _ in self.open]))
            if tag not in ("input", "meta", "link", "br", "img"):
                self.open.append((tag, dict(attrs)))

        def handle_endtag(self, tag):
            while self.open and self.open.pop()[0] != tag:
                pass

        def handle_data(self, data):
            if any(a.get("id") == "model-choice" for _, a in self.open):
                self.label_text += data

    page = Tags()
    page.feed(shipped_client.get("/").text)
    selects = [(a, parents) for t, a, parents in page.tags if t == "select" and a.get("id") == "model"]
    assert len(selects) == 1 and "disabled" in selects[0][0], selects
    label = [a for t, a, _ in page.tags if a.get("id") == "model-choice"]
    assert len(label) == 1 and "hidden" in label[0] and selects[0][1][-1] == "label"
    assert page.label_text.split() == ["Model"]
    assert len(shipped_client.get("/v1/models").json()["models"]) == 1  # what app.js counts


@pytest.fixture(scope="module")
def two_model_server():
    """The shipped fast and best weights on one server: one worker, batches fixed (no measuring at start-up)."""
    s = ServerProcess(FAST, BEST, "--backend", "torch", "--workers", "1", "--max-batch", "1")
    yield s
    s.stop()


def test_browser_chooses_the_model_and_shows_each_models_answer(two_model_server, images):
    """Two models: the page's menu lists both with their accuracy, the default chosen; each choice changes
    the header's accuracy, clears the previous prediction and sends the next upload (and its class map) to
    that model's routes, whose answer the page shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.support.ui import WebDriverWait

    server = two_model_server
    listed = httpx.get(server.url + "/v1/models").json()["models"]
    assert [m["name"] for m in listed] == [FAST, BEST]
    accuracy = {name: f"{100 * shipped_accuracy(name)[0]:.2f}% ({shipped_accuracy(name)[1]} TTA)"
                for name in (FAST, BEST)}
    assert accuracy == {FAST: "93.04% (flip TTA)", BEST: "95.15% (shift TTA)"}

    def shown(name: str, path: Path) -> tuple[str, str]:
        top = httpx.post(f"{server.url}/v1/models/{name}/predict", content=path.read_bytes()).json()["top"][0]
        return top["class"], f"{100 * top['prob']:.1f}%"

    # an image the two models answer differently as the page shows it: else the page could use either
    for path in images[:20]:
        answers = {name: shown(name, path) for name in (FAST, BEST)}
        if answers[FAST] != answers[BEST]:
            break
    else:
        raise AssertionError("no test image that the fast and best weights answer differently")

    browser = chrome("1200,820", performance_log=True)
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 30)
        menu = browser.find_element(By.ID, "model")
        wait.until(lambda b: len(Select(menu).options) == 2)
        assert browser.find_element(By.ID, "model-choice").is_displayed() and menu.is_enabled()
        assert browser.find_element(By.ID, "model-choice").text.startswith("Model")
        assert [o.text for o in Select(menu).options] == [f"{n} · {accuracy[n]}" for n in (FAST, BEST)]
        assert Select(menu).first_selected_option.get_attribute("value") == FAST  # the server's default
        for i, name in enumerate((FAST, BEST, FAST)):
            if i:
                Select(menu).select_by_value(name)
                # the previous model's prediction is gone at once
                assert not browser.find_element(By.ID, "result").is_displayed()
                assert browser.find_element(By.ID, "empty").is_displayed()
                assert not browser.find_element(By.ID, "top-class").text
            header = browser.find_element(By.ID, "model-info").text
            assert header == f"nin_fmnist · {name} · 10 classes · input 1×28×28 · pytorch (cpu) · " \
                             f"test accuracy {accuracy[name]}"
            browser.find_element(By.ID, "file").send_keys(str(path))
            wait.until(lambda b: b.find_element(By.ID, "cam-class").text)  # prediction and class map drawn
            got = (browser.find_element(By.ID, "top-class").text, browser.find_element(By.ID, "top-prob").text)
            assert got == answers[name], (name, got, answers)
            assert browser.find_element(By.ID, "cam-class").text == answers[name][0]
        # which routes the page asked: each model's own, never the default's
        posts = []
        for entry in browser.get_log("performance"):
            message = json.loads(entry["message"])["message"]
            if message["method"] == "Network.requestWillBeSent" and message["params"]["request"]["method"] == "POST":
                posts.append(message["params"]["request"]["url"].removeprefix(server.url))
        routes = [u.split("?")[0] + ("?model=" + u.split("model=")[1].split("&")[0] if "model=" in u else "")
                  for u in posts]
        assert routes == [r for name in (FAST, BEST, FAST)
                          for r in (f"/v1/models/{name}/predict", f"/v1/cam?model={name}")], posts
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not severe, severe
    finally:
        browser.quit()
