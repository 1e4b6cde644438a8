"""Input pipeline throughput: nin's BatchLoader against the book's torchvision pipeline, same run.

Both produce shuffled batches of 128 Fashion-MNIST training images at 1 x 224 x 224, float.
  book: torchvision FashionMNIST + Resize(224) + ToTensor() in a DataLoader with 4 workers (d2l's default)
  nin:  BatchLoader(resize=224): uint8 split in memory, randperm, two GEMMs per batch (no workers)
Each figure is 128 / the median time of one `next()` on the iterator, after warm-up batches.

Run:  .venv/bin/python benchmarks/bench_data.py [--batches N] [--threads T]
Prints a markdown snippet.  Needs the Fashion-MNIST files (Debian: apt install dataset-fashion-mnist).
"""
from __future__ import annotations

import argparse
import gzip
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def time_batches(it, warmup: int, batches: int) -> list[float]:
    for _ in range(warmup):
        next(it)
    times = []
    for _ in range(batches):
        t = time.perf_counter()
        x, y = next(it)
        times.append(time.perf_counter() - t)
    assert x.shape[-2:] == (224, 224) and len(y) == 128
    return times


def book_pipeline(raw_dir: str, batches: int, workers: int) -> list[float]:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    with tempfile.TemporaryDirectory() as root:
        raw = Path(root) / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for f in Path(raw_dir).iterdir():  # torchvision wants the files un-gzipped in FashionMNIST/raw/
            if f.name.endswith("-ubyte"):
                (raw / f.name).symlink_to(f.resolve())
            elif f.name.endswith("-ubyte.gz"):
                (raw / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
        tf = transforms.Compose([transforms.Resize(224), transforms.ToTensor()])
        ds = datasets.FashionMNIST(root, train=True, transform=tf, download=False)
        loader = DataLoader(ds, batch_size=128, shuffle=True, num_workers=workers, drop_last=True)
        return time_batches(iter(loader), warmup=workers * 2 + 2, batches=batches)


def nin_pipeline(ds, batches: int, **options) -> list[float]:
    from nin.data.loader import BatchLoader

    loader = BatchLoader(ds.train, 128, shuffle=True, drop_last=True, resize=224, **options)
    it = (b for epoch in range(100) for b in loader.iterate(epoch))
    return time_batches(it, warmup=5, batches=batches)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=100, help="timed batches per nin variant (default 100)")
    p.add_argument("--book-batches", type=int, default=30, help="timed batches of the book's pipeline (default 30)")
    p.add_argument("--seed-batches", dest="book_batches", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # deprecated alias of --book-batches
    p.add_argument("--workers", type=int, default=4, help="DataLoader workers of the book's pipeline (default 4)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for nin")
    p.add_argument("--data-dir", help="where the Fashion-MNIST files are (default: nin's search)")
    args = p.parse_args()

    from nin.data.datasets import load_dataset

    ds = load_dataset("fashion-mnist", args.data_dir)
    torch.set_num_threads(args.threads)
    rows = [("the book: torchvision Resize(224)+ToTensor, DataLoader "
             f"{args.workers} workers", book_pipeline(ds.source, args.book_batches, args.workers))]
    norm = dict(mean=ds.mean, std=ds.std)
    variants = [("nin BatchLoader, fp32", {}),
                ("nin BatchLoader, fp32, normalised", norm),
                ("nin BatchLoader, fp32, normalised, crop 2 + flip", dict(norm, crop_padding=2, flip=True)),
                ("nin BatchLoader, bf16, normalised", dict(norm, dtype=torch.bfloat16))]
    for name, options in variants:
        rows.append((name, nin_pipeline(ds, args.batches, **options)))

    base = 128 / statistics.median(rows[0][1])
    cpu = platform.processor() or platform.machine()
    print(f"### Input pipeline: Fashion-MNIST train, batches of 128 at 1x224x224 "
          f"({os.cpu_count()} CPU cores, {cpu}, torch {torch.__version__}, {args.threads} threads)\n")
    print("| pipeline | images/s (median batch) | vs the book |")
    print("|---|---:|---:|")
    for name, times in rows:
        rate = 128 / statistics.median(times)
        print(f"| {name} | {rate:,.0f} | {rate / base:.1f}x |")
    print(f"\nMedian of per-batch `next()` times after warm-up: the book {len(rows[0][1])} batches, "
          f"nin {args.batches} batches per variant. Command: `.venv/bin/python benchmarks/bench_data.py`.")


if __name__ == "__main__":
    main()
