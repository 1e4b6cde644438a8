"""The book's configuration on one GPU: nin's step and whole 10-epoch `d2l` run against the book's pipeline.

Measures, on a CUDA machine:
  1. nin training images/s on the book's configuration (nin_d2l, Fashion-MNIST at 224, batch 128): data resident on
     the GPU as uint8 (BatchLoader), bf16 autocast, channels_last; one pipeline per --modes entry (eager, or a
     torch.compile mode), --steps steps after a warm-up whose time (the compilation) is stated apart, timed with
     torch.cuda.synchronize() around the steps only; with the share of the card's bf16 dense peak it reaches
     (training FLOPs = 3 x the forward FLOPs `nin summary` counts);
  2. the whole `nin train --recipe d2l` run (10 epochs + 10 test passes) for each --full-modes entry: wall seconds
     from the call to its return, split into start-up, training steps and evaluation, and its test accuracy.
     Goal: <= 20 s on one H100 (start-up excluded) at >= 0.87 test accuracy;
  3. the book's pipeline (d2l's DataLoader + train_ch6's step, fp32) for --book-steps steps, same process;
  4. --profile FILE: the eager step's CUDA kernels, by total time (torch.profiler), for the next optimisation.
Prints one markdown table (and --json FILE).  Usage on the GPU machine:
    .venv/bin/python benchmarks/gpu.py                     # everything, about 4 minutes on an H100
    .venv/bin/python benchmarks/gpu.py --device cpu --steps 2 --batch-size 8   # smoke test (tests/test_benchmarks.py)
--device cpu runs every path with --steps steps each, the full run as a dry run, and no torch.compile unless
--compile is given: a check that the script works, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import DEBIAN_FMNIST, BookPipeline, NinPipeline, machine, sync  # noqa: E402


# bf16 dense tensor-core peaks (no sparsity), FLOP/s, from NVIDIA's data sheets; matched against the device name
BF16_PEAK = {"H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def bf16_peak(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def timed_steps(pipe, steps: int, warmup: int, **step_kw) -> dict:
    t = time.perf_counter()
    for _ in range(warmup):
        pipe.step(**step_kw)
    sync(pipe.device)
    warm = time.perf_counter() - t
    t, images = time.perf_counter(), 0
    for _ in range(steps):
        images += pipe.step(**step_kw)[0]
    sync(pipe.device)
    wall = time.perf_counter() - t
    return {"images": images, "seconds": wall, "images_per_sec": images / wall, "warmup_steps": warmup,
            "warmup_seconds": warm}


def nin_pipeline(args, mode: str):
    """The d2l recipe's training step; mode 'eager' or a torch.compile mode ('default', 'max-autotune', ...)."""
    pipe = NinPipeline("d2l", args.device, args.data_dir, batch_size=args.batch_size, compile=False)
    if mode != "eager":
        pipe.net = torch.compile(pipe.net, mode=None if mode == "default" else mode)
    return pipe


def profile_steps(args, path: str) -> None:
    """The eager step's kernels by total device time: where the next speed-up has to come from."""
    from torch.profiler import ProfilerActivity, profile

    pipe = nin_pipeline(args, "eager")
    for _ in range(3):
        pipe.step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pipe.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(10):
            pipe.step(synchronize=False)
        sync(pipe.device)
    key = "cuda_time_total" if pipe.device.type == "cuda" else "cpu_time_total"
    Path(path).write_text(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))


def full_run(args, mode: str, smoke: bool) -> dict:
    """The whole `nin train --recipe d2l` in this process: wall time split into start-up (data, model, first
    batch), training steps (the epochs' own `seconds`) and the rest (test passes, run-folder writes)."""
    from nin.training.recipes import get_recipe
    from nin.training.runfolder import read_metrics
    from nin.training.trainer import train

    small = {"batch_size": args.batch_size} if args.batch_size != 128 else {}
    if smoke:  # the dry run's one test batch: keep it as small as the training batch
        small["eval_batch_size"] = args.batch_size
    cfg = get_recipe("d2l", device=args.device, compile=mode != "eager", data_dir=args.data_dir, **small)
    ends: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        sync(args.device)
        t = time.perf_counter()
        final = train(cfg, Path(tmp) / "run", quiet=True, dry_run=smoke, log=lambda *a, **k: None,
                      on_epoch=lambda hist: ends.append(time.perf_counter() - t))
        sync(args.device)
        wall = time.perf_counter() - t
        rows = read_metrics(Path(tmp) / "run")
    secs = [r["seconds"] for r in rows]
    # between two epochs' ends: that epoch's steps plus its test pass and writes; epoch 1 also holds start-up
    gaps = [ends[i] - ends[i - 1] - secs[i] for i in range(1, len(ends))]
    per_eval = statistics.median_high(gaps) if gaps else 0.0
    startup = (ends[0] - secs[0] - per_eval) if ends else wall
    later = statistics.median_high(secs[1:]) if len(secs) > 1 else None
    return {"mode": mode, "seconds": wall, "test_acc": final["test_acc"], "epochs": final.get("epoch"),
            "startup_seconds": startup, "seconds_without_startup": wall - startup,
            "train_seconds": sum(secs), "epoch_seconds": secs, "eval_seconds_median": per_eval,
            "first_epoch_extra_seconds": (secs[0] - later) if later is not None else None,  # the compilation
            "examples_per_sec": final.get("examples_per_sec", final.get("images_per_sec"))}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke mode)")
    p.add_argument("--steps", type=int, help="timed nin steps (default 200 on a GPU; smoke mode: required)")
    p.add_argument("--book-steps", type=int, help="timed steps of the book's pipeline (default 200; smoke: --steps)")
    p.add_argument("--seed-steps", dest="book_steps", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # deprecated alias of --book-steps
    p.add_argument("--batch-size", type=int, default=128, help="batch size (default 128, the book's)")
    p.add_argument("--modes", nargs="+", help="step timings: eager and/or torch.compile modes (default, "
                   "max-autotune-no-cudagraphs, reduce-overhead, ...); default on CUDA: eager default, cpu: eager")
    p.add_argument("--full-modes", nargs="+", choices=["eager", "compiled"],
                   help="whole runs: eager and/or compiled (the trainer's torch.compile); default on CUDA: eager "
                   "compiled, cpu: eager")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="shorthand: --modes/--full-modes with (or without) compilation only")
    p.add_argument("--skip", nargs="*", default=[], choices=["step", "full", "book"], help="parts to leave out")
    p.add_argument("--order", nargs="+", default=["step", "book", "full"], choices=["step", "full", "book"],
                   help="the parts in this order (the first ones survive a time limit)")
    p.add_argument("--profile", metavar="FILE", help="write the eager step's kernel table here first")
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
    # defaults: both ways on CUDA, eager in the smoke mode; --compile / --no-compile picks one
    both = args.compile is None and not smoke
    compiled = (not smoke) if args.compile is None else args.compile
    modes = args.modes or (["eager", "default"] if both else ["default"] if compiled else ["eager"])
    full_modes = args.full_modes or (["eager", "compiled"] if both else ["compiled"] if compiled else ["eager"])
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else machine()
    res = {"device": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "batch_size": args.batch_size,
           "modes": modes, "full_modes": full_modes, "smoke": smoke, "date": time.strftime("%Y-%m-%d"),
           "bf16_peak_flops": None if smoke else bf16_peak(gpu), "errors": {}}
    from nin.models import model_info
    res["train_flops_per_image"] = 3 * model_info("nin_d2l", (1, 224, 224)).flops  # forward + 2x for backward

    def save() -> None:  # after every part, so a run stopped by a time limit keeps what it measured
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1))

    def part(name: str, fn) -> None:  # one failing part (a missing package, say) leaves the others running
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- recorded and printed, the next part runs
            res["errors"][name] = f"{type(e).__name__}: {e}"
            print(f"{name} FAILED: {res['errors'][name]}", flush=True)
        save()

    if args.profile:
        part("profile", lambda: profile_steps(args, args.profile))

    def run_steps() -> None:
        res.setdefault("nin_steps", {})
        for mode in modes:
            pipe = nin_pipeline(args, mode)
            r = timed_steps(pipe, steps, warmup=1 if smoke else (20 if mode == "eager" else 30), synchronize=False)
            if res["bf16_peak_flops"]:
                r["peak_fraction"] = r["images_per_sec"] * res["train_flops_per_image"] / res["bf16_peak_flops"]
            res["nin_steps"][mode] = r
            if mode == modes[0]:
                res["nin_step"] = r  # the key gpu_results.py and older files use
            del pipe
            print("nin_step", mode, r, flush=True)
            save()

    def run_book() -> None:
        book = BookPipeline(args.raw_dir, args.batch_size, args.device, workers=0 if smoke else None)
        res["book_step"] = timed_steps(book, book_steps, warmup=1 if smoke else 5)
        book.close()
        print("book_step", res["book_step"], flush=True)

    def run_full() -> None:
        res.setdefault("nin_fulls", {})
        for mode in full_modes:
            r = full_run(args, mode, smoke)
            res["nin_fulls"][mode] = r
            if mode == full_modes[0]:
                res["nin_full"] = r
            print("nin_full", mode, r, flush=True)
            save()

    parts = {"step": run_steps, "book": run_book, "full": run_full}
    for name in args.order:
        if name not in args.skip:
            part(name, parts[name])
    res["markdown"] = markdown(res)
    print(res["markdown"])
    save()
    return res


def markdown(res: dict) -> str:
    smoke = res["smoke"]
    rows = ["| measurement | result |", "|---|---:|"]
    for mode, r in res.get("nin_steps", {}).items():
        peak = f", {r['peak_fraction']:.1%} of the bf16 peak" if r.get("peak_fraction") else ""
        warm = f" (warm-up {r['warmup_seconds']:.1f} s)" if mode != "eager" else ""
        rows.append(f"| nin `d2l` step, {mode}{warm}: data on device, bf16, channels_last ({r['images']} images) | "
                    f"{r['images_per_sec']:,.0f} images/s{peak} |")
    if "book_step" in res:
        r = res["book_step"]
        rows.append(f"| the book's pipeline: d2l DataLoader ({0 if smoke else 4} workers) + train_ch6 step, fp32 "
                    f"({r['images']} images) | {r['images_per_sec']:,.0f} images/s |")
        for mode, n in res.get("nin_steps", {}).items():
            rows.append(f"| nin {mode} / the book | {n['images_per_sec'] / r['images_per_sec']:.2f}x |")
    for mode, r in res.get("nin_fulls", {}).items():
        what = "dry run (1 train + 1 test batch)" if smoke else "10 epochs + 10 test passes"
        rows.append(f"| `nin train --recipe d2l`{' --compile' if mode == 'compiled' else ''}: {what}, wall without "
                    f"start-up | **{r['seconds_without_startup']:.1f} s** (start-up {r['startup_seconds']:.1f} s; "
                    f"test acc {r['test_acc']:.4f}; goal <= 20 s) |")
        if r["epoch_seconds"]:
            extra = (f"; epoch 1 {r['first_epoch_extra_seconds']:+.1f} s over the median epoch"
                     if r.get("first_epoch_extra_seconds") is not None else "")
            rows.append(f"| of which training steps / one test pass | {r['train_seconds']:.1f} s / "
                        f"{r['eval_seconds_median']:.2f} s (epochs: {', '.join(f'{x:.1f}' for x in r['epoch_seconds'])}"
                        f"{extra}) |")
    for name, err in res.get("errors", {}).items():
        rows.append(f"| {name} | failed: {err[:120]} |")
    return "\n".join([f"### GPU: {res['device']}, torch {res['torch']}, batch {res['batch_size']}"
                      + (" (SMOKE MODE: not a measurement)" if smoke else ""), "", *rows])


if __name__ == "__main__":
    main()
