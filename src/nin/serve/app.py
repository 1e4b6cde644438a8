"""The HTTP API and the page: thin FastAPI routes over ImageAPI (api.py) and a Batcher per model.

Every error is JSON ``{"error": "..."}`` with a status that names the kind of problem:
400 bad request (empty body, damaged image, bad parameter), 401 API key missing or wrong, 404 no such model,
413 body over --max-upload-mb (upload.read_body) or image over the pixel cap, 415 not an image,
501 class maps of an .onnx file, 503 queue full (with Retry-After).
"""
from __future__ import annotations

import asyncio
import gc
import logging
import re
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match, Route

from ..vocab import resolve_tta
from ..data.images import MAX_PIXELS
from .api import ImageAPI
from .batching import Batcher, QueueFull
from .metrics import RequestMetrics, ServeMetrics
from .model import ServedModel
from .upload import DESCRIPTIONS, PREDICT_PARAMETERS, ApiError, PredictQuery, check_key, read_body, upload_file

log = logging.getLogger("nin.serve")
INLINE_DECODE_BYTES = 256 * 1024  # smaller uploads decode on the event loop (~0.1 ms); larger in a thread
MAX_DECODERS = 2  # large images decoded at once: bounds the memory decoding can take (40 M pixels ~ 160 MB)
STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/static/style.css": ("style.css", "text/css; charset=utf-8")}
# Everything the page loads comes from nin itself; the browser refuses anything else.
CSP = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; connect-src 'self'"
_BINARY = {"schema": {"type": "string", "format": "binary"}}
# The upload in /openapi.json (the routes read the body themselves, to count its bytes as they arrive)
UPLOAD = {"requestBody": {"required": True, "description": "the image: a multipart form field 'file', or the raw body",
                          "content": {"multipart/form-data": {"schema": {
                              "type": "object", "required": ["file"],
                              "properties": {"file": {"type": "string", "format": "binary"}}}},
                              "image/*": _BINARY, "application/octet-stream": _BINARY}}}


@dataclass
class Slot:
    """One served model: what it does (api) and its queue (batcher)."""

    api: ImageAPI
    batcher: Batcher


class Service:
    """What the routes share: the models by name, the limits, the metrics."""

    def __init__(self, slots: dict[str, Slot], *, max_upload_mb: float, api_key: str | None, topk: int,
                 metrics: ServeMetrics) -> None:
        self.slots, self.api_key, self.topk, self.metrics = slots, api_key, topk, metrics
        self.max_upload_mb = max_upload_mb
        self.limit = int(max_upload_mb * 1024 * 1024)
        self.decoders = asyncio.Semaphore(MAX_DECODERS)
        self.ready = False

    def slot(self, name: str | None) -> Slot:
        if name is None:
            return next(iter(self.slots.values()))
        if name not in self.slots:
            raise ApiError(404, f"no model named {name!r} here; GET /v1/models lists: {', '.join(self.slots)}",
                           reason="no_model")
        return self.slots[name]

    async def read_image(self, request: Request, slot: Slot, invert: bool) -> tuple[np.ndarray, str]:
        """The request's image as the model's uint8 C x H x W and its file name, or ApiError."""
        body = await read_body(request, self.limit, limit_flag=f" (--max-upload-mb {self.max_upload_mb:g})")
        body, name = upload_file(body, request.headers.get("content-type", ""))
        if len(body) <= INLINE_DECODE_BYTES:
            return slot.api.decode(body, name, invert=invert), name
        async with self.decoders:
            return await asyncio.to_thread(slot.api.decode, body, name, invert=invert), name

    async def probabilities(self, slot: Slot, image: np.ndarray, tta: str | None) -> np.ndarray:
        try:
            return await slot.batcher.predict(image, tta)
        except QueueFull as e:
            raise ApiError(503, f"busy: {e}; retry shortly", {"Retry-After": "1"}, reason="queue_full") from None


def create_app(served: ServedModel | list[ServedModel], *, max_batch: int = 16, max_wait_ms: float = 2.0,
               max_queue: int = 256, max_upload_mb: float = 10, max_pixels: int = MAX_PIXELS,
               api_key: str | None = None, topk: int = 5, names: list[str] | None = None) -> FastAPI:
    """The FastAPI app serving ``served`` (one model, or several: the first answers /v1/predict), each
    under its name (``names``; default the architecture's).  ``max_batch`` may be one per model.
    Start it with uvicorn (server.run_server) or TestClient."""
    models = served if isinstance(served, list) else [served]
    names = [n or m.meta.model for n, m in zip(names or [None] * len(models), models)]
    batches = max_batch if isinstance(max_batch, list) else [max_batch] * len(models)
    metrics = ServeMetrics()
    slots = {}
    for model, name, mb in zip(models, names, batches):
        api = ImageAPI(model, name=name, max_pixels=max_pixels, max_batch=mb)
        batcher = Batcher(api.predict, max_batch=mb, max_wait_ms=max_wait_ms, max_queue=max_queue)
        batcher.stats.on_batch = metrics.batch
        slots[name] = Slot(api, batcher)
    metrics.watch_queue(lambda: sum(s.batcher.queued for s in slots.values()))
    service = Service(slots, max_upload_mb=max_upload_mb, api_key=api_key, topk=topk, metrics=metrics)
    app = FastAPI(title="nin serve", version="1", lifespan=_lifespan,
                  docs_url=None, redoc_url=None)  # Swagger UI / ReDoc load from a CDN: off (openapi.json stays)
    app.state.nin = service
    first = next(iter(slots.values()))
    app.state.batcher, app.state.served = first.batcher, first.api.served  # the first model's
    _add_error_handlers(app)
    app.include_router(router)
    _add_page(app)
    _add_predict(app)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    service: Service = app.state.nin
    for slot in service.slots.values():
        # Warm up both batch shapes before the first request: the first run of a session allocates.
        c, h, w = slot.api.meta.input_size
        for n in sorted({1, slot.batcher.max_batch}):
            slot.api.predict(np.zeros((n, c, h, w), np.uint8))
        slot.batcher.start()
    gc.freeze()  # the model and libraries never die: keep them out of every later collection's scan
    service.ready = True
    yield
    service.ready = False
    for slot in service.slots.values():
        await slot.batcher.stop()  # uvicorn has finished the in-flight requests by now


def _add_error_handlers(app: FastAPI) -> None:
    metrics = app.state.nin.metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        if e.reason:
            metrics.refused(e.reason)
        return JSONResponse({"error": e.message}, e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(request: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        metrics.refused("parameter")
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}"}, 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return JSONResponse({"error": str(e.detail)}, e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, e: ClientDisconnect):
        # The client closed the connection while sending its body (load generators do at their end):
        # nobody will read this answer; 499 as nginx logs it, not an internal error.
        metrics.refused("client_disconnect")
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": f"internal error ({e.__class__.__name__})"}, 500)


def _add_page(app: FastAPI) -> None:
    for route, (name, kind) in STATIC.items():
        data = resources.files("nin.serve").joinpath("static", name).read_bytes()  # read once
        headers = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache"}
        app.add_api_route(route, _asset(data, kind, headers), methods=["GET"], include_in_schema=False)


def _asset(data: bytes, kind: str, headers: dict):
    async def asset():
        return Response(data, media_type=kind, headers=headers)
    return asset


# --- the routes ------------------------------------------------------------------------------
async def require_key(request: Request) -> None:  # async: a plain def would hop to a thread per request
    check_key(request.headers, request.app.state.nin.api_key)


router = APIRouter()
keyed = [Depends(require_key)]
Invert = Query(False, description=DESCRIPTIONS["invert"])


# The predict routes are the hot path: plain Starlette routes that read their query and check the key
# themselves (PredictQuery, in upload.py).  FastAPI's per-request machinery (dependencies, parameter
# validation, its route wrapper) cost about a third of a request's event-loop time (BENCHMARKS.md,
# serving); /openapi.json still describes them as FastAPI would (_add_predict).
async def predict(request: Request) -> JSONResponse:
    """POST /v1/predict and /v1/models/{name}/predict (PREDICT_ROUTES)."""
    return await _predict(request, request.path_params.get("name"))


PREDICT_ROUTES = {  # path: (its name in /openapi.json, its description there)
    "/v1/predict": ("predict", "An image (raw body or multipart field 'file') -> its top-k classes, "
                               "as `nin predict --json`."),
    "/v1/models/{name}/predict": ("predict_with", "/v1/predict with the model called ``name`` "
                                                  "(GET /v1/models lists them)."),
}


class _Route(Route):
    """A Starlette route that puts itself in the scope, as FastAPI's own routes do (RequestMetrics reads it)."""

    def matches(self, scope):
        match, child = super().matches(scope)
        if match != Match.NONE:
            child["route"] = self
        return match, child


def _add_predict(app: FastAPI) -> None:
    app.router.routes[:0] = [_Route(path, predict, methods=["POST"]) for path in PREDICT_ROUTES]  # matched first
    generate = app.openapi

    where = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string", "title": "Name"}}]

    def openapi() -> dict:
        schema = generate()  # FastAPI's, made once and kept in app.openapi_schema
        for path, (name, description) in PREDICT_ROUTES.items():
            schema["paths"].setdefault(path, {"post": {
                "summary": name.replace("_", " ").title(), "description": description,
                "operationId": re.sub(r"\W", "_", name + path) + "_post",  # as FastAPI names them
                "parameters": (where if "{name}" in path else []) + PREDICT_PARAMETERS, **UPLOAD,
                "responses": {"200": {"description": "Successful Response",
                                      "content": {"application/json": {"schema": {}}}}}}})
        return schema

    app.openapi = openapi


async def _predict(request: Request, name: str | None) -> JSONResponse:
    service: Service = request.app.state.nin
    check_key(request.headers, service.api_key)
    query = PredictQuery.parse(request.query_params)
    slot = service.slot(name)
    with slot.batcher.expect():
        image, file = await service.read_image(request, slot, query.invert)
    tta = resolve_tta(slot.api.meta, query.tta)  # one batch key for "run", no value and the model's own by name
    probs = await service.probabilities(slot, image, tta)
    # a Response as is: FastAPI's generic serialisation (jsonable_encoder) of a dict of str/float is the same
    # JSON at several times the cost
    return JSONResponse(slot.api.encode(probs, file, topk=query.topk or service.topk,
                                        image=image if query.preview else None, tta=tta))


@router.post("/v1/cam", dependencies=keyed, openapi_extra=UPLOAD)
async def cam(request: Request, topk: int = Query(3, ge=1, le=1000), invert: bool = Invert,
              format: Literal["png", "json"] = Query("png", description="png: the figure `nin cam` draws; "
                                                                        "json: the maps as arrays"),
              model: str | None = Query(None, description="the model's name (default: the first)")):
    """Class activation maps of the top-k classes: the `nin cam` figure (PNG) or arrays (JSON)."""
    service: Service = request.app.state.nin
    slot = service.slot(model)
    if slot.api.served.cam_model is None:
        raise ApiError(501, "class activation maps need the PyTorch model: serve the run folder, not the .onnx")
    image, name = await service.read_image(request, slot, invert)
    probs = await service.probabilities(slot, image, resolve_tta(slot.api.meta, None))  # /v1/predict's numbers; the maps: one forward
    if format == "png":
        return Response(await slot.batcher.run(slot.api.cam_png, image, probs, topk, name), media_type="image/png")
    return await slot.batcher.run(slot.api.cam_json, image, probs, topk, name)


@router.get("/v1/model", dependencies=keyed)
async def model_info(request: Request, model: str | None = Query(None, description="default: the first")):
    """The model's description (model.json), the backend, whether class maps work, the limits."""
    service: Service = request.app.state.nin
    return service.slot(model).api.describe(topk=service.topk, max_upload_bytes=service.limit)


@router.get("/v1/models", dependencies=keyed)
async def models(request: Request):
    """The models this server answers with, by name (the first is /v1/predict's)."""
    service: Service = request.app.state.nin
    return {"models": [s.api.describe(topk=service.topk, max_upload_bytes=service.limit)
                       for s in service.slots.values()]}


@router.get("/metrics", dependencies=keyed, include_in_schema=False)
async def metrics(request: Request):
    """Prometheus' text format: requests by route and status, latency, batch sizes, refusals, queue depth."""
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.nin.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/health")
async def health(request: Request):
    """Liveness and readiness: 200 once the model is loaded and warmed up."""
    service: Service = request.app.state.nin
    api = next(iter(service.slots.values())).api
    return {"status": "ok", "model": api.meta.model, "weights": api.served.source,
            "queued": sum(s.batcher.queued for s in service.slots.values())}


@router.get("/livez")
async def livez():
    """Liveness: the process answers (Kubernetes livenessProbe)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request):
    """Readiness: 200 while the models are warmed up and taking requests, 503 while starting or stopping."""
    service: Service = request.app.state.nin
    if not (service.ready and all(s.batcher.running for s in service.slots.values())):
        return JSONResponse({"status": "not ready"}, 503)
    return {"status": "ready"}
