"""Mutation testing of the training core with mutmut 3 (`make mutation`); outside CI's pass/fail.

For each test selection ("before": without tests/test_guards.py and tests/reliability/test_defects.py,
"after": with them) it copies src/, tests/ and pyproject.toml into runs/mutation/<variant>/, adds a
[tool.mutmut] section there, runs `mutmut run --max-children 1` on the mutants of the functions in SCOPE
only, and writes the counts and every survivor (its diff and, when known, its classification from
CLASSIFIED below) to benchmarks/results/mutation-<date>.md.

Usage:  .venv/bin/python benchmarks/mutation.py [--variant before|after|both] [--date YYYY-MM-DD]
Runs niced, one thread, one test process at a time: about 10-25 minutes per variant on a busy 2-core CPU.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MUTMUT = Path(sys.executable).with_name("mutmut")

# The training core: module -> functions ("Class.method" or "Class.*").  mutmut 3 does not mutate
# decorated functions, so trainer.loader_eval (@torch.no_grad) and evaluation.predict_logits
# (@torch.inference_mode) are listed but produce no mutants; the report says so.
SCOPE = {
    "recipes": ["lr_at", "TrainConfig.validate", "check_option"],
    "engine": ["train_step", "Ema.*", "make_optimizer", "init_weights"],
    "data": ["augment", "erase_boxes", "to_float_batch", "epoch_order", "BatchLoader.iterate"],
    "trainer": ["split_validation", "loader_eval", "end_epoch", "epoch_metrics", "run_epoch"],
    "evaluation": ["tta_logits", "predict_logits", "evaluate", "confusion_matrix"],
}
DECORATED = ["trainer.loader_eval (@torch.no_grad)", "evaluation.predict_logits (@torch.inference_mode)"]

ALL_TESTS = ["tests/test_guards.py", "tests/test_train.py", "tests/test_data.py", "tests/test_evaluate.py",
             "tests/reliability/test_defects.py"]
NEW_TESTS = {"tests/test_guards.py", "tests/reliability/test_defects.py"}
# Not fast: the numeric and broken-pipe defects, and the 25-second real-data training run (it is @slow).
DESELECT = "not numeric and not broken_pipe and not test_fast_recipe_learns_real_fashion_mnist"

# Survivors judged by hand, keyed by (function, the mutated line with spaces removed).
# EQUIVALENT: cannot change a trained number.  NOT EQUIVALENT: could; "killed by" names the guard test.
CLASSIFIED: dict[tuple[str, str], tuple[str, str]] = {
}


def mutant_globs() -> list[str]:
    globs = []
    for mod, funcs in SCOPE.items():
        for f in funcs:
            if "." in f:
                cls, meth = f.split(".")
                globs.append(f"nin.{mod}.xǁ{cls}ǁ{meth}__mutmut_*")
            else:
                globs.append(f"nin.{mod}.x_{f}__mutmut_*")
    return globs


def prepare(work: Path, tests: list[str]) -> None:
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "src", work / "src", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    paths = [f"src/nin/{m}.py" for m in SCOPE]
    toml = (ROOT / "pyproject.toml").read_text()
    toml += "\n[tool.mutmut]\n"
    toml += f"source_paths = [\"src\"]\nonly_mutate = {paths!r}\n".replace("'", '"')
    toml += f"pytest_add_cli_args_test_selection = {tests!r}\n".replace("'", '"')
    toml += f"pytest_add_cli_args = [\"-k\", \"{DESELECT}\", \"-p\", \"no:cacheprovider\"]\n"
    (work / "pyproject.toml").write_text(toml)


def run_variant(name: str, tests: list[str], limit_s: int) -> dict:
    work = ROOT / "runs" / "mutation" / name
    prepare(work, tests)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    cmd = [str(MUTMUT), "run", "--max-children", "1", *mutant_globs()]
    t0 = time.time()
    log = (work / "mutmut-run.log").open("w")
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: os.nice(19))
    try:
        proc.wait(timeout=limit_s)
        finished = True
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        finished = False
    elapsed = time.time() - t0
    out = subprocess.run([str(MUTMUT), "results", "--all", "true"], cwd=work, env=env,
                         capture_output=True, text=True).stdout
    status = {}
    for line in out.splitlines():
        m = re.match(r"\s*(nin\.\S+):\s*(.+)$", line)
        if m:
            status[m.group(1)] = m.group(2).strip()
    in_scope = [re.compile(g.replace(".", r"\.").replace("*", ".*") + "$") for g in mutant_globs()]
    status = {k: v for k, v in status.items() if any(p.match(k) for p in in_scope)}
    survivors = {}
    for k, v in sorted(status.items()):
        if v == "survived":
            survivors[k] = subprocess.run([str(MUTMUT), "show", k], cwd=work, env=env,
                                          capture_output=True, text=True).stdout
    return {"name": name, "tests": tests, "status": status, "survivors": survivors,
            "elapsed": elapsed, "finished": finished, "rc": proc.returncode}


def function_of(mutant: str) -> str:
    m = re.match(r"nin\.(\w+)\.x(?:_|ǁ)(.+?)__mutmut_\d+$", mutant)
    return f"{m.group(1)}.{m.group(2).replace('ǁ', '.')}" if m else mutant


def mutated_line(diff: str) -> str:
    plus = [ln[1:] for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return plus[0].strip() if plus else ""


def classify(mutant: str, diff: str) -> tuple[str, str]:
    key = (function_of(mutant), re.sub(r"\s+", "", mutated_line(diff)))
    return CLASSIFIED.get(key, ("UNCLASSIFIED", "not yet judged"))


def counts(r: dict) -> str:
    c: dict[str, int] = {}
    for v in r["status"].values():
        c[v] = c.get(v, 0) + 1
    return ", ".join(f"{k} {n}" for k, n in sorted(c.items(), key=lambda kv: -kv[1]))


def report(results: list[dict], date: str, command: str) -> str:
    lines = [f"# Mutation testing of the training core ({date})", "",
             f"Command: `{command}` (mutmut 3.8.1, `--max-children 1`, niced, `OMP_NUM_THREADS=1`).", "",
             "Scope (only these functions' mutants are run):", ""]
    for mod, funcs in SCOPE.items():
        lines.append(f"- `src/nin/{mod}.py`: " + ", ".join(f"`{f}`" for f in funcs))
    lines += ["", "Not mutated: mutmut 3 skips decorated functions, so " + " and ".join(f"`{d}`" for d in DECORATED)
              + " have no mutants (their bodies are covered only through the tests, not measured here).", "",
              f"Tests per mutant: mutmut runs only the tests that call the mutated function, from the selection "
              f"below, with `-k \"{DESELECT}\"`.", "", "## Counts", "",
              "| selection | tests | mutants | killed | survived | other | wall |", "|---|---|---|---|---|---|---|"]
    for r in results:
        st = r["status"]
        killed = sum(v == "killed" for v in st.values())
        surv = sum(v == "survived" for v in st.values())
        other = len(st) - killed - surv
        lines.append(f"| {r['name']} | {' '.join(r['tests'])} | {len(st)} | {killed} | {surv} | {other} "
                     f"({counts(r)}) | {r['elapsed'] / 60:.1f} min{'' if r['finished'] else ' (stopped at the time limit: partial)'} |")
    lines += ["", "\"before\" leaves out the tests written for issue 21 (tests/test_guards.py, "
              "tests/reliability/test_defects.py); \"after\" includes them.", ""]
    last = results[-1]
    lines += [f"## Survivors of \"{last['name']}\" ({len(last['survivors'])})", ""]
    for k, diff in last["survivors"].items():
        cls, why = classify(k, diff)
        lines += [f"### `{k}` — {cls}", "", why, "", "```diff",
                  "\n".join(ln for ln in diff.splitlines() if ln.startswith(("+", "-", "@")) and not ln.startswith(("+++", "---"))),
                  "```", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=["before", "after", "both"], default="both")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--limit-min", type=float, default=25.0, help="time limit per variant, minutes")
    args = ap.parse_args()
    variants = {"before": [t for t in ALL_TESTS if t not in NEW_TESTS], "after": ALL_TESTS}
    names = ["before", "after"] if args.variant == "both" else [args.variant]
    results = [run_variant(n, variants[n], int(args.limit_min * 60)) for n in names]
    out = ROOT / "benchmarks" / "results" / f"mutation-{args.date}.md"
    command = "make mutation" if args.variant == "both" else f"python benchmarks/mutation.py --variant {args.variant}"
    out.write_text(report(results, args.date, command))
    for r in results:
        print(f"{r['name']}: {len(r['status'])} mutants: {counts(r)} ({r['elapsed'] / 60:.1f} min)")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
