"""Serving: requests/s and p50/p99 latency of `nin serve` under 1, 8 and 64 concurrent clients.

Five servers per model, all up at once and measured side by side (round-robin, medians of --rounds); the
ones not being measured are paused (SIGSTOP of their process group), so an idle server cannot take CPU:
  nin serve           the default: a worker process per core, backend auto (onnxruntime on CPU),
                      --max-batch auto (measured at start-up: 16 for the fast model, 1 where batching loses)
  nin serve, 1 worker --workers 1: one process, the compute threads on all cores but one (the design before)
  nin serve, 1 worker, --max-batch 1   the same without batching
  LitServe            the `litserve` package (pip install 'nin[bench]'): a LitAPI with batching (max 16,
                      2 ms), decoding with nin's reader and predicting with the same onnxruntime model as
                      nin serve (LITSERVE below); one API server + a worker per core as its inference workers
  few-line FastAPI    the endpoint a user would write: `async def predict(file: UploadFile)`, PIL, PyTorch
                      eager, one image per request (FEW_LINES below), under plain `uvicorn`
Models: the fast model (nin_fmnist width 32, 1x28x28) and nin_d2l (1x224x224); untrained weights unless
--fmnist-run gives a trained run (speed does not depend on the values).  Every request is the same
multipart upload of one 28x28 Fashion-MNIST-like PNG (the d2l model letterboxes it to 224x224).
Client: wrk (C, one thread, keep-alive connections, Lua script for the POST body); its CPU seconds and
every server process's (workers included) are recorded for every cell, since they share the machine's cores.
Measure on a quiet machine: numbers taken while other work runs say little.

Usage:  python benchmarks/bench_serve.py [--seconds 5] [--rounds 3] [--clients 1,8,64] [--models ...] [--json FILE] [--fmnist-run RUN]
Prints a markdown table (run_all.py's `serve` part puts it in BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
CONCURRENCY = (1, 8, 64)
NIN = "nin serve"
LIT = "LitServe (LitAPI, batching, same onnxruntime model)"
FEW = "few-line FastAPI (PyTorch, 1 image/request)"
DEFAULTS = {"clients": list(CONCURRENCY), "models": ["nin_fmnist", "nin_d2l"]}
BOUNDARY = "ninbenchboundary"

FEW_LINES = '''
import io, os, torch, numpy as np
from fastapi import FastAPI, UploadFile
from PIL import Image
from nin import load

model = load(os.environ["RUN"])
c, h, w = model.meta.input_size
mean, std = model.meta.preprocess["mean"][0], model.meta.preprocess["std"][0]
app = FastAPI()

@app.post("/predict")
async def predict(file: UploadFile):
    img = Image.open(io.BytesIO(await file.read())).convert("L").resize((w, h))
    x = (torch.from_numpy(np.asarray(img, np.float32) / 255)[None, None] - mean) / std
    with torch.no_grad():
        p = model(x).softmax(1)[0]
    return {"class": model.classes[int(p.argmax())], "prob": float(p.max())}
'''

LUA = '''
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "multipart/form-data; boundary=%s"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('RESULT {"requests": %%d, "duration_us": %%d, "p50_us": %%d, "p99_us": %%d, '
    .. '"max_us": %%d, "connect": %%d, "read": %%d, "write": %%d, "status": %%d, "timeout": %%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
''' % BOUNDARY


LITSERVE = '''
import os

import litserve as ls
import numpy as np

from nin.data.images import read_input
from nin.serve.model import load_served


class NinAPI(ls.LitAPI):
    def setup(self, device):
        # the same model as nin serve: exported to ONNX, checked, run by onnxruntime, 1 thread per worker
        self.served = load_served(os.environ["RUN"], threads=1)

    def decode_request(self, request):
        f = request["file"]
        data = f.file.read() if hasattr(f, "file") else f
        return read_input(self.served.meta, data)

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, x):
        return self.served.probabilities(x)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, p):
        i = int(p.argmax())
        return {"class": self.served.classes[i], "prob": float(p[i])}


if __name__ == "__main__":
    api = NinAPI(max_batch_size=16, batch_timeout=0.002)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=int(os.environ["WORKERS"]))
    server.run(host="127.0.0.1", port=int(os.environ["PORT"]), num_api_servers=1, log_level="warning",
               generate_client_file=False)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_runs(tmp: Path, fmnist_run: str | None) -> dict[str, Path]:
    import torch

    from nin.modelfile import ModelMeta, save_model
    from nin.hub import create_model

    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    runs = {}
    for name, size in (("nin_fmnist", 28), ("nin_d2l", 224)):
        if name == "nin_fmnist" and fmnist_run:
            runs[name] = Path(fmnist_run)
            continue
        torch.manual_seed(0)
        out = tmp / name
        out.mkdir()
        meta = ModelMeta(name, {}, classes, [1, size, size], "fashion-mnist",
                         {"resize": None, "mean": [0.286], "std": [0.353]})
        save_model(out, create_model(name).eval(), meta)
        runs[name] = out
    return runs


def body_file(tmp: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    img = np.zeros((28, 28), np.uint8)
    img[4:24, 8:20] = rng.integers(120, 230, (20, 12))  # a garment-like bright block on black
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + buf.getvalue() + f"\r\n--{BOUNDARY}--\r\n".encode()
    path = tmp / "body.bin"
    path.write_bytes(body)
    return path


class Server:
    def __init__(self, label: str, cmd: list[str], env: dict, path: str, port: int, log: Path,
                 ready_text: str | None = None):
        self.label, self.path, self.port, self.log = label, path, port, log
        self.ready_text = ready_text  # the line it prints once every worker listens
        # a file, not a pipe: a pipe nobody reads fills up and blocks the server's next log line
        with open(log, "w") as f:
            # its own process group: stop() and pause() reach every process it starts (LitServe's inference
            # workers outlived their server before, and kept polling: CPU taken from the server being measured)
            self.proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True,
                                         start_new_session=True)

    def wait_ready(self, body: bytes, timeout: float = 180) -> None:
        import http.client

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited: {self.log.read_text()[-2000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                c.request("POST", self.path, body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"})
                r = c.getresponse()
                r.read()
                if r.status == 200 and (self.ready_text is None or self.ready_text in self.log.read_text()):
                    return  # (a worker answers before the others listen: they would get no connection)
                if r.status == 200:
                    time.sleep(0.3)
                    continue
                raise RuntimeError(f"{self.label}: HTTP {r.status}")
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"{self.label} did not start")

    def cpu_seconds(self) -> float:
        """CPU seconds of the server and every process it started (workers), the living ones."""
        import psutil

        total = 0.0
        try:
            me = psutil.Process(self.proc.pid)
            for p in [me, *me.children(recursive=True)]:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            pass
        return total

    def _signal(self, sig) -> None:
        import signal

        try:
            os.killpg(self.proc.pid, getattr(signal, sig))
        except ProcessLookupError:
            pass

    def pause(self) -> None:
        """SIGSTOP the server's whole group while another server is measured: an idle server that polls
        (LitServe's workers do) would take CPU from the measured one."""
        self._signal("SIGSTOP")

    def resume(self) -> None:
        self._signal("SIGCONT")

    def stop(self) -> None:
        self.resume()
        self._signal("SIGTERM")
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        self._signal("SIGKILL")  # whatever of the group is left (workers)


def start_servers(run: Path, tmp: Path, baseline: tuple[str, Path] | None = None):
    """nin serve three ways, LitServe, the few-line endpoint, each started when the caller asks for the next
    (a generator); with ``baseline`` (its name and an exported source tree) also nin serve as it was there, a
    worker per core and one worker: the A/B of a change."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "RUN": str(run)}
    (tmp / "few_lines.py").write_text(FEW_LINES)
    (tmp / "lit.py").write_text(LITSERVE)
    ways = [(NIN, [], env), ("nin serve, 1 worker", ["--workers", "1"], env),
            ("nin serve, 1 worker, --max-batch 1", ["--workers", "1", "--max-batch", "1"], env)]
    if baseline is not None:
        old = {**env, "PYTHONPATH": str(baseline[1] / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        ways += [(f"nin serve at {baseline[0]}", [], old),
                 (f"nin serve at {baseline[0]}, 1 worker", ["--workers", "1"], old)]
    for i, (label, extra, where) in enumerate(ways):
        port = free_port()
        yield Server(label, [PY, "-m", "nin", "serve", str(run), "--port", str(port), *extra], where,
                     "/v1/predict", port, tmp / f"server{i}.log", ready_text="nin serve: http://")
    port = free_port()
    yield Server(LIT, [PY, str(tmp / "lit.py")], {**env, "PORT": str(port), "WORKERS": str(cores())},
                 "/predict", port, tmp / "server-litserve.log")
    port = free_port()
    yield Server(FEW, [PY, "-m", "uvicorn", "few_lines:app", "--port", str(port), "--log-level",
                       "warning", "--no-access-log", "--app-dir", str(tmp)], env, "/predict", port,
                 tmp / "server-few-lines.log")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def wrk(server: Server, conns: int, seconds: float, script: Path, body: Path) -> dict:
    url = f"http://127.0.0.1:{server.port}{server.path}"
    before_child = resource.getrusage(resource.RUSAGE_CHILDREN)
    before_server = server.cpu_seconds()
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--timeout", "20s", "-s", str(script), url],
                         capture_output=True, text=True, env={**os.environ, "BODY_FILE": str(body)}, check=True)
    after_child = resource.getrusage(resource.RUSAGE_CHILDREN)
    m = re.search(r"^RESULT (.*)$", out.stdout, re.M)
    if not m:
        raise RuntimeError(f"wrk printed no result: {out.stdout}\n{out.stderr}")
    r = json.loads(m.group(1))
    dur = r["duration_us"] / 1e6
    return {"rps": r["requests"] / dur, "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000,
            "requests": r["requests"], "errors": sum(r[k] for k in ("connect", "read", "write", "status", "timeout")),
            "client_cpu": (after_child.ru_utime + after_child.ru_stime - before_child.ru_utime - before_child.ru_stime) / dur,
            "server_cpu": (server.cpu_seconds() - before_server) / dur}


def median_cell(rounds: list[dict]) -> dict:
    keys = ("rps", "p50_ms", "p99_ms", "client_cpu", "server_cpu")
    out = {k: statistics.median(r[k] for r in rounds) for k in keys}
    out["errors"] = sum(r["errors"] for r in rounds)
    out["requests"] = sum(r["requests"] for r in rounds)
    return out


def measure(args) -> dict:
    if not shutil.which("wrk"):
        sys.exit("bench_serve: wrk is not installed (apt-get install wrk, or `make wrk`)")
    results = {"machine": machine(), "seconds": args.seconds, "rounds": args.rounds, "client": "wrk -t1 (Lua POST)",
               "fmnist_run": args.fmnist_run, "clients": args.clients, "model_names": args.models.split(","),
               "baseline": args.baseline,
               "models": {}}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        runs = make_runs(tmp, args.fmnist_run)
        body = body_file(tmp)
        script = tmp / "post.lua"
        script.write_text(LUA)
        baseline = None
        if args.baseline:
            from time_to_accuracy import export_revision  # the same export as its REV: variants

            baseline = (args.baseline, export_revision(args.baseline, tmp / "baseline")[1])
        for model in args.models.split(","):
            servers = []
            try:
                # one at a time, the others paused: nin serve's --max-batch auto times batch sizes as it starts,
                # and a pick made while other servers load differed from run to run
                for s in start_servers(runs[model], tmp, baseline):
                    servers.append(s)
                    s.wait_ready(body.read_bytes())
                    s.pause()
                for s in servers:  # warm-up, and the first batches' allocations
                    for other in servers:
                        other.pause() if other is not s else other.resume()
                    wrk(s, 8, 2, script, body)
                cells: dict[tuple[str, int], list[dict]] = {}
                for rnd in range(args.rounds):
                    for conns in args.clients:
                        for s in servers:
                            for other in servers:  # only the measured server runs
                                other.pause() if other is not s else other.resume()
                            r = wrk(s, conns, args.seconds, script, body)
                            cells.setdefault((s.label, conns), []).append(r)
                            print(f"[{model} round {rnd + 1}] {s.label:<45} c={conns:<3} {r['rps']:8.1f} req/s  "
                                  f"p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}",
                                  file=sys.stderr, flush=True)
            finally:
                for s in servers:
                    s.stop()
            results["models"][model] = [{"server": label, "clients": conns, **median_cell(rs), "rounds": rs}
                                        for (label, conns), rs in cells.items()]
    return results


def machine() -> str:
    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({cpu})"


def markdown(res: dict) -> str:
    lines = [f"### Serving: `nin serve` under load ({res['machine']})", "",
             f"Requests/s and latency of `POST` one 28x28 PNG (multipart), {res['client']}, {res['seconds']:g} s per "
             f"cell, median of {res['rounds']} rounds run side by side; client and server CPU in cores "
             "(1.0 = one core busy). Weights: " + ("a trained run" if res.get("fmnist_run") else "untrained")
             + " nin_fmnist, untrained nin_d2l (speed does not depend on the values).", ""]
    for model, rows in res["models"].items():
        name = {"nin_fmnist": "the fast model (nin_fmnist, 1x28x28)", "nin_d2l": "nin_d2l (1x224x224)"}.get(model, model)
        lines += [f"**{name}**", "",
                  "| server | clients | req/s | p50 ms | p99 ms | errors | server CPU | wrk CPU |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sorted(rows, key=lambda r: (r["clients"], r["server"])):
            lines.append(f"| {r['server']} | {r['clients']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
                         f"| {r['errors']} | {r['server_cpu']:.2f} | {r['client_cpu']:.2f} |")
        at64 = {r["server"]: r for r in rows if r["clients"] == 64}
        nin, few, lit = at64.get(NIN), at64.get(FEW), at64.get(LIT)
        if nin and few:
            lines += ["", f"At 64 clients: nin serve answers {nin['rps'] / few['rps']:.1f}x the few-line endpoint's "
                          f"requests/s, p99 {nin['p99_ms']:.0f} ms vs {few['p99_ms']:.0f} ms"
                      + (f"; {nin['rps'] / lit['rps']:.2f}x LitServe's (p99 {lit['p99_ms']:.0f} ms)." if lit else ".")]
        lines.append("")
    extra = "".join(f" --{k} {','.join(map(str, v))}" for k, v in (("clients", res.get("clients")),
                                                                    ("models", res.get("model_names")))
                    if v and list(v) != DEFAULTS[k])
    if res.get("baseline"):
        extra += f" --baseline {res['baseline']}"
    lines.append("Command: `python benchmarks/bench_serve.py" + (" --fmnist-run RUN" if res.get("fmnist_run") else "")
                 + f" --seconds {res['seconds']:g} --rounds {res['rounds']}{extra}`.")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, default=5, help="seconds per wrk run (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all cells; the table shows medians (default 3)")
    p.add_argument("--clients", type=lambda v: [int(c) for c in v.split(",")], default=list(CONCURRENCY),
                   help="comma-separated concurrent connections per cell (default 1,8,64)")
    p.add_argument("--models", default="nin_fmnist,nin_d2l", help="comma-separated (default nin_fmnist,nin_d2l)")
    p.add_argument("--fmnist-run", metavar="RUN", help="a trained fast-model run folder (default: untrained weights)")
    p.add_argument("--baseline", metavar="REV", help="also serve nin as it was at this git revision (git archive), "
                                                    "in the same rounds: the side-by-side measure of a change")
    p.add_argument("--json", metavar="FILE", help="also write every measurement as JSON")
    args = p.parse_args(argv)
    res = measure(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(markdown(res))


if __name__ == "__main__":
    main()
