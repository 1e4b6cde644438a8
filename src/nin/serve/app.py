"""The HTTP API and the page: FastAPI routes over a ServedModel and a Batcher.

Every error is JSON ``{"error": "..."}`` with a status that names the kind of problem:
400 bad request (empty body, damaged image, bad parameter), 401 API key missing or wrong,
413 body over --max-upload-mb (counted while reading; the rest is read and dropped, up to DISCARD_BYTES,
so that a client still sending reads the answer, and the connection is closed) or image over the pixel cap,
415 not an image, 503 queue full (with Retry-After).  Uploads stay in memory: a request never touches the file system.
"""
from __future__ import annotations

import asyncio
import base64
import gc
import hmac
import io
import logging
from contextlib import asynccontextmanager
from importlib import resources
from typing import Literal

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..errors import ImageError
from ..images import MAX_PIXELS, read_input
from .batching import Batcher, QueueFull
from .model import ServedModel, reported_accuracy

log = logging.getLogger("nin.serve")
INLINE_DECODE_BYTES = 256 * 1024  # smaller uploads decode on the event loop (~0.1 ms); larger in a thread
MAX_DECODERS = 2  # large images decoded at once: bounds the memory decoding can take (40 M pixels ~ 160 MB)
# A body over --max-upload-mb is still read (and dropped) up to this many bytes (or 4x the limit, if more)
# before the 413: clients that send the whole body before reading the answer (Python's urllib) would
# otherwise get a connection reset instead of the 413.  A body declared larger is answered at once.
DISCARD_BYTES = 64 * 1024 * 1024
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/static/style.css": ("style.css", "text/css; charset=utf-8")}
# Everything the page loads comes from nin itself; the browser refuses anything else.
CSP = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'"


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def image_error_status(e: ImageError) -> int:
    text = str(e)
    if "over the limit" in text:
        return 413
    if "not an image file" in text:
        return 415
    return 400  # empty, truncated or damaged


def _multipart_file(body: bytes, content_type: str) -> tuple[bytes, str]:
    """(bytes, filename) of the upload in a multipart/form-data body: the first part with a filename,
    else the part named file or image.  Parsed in memory (Starlette's form parser spools to disk)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise ApiError(400, "multipart/form-data body without a boundary")
    parts: list[dict] = []
    field = bytearray()
    value = bytearray()

    def on_part_begin():
        parts.append({"headers": {}, "data": []})

    def on_header_end():
        parts[-1]["headers"][bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin,
        "on_part_data": lambda d, s, e: parts[-1]["data"].append(d[s:e]),
        "on_header_field": lambda d, s, e: field.extend(d[s:e]),
        "on_header_value": lambda d, s, e: value.extend(d[s:e]),
        "on_header_end": on_header_end,
    })
    try:
        parser.write(body)
        parser.finalize()
    except Exception as e:  # python-multipart raises its own errors on malformed bodies
        raise ApiError(400, f"malformed multipart/form-data body ({e})") from None
    named = []
    for part in parts:
        params = parse_options_header(part["headers"].get(b"content-disposition", b""))[1]
        filename = params.get(b"filename")
        if filename is not None:
            return b"".join(part["data"]), filename.decode("utf-8", "replace") or "upload"
        if params.get(b"name") in (b"file", b"image"):
            named.append(part)
    if named:
        return b"".join(named[0]["data"]), "upload"
    raise ApiError(400, "multipart/form-data body without a file (send it as the field 'file')")


def _png(image: np.ndarray) -> str:
    """uint8 C x H x W -> a data: URL of a PNG (the page shows what the network sees)."""
    from PIL import Image

    arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _top(probs: np.ndarray, classes: list[str], k: int) -> list[dict]:
    k = max(1, min(k, len(classes)))
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"class": classes[i], "prob": float(probs[i])} for i in order]


def create_app(served: ServedModel, *, max_batch: int = 16, max_wait_ms: float = 2.0, max_queue: int = 256,
               max_upload_mb: float = 10, max_pixels: int = MAX_PIXELS, api_key: str | None = None,
               topk: int = 5) -> FastAPI:
    """The FastAPI app serving ``served``.  Start it with uvicorn (server.run_server) or TestClient."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_fastapi_instrumentator import Instrumentator

    meta = served.meta
    c, h, w = meta.input_size
    limit = int(max_upload_mb * 1024 * 1024)
    discard = max(DISCARD_BYTES, 4 * limit)
    batcher = Batcher(served.probabilities, max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue)
    decoders = asyncio.Semaphore(MAX_DECODERS)
    assets = {route: (resources.files("nin.serve").joinpath("static", name).read_bytes(), kind)
              for route, (name, kind) in STATIC.items()}  # read once: serving them touches no file

    registry = CollectorRegistry()  # one per app: several apps (tests) never share counters
    batch_size = Histogram("nin_batch_size", "images per forward pass", registry=registry,
                           buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    infer_seconds = Histogram("nin_inference_seconds", "seconds per forward pass (a whole batch)",
                              registry=registry, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
    errors = Counter("nin_request_errors", "refused requests by reason", ["reason"], registry=registry)
    Gauge("nin_queue_depth", "images waiting for a forward pass", registry=registry).set_function(
        lambda: batcher.queued)

    def observe(n: int, seconds: float) -> None:
        batch_size.observe(n)
        infer_seconds.observe(seconds)
    batcher.stats.on_batch = observe

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Warm up both batch shapes before the first request: the first run of a session allocates.
        for n in sorted({1, batcher.max_batch}):
            served.probabilities(np.zeros((n, c, h, w), np.uint8))
        gc.freeze()  # the model and libraries never die: keep them out of every later collection's scan
        batcher.start()
        yield
        await batcher.stop()  # uvicorn has finished the in-flight requests by now

    app = FastAPI(title="nin serve", version="1", lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # Swagger UI / ReDoc load from a CDN: off (openapi.json stays)
    app.state.batcher = batcher
    app.state.served = served

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if given is None or not hmac.compare_digest(given.encode(), api_key.encode()):
            errors.labels("api_key").inc()
            raise ApiError(401, "missing or wrong API key (send it as X-API-Key or Authorization: Bearer)",
                           {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return JSONResponse({"error": e.message}, e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        errors.labels("parameter").inc()
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)}, e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, e: ClientDisconnect):
        # The client closed the connection while sending its body (load generators do at their end):
        # nobody will read this answer; 499 as nginx logs it, not an internal error.
        errors.labels("client_disconnect").inc()
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": f"internal error ({e.__class__.__name__})"}, 500)

    async def read_upload(request: Request, invert: bool) -> tuple[np.ndarray, str]:
        """The request's image as the model's uint8 C x H x W, or ApiError."""
        declared = request.headers.get("content-length", "")
        declared = int(declared) if declared.isdigit() else None
        chunks, n, over = [], 0, declared is not None and declared > limit
        if not (over and declared > discard):
            async for chunk in request.stream():  # count what arrives: Content-Length can lie or be absent
                n += len(chunk)
                over = over or n > limit
                if over:  # read on (dropping it) so that the client is done sending and reads the 413
                    chunks.clear()
                    if n > discard:
                        break
                    continue
                chunks.append(chunk)
        if over:
            errors.labels("too_large").inc()
            size = f"{declared:,} bytes, over" if declared is not None and declared > limit else "over"
            raise ApiError(413, f"the body is {size} the limit of {limit:,} bytes (--max-upload-mb {max_upload_mb:g})",
                           {"Connection": "close"})
        body = b"".join(chunks)
        name = "upload"
        ctype = request.headers.get("content-type", "")
        if ctype.lower().startswith("multipart/form-data"):
            body, name = _multipart_file(body, ctype)
        if not body:
            errors.labels("empty").inc()
            raise ApiError(400, f"{name}: empty body (send the image as the body or as the form field 'file')")
        try:
            if len(body) <= INLINE_DECODE_BYTES:
                image = read_input(meta, body, invert=invert, max_pixels=max_pixels, name=name)
            else:
                async with decoders:
                    image = await asyncio.to_thread(read_input, meta, body, invert=invert,
                                                    max_pixels=max_pixels, name=name)
        except ImageError as e:
            status = image_error_status(e)
            errors.labels({413: "too_many_pixels", 415: "not_an_image"}.get(status, "bad_image")).inc()
            raise ApiError(status, str(e)) from None
        return image, name

    async def probabilities(image: np.ndarray) -> np.ndarray:
        try:
            return await batcher.predict(image)
        except QueueFull as e:
            errors.labels("queue_full").inc()
            raise ApiError(503, f"busy: {e}; retry shortly", {"Retry-After": "1"}) from None

    keyed = [Depends(check_key)]
    TopK = Query(topk, ge=1, le=1000, description="how many classes to return")
    Invert = Query(False, description="invert the image first (dark object on a light background)")

    @app.post("/v1/predict", dependencies=keyed)
    async def predict(request: Request, topk: int = TopK, invert: bool = Invert,
                      preview: bool = Query(False, description="add the image as the network sees it (PNG)")):
        """An image (raw body or multipart field 'file') -> its top-k classes, as `nin predict --json`."""
        with batcher.expect():
            image, name = await read_upload(request, invert)
        probs = await probabilities(image)
        out = {"file": name, "top": _top(probs, served.classes, topk)}
        if preview:
            out["input"] = _png(image)
        return out

    @app.post("/v1/cam", dependencies=keyed)
    async def cam(request: Request, topk: int = Query(3, ge=1, le=1000), invert: bool = Invert,
                  format: Literal["png", "json"] = Query("png", description="png: the figure `nin cam` draws; "
                                                         "json: the maps as arrays")):
        """Class activation maps of the top-k classes: the `nin cam` figure (PNG) or arrays (JSON)."""
        if served.cam_model is None:
            raise ApiError(501, "class activation maps need the PyTorch model: serve the run folder, not the .onnx")
        image, name = await read_upload(request, invert)
        probs = await probabilities(image)  # /v1/predict's numbers (the model's own TTA); the maps: one forward
        if format == "png":
            data = await batcher.run(_cam_png, served.cam_model, image, probs, topk, name)
            return Response(data, media_type="image/png")
        maps = await batcher.run(_cam_arrays, served.cam_model, image)
        top = _top(probs, served.classes, topk)
        index = {name: i for i, name in enumerate(served.classes)}
        for t in top:
            t["map"] = np.round(maps[index[t["class"]]], 4).tolist()
        return {"file": name, "input": _png(image), "map_size": list(maps.shape[1:]), "top": top}

    @app.get("/v1/model", dependencies=keyed)
    async def model_info():
        """The model's description (model.json), the backend, whether class maps work, the limits."""
        doc = meta.to_json()
        acc = reported_accuracy(meta)  # fp32, with the model's own TTA; null when not recorded
        return {**doc, "weights": served.source, "accuracy": acc and acc["value"], "accuracy_tta": acc and acc["tta"],
                "accuracy_precision": acc and acc["precision"], "backend": served.backend,
                "cam": served.cam_model is not None, "topk": topk, "max_batch": batcher.max_batch,
                "max_upload_bytes": limit, "max_pixels": max_pixels}

    @app.get("/health")
    async def health():
        """Liveness and readiness: 200 once the model is loaded and warmed up."""
        return {"status": "ok", "model": meta.model, "weights": served.source, "queued": batcher.queued}

    def page(route: str):
        data, kind = assets[route]

        async def asset():
            return Response(data, media_type=kind, headers={"Content-Security-Policy": CSP,
                                                            "Cache-Control": "no-cache"})
        return asset

    for route in STATIC:
        app.add_api_route(route, page(route), methods=["GET"], include_in_schema=False)

    Instrumentator(should_group_status_codes=False, registry=registry,
                   excluded_handlers=["/metrics"]).instrument(app).expose(
        app, include_in_schema=False, dependencies=keyed)
    return app


def _cam_png(model, image: np.ndarray, probs: np.ndarray, topk: int, title: str) -> bytes:
    import torch

    from ..evaluation import CAM_DPI, cam_figure

    fig, _ = cam_figure(model, torch.from_numpy(image.copy()), topk=topk, title=title, probs=torch.from_numpy(probs))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=CAM_DPI)
    return buf.getvalue()


def _cam_arrays(model, image: np.ndarray) -> np.ndarray:
    """The class maps (K x h x w) of one image, at the network's own map resolution (one plain forward)."""
    import torch

    from ..evaluation import class_activation_maps, preprocess

    dev = next(model.parameters()).device
    maps, _ = class_activation_maps(model, preprocess(model, torch.from_numpy(image.copy())[None].to(dev)))
    return maps[0].float().cpu().numpy()
