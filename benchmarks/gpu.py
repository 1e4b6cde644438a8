"""The book's configuration on one GPU: nin's step and whole 10-epoch `d2l` run against the book's pipeline.

Measures, on a CUDA machine (nothing measured yet: no GPU was available when this was written):
  1. nin training images/s on the book's configuration (nin_d2l, Fashion-MNIST at 224, batch 128): data resident on
     the GPU as uint8 (BatchLoader), bf16 autocast, channels_last, torch.compile; --steps steps after a warm-up
     that includes compilation, timed with torch.cuda.synchronize() around the steps only;
  2. the whole `nin train --recipe d2l --compile` run (10 epochs + 10 test passes), wall seconds from the call
     to its return, and its test accuracy.  Goal: <= 20 s on one H100 at >= 0.87 test accuracy;
  3. the book's pipeline (d2l's DataLoader + train_ch6's step, fp32) for --book-steps steps, same process.
Prints one markdown table (and --json FILE).  Usage on the GPU machine:
    .venv/bin/python benchmarks/gpu.py                     # everything, about 2 minutes on an H100
    .venv/bin/python benchmarks/gpu.py --device cpu --steps 2 --batch-size 8   # smoke test (tests/test_benchmarks.py)
--device cpu runs every path with --steps steps each, the full run as a dry run, and no torch.compile unless
--compile is given: a check that the script works, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import DEBIAN_FMNIST, BookPipeline, NinPipeline, machine, sync  # noqa: E402


def timed_steps(pipe, steps: int, warmup: int, **step_kw) -> dict:
    for _ in range(warmup):
        pipe.step(**step_kw)
    sync(pipe.device)
    t, images = time.perf_counter(), 0
    for _ in range(steps):
        images += pipe.step(**step_kw)[0]
    sync(pipe.device)
    wall = time.perf_counter() - t
    return {"images": images, "seconds": wall, "images_per_sec": images / wall}


def full_run(args, compile_: bool, smoke: bool) -> dict:
    from nin.recipes import get_recipe
    from nin.runfolder import read_metrics
    from nin.trainer import train

    small = {"batch_size": args.batch_size} if args.batch_size != 128 else {}
    if smoke:  # the dry run's one test batch: keep it as small as the training batch
        small["eval_batch_size"] = args.batch_size
    cfg = get_recipe("d2l", device=args.device, compile=compile_, data_dir=args.data_dir, **small)
    with tempfile.TemporaryDirectory() as tmp:
        sync(args.device)
        t = time.perf_counter()
        final = train(cfg, Path(tmp) / "run", quiet=True, dry_run=smoke, log=lambda *a, **k: None)
        sync(args.device)
        wall = time.perf_counter() - t
        rows = read_metrics(Path(tmp) / "run")
    # train_seconds: the training steps only (no data loading from disk, compilation warm-up is in epoch 1)
    return {"seconds": wall, "test_acc": final["test_acc"], "epochs": final.get("epoch"),
            "train_seconds": sum(r["seconds"] for r in rows), "epoch_seconds": [r["seconds"] for r in rows],
            "examples_per_sec": final.get("examples_per_sec", final.get("images_per_sec"))}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke mode)")
    p.add_argument("--steps", type=int, help="timed nin steps (default 200 on a GPU; smoke mode: required)")
    p.add_argument("--book-steps", type=int, help="timed steps of the book's pipeline (default 200; smoke: --steps)")
    p.add_argument("--seed-steps", dest="book_steps", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # deprecated alias of --book-steps
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default 128, the book's)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the nin model (default: on for CUDA, off for cpu)")
    p.add_argument("--skip", nargs="*", default=[], choices=["step", "full", "book"], help="parts to leave out")
    p.add_argument("--raw-dir", default=DEBIAN_FMNIST, help="the four Fashion-MNIST IDX files, for the book's pipeline")
    p.add_argument("--data-dir", help="nin's --data-dir (default: nin's search)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    smoke = dev.type != "cuda"
    if smoke and args.steps is None:
        p.error("--device cpu is a smoke mode: give --steps N (e.g. --steps 2 --batch-size 8)")
    if not smoke and not torch.cuda.is_available():
        p.error("no CUDA device here; run with --device cpu --steps N for a smoke test")
    steps = args.steps or 200
    book_steps = args.book_steps or (steps if smoke else 200)
    compile_ = (not smoke) if args.compile is None else args.compile
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else machine()
    res = {"device": gpu, "torch": torch.__version__, "batch_size": args.batch_size, "compile": compile_,
           "smoke": smoke}

    def save() -> None:  # after every part, so a run stopped by a time limit keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))

    if "step" not in args.skip:
        pipe = NinPipeline("d2l", args.device, args.data_dir, batch_size=args.batch_size, compile=compile_)
        res["nin_step"] = timed_steps(pipe, steps, warmup=1 if smoke else 20, synchronize=False)
        del pipe
        print("nin_step", res["nin_step"], flush=True)
        save()
    if "book" not in args.skip:
        book = BookPipeline(args.raw_dir, args.batch_size, args.device, workers=0 if smoke else None)
        res["book_step"] = timed_steps(book, book_steps, warmup=1 if smoke else 5)
        book.close()
        print("book_step", res["book_step"], flush=True)
        save()
    if "full" not in args.skip:
        res["nin_full"] = full_run(args, compile_, smoke)
        print("nin_full", {k: v for k, v in res["nin_full"].items()}, flush=True)
        save()

    rows = ["| measurement | result |", "|---|---:|"]
    if "nin_step" in res:
        r = res["nin_step"]
        rows.append(f"| nin `d2l` step: data on device, bf16, channels_last{', torch.compile' if compile_ else ''}"
                    f" ({r['images']} images) | {r['images_per_sec']:,.0f} images/s |")
    if "book_step" in res:
        r = res["book_step"]
        rows.append(f"| the book's pipeline: d2l DataLoader ({0 if smoke else 4} workers) + train_ch6 step, fp32 "
                    f"({r['images']} images) | "
                    f"{r['images_per_sec']:,.0f} images/s |")
    if "nin_step" in res and "book_step" in res:
        rows.append(f"| nin / the book | "
                    f"{res['nin_step']['images_per_sec'] / res['book_step']['images_per_sec']:.2f}x |")
    if "nin_full" in res:
        r = res["nin_full"]
        what = "dry run (1 train + 1 test batch)" if smoke else "10 epochs + 10 test passes, wall"
        rows.append(f"| `nin train --recipe d2l{' --compile' if compile_ else ''}`: {what} | {r['seconds']:.1f} s, "
                    f"test acc {r['test_acc']:.4f} (goal <= 20 s at >= 0.87) |")
        if r["epoch_seconds"]:
            rows.append(f"| of which training steps (sum of the epochs' `seconds`; epoch 1 holds the compilation) | "
                        f"{r['train_seconds']:.1f} s (epochs: {', '.join(f'{x:.1f}' for x in r['epoch_seconds'])}) |")
    text = "\n".join([f"### GPU: {gpu}, torch {torch.__version__}, batch {args.batch_size}"
                      + (" (SMOKE MODE: not a measurement)" if smoke else ""), "", *rows])
    print(text)
    res["markdown"] = text
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
