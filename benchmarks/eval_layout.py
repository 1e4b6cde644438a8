"""Evaluation speed of a model's memory layout on CPU: contiguous (NCHW) against channels_last, fp32,
side by side in one process, median of --repeats passes each, alternating.

    python benchmarks/eval_layout.py nin_fmnist.fashion_mnist_best [--images 2048] [--tta flip]
        [--batch-sizes 256 1000] [--repeats 3] [--jsonl FILE]

The logits of the two layouts are compared too (largest difference, same predicted classes or not).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import nin
from nin.data.datasets import load_dataset
from nin.inference import preprocess, tta_logits
from recipe_seeds import cpu_name


@torch.inference_mode()
def one_pass(model, images, batch_size: int, channels_last: bool, tta: str):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    t0, out = time.perf_counter(), []
    for i in range(0, len(images), batch_size):
        x = preprocess(model, images[i:i + batch_size]).contiguous(memory_format=fmt)
        out.append(tta_logits(model, x, tta))
    return time.perf_counter() - t0, torch.cat(out)


def measure(model, images, *, batch_size: int, tta: str, repeats: int) -> dict:
    times = {False: [], True: []}
    logits = {}
    for _ in range(repeats):
        for cl in (False, True):
            dt, logits[cl] = one_pass(model, images, batch_size, cl, tta)
            times[cl].append(dt)
    a, b = statistics.median(times[False]), statistics.median(times[True])
    return {"batch_size": batch_size, "tta": tta, "images": len(images), "contiguous_s": a, "channels_last_s": b,
            "ratio": b / a, "max_abs_diff": (logits[False] - logits[True]).abs().max().item(),
            "same_predictions": bool(torch.equal(logits[False].argmax(1), logits[True].argmax(1)))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a run folder, a .safetensors or a shipped name (Fashion-MNIST models)")
    p.add_argument("--images", type=int, default=2048, help="the first N test images")
    p.add_argument("--tta", default="flip", choices=["none", "flip", "shift"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 1000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--jsonl", default=None, help="append one JSON line per batch size")
    args = p.parse_args(argv)
    model = nin.load(args.model)
    images = load_dataset(model.meta.dataset, args.data_dir).test.images[:args.images]
    print(f"| batch | contiguous s | channels_last s | ratio | max abs diff | same predictions |\n|---:|---:|---:|---:|---:|---|")
    for bs in args.batch_sizes:
        r = measure(model, images, batch_size=bs, tta=args.tta, repeats=args.repeats)
        print(f"| {bs} | {r['contiguous_s']:.2f} | {r['channels_last_s']:.2f} | {r['ratio']:.3f} | "
              f"{r['max_abs_diff']:.1e} | {r['same_predictions']} |")
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps({**r, "model": args.model, "threads": torch.get_num_threads(),
                                    "cpu": cpu_name(),
                                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
