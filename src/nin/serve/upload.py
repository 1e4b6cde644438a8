"""Reading a request: its body within a size limit, the file inside a multipart form, the predict routes'
query, and the API key.

Plain functions over a Starlette request (or just its headers), each testable alone; every refusal is
an ApiError whose status names the kind of problem and whose ``reason`` labels /metrics' refusal counter.
Uploads stay in memory: a request never touches the file system.
"""
from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ImageError
from ..vocab import TTA_REQUESTS

# A body over the limit is still read (and dropped) up to this many bytes (or 4x the limit, if more)
# before the 413: clients that send the whole body before reading the answer (Python's urllib) would
# otherwise get a connection reset instead of the 413.  A body declared larger is answered at once.
DISCARD_BYTES = 64 * 1024 * 1024


class ApiError(Exception):
    """A refused request: answered as JSON ``{"error": message}`` with ``status`` and ``headers``."""

    def __init__(self, status: int, message: str, headers: dict | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.reason = status, message, headers, reason


def image_error(e: ImageError) -> ApiError:
    """An image that cannot be used: 413 over the pixel cap, 415 not an image, 400 empty/truncated/damaged."""
    text = str(e)
    if "over the limit" in text:
        return ApiError(413, text, reason="too_many_pixels")
    if "not an image file" in text:
        return ApiError(415, text, reason="not_an_image")
    return ApiError(400, text, reason="bad_image")


async def read_body(request, limit: int, *, limit_flag: str = "") -> bytes:
    """The request's body, at most ``limit`` bytes, or ApiError 413 (Connection: close).

    Bytes are counted as they arrive: a missing or false Content-Length changes nothing.  A body over the
    limit is read on and dropped up to ``max(DISCARD_BYTES, 4 * limit)``, so that the client has sent it
    all and reads the 413; a body declared larger than that is refused without reading it."""
    discard = max(DISCARD_BYTES, 4 * limit)
    declared = request.headers.get("content-length", "")
    declared = int(declared) if declared.isdigit() else None
    chunks, n, over = [], 0, declared is not None and declared > limit
    if not (over and declared > discard):
        async for chunk in request.stream():
            n += len(chunk)
            over = over or n > limit
            if over:
                chunks.clear()
                if n > discard:
                    break
                continue
            chunks.append(chunk)
    if over:
        size = f"{declared:,} bytes, over" if declared is not None and declared > limit else "over"
        raise ApiError(413, f"the body is {size} the limit of {limit:,} bytes{limit_flag}",
                       {"Connection": "close"}, reason="too_large")
    return b"".join(chunks)


def upload_file(body: bytes, content_type: str) -> tuple[bytes, str]:
    """(image bytes, file name) of a request body: the body itself ("upload"), or for multipart/form-data
    the first part with a filename, else the part named file or image.  ApiError 400 when it is empty."""
    name = "upload"
    if content_type.lower().startswith("multipart/form-data"):
        body, name = multipart_file(body, content_type)
    if not body:
        raise ApiError(400, f"{name}: empty body (send the image as the body or as the form field 'file')",
                       reason="empty")
    return body, name


def multipart_file(body: bytes, content_type: str) -> tuple[bytes, str]:
    """(bytes, filename) of the upload in a multipart/form-data body, parsed in memory (Starlette's form
    parser spools large parts to disk)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise ApiError(400, "multipart/form-data body without a boundary", reason="bad_form")
    parts: list[dict] = []
    field, value = bytearray(), bytearray()

    def on_header_end():
        parts[-1]["headers"][bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    parser = MultipartParser(boundary, {
        "on_part_begin": lambda: parts.append({"headers": {}, "data": []}),
        "on_part_data": lambda d, s, e: parts[-1]["data"].append(d[s:e]),
        "on_header_field": lambda d, s, e: field.extend(d[s:e]),
        "on_header_value": lambda d, s, e: value.extend(d[s:e]),
        "on_header_end": on_header_end,
    })
    try:
        parser.write(body)
        parser.finalize()
    except Exception as e:  # python-multipart raises its own errors on malformed bodies
        raise ApiError(400, f"malformed multipart/form-data body ({e})", reason="bad_form") from None
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
    raise ApiError(400, "multipart/form-data body without a file (send it as the field 'file')", reason="bad_form")


def check_key(headers: Mapping[str, str], api_key: str | None) -> None:
    """Nothing when ``api_key`` is None or the headers carry it (``X-API-Key: KEY`` or
    ``Authorization: Bearer KEY``, compared in constant time); ApiError 401 otherwise."""
    if api_key is None:
        return
    given = headers.get("x-api-key")
    auth = headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if given is None or not hmac.compare_digest(given.encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key (send it as X-API-Key or Authorization: Bearer)",
                       {"WWW-Authenticate": "Bearer"}, reason="api_key")


# --- the predict routes' query ----------------------------------------------------------------------
# /v1/predict parses its query here rather than through FastAPI's parameter validation, which (with the key
# dependency) cost a third of a request's event-loop time (BENCHMARKS.md, serving).  The rules and messages are
# pydantic's, as the other routes give them; PREDICT_PARAMETERS documents them in /openapi.json as FastAPI would.
TOPK_MAX = 1000
_TRUE, _FALSE = ("1", "on", "t", "true", "y", "yes"), ("0", "off", "f", "false", "n", "no")
DESCRIPTIONS = {"topk": "how many classes to return (default: the server's --topk)",
                "invert": "invert the image first (dark object on a light background)",
                "preview": "add the image as the network sees it (PNG data URL)",
                "tta": "test-time augmentation for this request (default run: the model's own, as `nin predict`); "
                       "none is the fastest"}


def _documented(name: str, schema: dict) -> dict:
    schema = {**schema, "description": DESCRIPTIONS[name], "title": name.title()}
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": DESCRIPTIONS[name]}


PREDICT_PARAMETERS = [
    _documented("topk", {"anyOf": [{"type": "integer", "maximum": TOPK_MAX, "minimum": 1}, {"type": "null"}]}),
    _documented("invert", {"type": "boolean", "default": False}),
    _documented("preview", {"type": "boolean", "default": False}),
    _documented("tta", {"anyOf": [{"enum": list(TTA_REQUESTS), "type": "string"}, {"type": "null"}]}),
]


@dataclass(frozen=True)
class PredictQuery:
    """``?topk=&invert=&preview=&tta=`` of a predict request (unknown names are ignored; a repeated one: the last)."""

    topk: int | None = None
    invert: bool = False
    preview: bool = False
    tta: str | None = None

    @classmethod
    def parse(cls, query: Mapping[str, str]) -> "PredictQuery":
        """The query's values, or ApiError 400 naming the parameter (``"topk: Input should be ..."``)."""
        topk, tta = query.get("topk"), query.get("tta")
        if tta is not None and tta not in TTA_REQUESTS:
            quoted = [repr(t) for t in TTA_REQUESTS]
            _bad("tta", f"Input should be {', '.join(quoted[:-1])} or {quoted[-1]}")
        return cls(topk=None if topk is None else _topk(topk), invert=_bool(query, "invert"),
                   preview=_bool(query, "preview"), tta=tta)


def _bad(name: str, message: str):
    raise ApiError(400, f"{name}: {message}", reason="parameter")


def _topk(text: str) -> int:
    text = text.strip()
    whole = re.fullmatch(r"[+-]?[0-9]+(_[0-9]+)*(\.0+)?", text)  # "5.0" is 5, as pydantic reads it
    if not whole:
        _bad("topk", "Input should be a valid integer, unable to parse string as an integer")
    value = int(text.partition(".")[0])
    if value < 1:
        _bad("topk", "Input should be greater than or equal to 1")
    if value > TOPK_MAX:
        _bad("topk", f"Input should be less than or equal to {TOPK_MAX}")
    return value


def _bool(query: Mapping[str, str], name: str) -> bool:
    text = query.get(name)
    if text is None:
        return False
    text = text.lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    _bad(name, "Input should be a valid boolean, unable to interpret input")
