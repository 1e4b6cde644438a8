"""Where a training step's time goes: torch.profiler over steps of `nin train --recipe R`'s step, by operator.

The step is bench_train.py's NinPipeline (the library's own set-up, the loop's seed, lr and train_step).  After
--warmup untimed steps, --steps steps are profiled (CPU activities, without record_shapes: recording shapes kept
tensors alive and doubled the time of the large elementwise operators in this measurement) and timed without
the profiler; the table gives each operator's own time per step and its share of the profiled step.
--rev REV profiles the step as it was at git revision REV (`git archive`, imported through PYTHONPATH).

Run:  .venv/bin/python benchmarks/profile_step.py [--recipe d2l] [--steps 4] [--rev REV] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def profile(recipe: str, steps: int, warmup: int, threads: int | None) -> dict:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from bench_train import NinPipeline

    if threads:
        torch.set_num_threads(threads)
    pipe = NinPipeline(recipe, "cpu")
    for _ in range(warmup):
        pipe.step()
    plain = [pipe.step()[1] for _ in range(steps)]
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            pipe.step()
        profiled = (time.perf_counter() - t) / steps
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    import nin

    return {"recipe": recipe, "batch": pipe.cfg.batch_size, "step_s": statistics.median(plain), "profiled_step_s": profiled,
            "ops": [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / steps, "calls_per_step": e.count / steps}
                    for e in ops if e.self_cpu_time_total / 1e3 / steps >= 0.5],
            "threads": torch.get_num_threads(), "torch": torch.__version__, "nin": nin.__file__}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="d2l")
    p.add_argument("--steps", type=int, default=4, help="profiled steps, and as many timed without the profiler")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--rev", help="profile nin as it was at this git revision")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rev and not args.child:  # run again with REV's source first on the path
        from time_to_accuracy import revision_env

        _, env = revision_env(args.rev, Path(tempfile.mkdtemp(prefix="profile-step-src-")))
        cmd = [sys.executable, __file__, "--child", "--recipe", args.recipe, "--steps", str(args.steps), "--warmup",
               str(args.warmup)] + (["--threads", str(args.threads)] if args.threads else []) \
            + (["--json", args.json] if args.json else [])
        raise SystemExit(subprocess.call(cmd, env=env))
    res = profile(args.recipe, args.steps, args.warmup, args.threads)
    total = sum(o["ms_per_step"] for o in res["ops"])
    print(f"recipe {res['recipe']}, batch {res['batch']}: {res['step_s'] * 1e3:.0f} ms a step "
          f"({res['batch'] / res['step_s']:.1f} img/s) without the profiler, {res['profiled_step_s'] * 1e3:.0f} ms with it; "
          f"{res['threads']} threads, torch {res['torch']}, nin from {res['nin']}")
    print("| operator | ms per step | calls per step | share |\n|---|---:|---:|---:|")
    for o in res["ops"]:
        print(f"| `{o['op']}` | {o['ms_per_step']:.1f} | {o['calls_per_step']:.0f} | {o['ms_per_step'] / total:.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
