"""Time to accuracy: training recipes, and a recipe as it was at an earlier git revision, run side by side
over seeds as whole `nin train` commands; how long each takes and how accurate its saved model is.

Each run is `python -m nin train --recipe R --seed S --out RUN [flags]`, a subprocess started from nothing,
so its seconds are the whole command's wall time: start-up, loading the data, every epoch's evaluation,
the closing evaluation and the saving.  Its stdout is read line by line as it comes, each epoch's line
stamped with the seconds since the start, which gives the run's curve (seconds, epoch, test accuracy).
A run's accuracy is its saved model's as `nin eval` reports it with the model's own test-time
augmentation (model.json: `tta_test_acc` after a closing evaluation, else the saved epoch's `test_acc`);
with --eval-none an untimed `nin eval RUN --tta none` after the run adds the accuracy without it.

A variant is NAME=[REV:]RECIPE [extra nin train flags].  With REV the run uses that revision's code:
`git archive REV` is unpacked once into a temporary folder and `nin` is imported from its src/ (through
PYTHONPATH, with the same interpreter and packages); each line records the `nin` the runs imported.
The first variant is the reference of the time ratios.  Runs go seed by seed, the variants in turn within
a seed and in reverse order on every other seed (A B C, C B A, ...), so the machine's drift hits every
variant alike.  Every finished run is appended to --jsonl at once; the end prints one Markdown table row
per variant (accuracy per seed, mean and sample sd, median seconds and their ratio to the reference's)
and the machine; --from-jsonl FILE prints it again, and --figure draws the curves, without running anything.

The real benchmark (15 full trainings, one at a time; nothing else should run on the machine meanwhile):
    python benchmarks/time_to_accuracy.py --variant old=f77f30f:fast --variant fast=fast \\
        --variant fast94=fast94 --seeds 0 1 2 3 4 --eval-none --target 0.93 --target 0.94 \\
        --figure docs/time-to-accuracy.png
--smoke makes every run tiny (one epoch on 512 images) for the tests; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nin
from nin.devices import cores
from recipe_seeds import row_of

ROOT = Path(__file__).resolve().parents[1]
# trainer.end_epoch's line, the same at f77f30f:
# "epoch   3/6  loss 0.4123  train acc 0.8512  [val acc 0.8600  ]test acc 0.8700  lr 0.1  1234 img/s  33.1 s"
EPOCH_LINE = re.compile(r"^epoch\s+(\d+)/\d+\s+loss\s+\S+\s+train acc\s+\S+(?:\s+val acc\s+\S+)?\s+test acc\s+(\S+)")
# --smoke: every run tiny.  All three flags exist at f77f30f too; there --limit-train takes the first N
# images, now a sample stratified by class (smoke numbers are not comparable, and need not be).
SMOKE_FLAGS = ["--epochs", "1", "--limit-train", "512", "--eval-batch-size", "256"]


def parse_variant(text: str) -> dict:
    """NAME=[REV:]RECIPE [flags] -> {name, spec, rev, recipe, flags} (rev: as given, resolved later)."""
    name, sep, spec = text.partition("=")
    words = shlex.split(spec)
    if not sep or not name or not words or words[0].startswith("-"):
        raise argparse.ArgumentTypeError(f"--variant wants NAME=[REV:]RECIPE [nin train flags], got {text!r}")
    rev, colon, recipe = words[0].rpartition(":")
    if colon and not (rev and recipe):
        raise argparse.ArgumentTypeError(f"--variant {text!r}: REV:RECIPE needs both, e.g. f77f30f:fast")
    return {"name": name, "spec": spec.strip(), "rev": rev or None, "recipe": recipe, "flags": words[1:]}


def export_revision(rev: str, into: Path) -> tuple[str, Path]:
    """`git archive REV | tar -x` into ``into``/SHA (no worktree): the full sha and the folder."""
    found = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"],
                           capture_output=True, text=True)
    if found.returncode:
        raise SystemExit(f"error: {rev!r} is no commit of {ROOT}")
    sha = found.stdout.strip()
    dest = into / sha[:12]
    if not dest.exists():
        dest.mkdir(parents=True)
        git = subprocess.Popen(["git", "-C", str(ROOT), "archive", sha], stdout=subprocess.PIPE)
        tar = subprocess.run(["tar", "-x", "-C", str(dest)], stdin=git.stdout)
        git.stdout.close()
        if git.wait() or tar.returncode:
            raise SystemExit(f"error: could not export {rev} ({sha}) with git archive")
    return sha, dest


def revision_env(rev: str, into: Path) -> tuple[str, dict]:
    """(full sha, this process's environment with REV's src/ first on PYTHONPATH): for benchmarks whose workers
    import nin as it was at REV (bench_train.py --baseline, profile_step.py --rev)."""
    sha, tree = export_revision(rev, into)
    return sha, {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree / "src"), os.environ.get("PYTHONPATH")]))}


def nin_file(env: dict) -> str:
    """The `nin` a run with this environment imports (its __init__.py)."""
    p = subprocess.run([sys.executable, "-c", "import nin; print(nin.__file__)"], env=env, capture_output=True,
                       text=True)
    if p.returncode:
        raise SystemExit(f"error: `import nin` fails in the runs' environment: {p.stderr[-500:]}")
    return p.stdout.strip()


def saved_accuracy(run: Path, last: dict) -> tuple[float | None, str | None]:
    """The saved model's accuracy with its own TTA, as `nin eval RUN` reports it, read from the files
    themselves (the revision's format): info.tta_test_acc after a closing evaluation, else info.test_acc
    (the saved epoch's: with a validation split not always the last), else the last metrics row's."""
    try:
        meta = json.loads((run / "model.json").read_text())
    except (OSError, ValueError):
        return None, None
    info = meta.get("info") or {}
    for value in (info.get("tta_test_acc"), info.get("test_acc"), last.get("test_acc")):
        if isinstance(value, (int, float)):
            return float(value), meta.get("tta") or "none"
    return None, None


def accuracy_without_tta(run: Path, env: dict, data_dir: str | None) -> float | None:
    """Untimed `nin eval RUN --tta none --json` with the current checkout's nin."""
    cmd = [sys.executable, "-m", "nin", "eval", str(run), "--tta", "none", "--json"]
    p = subprocess.run(cmd + (["--data-dir", data_dir] if data_dir else []), env=env, capture_output=True, text=True)
    if p.returncode:
        sys.stderr.write(f"nin eval --tta none failed on {run}:\n{p.stderr[-2000:]}\n")
        return None
    return json.loads(p.stdout)["accuracy"]


def timed_run(cmd: list[str], env: dict, log: Path | None = None) -> dict:
    """One `nin train` command: wall seconds, return code, the curve from its epoch lines as they came;
    what it printed is kept in ``log`` (written after the run: no file work while it is timed)."""
    curve, tail, printed = [], collections.deque(maxlen=20), []
    with tempfile.TemporaryFile("w+") as err:  # a file, not a pipe: stderr can never block the run
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        for line in p.stdout:
            now = time.monotonic() - t0
            m = EPOCH_LINE.match(line)
            if m:
                curve.append([round(now, 3), int(m[1]), float(m[2])])
            tail.append(line)
            printed.append(line)
        rc = p.wait()
        seconds = time.monotonic() - t0
        err.seek(0)
        error = "" if rc == 0 else ("".join(tail) + err.read())[-2000:]
    if log is not None and log.parent.is_dir():
        log.write_text("".join(printed))
    return {"seconds": seconds, "rc": rc, "curve": curve, "error": error}


def run_all(args, variants: list[dict], command: str) -> list[dict]:
    data_dir = str(Path(args.data_dir).resolve()) if args.data_dir else None
    seeds = args.seeds if args.seeds is not None else ([0] if args.smoke else [0, 1, 2, 3, 4])
    # PYTHONSAFEPATH: `python -m nin` must not import a nin from the working directory
    base_env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"}
    runs = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="time-to-accuracy-"))
    taken = [runs / f"{v['name']}-s{s}" for s in seeds for v in variants if (runs / f"{v['name']}-s{s}").exists()]
    if taken:
        raise SystemExit(f"error: {taken[0]} exists already: give another --keep folder")
    runs.mkdir(parents=True, exist_ok=True)
    exports = Path(tempfile.mkdtemp(prefix="time-to-accuracy-src-"))
    jsonl = Path(args.jsonl or ROOT / "benchmarks" / "results" / f"time-to-accuracy-{time.strftime('%Y-%m-%d')}.jsonl")
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for v in variants:  # every export and environment before the first timed run
            v["env"], v["sha"], want = dict(base_env), None, Path(nin.__file__).parent
            if v["rev"]:
                v["sha"], src = export_revision(v["rev"], exports)
                v["env"]["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src / "src"), os.environ.get("PYTHONPATH")]))
                want = src / "src" / "nin"
            v["nin"] = nin_file(v["env"])
            if Path(v["nin"]).resolve().parent != want.resolve():
                raise SystemExit(f"error: variant {v['name']} imports {v['nin']}, not {want}")
        print(f"runs: {runs}\nresults: {jsonl}", flush=True)
        for i, seed in enumerate(seeds):
            for v in (variants if i % 2 == 0 else variants[::-1]):
                rows.append(one_run(v, seed, runs, args, data_dir, base_env, command))
                with open(jsonl, "a") as f:
                    f.write(json.dumps(rows[-1]) + "\n")
                r = rows[-1]
                acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.4f} ({r['tta']})"
                none = "" if r["none_acc"] is None else f", without TTA {r['none_acc']:.4f}"
                print(f"seed {seed} {v['name']}: {r['seconds']:.1f} s, accuracy {acc}{none}, rc {r['rc']}", flush=True)
                if r["rc"]:
                    sys.stderr.write(r["error"] + "\n")
    finally:
        shutil.rmtree(exports, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(runs, ignore_errors=True)
    return rows


def one_run(v: dict, seed: int, runs: Path, args, data_dir: str | None, base_env: dict, command: str) -> dict:
    run = runs / f"{v['name']}-s{seed}"
    flags = [*v["flags"], *(SMOKE_FLAGS if args.smoke else []), *(["--data-dir", data_dir] if data_dir else [])]
    cmd = [sys.executable, "-m", "nin", "train", "--recipe", v["recipe"], "--seed", str(seed), "--out", str(run), *flags]
    load_before = os.getloadavg()[0]
    timed = timed_run(cmd, v["env"], run / "train.log")
    load_after = os.getloadavg()[0]
    row = row_of(run, variant=v["name"], flags=v["flags"], seconds=timed["seconds"], rc=timed["rc"],
                 threads=args.threads)
    last = {"test_acc": row["test_acc"]}
    accuracy, tta = saved_accuracy(run, last) if timed["rc"] == 0 else (None, None)
    none_acc = accuracy_without_tta(run, base_env, data_dir) if args.eval_none and accuracy is not None else None
    return {**row, "variant_index": v["index"], "spec": v["spec"], "rev": v["sha"], "recipe": v["recipe"],
            "seed": seed, "accuracy": accuracy, "tta": tta, "none_acc": none_acc, "curve": timed["curve"],
            "nin": v["nin"], "smoke": args.smoke, "run_command": shlex.join(["python", *cmd[1:]]),
            "torch": row["torch"] or torch_version(), "load_before": load_before, "load_after": load_after,
            "command": command, "error": timed["error"]}


def torch_version() -> str:
    import torch  # imported already (nin.devices): the version config.json records, local tag included

    return torch.__version__


def by_variant(rows: list[dict]) -> dict[str, list[dict]]:
    """Rows grouped by variant, the reference (the first --variant) first."""
    order = sorted(dict.fromkeys(r["variant"] for r in rows),
                   key=lambda v: min(r.get("variant_index", 0) for r in rows if r["variant"] == v))
    return {v: sorted((r for r in rows if r["variant"] == v), key=lambda r: r["seed"]) for v in order}


def fmt_acc(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.4f}"


def table(rows: list[dict]) -> str:
    """Per variant: the accuracy of each seed, mean +- sample sd, median (min-max) wall seconds, their ratio
    to the reference's median, and (with --eval-none) the mean accuracy without TTA; then the machine."""
    groups = by_variant(rows)
    with_none = any(r.get("none_acc") is not None for r in rows)
    out = ["| variant | spec | TTA | seeds | accuracy per seed | mean ± sd | wall s median (min-max) | ratio |"
           + (" mean acc without TTA |" if with_none else ""),
           "|---|---|---|---|---|---:|---:|---:|" + ("---:|" if with_none else "")]
    ref = None
    for v, rs in groups.items():
        ok = [r for r in rs if r["rc"] == 0 and r["accuracy"] is not None]
        failed = [str(r["seed"]) for r in rs if r not in ok]
        accs, secs = [r["accuracy"] for r in ok], [r["seconds"] for r in ok]
        med = statistics.median(secs) if secs else None
        ref = med if ref is None and v == next(iter(groups)) else ref
        mean = f"{statistics.mean(accs):.4f}" if accs else "-"
        sd = f" ± {statistics.stdev(accs):.4f}" if len(accs) > 1 else ""
        seeds = " ".join(filter(None, [",".join(str(r["seed"]) for r in ok),
                                       f"(failed: {','.join(failed)})" if failed else ""]))
        wall = f"{med:.1f} ({min(secs):.1f}-{max(secs):.1f})" if secs else "-"
        ratio = f"{med / ref:.3f}" if med and ref else "-"
        tta = "/".join(sorted({r["tta"] for r in ok})) or "-"
        line = (f"| {v} | `{rs[0]['spec']}` | {tta} | {seeds} | {', '.join(fmt_acc(a) for a in accs)} | {mean}{sd} "
                f"| {wall} | {ratio} |")
        if with_none:
            nones = [r["none_acc"] for r in ok if r.get("none_acc") is not None]
            line += f" {statistics.mean(nones):.4f} |" if nones else " - |"
        out.append(line)

    def each(key: str) -> str:
        return ", ".join(str(x) for x in dict.fromkeys(r.get(key) for r in rows))
    loads = [r[k] for r in rows for k in ("load_before", "load_after") if r.get(k) is not None]
    load = f"; load average {min(loads):.2f}-{max(loads):.2f}" if loads else ""
    out.append(f"\nMachine: {each('cpu')}, OMP_NUM_THREADS={each('threads')}, torch {each('torch')}{load}; "
               f"{each('date')}. Command: `{each('command')}`")
    return "\n".join(out)


def figure(rows: list[dict], path: str, targets: list[float]) -> None:
    """Test accuracy against wall seconds: each seed's epochs (thin, ending at the whole command's end with
    the saved model's accuracy), one marker per variant at (median seconds, mean accuracy)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    finals = []
    for i, (v, rs) in enumerate(by_variant(rows).items()):
        ok = [r for r in rs if r["rc"] == 0 and r["accuracy"] is not None]
        for r in ok:
            xs = [c[0] for c in r["curve"]] + [r["seconds"]]
            ys = [c[2] for c in r["curve"]] + [r["accuracy"]]
            ax.plot(xs, ys, ".-", color=f"C{i}", lw=0.7, ms=3, alpha=0.6)
        if ok:
            finals += [r["accuracy"] for r in ok]
            ax.plot(statistics.median(r["seconds"] for r in ok), statistics.mean(r["accuracy"] for r in ok), "o",
                    color=f"C{i}", ms=8, mec="black", label=f"{v} ({rs[0]['spec']}): median s, mean acc")
    for t in targets:
        ax.axhline(t, color="grey", ls="--", lw=0.8)
        ax.annotate(f"{t:.1%}", (0, t), xycoords=("axes fraction", "data"), va="bottom", fontsize=8, color="grey")
    if targets and finals:  # the region where the targets are, not the first epochs' climb
        ax.set_ylim(bottom=min(min(targets) - 0.03, min(finals) - 0.01), top=max(max(targets), max(finals)) + 0.01)
    r0 = rows[0]
    ax.set_title(f"Time to accuracy ({r0.get('cpu')}, OMP_NUM_THREADS={r0.get('threads')})", fontsize=9)
    ax.set_xlim(left=0)
    ax.set_xlabel("wall seconds since the `nin train` command started")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="NAME=SPEC",
                    help="NAME=[REV:]RECIPE [nin train flags], repeatable; the first is the reference of the ratios")
    ap.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 3 4 (--smoke: 0)")
    ap.add_argument("--threads", type=int, default=cores(), help="OMP_NUM_THREADS of each run (default: all cores)")
    ap.add_argument("--keep", metavar="DIR", help="keep the run folders here (default: a temporary folder, removed)")
    ap.add_argument("--data-dir", metavar="DIR", help="passed to nin train (and nin eval)")
    ap.add_argument("--eval-none", action="store_true",
                    help="after each run, untimed: the saved model's accuracy without TTA (nin eval --tta none)")
    ap.add_argument("--jsonl", metavar="FILE",
                    help="append one line per run (default benchmarks/results/time-to-accuracy-DATE.jsonl)")
    ap.add_argument("--from-jsonl", metavar="FILE", help="run nothing: the table (and --figure) of this file's runs")
    ap.add_argument("--figure", metavar="PNG", help="draw test accuracy against wall seconds into this file")
    ap.add_argument("--target", type=float, action="append", default=[], help="a horizontal line at this accuracy")
    ap.add_argument("--smoke", action="store_true", help="tiny runs for the tests: " + " ".join(SMOKE_FLAGS))
    args = ap.parse_args(argv)

    if args.from_jsonl:
        rows = [json.loads(x) for x in Path(args.from_jsonl).read_text().splitlines() if x.strip()]
        if not rows:
            ap.error(f"{args.from_jsonl} holds no runs")
    else:
        if not args.variant:
            ap.error("give at least one --variant NAME=[REV:]RECIPE")
        names = [v["name"] for v in args.variant]
        if len(set(names)) < len(names):
            ap.error(f"variant names must differ: {', '.join(names)}")
        for i, v in enumerate(args.variant):
            v["index"] = i
        rows = run_all(args, args.variant, shlex.join(["python", "benchmarks/time_to_accuracy.py", *argv]))
        print()
    print(table(rows))
    if args.figure:
        figure(rows, args.figure, args.target)
        print(f"figure: {args.figure}")
    return 1 if any(r["rc"] for r in rows) and not args.from_jsonl else 0


if __name__ == "__main__":
    sys.exit(main())
