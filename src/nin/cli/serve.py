"""`nin serve`: the HTTP API and the page (the serve extra)."""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import UsageError


def cmd_serve(args: argparse.Namespace) -> int:
    import tempfile

    from ..devices import cores

    try:
        from ..serve import create_app, load_served, run_server, run_workers
        from ..serve.model import choose_max_batch, default_threads, weights_name
        from ..serve.server import listen
    except ImportError as e:
        raise UsageError(f"nin serve needs the serve extra: pip install 'nin[serve]' ({e})") from None
    _check_serve_options(args)
    models = args.model or [None]
    names = _served_names(models)
    workers = args.workers or (1 if args.device.startswith("cuda") else cores())
    threads = args.threads or default_threads(workers)
    key = args.api_key or os.environ.get("NIN_API_KEY") or None
    # a port in use is said now, not after loading the model; several workers: a socket each (listen_again)
    sockets = listen(args.host, args.port, reuse_port=workers > 1)
    with tempfile.TemporaryDirectory(prefix="nin-serve-") as keep:  # the checked ONNX files the workers load
        try:
            served = []
            for m in models:
                print(f"nin serve: loading {weights_name(m)} ...", file=sys.stderr, flush=True)
                served.append(load_served(m, backend=args.backend, device=args.device, threads=threads,
                                          onnx_dir=keep if workers > 1 else None))
            batches = [choose_max_batch(s) if args.max_batch == "auto" else int(args.max_batch) for s in served]
            options = dict(max_batch=batches, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue, names=names,
                           max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels, api_key=key, topk=args.topk)
            app = create_app(served, **options) if workers == 1 else None
        except BaseException:
            for s in sockets:
                s.close()
            raise

        def ready(host, port):
            for s, name, mb in zip(served, names, batches):
                meta = s.meta
                print(f"nin serve: {s.source} ({meta.model}, {len(meta.classes)} classes, input "
                      f"{'x'.join(map(str, meta.input_size))}) on {s.backend}, batches up to {mb}"
                      f"{f', /v1/models/{name}/predict' if len(served) > 1 else ''}", flush=True)
            print(f"nin serve: http://{host}:{port}/  ({workers} worker{'s' * (workers > 1)} x {threads} compute "
                  f"thread{'s' * (threads > 1)}{', API key required' if key else ''}; API: POST /v1/predict, /v1/cam; "
                  "GET /v1/model, /v1/models, /health, /livez, /readyz, /metrics; Ctrl+C or SIGTERM to stop)",
                  flush=True)
        if workers == 1:
            return run_server(app, host=args.host, port=args.port, log_level=args.log_level, ready=ready,
                              sockets=sockets)
        recipes = [s.recipe(threads=threads) for s in served]
        return run_workers(recipes, options, workers=workers, sockets=sockets, log_level=args.log_level, ready=ready)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an HTTP API and a web page for a trained model (needs nin[serve])")
    p.add_argument("model", metavar="MODEL", nargs="*",
                   help="a run folder, a .safetensors, an exported .onnx or a pretrained name "
                        "(default: the default pretrained model); several: each at /v1/models/NAME/predict, "
                        "the first also at /v1/predict")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port, 0 to 65535 (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require this key (X-API-Key or Authorization: Bearer) on /v1/* and /metrics "
                        "(default: $NIN_API_KEY, else none)")
    p.add_argument("--max-batch", default="auto", metavar="N",
                   help="most images in one forward pass: a number (1 turns batching off) or auto (default): "
                        "16, 8 or 4 where that costs 1/1.25 of one image's time per image, measured at start-up, "
                        "else 1 (a large input, as nin_d2l's, already fills the cores)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="server processes sharing the port, each with its own model copy and batch queue "
                        "(default: one per core on the CPU, 1 on a GPU)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, metavar="MS",
                   help="how long a batch may wait for more images while requests are arriving (default 2)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="images waiting at most; more are answered 503 with Retry-After (default 256)")
    p.add_argument("--max-upload-mb", type=float, default=10, metavar="MB",
                   help="refuse request bodies over this size with 413 (default 10)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, metavar="N",
                   help="refuse images with more pixels than N with 413 (default 40,000,000)")
    p.add_argument("--topk", type=int, default=5, metavar="K", help="classes returned when ?topk= is not given "
                                                                    "(default 5)")
    p.add_argument("--backend", choices=["auto", "onnx", "torch"], default="auto",
                   help="what runs predictions: auto (onnxruntime on CPU when installed, else PyTorch), "
                        "onnx or torch (default auto); class maps always use PyTorch")
    p.add_argument("--device", default="auto", help="PyTorch device: auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, metavar="N",
                   help="compute threads per worker (default: the cores shared out among the workers; "
                        "with one worker all cores but one, left to the HTTP side)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="warning",
                   help="uvicorn's log level (default warning)")
    p.set_defaults(func=cmd_serve)


def _check_serve_options(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535 (0: any free port), got {args.port}")
    if args.max_batch != "auto" and not (args.max_batch.isdigit() and int(args.max_batch) >= 1):
        raise UsageError(f"--max-batch must be at least 1 (or auto), got {args.max_batch}")
    for flag, value, least in (("--max-queue", args.max_queue, 1), ("--topk", args.topk, 1),
                               ("--max-pixels", args.max_pixels, 1), ("--workers", args.workers, 1),
                               ("--threads", args.threads, 1)):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    if args.max_wait_ms < 0 or args.max_upload_mb <= 0:
        raise UsageError("--max-wait-ms must be >= 0 and --max-upload-mb > 0")
    if args.workers and args.workers > 1 and args.device.startswith("cuda"):
        raise UsageError("--workers above 1 runs on the CPU; on a GPU one worker batches for it (--workers 1)")


def _served_names(models: list) -> list[str]:
    """Each model's name in /v1/models: the shipped weights' name, else the file's or folder's name."""
    from pathlib import Path

    from ..serve.model import weights_name

    if len(models) == 1:
        return [None]
    names = [weights_name(m) if m is None or not Path(m).exists() else Path(m).stem or Path(m).name for m in models]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UsageError(f"two models would both be called {twice[0]!r} in /v1/models/NAME; rename one of them")
    return names
