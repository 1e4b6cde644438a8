"""``nin serve``: an HTTP API and a web page for a trained model (FastAPI + uvicorn, the ``serve`` extra).

- ``model.py``    what answers: onnxruntime on CPU when available, PyTorch otherwise; PyTorch for class maps
- ``batching.py`` dynamic batching with a bounded queue, inference off the event loop
- ``app.py``      the routes, the limits and the errors; the page in ``static/``
- ``server.py``   uvicorn, with SIGTERM draining the requests in flight
"""
from .app import create_app
from .model import ServedModel, load_served
from .server import run_server

__all__ = ["create_app", "load_served", "run_server", "ServedModel"]
