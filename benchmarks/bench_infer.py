"""Inference latency and throughput on CPU: PyTorch eager fp32 vs onnxruntime, plus `nin predict` cold start.

Measures (random-init weights: speed does not depend on the values; a run folder is made in a temp dir):
  - single-image latency in process, nin_fmnist: preprocess + forward + softmax, median of 200 after warm-up
    (target <= 2 ms);
  - `nin predict RUN one.png` as a fresh process, wall time including Python + torch import (target <= 3 s);
  - images/s at batch 256 for nin_fmnist and nin_d2l, PyTorch (inference_mode) and onnxruntime (dynamic batch).
Prints a markdown table.  About a minute on 2 cores.   Usage: python benchmarks/bench_infer.py [--out FILE]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nin.data.batchops import to_float_batch
from nin.modelfile import ModelMeta, save_model
from nin.onnx import OnnxModel, export_onnx
from nin.hub import load
from nin.hub import create_model

FMNIST_MEAN, FMNIST_STD = [0.286], [0.353]


def make_run(root: Path, name: str) -> Path:
    torch.manual_seed(0)
    model = create_model(name).eval()
    c, h, w = model.default_input_size
    resize = h if name == "nin_d2l" else None  # d2l's network reads 28 x 28 images resized to 224
    meta = ModelMeta(name, {}, [str(i) for i in range(model.num_classes)], [c, h, w],
                     "fashion-mnist", {"resize": resize, "mean": FMNIST_MEAN, "std": FMNIST_STD})
    run = root / name
    run.mkdir()
    save_model(run, model, meta)
    return run


def single_image_ms(run: Path, n: int = 200) -> float:
    model = load(run)
    x = torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8)
    times = []
    with torch.inference_mode():
        for i in range(n + 20):
            t = time.perf_counter()
            model(to_float_batch(x, mean=FMNIST_MEAN, std=FMNIST_STD)).softmax(1)
            if i >= 20:
                times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def cold_predict_s(run: Path, image: Path, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "nin", "predict", str(run), str(image)], check=True,
                       capture_output=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def throughput(fn, x: torch.Tensor, seconds: float) -> float:
    fn(x)  # warm-up
    n, t0 = 0, time.perf_counter()
    while n == 0 or time.perf_counter() - t0 < seconds:
        fn(x)
        n += 1
    return n * x.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the table to this markdown file")
    ap.add_argument("--seconds", type=float, default=4.0, help="time per throughput measurement (default 4)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        fm = make_run(root, "nin_fmnist")
        rows.append(("single-image predict, in process (median)", "nin_fmnist", "PyTorch",
                     f"{single_image_ms(fm):.2f} ms", "<= 2 ms"))
        png = root / "one.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8), "L").save(png)
        rows.append(("`nin predict` one file, cold start (median of 3)", "nin_fmnist", "PyTorch",
                     f"{cold_predict_s(fm, png):.2f} s", "<= 3 s"))
        for name in ("nin_fmnist", "nin_d2l"):
            run = fm if name == "nin_fmnist" else make_run(root, name)
            model = load(run)
            x = to_float_batch(torch.randint(0, 256, (256, 1, 28, 28), dtype=torch.uint8),
                               **model.meta.preprocess)
            with torch.inference_mode():
                ips = throughput(model, x, args.seconds)
            rows.append(("images/s, batch 256", name, "PyTorch", f"{ips:,.0f}", ""))
            om = OnnxModel(export_onnx(model, model.meta, root / f"{name}.onnx", dynamic_batch=True))
            rows.append(("images/s, batch 256", name, "onnxruntime", f"{throughput(om, x, args.seconds):,.0f}", ""))
    table = ["| measurement | model | runtime | result | target |", "|---|---|---|---|---|"]
    table += [f"| {' | '.join(r)} |" for r in rows]
    text = "\n".join(table)
    print(text)
    print(f"\n{torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"nin_d2l input: 28 x 28 resized to 224 inside to_float_batch (not timed in images/s)")
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
