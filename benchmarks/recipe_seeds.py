"""A recipe over several seeds, and variants of it side by side: is a change faster, is it as accurate,
and is one seed's number the typical one?

Each run is `nin train --recipe R --seed S` plus one variant's flags, as a subprocess started from
nothing, so a run's seconds are the whole command's wall time (start-up, every epoch's evaluation and
the saving included) and its accuracies are exactly what the CLI reports (the final row of
metrics.jsonl: the saved model's, as `nin train` prints them).  Runs go one at a time, seed by seed and
the variants in turn within a seed (A B A B ...), so the machine's drift hits every variant alike.
Every finished run is appended to --jsonl at once; the summary gives per variant the mean test accuracy
with its sample standard deviation and range, and the median seconds with their ratio to the first
variant's.

The `fast` recipe against its flags of before 2026-11-28 (BENCHMARKS.md, "Seeds of the fast recipe"):
    python benchmarks/recipe_seeds.py --recipe fast --variant old="--epochs 8 --crop-padding 2" \\
        --variant new= --seeds 0 1 2 --threads 1 --jsonl fast-seeds.jsonl
Finished run folders (long runs made by hand) join a table with --add-runs RUN ... (variant: "runs").
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nin.training.runfolder import read_metrics, read_status


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def row_of(run: Path, *, variant: str, flags: list[str], seconds: float | None, rc: int | None,
           threads: int | None) -> dict:
    """One run's line: what it was, how long it took, and its final metrics row."""
    written = json.loads((run / "config.json").read_text()) if (run / "config.json").exists() else {}
    config = written.get("config", {})
    rows = read_metrics(run) if (run / "metrics.jsonl").exists() else []
    last = rows[-1] if rows else {}
    status = (read_status(run) or {}).get("state")
    return {"variant": variant, "flags": flags, "recipe": config.get("recipe"), "seed": config.get("seed"),
            "epochs": len(rows), "seconds": seconds, "train_seconds": sum(r["seconds"] for r in rows),
            "test_acc": last.get("test_acc"), "train_acc": last.get("train_acc"), "val_acc": last.get("val_acc"),
            "rc": rc, "status": status, "run": str(run), "threads": threads, "cpu": cpu_name(),
            "torch": written.get("versions", {}).get("torch"), "date": time.strftime("%Y-%m-%d")}


def summary(rows: list[dict]) -> str:
    """Per variant: seeds, mean +- sample sd (range) of the test accuracy, median seconds, ratio."""
    out = ["| variant | seeds | test acc mean | sd | range | median s | ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    base = None
    for v in variants:
        rs = sorted((r for r in rows if r["variant"] == v and r["test_acc"] is not None), key=lambda r: r["seed"])
        if not rs:
            continue
        accs = [r["test_acc"] for r in rs]
        secs = [r["seconds"] for r in rs if r["seconds"] is not None]
        med = statistics.median(secs) if secs else None
        base = base if base is not None else med
        sd = statistics.stdev(accs) if len(accs) > 1 else float("nan")
        ratio = f"{med / base:.3f}" if med and base else "-"
        out.append(f"| {v} | {','.join(str(r['seed']) for r in rs)} | {statistics.mean(accs):.4f} | {sd:.4f} | "
                   f"{min(accs):.4f}-{max(accs):.4f} | {f'{med:.0f}' if med else '-'} | {ratio} |")
    return "\n".join(out)


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--variant wants NAME=FLAGS (FLAGS may be empty), got {text!r}")
    return name, shlex.split(flags)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="fast")
    ap.add_argument("--variant", type=parse_variant, action="append", default=[],
                    help="NAME=FLAGS added to nin train (repeatable; the first is the ratio's base; default: base=)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS of each run")
    ap.add_argument("--jsonl", help="append one line per run to this file")
    ap.add_argument("--keep", help="keep the run folders under this folder (default: a temporary one)")
    ap.add_argument("--add-runs", nargs="+", metavar="RUN", help="summarise these finished run folders instead")
    ap.add_argument("--from-jsonl", help="only print the summary of this file's runs")
    args = ap.parse_args()

    def emit(row: dict) -> None:
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
        acc = "-" if row["test_acc"] is None else f"{row['test_acc']:.4f}"
        secs = "-" if row["seconds"] is None else f"{row['seconds']:.0f}"
        print(f"| {row['variant']} | {row['seed']} | {row['epochs']} | {acc} | {secs} | {row['status']} |", flush=True)

    if args.from_jsonl:
        print(summary([json.loads(line) for line in Path(args.from_jsonl).read_text().splitlines() if line.strip()]))
        return
    print("| variant | seed | epochs | test acc | s | status |\n|---|---:|---:|---:|---:|---|", flush=True)
    rows = []
    if args.add_runs:
        for run in args.add_runs:
            rows.append(row_of(Path(run), variant="runs", flags=[], seconds=None, rc=None, threads=None))
            emit(rows[-1])
        print("\n" + summary(rows))
        return
    variants = args.variant or [("base", [])]
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="recipe-seeds-"))
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for seed in args.seeds:
        for name, flags in variants:
            run = root / f"{name}-s{seed}"
            cmd = [sys.executable, "-m", "nin", "train", "--recipe", args.recipe, "--seed", str(seed), "--quiet",
                   "--out", str(run), *flags]
            t = time.monotonic()
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            seconds = time.monotonic() - t
            if p.returncode:
                sys.stderr.write(p.stdout[-2000:])
            rows.append(row_of(run, variant=name, flags=flags, seconds=seconds, rc=p.returncode,
                               threads=args.threads))
            emit(rows[-1])
    print("\n" + summary(rows))


if __name__ == "__main__":
    main()
