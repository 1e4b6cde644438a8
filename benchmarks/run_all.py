"""Run nin's benchmarks and write BENCHMARKS.md (`make bench`).  About 12-15 minutes on 2 shared CPU cores.

Parts (--only / --skip pick a subset; BENCHMARKS.md is rewritten with the parts that ran):
  train  the book's pipeline vs `nin train --recipe d2l`'s step, alternating, medians; conv peaks (bench_train.py)
  tta    time to accuracy of the `fast` recipe: `nin train` as a subprocess, wall seconds from its start to
         the first epoch whose row in metrics.jsonl reaches >= 92% / >= 93% test accuracy
  infer  inference, nin_d2l and the fast model (nin_fmnist width 32): images/s at batch 256 and latency at
         batch 1, PyTorch eager (inference_mode, fp32) vs onnxruntime (reuses bench_infer.py's helpers)
  data   the input pipeline alone (bench_data.py)
  serve  `nin serve` under 1/8/64 wrk clients vs --max-batch 1 vs a few-line FastAPI endpoint (bench_serve.py;
         every measurement also goes to benchmarks/results/serve-cpu-DATE.json)
  stream streaming your own images: loader throughput vs torchvision's ImageFolder path, memory and time to the
         first step of `nin train --stream` at 5,000 and 20,000 JPEGs (bench_stream.py; JSON in benchmarks/results/)
Every speed figure of a part is measured in one process tree in one run; the 1-minute load average is
recorded around each part (the machine is shared: compare ratios, not absolute numbers across runs).

Usage:  .venv/bin/python benchmarks/run_all.py [--only train,tta] [--skip data] [--quick] [--out BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
PARTS = ("train", "tta", "infer", "data", "serve", "stream")


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def run_train(args, tmp: Path) -> str:
    out = tmp / "train.json"
    steps = ["--rounds", "2", "--book-steps", "2", "--nin-steps", "4"] if args.quick else \
        ["--rounds", str(args.rounds), "--book-steps", "4", "--nin-steps", "8"]
    subprocess.run([PY, str(HERE / "bench_train.py"), *steps, "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
    sys.path.insert(0, str(HERE))
    from bench_train import markdown

    return markdown(json.loads(out.read_text()))


def run_tta(args, tmp: Path) -> str:
    """`nin train --recipe fast` from a fresh process; the wall clock of each epoch's metrics row appearing."""
    run = tmp / "fast-run"
    cmd = [str(Path(PY).with_name("nin")), "train", "--recipe", "fast", "--out", str(run), "--quiet"]
    if args.quick:
        cmd += ["--epochs", "1", "--limit-train", "6000"]
    metrics = run / "metrics.jsonl"
    seen: list[tuple[float, dict]] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp)
    while True:
        done = proc.poll() is not None
        if metrics.exists():
            rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
            for r in rows[len(seen):]:
                seen.append((time.perf_counter() - t0, r))
        if done:
            break
        time.sleep(0.2)
    total = time.perf_counter() - t0
    log = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{log[-2000:]}")
    train_s = sum(r["seconds"] for _, r in seen)
    lines = [f"### Time to accuracy: the `fast` recipe (nin_fmnist width 32, {len(seen)} epochs), from a cold start", "",
             "| target | first epoch reaching it | wall from command start | its training seconds (sum) |",
             "|---|---:|---:|---:|"]
    for target in (0.92, 0.93):
        hit = next(((i, w, r) for i, (w, r) in enumerate(seen) if r["test_acc"] >= target), None)
        if hit is None:
            lines.append(f"| test acc >= {target:.0%} | not reached (best {max(r['test_acc'] for _, r in seen):.4f}) "
                         "| | |")
        else:
            i, w, r = hit
            lines.append(f"| test acc >= {target:.0%} | epoch {r['epoch']} ({r['test_acc']:.4f}) | {w:.0f} s "
                         f"({int(w) // 60}:{int(w) % 60:02d}) | {sum(x['seconds'] for _, x in seen[:i + 1]):.0f} s |")
    last = seen[-1][1]
    lines += ["", f"Final: epoch {last['epoch']}, test acc {last['test_acc']:.4f}; whole command {total:.0f} s wall, "
              f"of which {train_s:.0f} s in training steps (metrics' `seconds`), {total - train_s:.0f} s start-up, "
              f"evaluation and saving; {statistics.median(r['images_per_sec'] for _, r in seen):,.0f} training "
              "images/s (median epoch). Per epoch (wall at its row, test acc): "
              + ", ".join(f"{w:.0f} s {r['test_acc']:.4f}" for w, r in seen) + ".",
              f"Command: `{' '.join(['nin', *cmd[1:4]])}` (run by `benchmarks/run_all.py --only tta`)."]
    return "\n".join(lines)


def latency_ms(fn, x, n: int) -> float:
    for _ in range(10):
        fn(x)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def run_infer(args, tmp: Path) -> str:
    import torch

    sys.path.insert(0, str(HERE))
    from bench_infer import cold_predict_s, throughput

    from nin.data.batchops import to_float_batch
    from nin.modelfile import ModelMeta, save_model
    from nin.onnx import OnnxModel, export_onnx
    from nin.hub import load
    from nin.hub import create_model

    seconds = 1.5 if args.quick else 4.0
    rows = ["| model | runtime | images/s, batch 256 | latency, batch 1 (median) |", "|---|---|---:|---:|"]
    for name, kwargs, resize in (("nin_d2l", {}, 224), ("nin_fmnist", {"width": 32}, None)):
        torch.manual_seed(0)
        model = create_model(name, **kwargs).eval()
        meta = ModelMeta(name, kwargs, [str(i) for i in range(10)], list(model.default_input_size), "fashion-mnist",
                         {"resize": resize, "mean": None if resize else [0.286], "std": None if resize else [0.353]})
        run = tmp / f"infer-{name}"
        run.mkdir()
        save_model(run, model, meta)
        model = load(run)
        x = to_float_batch(torch.randint(0, 256, (256, 1, 28, 28), dtype=torch.uint8), **model.meta.preprocess)
        om = OnnxModel(export_onnx(model, model.meta, tmp / f"{name}.onnx", dynamic_batch=True))
        for runtime, fn in (("PyTorch eager fp32", model), ("onnxruntime", om)):
            with torch.inference_mode():
                ips = throughput(fn, x, seconds)
                lat = latency_ms(fn, x[:1], 50 if name == "nin_d2l" else 200)
            label = f"{name}" + (" (fast recipe's, width 32)" if kwargs else " (the book's)")
            rows.append(f"| {label} | {runtime} | {ips:,.0f} | {lat:.2f} ms |")
    from PIL import Image

    png = tmp / "one.png"
    Image.fromarray(torch.randint(0, 256, (28, 28), dtype=torch.uint8).numpy(), "L").save(png)
    cold = cold_predict_s(tmp / "infer-nin_fmnist", png)
    rows += ["", f"`nin predict RUN one.png` from a cold start (new process, importing torch included), "
                 f"fast model, median of 3: **{cold:.2f} s**."]
    return "\n".join(["### Inference (CPU, random weights: speed does not depend on them)", "", *rows, "",
                      f"Input already preprocessed (nin_d2l: 1x224x224, nin_fmnist: 1x28x28); throughput measured "
                      f"for {seconds:g} s per cell after a warm-up; {torch.get_num_threads()} threads. "
                      "Command: `.venv/bin/python benchmarks/run_all.py --only infer`."])


def run_data(args, tmp: Path) -> str:
    batches = ["--batches", "20", "--book-batches", "10"] if args.quick else ["--batches", "50", "--book-batches", "20"]
    out = subprocess.run([PY, str(HERE / "bench_data.py"), *batches], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def run_serve(args, tmp: Path) -> str:
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    rounds = ["--seconds", "2", "--rounds", "1"] if args.quick else ["--seconds", "5", "--rounds", "3"]
    out = subprocess.run([PY, str(HERE / "bench_serve.py"), *rounds, "--json", str(HERE / "results" / f"serve-cpu-{day}.json")],
                         check=True, capture_output=True, text=True)
    return out.stdout.strip()


def run_stream(args, tmp: Path) -> str:
    sizes = ["--images", "200", "--rounds", "1", "--memory", "300,600", "--train-steps", "4", "--work",
             str(tmp / "imgs"), "--out", str(tmp)] if args.quick else []
    md = tmp / "stream.md"
    subprocess.run([PY, str(HERE / "bench_stream.py"), "--skip", "decode", *sizes, "--markdown", str(md)],
                   check=True, stdout=subprocess.DEVNULL)
    return md.read_text().strip()


def old_sections(path: Path) -> dict[str, str]:
    """The parts' sections of an earlier BENCHMARKS.md, so a subset run keeps the others."""
    if not path.exists():
        return {}
    return dict(re.findall(r"<!-- part:(\w+) -->\n(.*?)\n<!-- /part:\1 -->", path.read_text(), re.S))


def hand_written(path: Path) -> str:
    """What an earlier BENCHMARKS.md holds after its last part (sections written by hand, e.g. the seed
    tables of the model-quality runs): kept as it is."""
    if not path.exists():
        return ""
    text = path.read_text()
    ends = list(re.finditer(r"<!-- /part:\w+ -->\n", text))
    return text[ends[-1].end():] if ends else ""


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help=f"comma-separated parts to run ({','.join(PARTS)}); default all")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the train part (default 3)")
    p.add_argument("--quick", action="store_true", help="fewer steps and a 1-epoch tta run: a check, not a result")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file to write (default BENCHMARKS.md)")
    args = p.parse_args(argv)
    parts = [x for x in (args.only.split(",") if args.only else PARTS) if x not in args.skip.split(",")]
    unknown = set(parts) - set(PARTS)
    if unknown:
        p.error(f"unknown part(s) {', '.join(sorted(unknown))}; choose from {', '.join(PARTS)}")
    sys.path.insert(0, str(HERE))
    from bench_train import machine

    sections, timings = [], []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for part in parts:
            before, t = loadavg(), time.perf_counter()
            print(f"[run_all] {part} ... (load {before})", file=sys.stderr, flush=True)
            text = {"train": run_train, "tta": run_tta, "infer": run_infer, "data": run_data,
                    "serve": run_serve, "stream": run_stream}[part](args, Path(tmp))
            took = time.perf_counter() - t
            timings.append(f"{part} {took:.0f} s (load average 1/5/15 min: {before} before, {loadavg()} after)")
            stamp = datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
            sections.append((part, f"{text}\n\n_Measured {stamp}, {took:.0f} s; load average (1/5/15 min) {before} "
                                   f"before, {loadavg()} after._"))
            print(text + "\n", flush=True)
    total = time.perf_counter() - t_all
    previous = old_sections(Path(args.out))
    kept = [p_ for p_ in PARTS if p_ not in parts and p_ in previous]
    sections = sorted(sections + [(p_, previous[p_]) for p_ in kept], key=lambda x: PARTS.index(x[0]))
    if kept:
        timings.append(f"kept from the previous BENCHMARKS.md (not rerun): {', '.join(kept)}")
    header = [
        "# Benchmarks", "",
        f"Written by `{' '.join(['benchmarks/run_all.py', *(argv if argv is not None else sys.argv[1:])])}` on "
        f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}: {machine()}, Python "
        f"{sys.version.split()[0]}{', QUICK MODE (a check, not a result)' if args.quick else ''}.",
        "The machine is shared with other work, so every comparison is side by side in one run (alternating, "
        "medians) and the load average is given with it; compare ratios, not absolute figures across runs.",
        f"Parts: {'; '.join(timings)}; {total / 60:.1f} min in all.",
        "How each figure is measured, and what the profile showed: `benchmarks/README.md`.", "",
    ]
    from gpu_results import render  # what a lent GPU measured, kept in benchmarks/results/
    sections.append(("gpu", render()))
    body = "\n\n".join(f"<!-- part:{k} -->\n{text}\n<!-- /part:{k} -->" for k, text in sections)
    Path(args.out).write_text("\n".join(header) + "\n" + body + "\n" + hand_written(Path(args.out)))
    print(f"wrote {args.out} ({total / 60:.1f} min)", file=sys.stderr)


if __name__ == "__main__":
    main()
