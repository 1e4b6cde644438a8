"""d2l vs d2l-stable at reduced cost on CPU: does the seed's recipe get stuck at loss ln(10), and does
the one-epoch warm-up prevent it?

The seed's own failure (ANCHORS.md section 1: several of 21 GPU builds ended at loss 2.303, accuracy
0.100) needs the full 224 x 224, 10-epoch run, hours per seed on 2 CPU cores.  This script runs both
recipes for several seeds at a reduced cost (smaller --resize, a training subset, few epochs; the same
network, init, optimiser, lr and batch) and prints one table: per seed, the first epoch's train loss
and the final test accuracy.  It is evidence, not proof; run it on a GPU with --resize 224
--epochs 10 --limit-train 0 for the real check.

    python benchmarks/d2l_stability.py --seeds 0 1 2 3 4 --resize 96 --limit-train 12000 --epochs 2
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from nin.recipes import get_recipe
from nin.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--resize", type=int, default=96, help="input side (the seed: 224; smallest: 67)")
    ap.add_argument("--limit-train", type=int, default=12000, help="training images (0: all 60,000)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--warmup-epochs", type=float, default=None,
                    help="d2l-stable's warm-up, scaled to this budget (default: the recipe's 1 epoch)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for recipe in ("d2l", "d2l-stable"):
                over = dict(seed=seed, resize=args.resize, epochs=args.epochs, device=args.device,
                            limit_train=args.limit_train or None)
                if recipe == "d2l-stable" and args.warmup_epochs is not None:
                    over["warmup_epochs"] = args.warmup_epochs
                cfg = get_recipe(recipe, **over)
                out = Path(tmp) / f"{recipe}-{seed}"
                final = train(cfg, out, quiet=True, log=lambda *a, **k: None)
                hist = [json.loads(line) for line in open(out / "metrics.jsonl")]
                stuck = abs(hist[-1]["train_loss"] - math.log(10)) < 0.01
                rows.append({"recipe": recipe, "seed": seed, "epoch1_loss": hist[0]["train_loss"],
                             "final_loss": final["train_loss"], "test_acc": final["test_acc"], "stuck": stuck})
                r = rows[-1]
                print(f"| {recipe:<10} | {seed} | {r['epoch1_loss']:.3f} | {r['final_loss']:.3f} | "
                      f"{r['test_acc']:.3f} | {'STUCK' if stuck else 'ok'} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
