"""Training throughput on the book's configuration: the book's own pipeline against `nin train --recipe d2l`.

Both train nin_d2l (the book's network) on Fashion-MNIST resized to 224 x 224, batch 128, plain SGD lr 0.1:
  book: the d2l.ai chapter's code driven through the public d2l package (d2l==1.0.3): d2l.load_data_fashion_mnist(128,
        resize=224) (torchvision Resize + ToTensor, DataLoader with 4 workers), the book's nn.Sequential, and the
        body of d2l.train_ch6's inner loop, verbatim (fp32, NCHW).  The Debian Fashion-MNIST files are unpacked
        where torchvision looks (a temp data/FashionMNIST/raw/), so nothing downloads.
  nin:  nin.training.trainer.train_step (the function `nin train` calls every step) on nin's BatchLoader, set up as
        nin.training.trainer.train sets it up (bf16 autocast, channels_last, fused SGD, the kept-heap allocator).
Each pipeline runs in its own worker process (the allocator setting is process-wide, and the book's DataLoader
workers are its own); the parent alternates them -- book, nin, then (--one-thread, the default) the book and nin
again with one torch thread each, as under OMP_NUM_THREADS=1, then the conv peaks -- for --rounds rounds.  On a
loaded 2-core machine two threads lose more than half their speed waiting on each other at every op
(benchmarks/README.md), so the one-thread pair is the like-for-like comparison there.
A segment's rate is images / wall seconds over its steps, data loading included, after one untimed step.
The headline is the ratio of the median rates.  The same run measures this machine's bf16 and fp32 convolution
peak (the book's 5x5 conv 96->256 at 26x26, batch 128, forward) and nin's share of it.  The peak is measured with
the heap setting training uses (nin.training.engine.keep_freed_memory): without it every call page-faults its
44 MB output afresh, which read the peak about 25% low on an AMX Xeon (before 2026-12-04 it was measured so).
--baseline REV adds a third worker: nin's step as it was at git revision REV (`git archive`, imported through
PYTHONPATH), in the same rounds, for a before/after ratio of nin's own step.

Run:  .venv/bin/python benchmarks/bench_train.py [--rounds 3] [--book-steps 4] [--nin-steps 8] [--baseline REV] [--json FILE]
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
DEBIAN_FMNIST = "/usr/share/datasets/fashion-mnist"


def loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# --- the book's pipeline ------------------------------------------------------------------
def torchvision_root(raw_dir: str | os.PathLike, root: str | os.PathLike) -> Path:
    """Unpack the Fashion-MNIST IDX files into root/data/FashionMNIST/raw/ (where torchvision looks for
    ``datasets.FashionMNIST("../data")`` run from root/cwd, as d2l does); returns root/cwd."""
    raw = Path(root) / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for f in Path(raw_dir).iterdir():
        if f.name.endswith("-ubyte") and not (raw / f.name).exists():
            (raw / f.name).symlink_to(f.resolve())
        elif f.name.endswith("-ubyte.gz") and not (raw / f.name[:-3]).exists():
            (raw / f.name[:-3]).write_bytes(gzip.decompress(f.read_bytes()))
    (Path(root) / "cwd").mkdir(exist_ok=True)
    return Path(root) / "cwd"


def book_net() -> nn.Sequential:
    """The book's network, as d2l.ai's NiN chapter writes it."""
    def nin_block(in_channels, out_channels, kernel_size, strides, padding):
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size, strides, padding),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU())

    return nn.Sequential(
        nin_block(1, 96, kernel_size=11, strides=4, padding=0),
        nn.MaxPool2d(3, stride=2),
        nin_block(96, 256, kernel_size=5, strides=1, padding=2),
        nn.MaxPool2d(3, stride=2),
        nin_block(256, 384, kernel_size=3, strides=1, padding=1),
        nn.MaxPool2d(3, stride=2),
        nn.Dropout(0.5),
        nin_block(384, 10, kernel_size=3, strides=1, padding=1),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten())


class BookPipeline:
    """d2l.load_data_fashion_mnist(batch_size, resize=224) + one pass of d2l.train_ch6's inner loop per ``step``."""

    def __init__(self, raw_dir: str = DEBIAN_FMNIST, batch_size: int = 128, device="cpu", lr: float = 0.1,
                 workers: int | None = None) -> None:
        from d2l import torch as d2l  # pip install --no-deps d2l==1.0.3 (+ pandas requests ipython ...)

        self.d2l, self.device = d2l, torch.device(device)
        self._tmp = tempfile.TemporaryDirectory()
        cwd, old = torchvision_root(raw_dir, self._tmp.name), os.getcwd()
        os.chdir(cwd)  # d2l reads root="../data"; the dataset is in memory after construction
        try:
            if workers is not None:
                d2l.get_dataloader_workers = lambda: workers  # smoke tests only; the book uses 4
            self.train_iter, _ = d2l.load_data_fashion_mnist(batch_size, resize=224)
        finally:
            os.chdir(old)
        net = book_net()

        def init_weights(m):  # train_ch6's own
            if type(m) == nn.Linear or type(m) == nn.Conv2d:
                nn.init.xavier_uniform_(m.weight)
        net.apply(init_weights)
        net.to(self.device)
        self.net = net
        self.optimizer = torch.optim.SGD(net.parameters(), lr=lr)
        self.loss = nn.CrossEntropyLoss()
        self.metric = d2l.Accumulator(3)
        self._it = iter(self.train_iter)

    def step(self) -> tuple[int, float]:
        """One training step; returns (images, compute seconds: what train_ch6's timer counts, data excluded)."""
        try:
            X, y = next(self._it)
        except StopIteration:
            self._it = iter(self.train_iter)
            X, y = next(self._it)
        d2l, net, optimizer, loss, metric, device = (self.d2l, self.net, self.optimizer, self.loss, self.metric,
                                                     self.device)
        net.train()
        t = time.perf_counter()  # timer.start()
        # --- d2l.train_ch6, verbatim ---
        optimizer.zero_grad()
        X, y = X.to(device), y.to(device)
        y_hat = net(X)
        l = loss(y_hat, y)  # noqa: E741
        l.backward()
        optimizer.step()
        with torch.no_grad():
            metric.add(l * X.shape[0], d2l.accuracy(y_hat, y), X.shape[0])
        # ---
        sync(device)
        return X.shape[0], time.perf_counter() - t

    def close(self) -> None:
        self._it = None
        self._tmp.cleanup()


# --- the nin pipeline ---------------------------------------------------------------------
class NinPipeline:
    """The training step of `nin train --recipe RECIPE`, set up as nin.training.trainer.train sets it up."""

    def __init__(self, recipe: str = "d2l", device="cpu", data_dir: str | None = None, **overrides) -> None:
        from nin.training.recipes import get_recipe
        from nin.training.trainer import TrainState, set_up

        # the library's own set-up step: the same model, loader, optimizer and checks as `nin train`
        self.setup = set_up(get_recipe(recipe, device=str(device), data_dir=data_dir, **overrides))
        self.cfg, self.device, self.amp_dtype = self.setup.cfg, self.setup.device, self.setup.amp_dtype
        self.loader, self.model, self.net = self.setup.train_loader, self.setup.model, self.setup.net
        self.state = TrainState(sums=torch.zeros(3, dtype=torch.float64, device=self.device))
        self.sums = self.state.sums
        self._it = self.loader.iterate(0)

    def step(self, synchronize: bool = True) -> tuple[int, float]:
        """One step of nin.training.trainer.train's loop (seed, lr, train_step, finite check); returns (images, seconds).
        ``synchronize=False`` leaves a GPU's queue running (train() syncs only every 25 steps there)."""
        from nin.training.recipes import lr_at
        from nin.training.trainer import step_seed, train_step

        s, st = self.setup, self.state
        try:
            x, y = next(self._it)
        except StopIteration:
            st.epoch, st.batch = st.epoch + 1, 0
            self._it = self.loader.iterate(st.epoch)
            x, y = next(self._it)
        t = time.perf_counter()
        self.net.train()
        torch.manual_seed(step_seed(self.cfg.seed, st.epoch, st.batch, 0))
        lr = lr_at(self.cfg, st.step, s.steps_per_epoch, s.base_lr)
        loss, _ = train_step(self.net, s.opt, s.scaler, x, y, lr=lr, amp_dtype=self.amp_dtype,
                             label_smoothing=self.cfg.label_smoothing, sums=st.sums,
                             clip_grad_norm=self.cfg.clip_grad_norm)
        if self.device.type == "cpu":  # train() checks the loss every step on CPU (a host sync)
            assert bool(torch.isfinite(loss.detach()))
        st.step, st.batch = st.step + 1, st.batch + 1
        self.last_loss = loss.detach()
        if synchronize:
            sync(self.device)
        return y.numel(), time.perf_counter() - t


# --- conv peak and FLOPs ------------------------------------------------------------------
def conv_peak(dtype: torch.dtype, batch: int = 128, reps: int = 3) -> float:
    """Forward GFLOP/s of the book's 5x5 conv 96->256 at 26x26 (its largest layer), channels_last, median."""
    x = torch.randn(batch, 96, 26, 26).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 96, 5, 5).to(dtype).contiguous(memory_format=torch.channels_last)
    flops = 2 * batch * 26 * 26 * 256 * 96 * 25
    times = []
    with torch.no_grad():
        torch.nn.functional.conv2d(x, w, padding=2)
        for _ in range(reps):
            t = time.perf_counter()
            torch.nn.functional.conv2d(x, w, padding=2)
            times.append(time.perf_counter() - t)
    return flops / statistics.median(times) / 1e9


def train_flops_per_image(name: str = "nin_d2l", size: int = 224) -> float:
    """Forward + backward FLOPs of one training image (torch.utils.flop_counter, fp32, batch 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    from nin.hub import create_model

    model = create_model(name)
    x = torch.zeros(2, 1, size, size)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 2


# --- worker processes ---------------------------------------------------------------------
def worker(kind: str, args) -> None:
    """Set up one pipeline, say "ready", then for every "N" line run N timed steps (after one untimed)."""
    torch.set_num_threads(1 if kind.endswith("1") else args.threads)  # book1, nin1: as OMP_NUM_THREADS=1
    if kind.startswith("book"):
        pipe = BookPipeline(args.raw_dir, args.batch_size)
    else:
        pipe = NinPipeline(args.recipe, "cpu", args.data_dir, batch_size=args.batch_size)
    for _ in range(args.warmup):
        pipe.step()
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        n = int(line)
        pipe.step()  # untimed: lets the other pipeline's leftovers (prefetching workers) settle
        wall, images, compute = time.perf_counter(), 0, 0.0
        for _ in range(n):
            k, c = pipe.step()
            images, compute = images + k, compute + c
        wall = time.perf_counter() - wall
        print(json.dumps({"images": images, "wall": wall, "compute": compute}), flush=True)


class Worker:
    def __init__(self, kind: str, args, env: dict | None = None) -> None:
        cmd = [sys.executable, __file__, "--worker", kind, "--threads", str(args.threads), "--batch-size",
               str(args.batch_size), "--raw-dir", args.raw_dir, "--recipe", args.recipe, "--warmup", str(args.warmup)]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.kind = kind

    def wait_ready(self) -> None:
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.kind} worker failed to start (see its traceback above)")

    def run(self, steps: int) -> dict:
        self.p.stdin.write(f"{steps}\n")
        self.p.stdin.flush()
        line = self.p.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.kind} worker died (see its traceback above)")
        return json.loads(line)

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=60)


def measure(args) -> dict:
    from nin.training.engine import keep_freed_memory

    kinds = ["book", "nin"] + (["book1", "nin1"] if args.one_thread else [])
    workers = {k: Worker(k, args) for k in kinds}
    if args.baseline:  # nin's step at REV: its source tree first on the worker's path
        from time_to_accuracy import revision_env

        args.baseline_sha, env = revision_env(args.baseline, Path(tempfile.mkdtemp(prefix="bench-train-src-")))
        workers["base"] = Worker("base", args, env)
        kinds.append("base")
    for w in workers.values():
        w.wait_ready()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # the conv peak with training's heap setting (see the docstring)
    rounds = []
    try:
        for r in range(args.rounds):
            row = {"load_before": loadavg()}
            for k, w in workers.items():
                row[k] = w.run(args.book_steps if k.startswith("book") else args.nin_steps)
            row["peak_bf16"] = conv_peak(torch.bfloat16)
            row["peak_fp32"] = conv_peak(torch.float32)
            row["load_after"] = loadavg()
            for k in kinds:
                row[k]["rate"] = row[k]["images"] / row[k]["wall"]
            rounds.append(row)
            print(f"round {r + 1}/{args.rounds}: the book {row['book']['rate']:.1f} img/s, "
                  f"nin {row['nin']['rate']:.1f} img/s ({row['nin']['rate'] / row['book']['rate']:.2f}x)"
                  + (f"; one thread: the book {row['book1']['rate']:.1f}, nin {row['nin1']['rate']:.1f} img/s"
                     if "nin1" in row else "")
                  + (f"; nin at {args.baseline} {row['base']['rate']:.1f} img/s" if "base" in row else "") + f", conv peak bf16 {row['peak_bf16']:.0f} "
                  f"fp32 {row['peak_fp32']:.0f} GFLOP/s, load {row['load_before']:.2f}->{row['load_after']:.2f}",
                  file=sys.stderr, flush=True)
    finally:
        for w in workers.values():
            w.close()
    med = lambda key, sub=None: statistics.median(r[key][sub] if sub else r[key] for r in rounds)  # noqa: E731
    flops = train_flops_per_image()
    res = {
        "rounds": rounds, "book_rate": med("book", "rate"), "nin_rate": med("nin", "rate"),
        "book_compute_rate": statistics.median(r["book"]["images"] / r["book"]["compute"] for r in rounds),
        "peak_bf16": med("peak_bf16"), "peak_fp32": med("peak_fp32"), "train_gflop_per_image": flops / 1e9,
        "loads": [x for r in rounds for x in (r["load_before"], r["load_after"])],
        "ratios": [r["nin"]["rate"] / r["book"]["rate"] for r in rounds],
        "config": {k: getattr(args, k) for k in ("rounds", "book_steps", "nin_steps", "batch_size", "threads",
                                                  "one_thread")},
        "machine": machine(),
    }
    res["ratio"] = res["nin_rate"] / res["book_rate"]
    if args.one_thread:
        res["nin1_rate"], res["book1_rate"] = med("nin1", "rate"), med("book1", "rate")
        res["ratio1"] = res["nin1_rate"] / res["book1_rate"]
        res["ratios1"] = [r["nin1"]["rate"] / r["book1"]["rate"] for r in rounds]
    if args.baseline:
        res["baseline"], res["baseline_sha"], res["base_rate"] = args.baseline, args.baseline_sha, med("base", "rate")
        res["ratios_base"] = [r["nin"]["rate"] / r["base"]["rate"] for r in rounds]
    res["limit_bf16"] = res["peak_bf16"] * 1e9 / flops
    res["limit_fp32"] = res["peak_fp32"] * 1e9 / flops
    return res


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), torch {torch.__version__}, {torch.get_num_threads()} threads"


def markdown(res: dict) -> str:
    c = res["config"]

    def per_round(k: str) -> str:
        return ", ".join(f"{r[k]['rate']:.1f}" for r in res["rounds"])

    rows = [
        "| pipeline | images/s (median of rounds) | per round | vs the book |",
        "|---|---:|---|---:|",
        f"| the book: d2l 1.0.3 `load_data_fashion_mnist(128, resize=224)` + `train_ch6` step, fp32 | "
        f"{res['book_rate']:.1f} | {per_round('book')} | 1.00x |",
        f"| nin: `nin train --recipe d2l` step (`train_step`, BatchLoader bf16, channels_last, fused SGD) | "
        f"{res['nin_rate']:.1f} | {per_round('nin')} | "
        f"**{res['ratio']:.2f}x** |",
    ]
    if "nin1_rate" in res:
        rows += [f"| the book, one thread (`OMP_NUM_THREADS=1`; its 4 loader workers as before) | "
                 f"{res['book1_rate']:.1f} | {per_round('book1')} | 1.00x |",
                 f"| nin, one thread: `OMP_NUM_THREADS=1 nin train --recipe d2l` step | {res['nin1_rate']:.1f} | "
                 f"{per_round('nin1')} | **{res['ratio1']:.2f}x** (vs the book at default threads: "
                 f"{res['nin1_rate'] / res['book_rate']:.2f}x) |"]
    if "base_rate" in res:
        rows.append(f"| nin's step at {res['baseline']} ({res['baseline_sha'][:7]}), same rounds | {res['base_rate']:.1f} | "
                    f"{per_round('base')} | {res['base_rate'] / res['book_rate']:.2f}x (nin now: "
                    f"**{statistics.median(res['ratios_base']):.2f}x** of it, median of rounds) |")
    gf = res["train_gflop_per_image"]
    lines = [
        "### Training throughput, the book's configuration (nin_d2l, Fashion-MNIST at 224, batch 128)", "",
        *rows, "",
        f"Per-round ratios: {', '.join(f'{x:.2f}' for x in res['ratios'])}"
        + (f" (one thread each: {', '.join(f'{x:.2f}' for x in res['ratios1'])})" if "ratios1" in res else "") + ". The book's own `examples/sec` figure "
        f"(train_ch6's timer, data loading excluded) was {res['book_compute_rate']:.1f} in the same segments.",
        "",
        "| convolution peak (the book's 5x5 conv 96->256 at 26x26, batch 128, forward, median) | GFLOP/s | "
        f"limit for nin_d2l at {gf:.2f} GFLOP per training image | nin's share |",
        "|---|---:|---:|---:|",
        f"| bf16, channels_last | {res['peak_bf16']:.0f} | {res['limit_bf16']:.0f} images/s | "
        f"{res['nin_rate'] / res['limit_bf16']:.0%}"
        + (f" (one thread: {res['nin1_rate'] / res['limit_bf16']:.0%})" if "nin1_rate" in res else "")
        + (f" (at {res['baseline']}: {res['base_rate'] / res['limit_bf16']:.0%})" if "base_rate" in res else "") + " |",
        f"| fp32, channels_last | {res['peak_fp32']:.0f} | {res['limit_fp32']:.0f} images/s | "
        f"(the book: {res['book_rate'] / res['limit_fp32']:.0%}) |",
        "",
        f"{c['rounds']} rounds, each: the book's pipeline {c['book_steps']} steps, then nin {c['nin_steps']} steps"
        + (", then the same two with one thread each" if "nin1_rate" in res else "")
        + (f", then nin at {res['baseline']}" if "base_rate" in res else "") + " (each after one "
        "untimed step; rate = images / wall seconds, data loading included), then the conv peaks. "
        f"Load average (1 min) before/after each round: {', '.join(f'{x:.2f}' for x in res['loads'])}. "
        f"{res['machine']}. Command: `.venv/bin/python benchmarks/bench_train.py --rounds {c['rounds']} "
        + (f"--threads {c['threads']} " if c["threads"] != os.cpu_count() else "")
        + f"--book-steps {c['book_steps']} --nin-steps {c['nin_steps']}"
        + (f" --baseline {res['baseline']}" if "base_rate" in res else "") + "`.",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--book-steps", type=int, default=4, help="timed steps of the book's pipeline per round (default 4)")
    p.add_argument("--seed-steps", dest="book_steps", type=int, default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)  # deprecated alias of --book-steps
    p.add_argument("--nin-steps", type=int, default=8, help="timed nin steps per round (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after each worker starts (default 2)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size of both pipelines (default 128)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads per pipeline")
    p.add_argument("--recipe", default="d2l", help="nin recipe whose step is timed (default d2l)")
    p.add_argument("--raw-dir", default=DEBIAN_FMNIST, help="the four Fashion-MNIST IDX files (.gz or not)")
    p.add_argument("--data-dir", help="nin's --data-dir (default: nin's search)")
    p.add_argument("--one-thread", action=argparse.BooleanOptionalAction, default=True,
                   help="also time nin with one thread (as OMP_NUM_THREADS=1): on a loaded machine two threads "
                        "wait on each other at every op (default on)")
    p.add_argument("--baseline", metavar="REV", help="also time nin's step as it was at this git revision")
    p.add_argument("--json", help="also write the raw results to this JSON file")
    p.add_argument("--worker", choices=["book", "nin", "book1", "nin1", "base"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args)
    res = measure(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(markdown(res))


if __name__ == "__main__":
    main()
