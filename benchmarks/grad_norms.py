"""The gradient's global L2 norm, step by step, in a recipe's first steps: how large a step can get.

What `d2l-stable`'s gradient clipping (norm 1) was chosen from: the unclipped recipe's norms, seed 0, one
thread, on this project's CPU (benchmarks/results/grad-norms-d2l-stable-cpu-2026-11-27.jsonl, 290 steps):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/grad_norms.py --recipe d2l-stable --clip-grad-norm 0 \
        --steps 290 --jsonl OUT.jsonl
Each step is nin's own (bench_train.NinPipeline: the library's set-up and `train_step`); the norm is of the
gradient the step just applied, so with clipping on it is the clipped one: give --clip-grad-norm 0.  One JSON line per step, then a
summary per block of 20 steps (median and largest norm).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import NinPipeline  # noqa: E402


def grad_norm(model: torch.nn.Module) -> float:
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]).item()


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="d2l-stable")
    ap.add_argument("--clip-grad-norm", type=float, help="override the recipe's (0: off)")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-dir")
    ap.add_argument("--limit-train", type=int, help="quick checks: train on the first N images only")
    ap.add_argument("--jsonl", help="write the per-step lines here")
    args = ap.parse_args(argv)
    over = {"seed": args.seed}
    if args.clip_grad_norm is not None:
        over["clip_grad_norm"] = args.clip_grad_norm
    if args.limit_train:
        over["limit_train"] = args.limit_train
    pipe = NinPipeline(args.recipe, args.device, args.data_dir, **over)
    rows = []
    for step in range(args.steps):
        pipe.step()
        rows.append({"step": step, "loss": round(pipe.last_loss.item(), 4),
                     "grad_norm": round(grad_norm(pipe.model), 4)})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if args.jsonl:
        Path(args.jsonl).write_text(text)
    for a in range(0, len(rows), 20):
        g = [r["grad_norm"] for r in rows[a:a + 20]]
        print(f"steps {a}-{a + len(g) - 1}: median {statistics.median(g):.3f}, largest {max(g):.3f}")
    return rows


if __name__ == "__main__":
    main()
