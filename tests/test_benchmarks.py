"""Smoke tests of benchmarks/: the GPU script's CPU mode and the two pipelines' step functions (a few seconds)."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nin.data.loader import BatchLoader
from nin.data.datasets import Split
from nin.data.batchops import to_float_batch
from nin.hub import create_model
from nin.training.recipes import get_recipe
from nin.training.trainer import input_dtype, make_optimizer, train_step

from .fakedata import fake_fashion_dir

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

needs_d2l = pytest.mark.skipif(importlib.util.find_spec("d2l") is None,
                               reason="the book's pipeline needs d2l: pip install --no-deps d2l==1.0.3 "
                                      "pandas requests ipython matplotlib-inline")


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    return fake_fashion_dir(tmp_path_factory.mktemp("fmnist"), n_train=64, n_test=32)


def test_nin_pipeline_steps(fake_root):
    from bench_train import NinPipeline

    pipe = NinPipeline("d2l", "cpu", str(fake_root), batch_size=4)
    n, seconds = pipe.step()
    assert n == 4 and seconds > 0 and pipe.sums[2].item() == 4
    assert pipe.loader.dtype == input_dtype(pipe.amp_dtype)


@needs_d2l
def test_book_pipeline_steps(fake_root):
    from bench_train import BookPipeline

    pipe = BookPipeline(fake_root / "FashionMNIST" / "raw", batch_size=4, workers=0)
    try:
        n, seconds = pipe.step()
        assert n == 4 and seconds > 0 and pipe.metric[2] == 4
    finally:
        pipe.close()


@needs_d2l
def test_gpu_script_cpu_smoke_mode(fake_root, tmp_path):
    import gpu

    out = tmp_path / "gpu.json"
    res = gpu.main(["--device", "cpu", "--steps", "1", "--batch-size", "4", "--data-dir", str(fake_root),
                    "--raw-dir", str(fake_root / "FashionMNIST" / "raw"), "--json", str(out)])
    assert res["smoke"] and json.loads(out.read_text())["nin_step"]["images"] == 4
    assert res["book_step"]["images_per_sec"] > 0 and 0 <= res["nin_full"]["test_acc"] <= 1
    assert "SMOKE MODE" in res["markdown"]


def test_gpu_script_refuses_cpu_without_steps():
    import gpu

    with pytest.raises(SystemExit):
        gpu.main(["--device", "cpu"])


def test_bf16_loader_and_step_match_fp32_within_bf16_tolerance():
    """The speed changes (bf16 loader output, fused SGD, train_step) keep the book's numerics within bf16."""
    g = torch.Generator().manual_seed(0)
    x8 = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8, generator=g)
    a = to_float_batch(x8, resize=224)
    b = to_float_batch(x8, resize=224, dtype=torch.bfloat16).float()
    assert (a - b).abs().max() <= 2 ** -7  # two bf16 steps at 1: rounding of the two GEMMs (one bf16 cast: 2 ** -8)
    loader = BatchLoader(Split(x8, torch.arange(4) % 10), 4, resize=224, channels_last=True,
                         dtype=input_dtype(torch.bfloat16))
    x, y = next(iter(loader))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)

    cfg = get_recipe("d2l", device="cpu")
    torch.manual_seed(0)
    fast = create_model("nin_d2l").to(memory_format=torch.channels_last)
    plain = create_model("nin_d2l")
    plain.load_state_dict(fast.state_dict())
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in plain.named_parameters()]
    opt = make_optimizer(fast, cfg, cfg.lr, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    sums = torch.zeros(3, dtype=torch.float64)
    torch.manual_seed(1)
    loss, logits = train_step(fast, opt, scaler, x, y, lr=cfg.lr, amp_dtype=torch.bfloat16, label_smoothing=0.0,
                              sums=sums)
    torch.manual_seed(1)  # the same dropout mask
    ref_logits = plain(a)
    ref = F.cross_entropy(ref_logits, y)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 0.02 * max(1.0, ref.item())
    assert torch.allclose(logits.float(), ref_logits, atol=0.05 * max(1.0, ref_logits.abs().max().item()))
    # one fused SGD step moved the weights by -lr * the (bf16-autocast) gradient: as close to fp32's update
    # as the original path (fp32 loader output, autocast, plain SGD) gets
    torch.manual_seed(0)
    orig = create_model("nin_d2l")
    orig.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        orig_logits = orig(a)
    F.cross_entropy(orig_logits.float(), y).backward()
    want = torch.cat([(-cfg.lr * p.grad).flatten() for p in plain.parameters()])
    got = torch.cat([(p_fast.detach() - p_plain.detach()).flatten() for p_fast, p_plain
                     in zip(fast.parameters(), plain.parameters())])
    base = torch.cat([(-cfg.lr * p.grad).flatten() for p in orig.parameters()])
    assert (got - want).norm() <= max(0.1 * want.norm(), 2 * (base - want).norm())


def test_d2l_stability_runs_variants_and_records_each(fake_root, tmp_path):
    """The driver runs `nin train --recipe d2l` + each variant's flags per seed and appends one JSON line per
    run with its per-epoch history; a run past --deadline is killed and recorded as cut off."""
    import subprocess

    out = tmp_path / "rows.jsonl"
    cmd = [sys.executable, str(BENCH / "d2l_stability.py"), "--device", "cpu", "--resize", "67", "--limit-train", "32",
           "--epochs", "1", "--seeds", "0", "--variants", "d2l", "linear-class-block-cosine", "--data-dir",
           str(fake_root), "--workers", "2", "--jsonl", str(out), "--keep", str(tmp_path / "runs")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {x["variant"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"d2l", "linear-class-block-cosine"}
    for row in rows.values():
        assert row["status"] in ("ok", "STUCK") and row["epochs_done"] == 1 and len(row["history"]) == 1
    cfg = json.loads((tmp_path / "runs" / "linear-class-block-cosine-s0" / "config.json").read_text())
    assert cfg["config"]["model_kwargs"] == {"class_block_relus": "none"} and cfg["config"]["schedule"] == "cosine"

    # finished run folders join the table under the variant their config.json matches
    runs = tmp_path / "runs"
    added = tmp_path / "added.jsonl"
    add = [sys.executable, str(BENCH / "d2l_stability.py"), "--jsonl", str(added), "--add-runs"]
    r = subprocess.run([*add, str(runs / "linear-class-block-cosine-s0"), str(runs / "d2l-s0")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    again = [json.loads(x) for x in added.read_text().splitlines()]
    assert [(x["variant"], x["seed"], x["resize"], x["limit_train"], x["history"]) for x in again] == [
        (v, 0, 67, 32, rows[v]["history"]) for v in ("linear-class-block-cosine", "d2l")]
    cfg["config"]["lr"] = 0.3  # a run that is no variant: refused, named
    (runs / "d2l-s0" / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run([*add, str(runs / "d2l-s0")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "d2l-s0: its config is `--recipe d2l` plus no variant" in r.stderr
    assert "Traceback" not in r.stderr and len(added.read_text().splitlines()) == 2

    cut = tmp_path / "cut.jsonl"
    r = subprocess.run([*cmd[:cmd.index("--jsonl")], "--jsonl", str(cut), "--deadline", "0.5", "--workers", "1",
                        "--epochs", "3"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(x) for x in cut.read_text().splitlines()]
    assert [x["status"] for x in rows] == ["cut off"] and "runs not started: 1" in r.stdout


def test_d2l_stable_recipe_is_the_variant_verified_on_cpu():
    """The table's variant names must say what the recipe is: d2l-stable = d2l + the clipped batch-64 variant;
    run folders written before --clip-grad-norm existed still name their variant."""
    import d2l_stability

    from nin.training.recipes import get_recipe
    stable = get_recipe("d2l-stable").to_dict()
    assert d2l_stability.variant_of(stable) == "linear-class-block-cosine-batch64-clip1"
    older = {k: v for k, v in stable.items() if k != "clip_grad_norm"}
    assert d2l_stability.variant_of(older) == "linear-class-block-cosine-batch64"
    assert d2l_stability.variant_of(get_recipe("d2l", seed=5, resize=96).to_dict()) == "d2l"
    assert d2l_stability.variant_of(get_recipe("d2l", lr=0.3).to_dict()) is None


def test_gpu_results_table_counts_runs(tmp_path, monkeypatch):
    """BENCHMARKS.md's GPU section: per variant the seeds' final accuracies, STUCK at ln 10, runs >= 0.88;
    one table per cost setting, CPU results in their own section."""
    import gpu_results

    def row(variant, seed, losses_accs, epochs=2, resize=224):
        hist = [{"train_loss": lo, "train_acc": a, "test_acc": a} for lo, a in losses_accs]
        return {"variant": variant, "flags": ["--x"], "seed": seed, "epochs_done": len(hist), "epochs": epochs,
                "resize": resize, "limit_train": 0, "status": "ok", "history": hist}
    rows = [row("v", 0, [(1.0, 0.5), (0.3, 0.885)]), row("v", 1, [(2.3026, 0.1), (2.3026, 0.1)]),
            {**row("v", 2, [(1.0, 0.7)]), "status": "cut off"},
            {**row("v", 4, []), "status": "NaN (epoch 1, step 9)"}, {**row("v", 5, []), "status": "cut off"}]
    cpu = [row("w", 3, [(1.0, 0.9), (0.2, 0.91)], resize=96), row("w", 0, [(1.0, 0.5), (0.3, 0.87)]),
           {**row("w", 1, [(1.0, 0.6)]), "status": "NaN"}]
    (tmp_path / "d2l-stability-h200-x.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "d2l-stability-cpu-x.jsonl").write_text("\n".join(json.dumps(r) for r in cpu))
    (tmp_path / "gpu-x.json").write_text(json.dumps({
        "device": "GPU-NAME", "torch": "t", "batch_size": 128, "compile": False,
        "nin_step": {"images": 10, "images_per_sec": 3000.0}, "book_step": {"images": 10, "images_per_sec": 1000.0}}))
    monkeypatch.setattr(gpu_results, "RESULTS", tmp_path / "benchmarks" / "results")
    gpu_results.RESULTS.mkdir(parents=True)
    for f in tmp_path.glob("*.json*"):
        f.rename(gpu_results.RESULTS / f.name)
    text = gpu_results.render()
    # a run stopped inside epoch 1 by a NaN is named and counts as failed; one cut off there is left out
    assert "| v | `--x` | s0: 0.885, s1: STUCK, s2: 0.700 (1), s4: NaN (epoch 1, step 9) | 1/3 |" in text
    assert "GPU-NAME" in text and "| **nin / the book** | **3.00x** |" in text
    old = gpu_results.RESULTS / "gpu-old.json"  # results files written before the rename say seed_step
    old.write_text(json.dumps({"device": "OLD", "torch": "t", "batch_size": 128, "compile": False,
                               "nin_step": {"images": 10, "images_per_sec": 2000.0},
                               "seed_step": {"images": 10, "images_per_sec": 1000.0}}))
    assert "| **nin / the book** | **2.00x** |" in "\n".join(gpu_results._speed(old))
    new = gpu_results.RESULTS / "gpu-new.json"  # gpu.py since the H100 session: modes, whole runs, errors
    full = {"mode": "compiled", "seconds": 30.0, "startup_seconds": 2.0, "seconds_without_startup": 28.0,
            "test_acc": 0.8, "train_seconds": 25.0, "eval_seconds_median": 0.3, "epoch_seconds": [16.0, 9.0],
            "first_epoch_extra_seconds": 7.0}
    new.write_text(json.dumps({"device": "NEW", "torch": "t", "cuda": "c", "batch_size": 128, "smoke": False,
                               "nin_steps": {"eager": {"images": 10, "images_per_sec": 4000.0, "peak_fraction": 0.05},
                                             "default": {"images": 10, "images_per_sec": 5000.0,
                                                         "warmup_seconds": 20.0}},
                               "book_step": {"images": 10, "images_per_sec": 1000.0},
                               "nin_fulls": {"compiled": full}, "errors": {"full": "TimeoutError: x"}}))
    lines = "\n".join(gpu_results._speed(new))
    assert "| nin eager / the book | 4.00x |" in lines and "| nin default / the book | 5.00x |" in lines
    assert "4,000 images/s, 5.0% of the bf16 peak" in lines and "(warm-up 20.0 s)" in lines
    assert "**28.0 s** (start-up 2.0 s; test acc 0.8000" in lines and "epoch 1 +7.0 s" in lines
    assert "| full | failed: TimeoutError: x |" in lines
    gpu_part, cpu_part = text.split("### d2l-stable candidates on CPU")
    assert "NVIDIA H200" in gpu_part and "| w |" not in gpu_part
    big, small = cpu_part.split("**96 x 96**")
    assert "**224 x 224**" in big and "| w | `--x` | s0: 0.870, s1: 0.600 (1) NaN | 0/2 |" in big
    assert "| w | `--x` | s3: 0.910 | 1/1 |" in small


@needs_d2l
def test_gpu_stubs_let_d2l_and_the_run_folder_plot_work(tmp_path):
    """benchmarks/gpu_stubs stand in for IPython/matplotlib_inline on the GPU machine: d2l must import with
    them first on the path, and matplotlib (which looks at a loaded IPython) must still draw curves.png."""
    import os
    import subprocess

    code = ("import IPython, sys; assert 'gpu_stubs' in IPython.__file__\n"
            "from d2l import torch as d2l\n"
            "from nin.training.runfolder import plot_curves; import pathlib\n"
            f"plot_curves(pathlib.Path({str(tmp_path)!r}), [dict(epoch=1, train_loss=1.0, train_acc=0.5, "
            "test_acc=0.5)], 't')\n")
    env = {**os.environ, "PYTHONPATH": str(BENCH / "gpu_stubs")}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_stream_benchmark_smoke_writes_its_tables(tmp_path):
    """benchmarks/bench_stream.py (run_all's "stream" part) on a tiny generated collection: every loader
    delivers images, `nin train --stream` really takes its steps, and the section has both tables."""
    import subprocess

    md = tmp_path / "s.md"
    r = subprocess.run([sys.executable, str(BENCH / "bench_stream.py"), "--skip", "decode", "--images", "96",
                        "--rounds", "1", "--memory", "100,200", "--train-steps", "2", "--stream-only",
                        "--work", str(tmp_path / "imgs"), "--out", str(tmp_path), "--markdown", str(md)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(next(tmp_path.glob("stream-*.json")).read_text())
    assert all(v["median"] > 0 for v in result["throughput_img_per_s"].values())
    rows = {(m["mode"], m["collection"]): m for m in result["memory"] if "images" in m}
    assert rows[("train", 100)]["images"] == rows[("train", 200)]["images"] == 2 * 64
    assert rows[("stream", 200)]["images"] == 160  # one epoch: the 80% of 200 not held out
    text = md.read_text()
    assert "| nin folder stream |" in text and "| 200 | `nin train --stream` (fixed steps) | 128 |" in text


@needs_d2l
def test_gpu_all_script_smoke_mode_writes_every_result(tmp_path):
    """benchmarks/gpu_all.sh is what a lent GPU runs, once, with no second chance: its CPU smoke mode must
    run both parts end to end and leave every results file gpu_results.py renders."""
    import os
    import subprocess

    raw = fake_fashion_dir(tmp_path / "fm", n_train=300, n_test=64) / "FashionMNIST" / "raw"
    out = tmp_path / "out"
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "DATA": str(raw), "PY": sys.executable, "WORKERS": "2",
           "WHEELS": str(tmp_path / "no-wheels"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", str(BENCH / "gpu_all.sh")], cwd=BENCH.parent, env=env, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((out / "gpu.json").read_text())
    assert res["smoke"] and res["nin_step"]["images"] == 16 and not res["errors"], res["errors"]
    assert "the book" in res["markdown"] and (out / "profile.txt").read_text().strip()
    rows = [json.loads(x) for x in (out / "stability.jsonl").read_text().splitlines()]
    assert sorted((r_["variant"], r_["seed"]) for r_ in rows) == [
        ("d2l", 0), ("d2l", 1), ("linear-class-block-cosine-batch64-clip1", 0),
        ("linear-class-block-cosine-batch64-clip1", 1)]
    assert all(r_["status"] in ("ok", "STUCK") and r_["epochs_done"] == 1 for r_ in rows), rows
    assert "d2l imports" in (out / "env.txt").read_text()


def test_grad_norms_reports_the_norm_each_step_applied(fake_root, tmp_path):
    """benchmarks/grad_norms.py (what d2l-stable's clipping was chosen from): one line per step with the
    step's loss and the norm of the gradient it applied -- capped at the clip when clipping is on."""
    import grad_norms

    common = ["--recipe", "d2l-stable", "--steps", "3", "--data-dir", str(fake_root), "--limit-train", "64"]
    out = tmp_path / "g.jsonl"
    rows = grad_norms.main([*common, "--clip-grad-norm", "0", "--jsonl", str(out)])
    assert [r["step"] for r in rows] == [0, 1, 2] and [json.loads(x) for x in out.read_text().splitlines()] == rows
    assert all(r["grad_norm"] > 0.01 and 0 < r["loss"] < 10 for r in rows)
    clipped = grad_norms.main([*common, "--clip-grad-norm", "0.01"])
    assert clipped[0]["grad_norm"] <= 0.01 + 1e-4 and clipped[0]["loss"] == rows[0]["loss"]  # same first step


def test_recipe_seeds_runs_variants_seed_by_seed_and_summarises(fake_root, tmp_path):
    """benchmarks/recipe_seeds.py: variants alternate within each seed, one JSON line per run with the CLI's final
    row, and the summary's mean, sample sd, median seconds and ratio are those of the lines."""
    import statistics
    import subprocess

    from nin.training.runfolder import read_metrics

    out = tmp_path / "rows.jsonl"
    common = f"--data-dir {fake_root} --limit-train 32 --epochs 1 --warmup-epochs 0"
    cmd = [sys.executable, str(BENCH / "recipe_seeds.py"), "--recipe", "fast", "--variant", f"a={common}",
           "--variant", f"b={common} --lr 0.05", "--seeds", "0", "1", "--threads", "1", "--jsonl", str(out),
           "--keep", str(tmp_path / "runs")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(x["variant"], x["seed"]) for x in rows] == [("a", 0), ("b", 0), ("a", 1), ("b", 1)]
    for row in rows:
        run = Path(row["run"])
        cfg = json.loads((run / "config.json").read_text())["config"]
        assert (cfg["recipe"], cfg["seed"], cfg["lr"]) == ("fast", row["seed"], 0.05 if row["variant"] == "b" else 0.2)
        last = read_metrics(run)[-1]
        assert row["test_acc"] == last["test_acc"] and row["train_acc"] == last["train_acc"]
        assert row["status"] == "finished" and row["rc"] == 0 and row["seconds"] > row["train_seconds"] > 0
    for v in ("a", "b"):
        accs = [x["test_acc"] for x in rows if x["variant"] == v]
        med = statistics.median(x["seconds"] for x in rows if x["variant"] == v)
        base = statistics.median(x["seconds"] for x in rows if x["variant"] == "a")
        line = (f"| {v} | 0,1 | {sum(accs) / 2:.4f} | {abs(accs[0] - accs[1]) / 2 ** 0.5:.4f} | "
                f"{min(accs):.4f}-{max(accs):.4f} | {med:.0f} | {med / base:.3f} |")
        assert line in r.stdout
    again = subprocess.run([sys.executable, str(BENCH / "recipe_seeds.py"), "--from-jsonl", str(out)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.strip() == r.stdout.split("\n\n")[-1].strip()
    added = subprocess.run([sys.executable, str(BENCH / "recipe_seeds.py"), "--add-runs",
                            *[x["run"] for x in rows if x["variant"] == "b"]], capture_output=True, text=True, timeout=120)
    accs = [x["test_acc"] for x in rows if x["variant"] == "b"]
    assert added.returncode == 0 and f"| runs | 0,1 | {sum(accs) / 2:.4f} |" in added.stdout
    bad = subprocess.run([*cmd[:2], "--variant", "noequals"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--variant wants NAME=FLAGS" in bad.stderr and "Traceback" not in bad.stderr


def test_tta_views_columns_are_nins_own_evaluations(small_run, tmp_path, capsys):
    """benchmarks/tta_views.py moves the raw images itself; its none/flip/shift columns must be what
    nin.evaluate gives with tta none/flip/shift (the shift column checks `nin eval --tta shift`)."""
    import tta_views

    import nin

    path = small_run[0]
    out = tmp_path / "tta.jsonl"
    assert tta_views.main([str(path), "--limit", "300", "--jsonl", str(out)]) == 0
    row = json.loads(out.read_text())
    model = nin.load(path)
    test = nin.data.load_dataset("fashion-mnist").test
    for tta in ("none", "flip", "shift"):
        assert row["accuracy"][tta] == nin.evaluate(model, test, limit=300, tta=tta).accuracy, tta
    assert row["images"] == 300 and row["threads"] >= 1 and len(set(row["accuracy"].values())) > 2  # sets differ
    assert str(path) in capsys.readouterr().out


def test_eval_layout_compares_the_two_layouts_on_the_same_images(small_run, tmp_path, capsys):
    """benchmarks/eval_layout.py: both layouts' logits agree (nin evaluates channels_last), the ratio is
    of the medians it prints, and a JSON line per batch size records the machine."""
    import eval_layout

    out = tmp_path / "layout.jsonl"
    assert eval_layout.main([str(small_run[0]), "--images", "256", "--batch-sizes", "64", "100", "--repeats", "1",
                             "--jsonl", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["batch_size"] for r in rows] == [64, 100] and all(r["images"] == 256 for r in rows)
    printed = capsys.readouterr().out
    for r in rows:
        assert r["same_predictions"] and r["max_abs_diff"] < 1e-4 and r["threads"] >= 1 and r["cpu"]
        assert r["ratio"] == pytest.approx(r["channels_last_s"] / r["contiguous_s"])
        assert f"| {r['batch_size']} | {r['contiguous_s']:.2f} | {r['channels_last_s']:.2f} | {r['ratio']:.3f} |" in printed


def test_time_to_accuracy_smoke_runs_a_past_revision_beside_the_checkout(fake_root, tmp_path, capsys):
    """benchmarks/time_to_accuracy.py --smoke: a variant at a git revision (HEAD, exported with git archive)
    beside the checkout's recipe; the order flips every other seed, each run's line has its accuracy,
    seconds and epoch curve, the revision's runs import the exported nin, and --from-jsonl reprints the table.
    (--eval-none is checked on one kept run, not on all four: each `nin eval` is a 5 s process start.)"""
    import subprocess

    import time_to_accuracy

    out, png = tmp_path / "t.jsonl", tmp_path / "t.png"
    args = ["--smoke", "--variant", "ref=HEAD:fast", "--variant", "now=fast", "--seeds", "0", "1", "--threads", "1",
            "--data-dir", str(fake_root), "--keep", str(tmp_path / "runs"), "--jsonl", str(out), "--figure", str(png),
            "--target", "0.5"]
    assert time_to_accuracy.main(args) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["variant"], r["seed"]) for r in rows] == [("ref", 0), ("now", 0), ("now", 1), ("ref", 1)]
    head = subprocess.run(["git", "-C", str(BENCH.parent), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    src = BENCH.parent / "src"
    for r in rows:
        assert r["rc"] == 0 and 0 <= r["accuracy"] <= 1 and r["none_acc"] is None and r["tta"] == "flip"
        # fast: the epochs without TTA, the saved model's closing evaluation with flip: a number of its own
        assert r["accuracy"] == json.loads((Path(r["run"]) / "model.json").read_text())["info"]["tta_test_acc"]
        assert r["curve"] and [c[1] for c in r["curve"]] == [1] and 0 < r["curve"][-1][0] < r["seconds"]
        assert r["threads"] == 1 and r["cpu"] and r["torch"] and r["load_before"] >= 0
        if r["variant"] == "ref":
            assert r["rev"] == head and r["nin"].endswith("/src/nin/__init__.py")
            assert not Path(r["nin"]).is_relative_to(src)  # the exported copy, not the checkout
        else:
            assert r["rev"] is None and Path(r["nin"]) == src / "nin" / "__init__.py"
    text = time_to_accuracy.table(rows)
    assert text in printed
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ref") or line.startswith("| now")}
    assert lines["| ref"].startswith("| ref | `HEAD:fast` | flip | 0,1 |") and "| 1.000 |" in lines["| ref"]
    assert lines["| now"].startswith("| now | `fast` | flip | 0,1 |")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # --eval-none's number: the current nin's `nin eval RUN --tta none` of the revision's saved model
    none = time_to_accuracy.accuracy_without_tta(tmp_path / "runs" / "ref-s1", dict(os.environ), str(fake_root))
    assert 0 <= none <= 1
    with_none = time_to_accuracy.table([{**r, "none_acc": none} for r in rows])
    assert "| mean acc without TTA |" in with_none and f"| {none:.4f} |" in with_none.splitlines()[2]

    again = tmp_path / "again.png"
    assert time_to_accuracy.main(["--from-jsonl", str(out), "--figure", str(again)]) == 0
    assert capsys.readouterr().out == f"{text}\nfigure: {again}\n" and again.read_bytes()[:4] == b"\x89PNG"
