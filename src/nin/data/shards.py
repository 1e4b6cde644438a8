"""WebDataset tar shards: ``nin data pack`` writes them, ``--dataset wds:DIR`` trains from them.

A shard is a plain tar of samples (``00000042.jpg`` + ``00000042.cls`` + ``00000042.path``), the format
the field uses for collections on shared or object storage; ``index.json`` beside the shards lists the
classes, the samples per shard, sizes, channels, mean and std.  The ``webdataset`` package (pinned,
``pip install 'nin[stream]'``) writes and reads the tars, and is imported only here, only when used.

How an epoch is cut (``ShardLoader``), so that ranks are disjoint, cover the epoch and take equal steps
even when shards differ in size: the shards are put in an order drawn from (seed, epoch) and read as one
sequence of samples; rank r takes the r-th of ``world_size`` equal contiguous spans of that sequence (the
last ``N mod world_size`` samples are left out, as in the in-memory path); its span is cut into one
contiguous piece per DataLoader worker, whole batches each, and worker l's batches are the epoch's
batches l, l + W, l + 2W ... (the order in which DataLoader collects them).  Each worker reads its piece
front to back (at most two partial shards) through a shuffle buffer seeded from (seed, epoch, rank, l).
``webdataset.split_by_node`` / ``split_by_worker`` split shard *lists* instead, which gives ranks unequal
sample counts when shards differ (DDP then hangs at the epoch's end); its ``resampled`` + ``with_epoch``
fix samples with replacement.  Here every sample is read once per epoch, and the order depends on the
worker count: resume with the same ``--workers``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetError, ImageError, NinError, UsageError
from .stream import MAX_BAD, StreamDataset, StreamLoader, _BadFiles, decode_batch, open_folder, worker_init

__all__ = ["pack", "open_shards", "ShardSplit", "ShardLoader", "INDEX"]

INDEX = "index.json"
FORMAT = "nin-webdataset-1"
SHUFFLE_BUFFER = 1000  # samples held by each worker's shuffle buffer (raw bytes: ~100 MB of ImageNet JPEGs)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tiff", "tif", "ppm", "pgm")


def _wds():
    try:
        import webdataset
    except ImportError:
        raise UsageError("wds: datasets and `nin data pack` need the webdataset package: "
                         "pip install 'nin[stream]' (webdataset==1.0.2)") from None
    return webdataset


# --- writing -------------------------------------------------------------------------------------
SHARD_NAME = re.compile(r"(train|val)-\d{6}\.tar")  # the shard files pack writes


def _own_files(out: Path) -> list[Path]:
    """The files of an earlier pack in ``out``: its shards (by name, and those its index.json lists),
    index.json, and what a killed pack left (temp files of those names, its staging folders)."""
    own = set()
    try:
        old = json.loads((out / INDEX).read_text(encoding="utf-8"))
        for split in old["splits"].values():
            for s in split["shards"]:
                name = str(s["file"])
                if Path(name).name == name:  # a plain name in this folder, never a path elsewhere
                    own.add(out / name)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no index, or not one of ours: the shard names alone say what is ours
    for p in out.iterdir():
        n = p.name
        if (SHARD_NAME.fullmatch(n) or n == INDEX
                or (n.startswith(".") and n.endswith(".tmp") and (n.startswith(f".{INDEX}.") or ".tar." in n))
                or (n.startswith(".pack-") and p.is_dir())):
            own.add(p)
    return sorted(own)


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a folder that holds anything, unless ``overwrite`` (then only pack's own files
    go, after the new ones are written)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file, not a folder")
    if overwrite or not out.is_dir():
        return
    try:
        entries = sorted(p.name for p in out.iterdir())
    except OSError as e:
        raise UsageError(f"--out {out}: cannot read the folder ({e.strerror or e})") from None
    if entries:
        ours = any(SHARD_NAME.fullmatch(n) or n == INDEX for n in entries)
        raise UsageError(f"--out {out}: the folder is not empty ({len(entries)} entries, e.g. {entries[0]}"
                         f"{'; an earlier pack' if ours else ''}); choose a new or empty folder, or give "
                         "--overwrite to replace an earlier pack's shards and index.json (other files are kept)")


def pack(dataset: str, out: str | os.PathLike, *, shard_size: int = 1000, seed: int = 0, overwrite: bool = False,
         log=print) -> dict:
    """Write ``folder:PATH`` as ``train-000000.tar ...`` and ``val-000000.tar ...`` in ``out`` plus
    ``index.json``; returns the index.  The split is the in-memory path's (``folder_split`` with ``seed``);
    training samples are written in an order drawn from ``seed`` so every shard mixes the classes.  The
    image files' bytes are stored as they are (no re-encoding); a file whose header cannot be read is
    left out and listed in the index's ``bad_files``.

    ``out`` must be new or empty (UsageError otherwise), unless ``overwrite``: then the shards and
    index.json of an earlier pack there are replaced, and other files kept.  Everything is written in a
    staging folder inside ``out`` first, so a pack that fails leaves an earlier one intact; the new
    files then replace the old ones, index.json last (a pack killed during that leaves no index, never
    one that lists other shards)."""
    import shutil
    import tempfile

    from ..fsutil import atomic_write
    from .images import image_header

    wds = _wds()
    if not dataset.startswith("folder:"):
        raise UsageError(f"nin data pack reads folder:PATH, not {dataset!r}")
    if shard_size < 1:
        raise UsageError(f"--shard-size must be >= 1, got {shard_size}")
    out = Path(out)
    _check_out(out, overwrite)
    ds = open_folder(dataset.removeprefix("folder:"), seed)
    try:
        out.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".pack-", suffix=".tmp", dir=out))
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write the folder ({e.strerror or e})") from None
    try:
        index = _write_all(wds, ds, stage, shard_size, seed, atomic_write, image_header, log)
        old = _own_files(out)
        (out / INDEX).unlink(missing_ok=True)  # first: no index ever lists a mix of old and new shards
        new = {s["file"] for split in index["splits"].values() for s in split["shards"]}
        for p in old:  # an earlier pack's files that the new one does not replace (stale shards, leftovers)
            if p != stage and p.name not in new and p.name != INDEX:
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        for name in sorted(new) + [INDEX]:
            os.replace(stage / name, out / name)
    except OSError as e:
        raise NinError(f"{out}: cannot write the shards ({e.strerror or e})") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if index["bad_files"]:
        log(f"left out {len(index['bad_files'])} unreadable file(s), listed in {out / INDEX} (bad_files)")
    return index


def _write_all(wds, ds, out: Path, shard_size: int, seed: int, atomic_write, image_header, log) -> dict:
    """Write the shards and index.json of ``ds`` in ``out``; returns the index."""
    root = Path(ds.source)
    order = {"train": torch.randperm(len(ds.train), generator=torch.Generator().manual_seed(seed)).numpy(),
             "val": np.arange(len(ds.test))}
    splits, bad = {}, []
    for name, split in (("train", ds.train), ("val", ds.test)):
        shards, n_written = [], 0
        samples, per_class = [], [0] * len(ds.classes)
        for i in order[name]:
            path = split.paths[int(i)]
            try:
                image_header(path)
                data = Path(path).read_bytes()
            except (ImageError, OSError) as e:
                bad.append([str(Path(path).relative_to(root)), str(e).removeprefix(f"{path}: ")])
                continue
            ext = Path(path).suffix.lower().lstrip(".").replace("jpeg", "jpg")
            samples.append({"__key__": f"{n_written:08d}", ext: data, "cls": str(int(split.labels[i])).encode(),
                            "path": str(Path(path).relative_to(root)).encode()})
            n_written += 1
            per_class[int(split.labels[i])] += 1
            if len(samples) == shard_size:
                shards.append(_write_shard(wds, out, name, len(shards), samples, atomic_write))
                samples = []
        if samples or not shards:
            shards.append(_write_shard(wds, out, name, len(shards), samples, atomic_write))
        splits[name] = {"count": sum(s["count"] for s in shards), "bytes": sum(s["bytes"] for s in shards),
                        "per_class": per_class, "shards": shards}
        log(f"{name}: {splits[name]['count']:,} images in {len(shards)} shard(s), {splits[name]['bytes'] / 1e6:.1f} MB")
    index = {"format": FORMAT, "classes": ds.classes, "source": ds.source, "split": ds.split, "seed": seed,
             "shard_size": shard_size, "in_chans": ds.in_chans, "native_size": list(ds.native_size),
             "mean": list(ds.mean), "std": list(ds.std), "splits": splits, "bad_files": bad}
    atomic_write(out / INDEX, lambda tmp: Path(tmp).write_text(json.dumps(index, indent=1) + "\n"))
    return index


def _write_shard(wds, out: Path, split: str, number: int, samples: list, atomic_write) -> dict:
    name = f"{split}-{number:06d}.tar"

    def write(tmp):
        with wds.TarWriter(tmp, encoder=False) as tw:
            for s in samples:
                tw.write(s)
    atomic_write(out / name, write)  # a killed pack never leaves a torn shard under its final name
    return {"file": name, "count": len(samples), "bytes": (out / name).stat().st_size}


# --- reading -------------------------------------------------------------------------------------
class ShardSplit:
    """A split as shards: ``urls`` (paths or anything webdataset's gopen opens) and samples per shard."""

    def __init__(self, urls: list[str], counts: list[int], per_class: list[int] | None = None) -> None:
        self.urls, self.counts = list(urls), np.asarray(counts, dtype=np.int64)
        self.per_class = per_class  # samples per class, from the index
        self.starts = np.concatenate([[0], np.cumsum(self.counts)])  # global id of each shard's first sample

    def __len__(self) -> int:
        return int(self.starts[-1])

    def head(self, n: int) -> "ShardSplit":
        """The first ``n`` samples in the index's shard order (--limit-train): whole shards, the last one cut."""
        k = int(np.searchsorted(self.starts, min(n, len(self)), side="left"))  # shards 0..k-1 hold them
        counts = [int(c) for c in self.counts[:k]]
        if k:
            counts[-1] = min(n, len(self)) - int(self.starts[k - 1])
        return ShardSplit(self.urls[:k], counts)


def open_shards(spec: str) -> StreamDataset:
    """``wds:DIR`` (or ``wds:DIR/index.json``) -> a StreamDataset whose splits are ``ShardSplit``s.

    ``wds:DIR/train-{000000..000009}.tar`` (a brace pattern, webdataset's notation) trains on the named
    training shards only; the index beside them gives their sizes, the classes and the val shards."""
    path = spec.removeprefix("wds:")
    pattern = None
    if "{" in path:
        pattern, path = Path(path).name, str(Path(path).parent)
        if "{" in path:
            raise UsageError(f"--dataset {spec}: a brace pattern names shard files in one folder "
                             "(wds:DIR/train-{000000..000009}.tar)")
    path = Path(path).expanduser().resolve()
    index_path = path if path.suffix == ".json" else path / INDEX
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{index_path}: no shard index here (write shards with `nin data pack folder:PATH "
                           f"--out DIR`)") from None
    except (OSError, ValueError) as e:
        raise DatasetError(f"{index_path}: not a readable shard index ({e})") from None
    try:
        if index.get("format") != FORMAT:
            raise KeyError("format")
        splits = {}
        for name in ("train", "val"):
            shards = index["splits"][name]["shards"]
            urls = [str(index_path.parent / s["file"]) for s in shards]
            missing = [u for u in urls if not Path(u).is_file()]
            if missing:
                raise DatasetError(f"{index_path}: {len(missing)} shard(s) listed are missing, e.g. {missing[0]}")
            splits[name] = ShardSplit(urls, [int(s["count"]) for s in shards],
                                      index["splits"][name].get("per_class"))
        if pattern is not None:
            splits["train"] = _select(splits["train"], pattern, index_path, spec)
        ds = StreamDataset(f"wds:{index_path.parent}", splits["train"], splits["val"], list(index["classes"]),
                           tuple(index["mean"]), tuple(index["std"]), str(index_path.parent), int(index["in_chans"]),
                           tuple(index["native_size"]), index.get("split"))
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{index_path}: not a nin shard index (field {e} missing or malformed)") from None
    return ds


def _select(split: ShardSplit, pattern: str, index_path: Path, spec: str) -> ShardSplit:
    """The training shards a brace pattern names, in the index's order (each named shard must be one)."""
    _wds()  # the clean error when the extra is missing
    import braceexpand  # webdataset's own dependency

    names = list(braceexpand.braceexpand(pattern))
    by_name = {Path(u).name: i for i, u in enumerate(split.urls)}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise DatasetError(f"--dataset {spec}: {len(unknown)} named shard(s) are not training shards in "
                           f"{index_path}, e.g. {unknown[0]}")
    keep = sorted({by_name[n] for n in names})
    return ShardSplit([split.urls[i] for i in keep], [int(split.counts[i]) for i in keep])


def _shuffled(n: int, bufsize: int, rng: np.random.Generator) -> np.ndarray:
    """The order a shuffle buffer of ``bufsize`` emits a stream of n items in (positions 0..n-1)."""
    out, buf = np.empty(n, dtype=np.int64), []
    k = 0
    for i in range(n):
        if len(buf) < bufsize:
            buf.append(i)
            continue
        j = int(rng.integers(len(buf)))
        out[k], buf[j] = buf[j], i
        k += 1
    rest = np.array(buf, dtype=np.int64)[rng.permutation(len(buf))] if buf else np.empty(0, np.int64)
    out[k:] = rest
    return out


class ShardLoader(StreamLoader):
    """``StreamLoader``'s interface over a ``ShardSplit`` (see the module doc for how an epoch is cut)."""

    def __init__(self, split: ShardSplit, batch_size: int, *, shuffle_buffer: int = SHUFFLE_BUFFER, **kw) -> None:
        super().__init__(split, batch_size, **kw)
        self.shuffle_buffer = shuffle_buffer
        self._bad = _BadFiles(len(split), kw.get("max_bad", MAX_BAD), kw.get("on_bad"))

    def _plan(self, epoch: int):
        """[(logical worker, [(shard, first member, count)], sample ids in emitted order)] for this rank."""
        n, world, bs = len(self.split), self.world_size, self.batch_size
        sizes = [n // world] * world if self.drop_last else [len(range(r, n, world)) for r in range(world)]
        begin = sum(sizes[:self.rank])
        steps = len(self)
        used = steps * bs if self.drop_last else sizes[self.rank]
        if self.shuffle:
            shard_order = torch.randperm(len(self.split.urls),
                                         generator=torch.Generator().manual_seed(self.seed + 1000003 * epoch)).numpy()
        else:
            shard_order = np.arange(len(self.split.urls))
        seq_ids = np.concatenate([np.arange(self.split.starts[s], self.split.starts[s + 1]) for s in shard_order]
                                 + [np.empty(0, np.int64)])
        seq_shard = np.concatenate([np.full(self.split.counts[s], s) for s in shard_order] + [np.empty(0, np.int64)])
        workers = max(1, self.workers)
        plan, pos = [], begin
        for lw in range(workers):
            mine = list(range(lw, steps, workers))
            count = sum(min(bs, used - b * bs) for b in mine)
            ids, shards = seq_ids[pos:pos + count], seq_shard[pos:pos + count]
            pieces = []
            for s in dict.fromkeys(shards.tolist()):
                first = int(ids[shards == s][0] - self.split.starts[s])
                pieces.append((int(s), first, int((shards == s).sum())))
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch, self.rank, lw])
                ids = ids[_shuffled(count, self.shuffle_buffer, rng)]
            plan.append((lw, pieces, ids, mine))
            pos += count
        return plan

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """The global sample ids (shard order of index.json) this rank sees in ``epoch``, batch by batch."""
        plan, bs = self._plan(epoch), self.batch_size
        out = [None] * len(self)
        for _, _, ids, mine in plan:
            for k, b in enumerate(mine):
                out[b] = ids[k * bs:(k + 1) * bs]
        return torch.from_numpy(np.concatenate(out + [np.empty(0, np.int64)]))

    def _batches(self, epoch: int, start_batch: int):
        stream = _ShardStream(self, epoch, start_batch)
        if self.workers == 0:
            return iter(stream)
        return iter(torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=self.workers, prefetch_factor=self.prefetch,
            pin_memory=self.device.type == "cuda", persistent_workers=False, worker_init_fn=worker_init))

    def _name_of(self, key) -> str:
        return key  # "train-000003.tar/00001234 (class/file.jpg)"


class _ShardStream(torch.utils.data.IterableDataset):
    """One worker's batches: its piece of the epoch read in order, shuffled, decoded batch by batch.
    Physical worker p plays logical worker (p + start_batch) mod W, so that after a resume the batch
    DataLoader collects first is ``start_batch``."""

    def __init__(self, loader: ShardLoader, epoch: int, start_batch: int) -> None:
        self.loader, self.epoch, self.start = loader, epoch, start_batch
        self.known_bad = dict(loader._bad.reasons)

    def __iter__(self):
        loader = self.loader
        info = torch.utils.data.get_worker_info()
        workers = max(1, loader.workers)
        if info is None and loader.workers > 0:
            raise RuntimeError("a ShardLoader with workers iterates inside a DataLoader")
        plan = loader._plan(self.epoch)
        if info is None:  # workers=0: one logical worker, in this process
            yield from self._worker(plan[0])
            return
        yield from self._worker(plan[(info.id + self.start) % workers])

    def _worker(self, part):
        bs = self.loader.batch_size
        lw, pieces, ids, mine = part
        raw = self._read(pieces)
        buffer = {}  # id -> sample, filled as the emitted order needs them
        for k, b in enumerate(mine):
            want = ids[k * bs:(k + 1) * bs]
            batch = []
            for i in want:
                while int(i) not in buffer:
                    gid, sample = next(raw)
                    buffer[gid] = sample
                batch.append(buffer.pop(int(i)))
            if b < self.start:
                continue  # resuming: read past, never decoded
            yield self._decode(b, batch)

    def _read(self, pieces):
        _wds()
        from webdataset import tariterators as ti

        for s, first, count in pieces:
            url = self.loader.split.urls[s]
            samples = ti.group_by_keys(ti.tar_file_expander(ti.url_opener([{"url": url}])))
            for k, sample in enumerate(samples):
                if k < first:
                    continue
                if k >= first + count:
                    break
                yield int(self.loader.split.starts[s] + k), (url, sample)

    def _decode(self, b: int, batch):
        from .batchops import seed_mix

        loader = self.loader
        sources, labels, names = [], [], []
        for url, sample in batch:
            key = next((k for k in IMAGE_KEYS if k in sample), None)
            sources.append(sample[key] if key else b"")
            try:
                labels.append(int(sample.get("cls", b"-1")))
            except ValueError:
                labels.append(-1)
            names.append(f"{Path(url).name}/{sample['__key__']}"
                         + (f" ({sample['path'].decode(errors='replace')})" if "path" in sample else ""))
        item = decode_batch(sources, None, labels, loader.in_chans, loader.size, loader.transform,
                            flip=loader.flip and loader.transform == "random-resized-crop", eval_resize=loader.eval_resize,
                            seeds=[seed_mix(loader.seed, self.epoch, b, loader.rank, j) for j in range(len(batch))],
                            known_bad=self.known_bad, names=names, batch=b)
        for j, y in enumerate(labels):  # a label outside the classes makes the sample bad, not the run crash
            if y < 0 and item["good"][j]:
                item["good"][j] = False
                item["bad"].append((names[j], "no valid .cls label"))
        return item
