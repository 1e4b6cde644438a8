"""Test-time augmentation beyond the mirror: which views, averaged, classify the test set best?

For each model (a run folder, a .safetensors or a pretrained name) the test images are moved by
(dy, dx) in {-1, 0, 1}^2 on the raw uint8 pixels with a border of zero pixels (the background, as
the training crops pad), each view and its mirror is classified once (nin's predict_logits, no TTA,
fp32 unless --precision), and sets of those views are averaged:

    none         the image as it is
    flip         + its mirror (the recipes' TTA)
    flip+4shift  the image and its mirror at the centre and moved one pixel up, down, left, right (10)
    flip+hshift  at the centre and moved one pixel left and right (6)
    diag         airbench's: weight 1/2 the image and its mirror, 1/4 each moved by (1, 1) and (-1, -1)
    shift        all 9 positions, each with its mirror (18 views): nin's `--tta shift`

The `shift` column is what `nin eval RUN --tta shift` computes (there the moves are made on the
preprocessed batch, with the same background border), so this script is also a check of it.

    python benchmarks/tta_views.py nin_fmnist.fashion_mnist_best runs/best-s1 --jsonl tta.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

import nin
from nin.data.datasets import load_dataset
from nin.inference import SHIFTS, predict_logits

from recipe_seeds import cpu_name  # a sibling script: benchmarks/ is the script's folder on sys.path

VIEW_SETS = {
    "none": [((0, 0), False, 1.0)],
    "flip": [((0, 0), f, 1.0) for f in (False, True)],
    "flip+4shift": [(s, f, 1.0) for s in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)) for f in (False, True)],
    "flip+hshift": [((0, dx), f, 1.0) for dx in (0, -1, 1) for f in (False, True)],
    "diag": [((0, 0), f, 0.5) for f in (False, True)] + [(s, f, 0.25) for s in ((1, 1), (-1, -1))
                                                          for f in (False, True)],
    "shift": [(s, f, 1.0) for s in SHIFTS for f in (False, True)],
}


def moved(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """uint8 N x C x H x W moved by (dy, dx) pixels: out[y, x] = in[y + dy, x + dx], zeros outside."""
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))
    h, w = images.shape[-2:]
    return torch.from_numpy(padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w].copy())


def view_accuracies(model, images: torch.Tensor, labels: torch.Tensor, *, precision: str = "fp32",
                    batch_size: int = 1000) -> dict[str, float]:
    logits = {}
    for dy, dx in SHIFTS:
        x = moved(images, dy, dx)
        for f in (False, True):
            logits[(dy, dx), f] = predict_logits(model, x.flip(-1) if f else x, tta="none",
                                                 precision=precision, batch_size=batch_size)
    return {name: int((sum(w * logits[s, f] for s, f, w in views).argmax(1) == labels).sum()) / len(labels)
            for name, views in VIEW_SETS.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", metavar="MODEL", help="run folders, .safetensors or pretrained names")
    ap.add_argument("--data-dir", help="where the dataset files are (default: search)")
    ap.add_argument("--limit", type=int, help="only the first N test images")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--jsonl", help="append one line per model here")
    args = ap.parse_args(argv)
    names = list(VIEW_SETS)
    print(f"{'model':<40} " + " ".join(f"{n:>11}" for n in names))
    for name in args.models:
        model = nin.load(name)
        test = load_dataset(model.meta.dataset, args.data_dir).test
        images, labels = test.images[:args.limit], test.labels[:args.limit]
        t0 = time.perf_counter()
        acc = view_accuracies(model, images, labels, precision=args.precision)
        print(f"{name:<40} " + " ".join(f"{acc[n]:>11.4f}" for n in names), flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps({"model": name, "images": len(labels), "precision": args.precision,
                                    "accuracy": acc, "seconds": round(time.perf_counter() - t0, 1),
                                    "cpu": cpu_name(), "threads": torch.get_num_threads(),
                                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
