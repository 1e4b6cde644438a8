"""Streaming input: JPEG decoders side by side per core, loader throughput against torchvision's reference, and
memory / time to first batch as a collection grows.  One run, side by side; medians.

    .venv/bin/python benchmarks/bench_stream.py [--images 2000] [--memory 5000,20000] [--out DIR]
    .venv/bin/python benchmarks/bench_stream.py --skip throughput,memory   # the decoders alone

Decoders: images/s on one core of TorchCodec, torchvision.io (deprecated) and Pillow on the same JPEGs
(256x256 to 2000x1500), alternating within each round, medians (``bench_decode``).

Throughput: decoded + augmented 224x224 training images per second (RandomResizedCrop + flip, uint8
batches of 64, 2 workers), nin's StreamLoader and ShardLoader against torchvision's ImageNet reference
(ImageFolder + the same v2 transforms + DataLoader), alternating A/B/C rounds, median of each.
Memory: peak RSS of this process plus its workers, polled every 20 ms, two ways: VmRSS summed (shared
pages counted in each process: an upper bound) and PSS (each shared page split among its sharers) while one epoch of a folder of generated 256x256 JPEGs streams through,
at the loader level (the trainer integration is the lead's): streaming at each size, the in-memory path
at the smallest.  Results go to benchmarks/results/stream-<date>.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def photo(rng, w, h):
    """A photo-like image (smooth shapes, a little noise): JPEG size and decode cost near real photos'."""
    from PIL import Image

    x = np.linspace(0, 1, w)[None, :, None]
    y = np.linspace(0, 1, h)[:, None, None]
    f = rng.uniform(2, 20, 3)
    base = np.sin(x * f[0] + y * f[1] + rng.uniform(0, 6, 3)) * 60 + np.cos(x * y * f[2]) * 40 + 128
    return Image.fromarray(np.clip(base + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8))


def make_folder(root: Path, n: int, classes: int = 10, size: int = 256) -> Path:
    """n JPEGs (quality 90) of size x size in ``classes`` folders: crops of 64 generated 768px photos."""
    done = root / ".done"
    if done.exists() and int(done.read_text()) == n:
        return root
    rng = np.random.default_rng(0)
    bases = [photo(rng, 768, 768) for _ in range(64)]
    for i in range(n):
        d = root / f"class{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        x, y = rng.integers(0, 768 - size, 2)
        bases[i % 64].crop((x, y, x + size, y + size)).save(d / f"{i:06d}.jpg", quality=90)
    done.write_text(str(n))
    return root


def timeit(f, n):
    f()
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            f()
        runs.append((time.perf_counter() - t0) / n * 1e3)
    return statistics.median(runs)


def bench_decode(rounds: int = 5) -> list[dict]:
    """JPEG decoders side by side on one core, on the same JPEGs: images/s, bytes -> uint8 C x H x W tensor,
    the decoders alternating within each round, median over ``rounds`` (and each round's rate).

    Full scale: TorchCodec's ``decode_jpeg`` (nin's decoder), torchvision.io's (deprecated since torchvision
    0.29: nin's decoder before; its warning filtered here once, outside the timing, as nin did), Pillow
    (open + convert), and nin's ``decode_image`` itself with and without TorchCodec (header + decode).
    Reduced: Pillow's ``draft`` at 1/2, 1/4, 1/8 (nin's decoder when a crop allows a 2x reduction)."""
    import warnings

    from PIL import Image

    from nin.data import images

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchvision.io import decode_jpeg as tv_decode_jpeg
    from torchcodec.decoders import decode_jpeg as tc_decode_jpeg

    def tensor(data):  # a writable buffer, as nin passes it (torch.frombuffer warns on bytes)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def pillow(data, s=1):
        im = Image.open(io.BytesIO(data))
        if s > 1:
            im.draft("RGB", (im.width // s, im.height // s))
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)

    def nin(data, decoder):
        saved, images._JPEG = images._JPEG, decoder
        try:
            return images.decode_image(data, 3)
        finally:
            images._JPEG = saved

    decoders = {"torchcodec": lambda d: tc_decode_jpeg(tensor(d)),
                "torchvision.io (deprecated)": lambda d: tv_decode_jpeg(tensor(d)),
                "pillow": pillow,
                "nin decode_image (torchcodec)": lambda d: nin(d, tc_decode_jpeg),
                "nin decode_image (pillow only)": lambda d: nin(d, None),
                **{f"pillow draft 1/{s}": (lambda d, s=s: pillow(d, s)) for s in (2, 4, 8)}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(1)
    rows = []
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
            for w, h in ((256, 256), (500, 375), (1000, 750), (2000, 1500)):
                b = io.BytesIO()
                photo(rng, w, h).save(b, "JPEG", quality=90)
                data = b.getvalue()
                ref = pillow(data)
                for name, f in decoders.items():  # warm up, and check that all full decodes agree
                    x = f(data)
                    if "draft" not in name:
                        assert x.shape == ref.shape and (x.int() - ref.int()).abs().float().mean() < 1, name
                n = max(3, int(3e6 / (w * h)))
                runs = {k: [] for k in decoders}
                for _ in range(rounds):
                    for name, f in decoders.items():
                        t0 = time.perf_counter()
                        for _ in range(n):
                            f(data)
                        runs[name].append(n / (time.perf_counter() - t0))
                rows.append({"size": f"{w}x{h}", "kB": round(len(data) / 1e3, 1),
                             "img_per_s": {k: round(statistics.median(v), 1) for k, v in runs.items()},
                             "runs": {k: [round(r, 1) for r in v] for k, v in runs.items()}})
    finally:
        torch.set_num_threads(threads)
    return rows


def decode_table(rows: list[dict]) -> str:
    """The decoders' medians as a text table: one row a decoder, one column an image size."""
    names = list(rows[0]["img_per_s"])
    width = max(map(len, names))
    lines = [f"{'images/s (median), one core':<{width}}" + "".join(f"{r['size']:>11}" for r in rows)]
    lines += [f"{k:<{width}}" + "".join(f"{r['img_per_s'][k]:>11.0f}" for r in rows) for k in names]
    return "\n".join(lines)


def _loaders(folder: Path, shards: Path, batch: int, workers: int):
    from torchvision import datasets as tvd
    from torchvision.transforms import v2

    from nin.data.shards import ShardLoader, open_shards
    from nin.data.stream import StreamLoader, finish_batch, open_folder

    ref_ds = tvd.ImageFolder(str(folder), transform=v2.Compose([v2.RandomResizedCrop(224), v2.RandomHorizontalFlip(),
                                                                 v2.ToImage()]))

    def reference():
        dl = torch.utils.data.DataLoader(ref_ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True)
        return ((x, y) for x, y in dl)

    def uint8_batches(loader):  # the loaders' uint8 batches, before the float conversion (as the reference's)
        def run():
            for item in loader._batches(0, 0):
                yield finish_batch(item, train=True, device=torch.device("cpu"), non_blocking=False)
        return run

    st = open_folder(folder)
    kw = dict(in_chans=3, size=(224, 224), transform="random-resized-crop", flip=True, shuffle=True,
              drop_last=True, workers=workers)
    nin_folder = StreamLoader(st.train, batch, **kw)
    sh = open_shards(f"wds:{shards}")
    nin_shards = ShardLoader(sh.train, batch, **kw)
    return {"torchvision reference": reference, "nin folder stream": uint8_batches(nin_folder),
            "nin wds shards": uint8_batches(nin_shards)}


def bench_transform(folder: Path, n: int = 200) -> dict:
    """ms per image on one core, in this process: nin's training transform (``transform_sample``, read +
    RandomResizedCrop 224 + flip) against the reference's (Pillow open + the v2 transforms), median of 5."""
    from PIL import Image
    from torchvision.transforms import v2

    from nin.data.stream import transform_sample

    files = sorted(folder.rglob("*.jpg"))[:n]
    ref = v2.Compose([v2.RandomResizedCrop(224), v2.RandomHorizontalFlip(), v2.ToImage()])

    def nin_all():
        for f in files:
            transform_sample(str(f), 3, (224, 224), "random-resized-crop", flip=True)

    def ref_all():
        for f in files:
            with open(f, "rb") as fh:
                ref(Image.open(fh).convert("RGB"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {"nin": timeit(nin_all, 1) / len(files), "reference": timeit(ref_all, 1) / len(files)}
    finally:
        torch.set_num_threads(threads)
    return out


def bench_throughput(folder: Path, shards: Path, rounds: int, batch: int = 64, workers: int = 2) -> dict:
    loaders = _loaders(folder, shards, batch, workers)
    rates = {k: [] for k in loaders}
    for _ in range(rounds):
        for name, make in loaders.items():
            t0 = time.perf_counter()
            n = sum(len(y) for _, y in make())
            rates[name].append(n / (time.perf_counter() - t0))
    return {k: {"median": statistics.median(v), "runs": [round(r, 1) for r in v]} for k, v in rates.items()}


MEMORY_CHILD = r"""
import os, sys, threading, time, json, torch
sys.path.insert(0, sys.argv[1])
mode, folder = sys.argv[2], sys.argv[3]
peak = {"total": 0, "parent": 0, "pss": 0}
def rss(pid, field="VmRSS", f="status"):
    try:
        with open(f"/proc/{pid}/{f}") as fh:
            return next(int(l.split()[1]) for l in fh if l.startswith(field)) * 1024
    except (OSError, StopIteration):
        return 0
def kids(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []
def poll():
    me = os.getpid()
    while True:
        p = rss(me)
        peak["parent"] = max(peak["parent"], p)
        ks = kids(me)
        peak["total"] = max(peak["total"], p + sum(rss(k) for k in ks))
        # PSS: each shared page divided among the processes sharing it (no double counting)
        peak["pss"] = max(peak["pss"], sum(rss(q, "Pss:", "smaps_rollup") for q in [me, *ks]))
        time.sleep(0.02)
threading.Thread(target=poll, daemon=True).start()
t0 = time.perf_counter()
first = None
n = 0
if mode == "train":  # `nin train` itself, a fixed number of steps: what differs is only the collection
    import nin.training.trainer as T
    real_step = T.train_step
    def timed_step(*a, **k):
        global first
        if first is None:
            first = time.perf_counter() - t0
        return real_step(*a, **k)
    T.train_step = timed_step
    from nin.cli import main
    steps = int(sys.argv[4])
    main(["train", "--dataset", "folder:" + folder, "--stream", "--model", "nin_fmnist", "--model-kwargs",
          '{"width": 8}', "--transform", "imagenet", "--crop-size", "224", "--batch-size", "64",
          "--eval-batch-size", "64", "--workers", "2",
          "--max-steps", str(steps), "--out", sys.argv[5], "--quiet"])
    n = steps * 64
    total = time.perf_counter() - t0
    time.sleep(0.05)
    print(json.dumps({"mode": mode, "images": n, "first_batch_s": first, "epoch_s": total,
                      "peak_rss_total_MB": peak["total"] / 2**20, "peak_rss_parent_MB": peak["parent"] / 2**20,
                      "peak_pss_total_MB": peak["pss"] / 2**20}))
    sys.exit(0)
if mode == "stream":
    from nin.data.stream import StreamLoader, open_folder
    ds = open_folder(folder)
    L = StreamLoader(ds.train, 64, in_chans=3, size=(224, 224), transform="random-resized-crop", flip=True,
                     shuffle=True, workers=2, mean=ds.mean, std=ds.std)
else:
    from nin.data import BatchLoader, load_dataset
    ds = load_dataset("folder:" + folder)
    L = BatchLoader(ds.train, 64, shuffle=True, resize=224, flip=True, mean=ds.mean, std=ds.std)
for x, y in L.iterate(0):
    if first is None:
        first = time.perf_counter() - t0
    n += len(y)
total = time.perf_counter() - t0
time.sleep(0.05)
print(json.dumps({"mode": mode, "images": n, "first_batch_s": first, "epoch_s": total,
                  "peak_rss_total_MB": peak["total"] / 2**20, "peak_rss_parent_MB": peak["parent"] / 2**20,
                  "peak_pss_total_MB": peak["pss"] / 2**20}))
"""


def bench_memory(base: Path, sizes: list[int], stream_only: bool = False, train_steps: int = 50) -> list[dict]:
    import tempfile

    from nin.data.stream import estimate_memory

    rows = []
    for n in sizes:
        folder = make_folder(base / f"jpeg{n}", n)
        modes = ["train", "stream", "memory"] if n == min(sizes) and not stream_only else ["train", "stream"]
        for mode in modes:
            with tempfile.TemporaryDirectory() as tmp:
                out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(ROOT / "src"), mode, str(folder),
                                      str(train_steps), str(Path(tmp) / "run")],
                                     capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            row["collection"] = n
            rows.append(row)
        rows.append({"mode": "memory (estimate, not run)", "collection": n,
                     "estimate_MB": estimate_memory(f"folder:{folder}") / 2**20})
    return rows


def markdown(result: dict, command: str) -> str:
    """The BENCHMARKS.md section of one run."""
    lines = ["### Streaming: your own images (`benchmarks/bench_stream.py`)", "",
             f"Command: `{command}`; {result['cpus']} CPU cores, torch {result['torch']}, {result['date']}.", ""]
    tp = result.get("throughput_img_per_s")
    if tp:
        ref = tp["torchvision reference"]["median"]
        lines += [f"Throughput: decoded + augmented 224x224 training images/s (RandomResizedCrop + flip, uint8 "
                  f"batches of 64, 2 workers, {result['images']:,} generated 256x256 JPEGs), alternating rounds, "
                  "median (runs):", "", "| loader | images/s | vs reference |", "|---|---:|---:|"]
        for name, v in tp.items():
            label = {"torchvision reference": "torchvision reference (`ImageFolder` + the same v2 transforms + "
                                              "`DataLoader`)"}.get(name, name)
            runs = ", ".join(f"{r:.0f}" for r in v["runs"])
            lines.append(f"| {label} | {v['median']:.0f} ({runs}) | {v['median'] / ref:.2f}x |")
        lines.append("")
    tr = result.get("transform_ms_per_image")
    if tr:
        lines += [f"Per image on one core, in one process (the training transform alone: read, RandomResizedCrop "
                  f"224, flip; median of 5 passes over 200 files): nin {tr['nin']:.2f} ms, the reference "
                  f"{tr['reference']:.2f} ms ({tr['reference'] / tr['nin']:.2f}x).", ""]
    mem = [r for r in result.get("memory", []) if "images" in r]
    if mem:
        what = {"train": "`nin train --stream` (fixed steps)", "stream": "StreamLoader, one epoch",
                "memory": "in memory (`load_dataset` + `BatchLoader`), one epoch"}
        lines += ["Memory and time to the first step (peak over the process and its workers; PSS splits shared "
                  "pages among their sharers, VmRSS summed counts them once per process):", "",
                  "| collection | path | images | first step | PSS total | VmRSS summed | VmRSS main process |",
                  "|---:|---|---:|---:|---:|---:|---:|"]
        for r in mem:
            lines.append(f"| {r['collection']:,} | {what.get(r['mode'], r['mode'])} | {r['images']:,} | "
                         f"{r['first_batch_s']:.1f} s | {r.get('peak_pss_total_MB', 0):,.0f} MB | "
                         f"{r['peak_rss_total_MB']:,.0f} MB | {r['peak_rss_parent_MB']:,.0f} MB |")
        by = {(r["mode"], r["collection"]): r for r in mem}
        sizes = sorted({r["collection"] for r in mem})
        for mode in ("train", "stream"):
            a, b = by.get((mode, sizes[0])), by.get((mode, sizes[-1]))
            if a and b and a is not b:
                lines.append(f"\n{what[mode]}: PSS total {sizes[-1]:,} vs {sizes[0]:,} images: "
                             f"{b['peak_pss_total_MB'] / a['peak_pss_total_MB'] - 1:+.1%}.")
        est = [r for r in result.get("memory", []) if "estimate_MB" in r]
        if est:
            lines.append("\nThe in-memory path would hold " + ", ".join(
                f"{r['estimate_MB']:,.0f} MB for {r['collection']:,} images" for r in est) + " (`estimate_memory`).")
    return "\n".join(lines).rstrip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=2000, help="JPEGs in the throughput folder (default 2000)")
    ap.add_argument("--rounds", type=int, default=3, help="A/B/C rounds of the throughput comparison")
    ap.add_argument("--decode-rounds", type=int, default=5, help="rounds of the decoder comparison (default 5)")
    ap.add_argument("--memory", default="5000,20000", help="collection sizes for the memory runs ('' to skip)")
    ap.add_argument("--work", default="/tmp/nin-bench-stream", help="where the generated collections go")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the JSON result")
    ap.add_argument("--stream-only", action="store_true", help="memory runs: leave out the in-memory path")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: decode, throughput, memory")
    ap.add_argument("--markdown", help="also write the BENCHMARKS.md section here")
    ap.add_argument("--train-steps", type=int, default=50, help="steps of the `nin train` memory runs (default 50)")
    args = ap.parse_args()
    work = Path(args.work)
    result = {"date": str(date.today()), "cpus": len(os.sched_getaffinity(0)), "torch": torch.__version__,
              "images": args.images}
    skip = set(filter(None, args.skip.split(",")))
    if "decode" not in skip:
        result["decode_img_per_s"] = bench_decode(args.decode_rounds)
        print(decode_table(result["decode_img_per_s"]))
    if "throughput" not in skip:
        folder = make_folder(work / f"jpeg{args.images}", args.images)
        shards = work / f"wds{args.images}"
        if not (shards / "index.json").exists():
            from nin.data.shards import pack
            pack(f"folder:{folder}", shards, shard_size=500)
        result["transform_ms_per_image"] = bench_transform(folder)
        result["throughput_img_per_s"] = bench_throughput(folder, shards, args.rounds)
        print(json.dumps(result["throughput_img_per_s"], indent=1))
    if "memory" not in skip and args.memory:
        result["memory"] = bench_memory(work, [int(s) for s in args.memory.split(",")], args.stream_only,
                                        args.train_steps)
        print(json.dumps(result["memory"], indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"stream-{result['date']}.json").write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        command = " ".join([".venv/bin/python benchmarks/bench_stream.py", *sys.argv[1:]])
        command = re.sub(r" --markdown \S+| --out \S+", "", command)
        Path(args.markdown).write_text(markdown(result, command) + "\n")


if __name__ == "__main__":
    main()
