"""Streaming folders and WebDataset shards: the same order, pixels and resume as the in-memory path,
disjoint equal rank shares (also across two torchrun "nodes"), bad files skipped and counted."""
import dataclasses
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nin.cli import main
from nin.data.loader import BatchLoader
from nin.data.datasets import load_dataset
from nin.data import make_loader, open_dataset
from nin.errors import DatasetError, ImageError
from nin.data.images import decode_image, load_image
from nin.data.stream import (FileSplit, PathArray, StreamLoader, choose_path, estimate_memory, open_folder, parse_size, write_bad_files)

SRC = Path(__file__).resolve().parents[1] / "src"


def id_folder(root: Path, n: int = 60, classes: int = 3, odd_sizes: bool = False) -> Path:
    """PNGs whose pixels spell their id: R = id % 256, G = id // 256, B = class * 40 (8 x 8)."""
    for i in range(n):
        c = i % classes
        d = root / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        size = (12, 6) if odd_sizes and i % 7 == 0 else (8, 8)
        a = np.zeros((size[1], size[0], 3), np.uint8)
        a[..., 0], a[..., 1], a[..., 2] = i % 256, i // 256, c * 40
        Image.fromarray(a).save(d / f"{i:04d}.png")
    return root


def photo_folder(root: Path, n: int = 24, classes: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / f"k{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        w, h = [(96, 64), (64, 80), (300, 200)][i % 3]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)
    return root


def ids_of(x: torch.Tensor) -> list[int]:
    """Sample ids from a float batch in [0, 1] (no normalisation) of id_folder images."""
    v = (x[:, :2, 0, 0].float() * 255).round().long()
    return (v[:, 0] + 256 * v[:, 1]).tolist()


# --- images ------------------------------------------------------------------------------------
def test_decode_image_reduced_jpeg_and_bad_files(tmp_path):
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (400, 600, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "big.jpg", quality=95)
    full = decode_image(tmp_path / "big.jpg", 3)
    assert full.shape == (3, 400, 600) and full.dtype == torch.uint8
    pil = torch.from_numpy(np.array(load_image(tmp_path / "big.jpg").convert("RGB"))).permute(2, 0, 1)
    assert (full.int() - pil.int()).abs().float().mean() < 2  # TorchCodec and Pillow: both libjpeg-turbo
    small = decode_image(tmp_path / "big.jpg", 3, min_size=(100, 90))  # a 4x reduction is allowed
    assert small.shape == (3, 100, 150)
    assert decode_image(tmp_path / "big.jpg", 1).shape == (1, 400, 600)
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "big.jpg").read_bytes()[:3000])
    with pytest.raises(ImageError, match="cut.jpg"):
        decode_image(tmp_path / "cut.jpg", 3)


def test_full_scale_jpeg_decode_matches_pillow_without_a_deprecated_decoder(tmp_path):
    # guards: torchvision.io's decoders (deprecated since 0.29) warning on every image; the TorchCodec path
    # forgetting EXIF orientation, grey or invert that Pillow's path (load_image + to_channels) applies
    import importlib.util
    import warnings

    from nin.data import images

    if importlib.util.find_spec("torchcodec"):
        assert images._jpeg_decoder() is not None  # installed, so it must load with this torch
    yy, xx = np.mgrid[0:60, 0:100]
    a = np.stack([xx * 2, yy * 3, 128 + 60 * np.sin(xx / 9)], -1).astype(np.uint8)
    for orientation in (1, 6):
        im = Image.fromarray(a)
        exif = im.getexif()
        exif[0x0112] = orientation
        im.save(tmp_path / "o.jpg", quality=95, exif=exif.tobytes())
        for in_chans in (1, 3):
            for invert in (False, True):
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    x = decode_image(tmp_path / "o.jpg", in_chans, invert=invert)
                ref = np.array(images.to_channels(load_image(tmp_path / "o.jpg"), in_chans, invert=invert))
                ref = torch.from_numpy(ref[..., None] if ref.ndim == 2 else ref).permute(2, 0, 1)
                assert x.shape == ref.shape == ((in_chans, 100, 60) if orientation == 6 else (in_chans, 60, 100))
                assert (x.int() - ref.int()).abs().float().mean() < 1  # grey: libjpeg's Y vs Pillow's luma


def test_path_array_holds_names_in_two_arrays():
    names = [f"/data/class {i}/é{i}.jpg" for i in range(50)]
    pa = PathArray(names)
    assert isinstance(pa.blob, np.ndarray) and isinstance(pa.offsets, np.ndarray)
    assert [pa[i] for i in range(50)] == names
    assert [pa.head(7)[i] for i in range(7)] == names[:7] and len(pa.head(7)) == 7


# --- the folder loader ----------------------------------------------------------------------------
def test_fit_stream_equals_the_in_memory_loader(tmp_path):
    """The "fit" transform reproduces BatchLoader bit for bit: order, letterbox, crop, flip, mean/std."""
    root = id_folder(tmp_path / "f", odd_sizes=True)
    mem = load_dataset(f"folder:{root}", seed=3)
    st = open_folder(root, seed=3)
    assert st.classes == mem.classes and st.image_size == mem.image_size and len(st.train) == len(mem.train)
    common = dict(shuffle=True, seed=5, crop_padding=2, flip=True, mean=mem.mean, std=mem.std)
    a = BatchLoader(mem.train, 8, **common)
    b = StreamLoader(st.train, 8, in_chans=3, size=(8, 8), workers=2, **common)
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a.iterate(2), b.iterate(2)):
        assert torch.equal(ya, yb) and torch.allclose(xa, xb, atol=1e-6)
    assert torch.equal(a.epoch_indices(2), b.epoch_indices(2))


def test_imagenet_transforms_resume_and_workers(tmp_path):
    root = photo_folder(tmp_path / "p")
    ds = open_dataset(f"folder:{root}", stream=True)
    kw = dict(in_chans=3, size=(32, 32), transform="random-resized-crop", flip=True, shuffle=True, seed=1)
    one = StreamLoader(ds.train, 5, workers=0, **kw)
    two = StreamLoader(ds.train, 5, workers=2, **kw)
    a = [(x.clone(), y.clone()) for x, y in one.iterate(4)]
    b = list(two.iterate(4))
    assert len(a) == len(one) == 4 and a[0][0].shape == (5, 3, 32, 32)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))  # worker count: same
    tail = list(two.iterate(4, start_batch=2))
    assert all(torch.equal(p[0], q[0]) for p, q in zip(a[2:], tail)) and len(tail) == 2  # exact resume
    assert not torch.equal(a[0][0], next(one.iterate(5))[0])  # another epoch, other crops
    ev = make_loader(ds.test, 4, in_chans=3, size=(32, 32), transform="resize-center-crop", workers=0)
    assert sum(len(y) for _, y in ev.iterate(0)) == len(ds.test)


def test_ranks_take_disjoint_equal_shares(tmp_path):
    st = open_folder(id_folder(tmp_path / "f", n=50), seed=0)
    seen, steps = [], []
    for r in range(3):
        stream_loader = StreamLoader(st.train, 4, in_chans=3, size=(8, 8), shuffle=True, seed=2, drop_last=True, rank=r,
                         world_size=3, workers=0)
        ids = [i for x, _ in stream_loader.iterate(1) for i in ids_of(x)]
        steps.append(len(stream_loader))
        seen.append(ids)
    assert len(set(steps)) == 1 and all(len(s) == steps[0] * 4 for s in seen)
    flat = [i for s in seen for i in s]
    assert len(flat) == len(set(flat))


def test_bad_files_are_skipped_counted_listed_and_capped(tmp_path):
    root = id_folder(tmp_path / "f", n=60)
    (root / "c0" / "0000.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (root / "c1" / "0001.png").write_bytes(b"")
    st = open_folder(root, seed=0)
    listed = []
    stream_loader = StreamLoader(st.train, 8, in_chans=3, size=(8, 8), shuffle=True, max_bad=0.05, workers=2,
                     on_bad=lambda bad: listed.append(list(bad)))
    batches = list(stream_loader.iterate(0))
    assert all(len(y) == 8 for _, y in batches[:-1])  # a bad image's slot went to another of its batch
    n_bad_train = sum(1 for p, _ in stream_loader.bad_files)
    assert n_bad_train == len({"0000.png", "0001.png"} & {Path(st.train.paths[i]).name for i in range(len(st.train))})
    if n_bad_train:
        assert listed and listed[-1] == stream_loader.bad_files
        write_bad_files(tmp_path / "bad_files.txt", stream_loader.bad_files)
        write_bad_files(tmp_path / "bad_files.txt", stream_loader.bad_files)  # kept once
        lines = (tmp_path / "bad_files.txt").read_text().splitlines()
        assert len(lines) == n_bad_train and all("\t" in line for line in lines)
    all_files = FileSplit(PathArray([*(st.train.paths[i] for i in range(len(st.train))),
                                     *(st.test.paths[i] for i in range(len(st.test)))]),
                          np.concatenate([st.train.labels, st.test.labels]))
    ev = StreamLoader(all_files, 10, in_chans=3, size=(8, 8), workers=0, max_bad=0.05)
    assert sum(len(y) for _, y in ev.iterate(0)) == 58  # evaluation leaves the two out
    strict = StreamLoader(all_files, 10, in_chans=3, size=(8, 8), workers=0, max_bad=0.01)
    with pytest.raises(DatasetError, match=r"1 of 60 images could not be read.*--max-bad 0.01 allows \(0\).*0000.png"):
        list(strict.iterate(0))


def test_choose_path_and_sizes(tmp_path):
    root = id_folder(tmp_path / "f", n=30)
    need = estimate_memory(f"folder:{root}")
    assert need == 30 * (8 * 8 * 3 * 2)
    assert choose_path(f"folder:{root}", need) == "memory"
    assert choose_path(f"folder:{root}", need - 1) == "stream"
    assert choose_path("fashion-mnist") == "memory" and choose_path("wds:/x") == "stream"
    assert parse_size("8G") == 8 << 30 and parse_size("512m") == 512 << 20 and parse_size("1.5KiB") == 1536
    assert type(open_dataset(f"folder:{root}", memory_budget="100")).__name__ == "StreamDataset"
    assert type(open_dataset(f"folder:{root}")).__name__ == "Dataset"


# --- shards -------------------------------------------------------------------------------------
import webdataset  # noqa: E402,F401  (the `stream` extra; a missing one fails here, never skips)


def test_pack_and_read_shards(tmp_path, capsys):
    root = id_folder(tmp_path / "f", n=61)
    out = tmp_path / "shards"
    assert main(["data", "pack", f"folder:{root}", "--out", str(out), "--shard-size", "10"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["classes"] == ["c0", "c1", "c2"] and index["in_chans"] == 3
    tr = index["splits"]["train"]
    assert tr["count"] == 49 and [s["count"] for s in tr["shards"]] == [10, 10, 10, 10, 9]
    assert sorted(os.listdir(out)) == ["index.json", *(f"train-{i:06d}.tar" for i in range(5)), "val-000000.tar",
                                       "val-000001.tar"]
    assert main(["data", "info", f"wds:{out}"]) == 0
    assert re.search(r"total\s+49\s+12", capsys.readouterr().out)
    ds = open_dataset(f"wds:{out}")
    stream_loader = make_loader(ds.train, 8, in_chans=3, size=(8, 8), shuffle=True, seed=4, workers=2)
    a = [(x.clone(), y.clone()) for x, y in stream_loader.iterate(1)]
    ids = [i for x, _ in a for i in ids_of(x)]
    mem_train = open_folder(root, seed=0)
    want = sorted(int(Path(mem_train.train.paths[i]).stem) for i in range(len(mem_train.train)))
    assert sorted(ids) == want  # one epoch covers the train split once
    labels = torch.cat([y for _, y in a])
    assert torch.equal(labels, torch.tensor([i % 3 for i in ids]))
    tail = list(stream_loader.iterate(1, start_batch=3))
    assert len(tail) == len(a) - 3 and all(torch.equal(p[0], q[0]) for p, q in zip(a[3:], tail))
    assert ids != [i for x, _ in stream_loader.iterate(2) for i in ids_of(x)]  # each epoch its own order
    ev = make_loader(ds.test, 5, in_chans=3, size=(8, 8), workers=2)
    assert sorted(i for x, _ in ev.iterate(0) for i in ids_of(x)) == sorted(
        int(Path(mem_train.test.paths[i]).stem) for i in range(len(mem_train.test)))


def test_brace_patterns_and_limit_train_on_shards(tmp_path, capsys):
    root = id_folder(tmp_path / "f", n=61)
    out = tmp_path / "shards"
    assert main(["data", "pack", f"folder:{root}", "--out", str(out), "--shard-size", "10"]) == 0
    full = open_dataset(f"wds:{out}")

    def ids(split, **kw):
        return [i for x, _ in make_loader(split, 7, in_chans=3, size=(8, 8), workers=0, **kw).iterate(0)
                for i in ids_of(x)]
    every = ids(full.train)  # shard order of the index, unshuffled: shard k holds every[10k:10k+10]
    picked = open_dataset(f"wds:{out}/train-{{000001..000002}}.tar")
    assert len(picked.train) == 20 and picked.classes == full.classes and len(picked.test) == len(full.test)
    assert ids(picked.train) == every[10:30]
    head = full.train.head(25)
    assert head.counts.tolist() == [10, 10, 5] and ids(head) == every[:25]
    assert sorted(ids(head, shuffle=True, seed=3)) == sorted(every[:25])  # shuffled: the same 25, once each
    assert len(full.train.head(1000)) == 49
    with pytest.raises(DatasetError, match=r"not training shards .* val-000000.tar"):
        open_dataset(f"wds:{out}/{{train-000000,val-000000}}.tar")
    run = tmp_path / "run"
    assert main(["train", "--dataset", f"wds:{out}/train-{{000000..000001}}.tar", "--limit-train", "12",
                 "--model", "nin_fmnist", "--resize", "28", "--epochs", "1", "--batch-size", "4", "--out", str(run)]) == 0
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["images"] == 12


def test_unequal_shards_give_equal_steps_per_rank(tmp_path):
    root = id_folder(tmp_path / "f", n=70)
    out = tmp_path / "s"
    main(["data", "pack", f"folder:{root}", "--out", str(out), "--shard-size", "13"])
    ds = open_dataset(f"wds:{out}")  # 56 train samples in shards of 13, 13, 13, 13, 4
    seen, lens = [], set()
    for r in range(3):
        stream_loader = make_loader(ds.train, 4, in_chans=3, size=(8, 8), shuffle=True, seed=1, drop_last=True, rank=r,
                        world_size=3, workers=2)
        ids = [i for x, _ in stream_loader.iterate(0) for i in ids_of(x)]
        lens.add((len(stream_loader), len(ids)))
        assert ids == stream_loader.epoch_indices(0).tolist() or len(set(ids)) == len(ids)
        seen += ids
    assert lens == {(4, 16)} and len(seen) == len(set(seen))


NODE = textwrap.dedent("""
    import json, os, sys, torch, torch.distributed as dist
    from nin.data import make_loader, open_dataset
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = {}
    for name in sys.argv[1:3]:
        ds = open_dataset(name, stream=True)
        L = make_loader(ds.train, 4, in_chans=3, size=(8, 8), shuffle=True, seed=7, drop_last=True, rank=rank,
                        world_size=world, workers=1)
        ids = []
        for x, _ in L.iterate(1):
            v = (x[:, :2, 0, 0] * 255).round().long()
            ids += (v[:, 0] + 256 * v[:, 1]).tolist()
            dist.all_reduce(torch.ones(1))  # a collective per step: unequal step counts would hang here
        out[name] = {"steps": len(L), "ids": ids}
    json.dump(out, open(sys.argv[3] + f"/node{os.environ['GROUP_RANK']}.json", "w"))
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_two_torchrun_nodes_read_disjoint_covering_shares(tmp_path):
    root = id_folder(tmp_path / "f", n=54)
    out = tmp_path / "s"
    main(["data", "pack", f"folder:{root}", "--out", str(out), "--shard-size", "7"])  # 43 train: 7 x 6 + 1
    (tmp_path / "node.py").write_text(NODE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--node-rank", str(r), "--master-addr", "127.0.0.1", "--master-port", str(port),
                               str(tmp_path / "node.py"), f"wds:{out}", f"folder:{root}", str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stdout.read().decode()[-2000:]
    nodes = [json.loads((tmp_path / f"node{r}.json").read_text()) for r in range(2)]
    for name, n_train in ((f"wds:{out}", 43), (f"folder:{root}", 43)):
        a, b = (n[name] for n in nodes)
        assert a["steps"] == b["steps"] == 43 // 2 // 4
        assert len(a["ids"]) == len(b["ids"]) == a["steps"] * 4
        assert not set(a["ids"]) & set(b["ids"])  # disjoint
    # covering: with batch 1 nothing but the world-size remainder is left out (checked in one process)
    ds = open_dataset(f"wds:{out}")
    got = []
    for r in range(2):
        stream_loader = make_loader(ds.train, 1, in_chans=3, size=(8, 8), shuffle=True, seed=7, drop_last=True, rank=r,
                        world_size=2, workers=0)
        got += [i for x, _ in stream_loader.iterate(1) for i in ids_of(x)]
    assert len(got) == len(set(got)) == 42


def test_train_end_to_end_from_stream_and_shards(tmp_path):
    root = photo_folder(tmp_path / "p", n=40)
    out = tmp_path / "s"
    main(["data", "pack", f"folder:{root}", "--out", str(out), "--shard-size", "8"])
    for dataset in (f"folder:{root}", f"wds:{out}"):
        assert main(["train", "--dataset", dataset, "--stream", "--model", "nin_imagenet", "--transform", "imagenet",
                     "--crop-size", "64", "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / dataset[:3])]) == 0
        run = tmp_path / dataset[:3]
        assert json.loads((run / "config.json").read_text())["data_path"] == "stream"
        meta = json.loads((run / "model.json").read_text())
        assert meta["input_size"] == [3, 64, 64] and meta["preprocess"]["transform"] == "imagenet"
        assert (run / "best.safetensors").exists()


def test_imagenet_run_predicts_and_evaluates_as_its_test_loader(tmp_path, capsys):
    """A --transform imagenet run's model.json says so, and `nin predict`, `nin eval` and `nin cam --grid`
    read its images by resize + centre crop, the test loader's own path, not the letterbox of 28x28 models."""
    from torchvision.transforms import v2

    from nin.evaluation import evaluate, streamed_test_batches
    from nin.inference import predict_logits
    from nin.hub import load
    from nin.data.images import read_input
    from nin.prediction import probabilities

    root = photo_folder(tmp_path / "p", n=40)
    run = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{root}", "--stream", "--model", "nin_fmnist", "--transform", "imagenet",
                 "--crop-size", "32", "--epochs", "1", "--batch-size", "8", "--out", str(run)]) == 0
    model = load(run)
    assert model.meta.preprocess["transform"] == "imagenet" and model.meta.input_size == [3, 32, 32]
    # the prediction reader against torchvision's reference: Resize(32 / 0.875) + CenterCrop(32)
    yy, xx = np.mgrid[0:200, 0:300]
    smooth = np.stack([xx * 0.8, yy * 1.2, 128 + 100 * np.sin(xx / 20) * np.cos(yy / 15)], -1).astype(np.uint8)
    big = tmp_path / "smooth.jpg"
    Image.fromarray(smooth).save(big, quality=95)
    ref = v2.CenterCrop(32)(v2.Resize(37, antialias=True)(torch.from_numpy(np.array(Image.open(big))).permute(2, 0, 1)))
    x = torch.from_numpy(read_input(model.meta, big))
    assert x.shape == (3, 32, 32)
    assert (x.float() - ref.float()).abs().mean() < 4.0  # sub-pixel crop offsets and filters only
    fit = torch.from_numpy(read_input(dataclasses.replace(model.meta, preprocess={}), big))
    assert (fit.float() - ref.float()).abs().mean() > 10  # the letterbox is another picture
    # random weights make every image's logits differ; prediction and evaluation must see the same pixels
    torch.manual_seed(0)
    for m in model.modules():  # fresh He-initialised weights: one epoch on noise barely moves the logits
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.reset_parameters()
    ds = open_dataset(f"folder:{root}", stream=True)
    xs, ys = zip(*streamed_test_batches(model, ds, batch_size=5)[0])
    from_loader = predict_logits(model, torch.cat(xs), tta="none")
    files = torch.stack([torch.from_numpy(read_input(model.meta, ds.test.paths[i])) for i in range(len(ds.test))])
    assert from_loader.std(0).max() > 1e-3
    torch.testing.assert_close(predict_logits(model, files, tta="none"), from_loader, rtol=0, atol=0)
    torch.testing.assert_close(probabilities(model, files, tta="none"), from_loader.softmax(1))
    result = evaluate(model, streamed_test_batches(model, ds, batch_size=3)[0], tta="none")
    assert result.n == len(ds.test) and result.confusion.trace() == int((from_loader.argmax(1) == torch.cat(ys)).sum())
    # the CLI: eval reports the run's own test accuracy; the cam grid reads the same images
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)["accuracy"]
    last = (run / "metrics.csv").read_text().splitlines()[-1].split(",")
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert acc == pytest.approx(float(last[header.index("test_acc")]), abs=1e-9)
    assert main(["cam", str(run), "--grid", "4", "--out", str(tmp_path / "grid.png")]) == 0
    assert Image.open(tmp_path / "grid.png").size[0] > 100
    # export checks onnxruntime against torch on real test images read the same way; the .onnx evaluates alike
    capsys.readouterr()
    assert main(["export", str(run), "--out", str(tmp_path / "m.onnx")]) == 0
    assert re.search(r"on \d+ real test images", capsys.readouterr().out)
    accs = []
    for target in (run, tmp_path / "m.onnx"):
        assert main(["eval", str(target), "--precision", "fp32", "--json"]) == 0
        accs.append(json.loads(capsys.readouterr().out)["accuracy"])
    assert accs[0] == accs[1]


def test_alternating_flip_is_refused_for_a_streamed_collection(tmp_path, capsys):
    root = id_folder(tmp_path / "ids", n=12)
    run = tmp_path / "run"
    assert main(["train", "--dataset", f"folder:{root}", "--stream", "--flip", "--alt-flip", "--epochs", "1",
                 "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "--alt-flip needs the images in memory" in err and "Traceback" not in err
    assert not (run / "best.safetensors").exists()
