"""``nin serve``: an HTTP API and a web page for trained models (FastAPI + uvicorn, the ``serve`` extra).

- ``model.py``    what answers: onnxruntime on CPU when available, PyTorch otherwise; PyTorch for class maps
- ``api.py``      ImageAPI: decode / predict / encode for one model, as LitServe's LitAPI (no HTTP in it)
- ``upload.py``   reading a request: the body within its limit, a multipart file, the API key
- ``batching.py`` dynamic batching with a bounded queue, inference off the event loop
- ``metrics.py``  the Prometheus counters, summed over worker processes
- ``app.py``      thin routes over ImageAPI, the errors; the page in ``static/``
- ``server.py``   uvicorn in one process or several workers on one port; SIGTERM drains them all
"""
from .app import create_app
from .model import ServedModel, load_served
from .server import run_server, run_workers

__all__ = ["create_app", "load_served", "run_server", "run_workers", "ServedModel"]
