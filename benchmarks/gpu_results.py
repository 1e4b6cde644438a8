"""BENCHMARKS.md's GPU section, rendered from the results a lent GPU machine produced.

GPU machines are lent to a few sessions only, so what `benchmarks/gpu_all.sh` measured there is kept in
benchmarks/results/ (gpu-*.json from gpu.py, d2l-stability-*.jsonl from d2l_stability.py) and
`run_all.py` renders it on every run, on any machine.  `python benchmarks/gpu_results.py` prints it;
`python benchmarks/gpu_results.py --write` puts it into BENCHMARKS.md in place of the old GPU part.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _speed(path: Path) -> list[str]:
    r = json.loads(path.read_text())
    stamp = path.stem.split("-", 2)[-1]
    if "nin_steps" in r:  # gpu.py since 2026-11-27 (H100): several modes, whole runs split up
        from gpu import markdown
        return [f"**{r['device']}**, torch {r['torch']}, CUDA {r.get('cuda')} "
                f"(`{path.relative_to(RESULTS.parent.parent)}`, {stamp}):", ""] + markdown(r).splitlines()[2:]
    lines = [f"**{r['device']}**, torch {r['torch']}, batch {r['batch_size']}, "
             f"torch.compile {'on' if r['compile'] else 'off'} (`{path.relative_to(RESULTS.parent.parent)}`, {stamp}):",
             "", "| measurement | images/s |", "|---|---:|"]
    if "nin_step" in r:
        lines.append(f"| nin `d2l` step: data on the GPU as uint8, bf16, channels_last ({r['nin_step']['images']:,} "
                     f"images) | {r['nin_step']['images_per_sec']:,.0f} |")
    book = r.get("book_step", r.get("seed_step"))  # seed_step: its name in older results files
    if book:
        lines.append(f"| the book's pipeline: d2l DataLoader (4 workers, PIL resize) + train_ch6 step, fp32 "
                     f"({book['images']:,} images) | {book['images_per_sec']:,.0f} |")
    if "nin_step" in r and book:
        lines.append(f"| **nin / the book** | **{r['nin_step']['images_per_sec'] / book['images_per_sec']:.2f}x** |")
    if "nin_full" in r:
        f = r["nin_full"]
        lines.append(f"| whole `nin train --recipe d2l` (10 epochs + 10 test passes) | {f['seconds']:.1f} s wall, "
                     f"test acc {f['test_acc']:.4f} |")
    else:
        lines += ["", "The whole 10-epoch `nin train --recipe d2l` run was not timed in that session (the script's "
                  "stand-in IPython module broke matplotlib; fixed since, not rerun)."]
    return lines


def stuck(history: list[dict]) -> bool:
    """Ended at the book recipe's failure: loss ln 10 (uniform logits over the 10 classes), chance accuracy."""
    return bool(history) and abs(history[-1]["train_loss"] - math.log(10)) < 0.01 and history[-1]["train_acc"] < 0.2


# the machine named in a results file (d2l-stability-MACHINE-DATE.jsonl)
MACHINES = {"h200": "one NVIDIA H200, bf16, several runs sharing the GPU",
            "h100": "one NVIDIA H100 80GB HBM3, bf16, five runs sharing the GPU (four in the lr 0.05 check)",
            "cpu": "this project's 2-core CPU, bf16, two runs at once with one thread each or one "
                   "run with two"}


def _stability(path: Path) -> list[str]:
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    machine = path.stem.split("-")[2]
    lines = []
    for resize, limit, epochs in sorted({(r["resize"], r["limit_train"], r["epochs"]) for r in rows}, reverse=True):
        by = defaultdict(list)
        for r in rows:
            if (r["resize"], r["limit_train"], r["epochs"]) == (resize, limit, epochs):
                by[r["variant"]].append(r)
        lines += [f"`nin train --recipe d2l` plus the flags shown, **{resize} x {resize}**, "
                  f"{f'{limit:,}' if limit else 'all 60,000'} images, {epochs} epochs, on "
                  f"{MACHINES.get(machine, machine)} (`{path.relative_to(RESULTS.parent.parent)}`; per-epoch "
                  "histories inside). Final test accuracy per seed; `(k)` = stopped after epoch k (the accuracy then), by "
                  "the session's time limit unless a reason follows; STUCK = ended at loss ln 10, accuracy 0.10:", "",
                  "| variant | flags added to `d2l` | final test accuracy by seed | runs >= 0.88 |", "|---|---|---|---:|"]
        for variant, rs in by.items():
            rs.sort(key=lambda r: r["seed"])
            cells, ok = [], 0
            for r in rs:
                if not r["history"]:  # stopped inside epoch 1 (NaN, say): no accuracy, but it counts
                    if r["status"] not in ("cut off", "ok") and not r["status"].startswith("stopped"):
                        cells.append(f"s{r['seed']}: {r['status']}")
                    continue
                acc = r["history"][-1]["test_acc"]
                done = r["epochs_done"] == r["epochs"]
                mark = "" if done else f" ({r['epochs_done']})"
                how = "" if r["status"] in ("ok", "cut off", "STUCK") else f" {r['status']}"
                cells.append(f"s{r['seed']}: {'STUCK' if stuck(r['history']) else f'{acc:.3f}'}{mark}{how}")
                ok += done and acc >= 0.88
            # a run that failed (NaN) counts against the variant; one cut off by time or dropped does not
            finished = sum(r["epochs_done"] == r["epochs"] or not (r["status"] == "cut off"
                           or r["status"].startswith("stopped")) for r in rs)
            flags = " ".join(r["flags"]) if rs[0]["flags"] else "(the book's recipe)"
            lines.append(f"| {variant} | `{flags}` | "
                         f"{', '.join(cells)} | {ok}/{finished} |")
        lines.append("")
    return lines


def render() -> str:
    parts = ["### GPU", ""]
    speed = sorted(RESULTS.glob("gpu-*.json"))
    stab = sorted(RESULTS.glob("d2l-stability-*.jsonl"))
    if not speed and not stab:
        return "### GPU\n\nNo GPU results yet: run `benchmarks/gpu_all.sh` on a CUDA machine."
    for p in speed:
        parts += _speed(p) + [""]
    for p in stab:
        if "-cpu-" not in p.name:
            parts += ["#### d2l-stable candidates (`benchmarks/d2l_stability.py`)", ""] + _stability(p)
    parts.append("`class_map_relu: false` in those flags is what `class_block_relus: \"hidden\"` is now (the ReLU "
                 "on the class maps removed). Rerun everything with `benchmarks/gpu_all.sh` (one command, about 9 "
                 "minutes on an H200).")
    for p in stab:
        if "-cpu-" in p.name:
            parts += ["", "### d2l-stable candidates on CPU (`benchmarks/d2l_stability.py`)", "",
                      "Without a GPU, the same check at full size takes an hour a run here, so most runs are at a "
                      "reduced cost: 96 x 96 instead of 224 (same network; its last maps are 1 x 1 instead of "
                      "5 x 5), all images, all 10 epochs, about 10 minutes a run.", ""] + _stability(p)
    return "\n".join(parts)


def write(path: Path) -> None:
    """Replace the GPU part of an existing BENCHMARKS.md (as run_all.py writes it) with render()."""
    text = path.read_text()
    start, end = "<!-- part:gpu -->\n", "\n<!-- /part:gpu -->"
    if start not in text or end not in text:
        raise SystemExit(f"{path}: no GPU part (<!-- part:gpu --> ... <!-- /part:gpu -->); run run_all.py first")
    head, rest = text.split(start, 1)
    path.write_text(head + start + render() + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--write"]:  # after a GPU session: update BENCHMARKS.md without rerunning the CPU parts
        write(Path(sys.argv[2]) if len(sys.argv) > 2 else RESULTS.parent.parent / "BENCHMARKS.md")
    else:
        print(render())
