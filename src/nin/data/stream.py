"""Streaming image folders: collections larger than memory, decoded by DataLoader workers per batch.

``StreamLoader`` has ``BatchLoader``'s interface (``len``, ``iterate(epoch, start_batch)``,
``epoch_indices``, ``device``, ``batch_size``), so the training loop takes either.  What differs:

- the split is a file list (``FileSplit``: names in one numpy buffer, labels in a numpy array), never
  the decoded images; each worker process decodes whole batches with ``images.decode_image``;
- the per-sample transforms run in the workers on uint8 tensors: ``fit`` (the in-memory path's
  letterbox, pixel for pixel, with its batch-wise crop/flip on the device), ``random-resized-crop``
  (torchvision v2's RandomResizedCrop parameters + flip: ImageNet training) or ``resize-center-crop``
  (resize the short side, centre crop: ImageNet evaluation);
- batches stay uint8 until they are on the device; ``data.batchops.to_float_batch`` does /255 and mean/std there;
- a file that cannot be decoded is skipped and remembered (``bad_files``); in training its place in
  the batch goes to another image of the same batch (so every step has the full batch and every rank
  the same number of steps), in evaluation it is left out.  More than ``max_bad`` (a fraction of the
  split) raises DatasetError naming a few.

Order and determinism: epoch ``e`` is ``data.epoch_order`` (the in-memory path's own order); sample j of
batch b draws its crop and flip from a seed mixed from (seed, e, b, rank, j), whichever worker decodes it,
so ``iterate(e, start_batch=k)`` yields exactly the tail of ``iterate(e)`` (resume mid-epoch).
"""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .batchops import seed_mix, augment, epoch_order, num_batches, to_float_batch
from ..errors import DatasetError, ImageError, UsageError
from .images import center_crop_box, decode_image, image_header, read_image, resized_crop
from .images import eval_resize as default_eval_resize

__all__ = ["TRANSFORMS", "PathArray", "FileSplit", "StreamDataset", "StreamLoader", "open_folder",
           "transform_sample", "choose_path", "estimate_memory", "default_memory_budget", "parse_size",
           "default_workers", "write_bad_files"]

TRANSFORMS = ("fit", "random-resized-crop", "resize-center-crop")
MAX_BAD = 0.001  # default --max-bad: the fraction of a split that may be unreadable
HEADER_SCAN = 2000  # headers read to choose channels and size (all of them in smaller collections)
STATS_SAMPLE = 256  # images decoded (at reduced size) to estimate the mean and std of a stream


# --- file lists --------------------------------------------------------------------------------
class PathArray:
    """File names in one numpy byte buffer plus offsets.  Forked workers that read a Python list of
    (path, class) tuples touch every object's reference count and so copy the parent's memory page by
    page (pytorch/pytorch#13246); two numpy arrays are two objects, whatever the collection's size."""

    def __init__(self, paths=(), *, blob: np.ndarray | None = None, offsets: np.ndarray | None = None) -> None:
        if blob is None:
            encoded = [os.fsencode(p) for p in paths]
            offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
            np.cumsum([len(b) for b in encoded], out=offsets[1:])
            blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self.blob, self.offsets = blob, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes())

    def head(self, n: int) -> "PathArray":
        return PathArray(blob=self.blob[:self.offsets[min(n, len(self))]], offsets=self.offsets[:n + 1])

    def take(self, indices) -> "PathArray":
        """The names at ``indices`` (in that order), in a new buffer."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        if len(idx) == 0:
            return PathArray(blob=np.zeros(0, dtype=np.uint8), offsets=offsets)
        # every byte position of the chosen names, built without a Python loop over the files
        pos = np.repeat(starts - offsets[:-1], ends - starts) + np.arange(offsets[-1])
        return PathArray(blob=self.blob[pos], offsets=offsets)


@dataclass
class FileSplit:
    """A split as files: names and int64 labels (numpy), decoded only when a batch needs them."""
    paths: PathArray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def head(self, n: int) -> "FileSplit":
        """The first ``n`` files (--limit-train)."""
        return FileSplit(self.paths.head(n), self.labels[:n])

    def take(self, indices) -> "FileSplit":
        """The files at ``indices``, in that order (e.g. --val-split's held-out ones)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return FileSplit(self.paths.take(idx), self.labels[idx])


@dataclass
class StreamDataset:
    """``datasets.Dataset``'s fields for a collection read from files during training."""
    name: str
    train: FileSplit
    test: FileSplit
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    in_chans: int
    native_size: tuple[int, int]  # (H, W): the most common image size (what "fit" letterboxes to)
    split: dict | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int, int]:
        return (self.in_chans, *self.native_size)


def _sample(n: int, k: int, seed: int) -> np.ndarray:
    if n <= k:
        return np.arange(n)
    return np.sort(torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()[:k])


def scan_headers(paths: PathArray, seed: int = 0, limit: int = HEADER_SCAN) -> list[tuple[int, int, bool, str]]:
    """(width, height, grey, format) of every file, or of ``limit`` chosen by ``seed`` in larger
    collections; files whose header cannot be read are left out (they count as bad when loaded)."""
    out = []
    for i in _sample(len(paths), limit, seed):
        try:
            out.append(image_header(paths[int(i)]))
        except ImageError:
            pass
    return out


def estimate_stats(paths: PathArray, in_chans: int, seed: int = 0, limit: int = STATS_SAMPLE):
    """Per-channel mean and std in [0, 1] units over ``limit`` training images chosen by ``seed``, each
    decoded at reduced size (at least 64 px): the in-memory path computes them exactly over all."""
    s = torch.zeros(in_chans, dtype=torch.float64)
    s2, count = torch.zeros_like(s), 0
    for i in _sample(len(paths), limit, seed):
        try:
            x = decode_image(paths[int(i)], in_chans, min_size=(64, 64)).double().div_(255).flatten(1)
        except ImageError:
            continue
        s += x.sum(1)
        s2 += (x * x).sum(1)
        count += x.shape[1]
    if count == 0:
        raise DatasetError(f"none of {min(limit, len(paths))} sampled training images could be decoded")
    mean = s / count
    std = (s2 / count - mean * mean).clamp_(min=0).sqrt()
    return tuple(mean.tolist()), tuple(v if v > 0 else 1.0 for v in std.tolist())


def open_folder(path: str | os.PathLike, seed: int = 0) -> StreamDataset:
    """A ``folder:PATH`` collection for streaming: the same classes and train/test split as the in-memory
    path (``datasets.folder_split``), channels and size from the image headers (nothing is decoded but
    ``STATS_SAMPLE`` images for the mean and std)."""
    from .datasets import folder_split

    root = Path(path).expanduser().resolve()
    train_files, test_files, classes, record = folder_split(root, seed)
    train = FileSplit(PathArray([p for p, _ in train_files]), np.array([c for _, c in train_files], dtype=np.int64))
    test = FileSplit(PathArray([p for p, _ in test_files]), np.array([c for _, c in test_files], dtype=np.int64))
    del train_files, test_files  # the lists of tuples go before any worker is forked
    heads = scan_headers(PathArray(blob=np.concatenate([train.paths.blob, test.paths.blob]),
                                   offsets=np.concatenate([train.paths.offsets[:-1],
                                                           test.paths.offsets + train.paths.offsets[-1]])), seed)
    if not heads:
        raise DatasetError(f"{root}: none of the images has a readable header")
    in_chans = 1 if all(g for _, _, g, _ in heads) else 3
    w, h = Counter((w, h) for w, h, _, _ in heads).most_common(1)[0][0]
    mean, std = estimate_stats(train.paths, in_chans, seed)
    return StreamDataset(f"folder:{root}", train, test, classes, mean, std, str(root), in_chans, (h, w), record)


# --- one sample ----------------------------------------------------------------------------------
def transform_sample(source, in_chans: int, size: tuple[int, int], transform: str = "fit", *,
                     flip: bool = False, eval_resize: int | None = None, name: str | None = None) -> torch.Tensor:
    """``source`` (a path or bytes) -> uint8 C x H x W at ``size``, by ``transform`` (see the module doc).

    Random draws use torch's global generator (the caller seeds it): RandomResizedCrop's parameters come
    from torchvision v2's own ``make_params`` on the size in the header, then the JPEG is decoded no larger
    than that crop needs (``decode_image``'s ``min_size``), and the box, scaled to the decoded size, is
    resized with antialiasing (``v2.functional.resized_crop``)."""
    if transform == "fit":
        return torch.from_numpy(read_image(source, in_chans, size, name=name))
    out_h, out_w = size
    if transform == "random-resized-crop":
        def box(w, h):  # torchvision v2's own parameters for this image's size
            p = _rrc(out_h, out_w).make_params([torch.empty((0, h, w), dtype=torch.uint8)])
            return p["top"], p["left"], p["height"], p["width"]
        y = resized_crop(source, in_chans, size, box, name=name)
        return y.flip(-1) if flip and bool(torch.rand(()) < 0.5) else y  # drawn after the crop, as v2 does
    if transform == "resize-center-crop":
        return resized_crop(source, in_chans, size,
                            lambda w, h: center_crop_box(w, h, size, eval_resize or default_eval_resize(size)),
                            name=name)
    raise UsageError(f"unknown transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")


_RRC = {}


def _rrc(h: int, w: int):
    from torchvision.transforms import v2

    if (h, w) not in _RRC:
        _RRC[h, w] = v2.RandomResizedCrop((h, w))  # scale (0.08, 1), ratio (3/4, 4/3): the reference's
    return _RRC[h, w]


class _BatchDecoder(torch.utils.data.Dataset):
    """Runs in the workers: a task (b, indices) -> the batch as uint8 N x C x H x W, which samples
    decoded, and (index, reason) for each that did not.  Indices in ``known_bad`` are not tried again."""

    def __init__(self, paths: PathArray, labels: np.ndarray, in_chans, size, transform, *, flip, eval_resize,
                 seed, epoch, rank, known_bad) -> None:
        self.paths, self.labels, self.in_chans, self.size = paths, labels, in_chans, size
        self.transform, self.flip, self.eval_resize = transform, flip, eval_resize
        self.seed, self.epoch, self.rank, self.known_bad = seed, epoch, rank, known_bad

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, task):
        b, idx = task
        return decode_batch([self.paths[int(i)] for i in idx], idx, self.labels[idx], self.in_chans, self.size,
                            self.transform, flip=self.flip, eval_resize=self.eval_resize,
                            seeds=[seed_mix(self.seed, self.epoch, b, self.rank, j) for j in range(len(idx))],
                            known_bad=self.known_bad, batch=b)


def decode_batch(sources, ids, labels, in_chans, size, transform, *, flip, eval_resize, seeds, known_bad=(),
                 names=None, batch=0) -> dict:
    """Decode and transform one batch (in a worker); shared by the folder and the shard loaders."""
    shape = (len(sources), in_chans, *size)
    if torch.utils.data.get_worker_info() is not None:
        # in a DataLoader worker, built in shared memory (as default_collate does): sending a batch made
        # in private memory copies it into a new shared segment first
        out = torch.empty(0, dtype=torch.uint8).new(torch.UntypedStorage._new_shared(math.prod(shape))).view(shape)
        out.zero_()
    else:
        out = torch.zeros(shape, dtype=torch.uint8)
    good = torch.zeros(len(sources), dtype=torch.bool)
    bad = []
    rng_state = torch.get_rng_state()  # per batch, not per sample (fork_rng costs 0.2 ms an image)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in DataLoader workers: with workers=0, per-image ops on all cores crawl
    try:
        for j, src in enumerate(sources):
            key = int(ids[j]) if names is None else names[j]
            if key in known_bad:
                bad.append((key, known_bad[key] if isinstance(known_bad, dict) else "unreadable"))
                continue
            try:
                # the CPU generator only: torch.manual_seed also queues lazy CUDA/MPS seeding, which records a
                # stack trace each time (0.2 ms a call, a fifth of the whole transform)
                torch.default_generator.manual_seed(seeds[j])
                out[j] = transform_sample(src, in_chans, size, transform, flip=flip, eval_resize=eval_resize,
                                          name="the image")
                good[j] = True
            except ImageError as e:
                bad.append((key, str(e).removeprefix("the image: ")))
            except Exception as e:  # a decoder's odd failure on odd data is a bad file, never a crash
                bad.append((key, f"{e.__class__.__name__}: {e}"))
    finally:
        torch.set_rng_state(rng_state)  # with workers=0 this runs in the trainer's process
        torch.set_num_threads(threads)
    return {"batch": batch, "images": out, "labels": torch.as_tensor(np.asarray(labels), dtype=torch.int64),
            "good": good, "bad": bad}


# --- the loader ----------------------------------------------------------------------------------
def worker_init(_worker_id: int) -> None:
    """Fix glibc's mmap threshold in a decoding worker.  By default glibc raises it to the largest block
    freed so far, after which the decoders' 0.2-10 MB buffers come from the heap and fragment it: a
    worker grew about 3 MB a batch, so memory rose with the epoch's length (benchmarks/bench_stream.py).
    With a fixed threshold those buffers are mapped and unmapped, and a worker stays flat."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD = -3; 128 KB is glibc's own default
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to fix
        pass


def default_workers() -> int:
    """Decoding workers per process: the cores this process may use, shared by the processes torchrun
    starts on this machine (LOCAL_WORLD_SIZE), at most 8 (more rarely pays in the reference recipes)."""
    from ..devices import cores

    return max(1, min(8, cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


class _BadFiles:
    """The files a loader could not decode: remembered across epochs, reported through ``on_bad``,
    fatal once there are more than ``max_bad`` x ``total`` of them."""

    def __init__(self, total: int, max_bad: float, on_bad) -> None:
        self.total, self.max_bad, self.on_bad = total, max_bad, on_bad
        self.reasons: dict = {}  # key (index or shard sample) -> reason
        self.names: dict = {}  # key -> what the list shows (a path, or shard/key)

    def add(self, entries, name_of) -> None:
        new = [(k, r) for k, r in entries if k not in self.reasons]
        if not new:
            return
        for k, r in new:
            self.reasons[k], self.names[k] = r, name_of(k)
        if self.on_bad is not None:
            self.on_bad(self.listing())
        limit = self.max_bad * self.total
        if len(self.reasons) > limit:
            few = "; ".join(f"{self.names[k]}: {self.reasons[k]}" for k in list(self.reasons)[:3])
            raise DatasetError(f"{len(self.reasons):,} of {self.total:,} images could not be read, more than "
                               f"--max-bad {self.max_bad:g} allows ({math.floor(limit):,}): {few}"
                               + ("; all are listed in bad_files.txt" if self.on_bad is not None else ""))

    def listing(self) -> list[tuple[str, str]]:
        return sorted((self.names[k], r) for k, r in self.reasons.items())


def finish_batch(item: dict, *, train: bool, device: torch.device, non_blocking: bool):
    """Fill or drop the bad samples of a decoded batch, then move it to ``device`` (still uint8).
    Training: a bad sample's slot takes the next good sample of the batch (cyclically), so the batch
    keeps its size; evaluation: bad samples are left out.  Returns (x, y) or None for an empty batch."""
    x, y, good = item["images"], item["labels"], item["good"]
    if not bool(good.all()):
        ok = good.nonzero().flatten()
        if len(ok) == 0:
            if train:
                raise DatasetError(f"no image of training batch {item['batch']} could be read "
                                   f"({len(good)} tried); is the collection readable?")
            return None
        if train:
            pos = torch.arange(len(good))
            nxt = ok[torch.searchsorted(ok, pos) % len(ok)]  # next good position at or after each slot
            x, y = x[nxt], y[nxt]
        else:
            x, y = x[ok], y[ok]
    return x.to(device, non_blocking=non_blocking), y.to(device, non_blocking=non_blocking)


class StreamLoader:
    """Batches of a ``FileSplit``, decoded by ``workers`` processes; the interface of ``BatchLoader``
    (see the module doc).  ``size`` = (H, W) the workers produce; ``resize``, ``mean``, ``std``,
    ``crop_padding`` and ``flip`` (with "fit") act on the device exactly as in ``BatchLoader``."""

    streamed = True  # images are read from files during training; unreadable ones reach on_bad

    def __init__(self, split: FileSplit, batch_size: int, *, in_chans: int, size: tuple[int, int],
                 transform: str = "fit", eval_resize: int | None = None, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, device="cpu", resize: int | None = None, mean=None, std=None,
                 crop_padding: int = 0, flip: bool = False, erase: float = 0.0, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, dtype: torch.dtype = torch.float32, workers: int | None = None,
                 max_bad: float = MAX_BAD, on_bad=None, prefetch: int = 2) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        if transform not in TRANSFORMS:
            raise UsageError(f"unknown transform {transform!r}; choose one of {', '.join(TRANSFORMS)}")
        if transform != "fit" and crop_padding:
            raise UsageError(f"--crop-padding works with the fit transform only, not {transform}")
        if not 0 <= max_bad < 1:
            raise UsageError(f"--max-bad must be a fraction in [0, 1), got {max_bad}")
        self.split, self.batch_size, self.in_chans, self.size = split, batch_size, in_chans, tuple(size)
        self.transform, self.eval_resize = transform, eval_resize
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.device = torch.device(device)
        self.resize, self.mean, self.std, self.dtype = resize, mean, std, dtype
        self.crop_padding, self.flip, self.channels_last = crop_padding, flip, channels_last
        self.erase = erase
        self.rank, self.world_size = rank, world_size
        self.workers = default_workers() if workers is None else workers
        self.prefetch = prefetch
        self._bad = _BadFiles(len(split), max_bad, on_bad)
        self.epoch = 0

    @property
    def on_bad(self):
        """Called with the whole ``bad_files`` list whenever it grows (before a --max-bad error), e.g.
        ``lambda bad: write_bad_files(run_dir / "bad_files.txt", bad)``; settable once the run folder exists."""
        return self._bad.on_bad

    @on_bad.setter
    def on_bad(self, fn) -> None:
        self._bad.on_bad = fn

    @property
    def labels(self) -> np.ndarray:
        """The split's labels (``BatchLoader.labels``' counterpart: ``len`` is the number of images)."""
        return self.split.labels

    @property
    def bad_files(self) -> list[tuple[str, str]]:
        """(path, reason) of every file that could not be decoded so far, sorted by path."""
        return self._bad.listing()

    def __len__(self) -> int:
        return num_batches(len(self.split), self.batch_size, drop_last=self.drop_last, rank=self.rank,
                           world_size=self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _name_of(self, key) -> str:
        return self.split.paths[int(key)]

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """The sample indices (int64, CPU) this rank sees in ``epoch``, in order (BatchLoader's order)."""
        return epoch_order(len(self.split), epoch, shuffle=self.shuffle, seed=self.seed, drop_last=self.drop_last,
                           rank=self.rank, world_size=self.world_size)

    def _batches(self, epoch: int, start_batch: int):
        """Decoded batches (dicts from ``decode_batch``) ``start_batch..len-1``, in order."""
        idx = self.epoch_indices(epoch).numpy()
        bs = self.batch_size
        tasks = [(b, idx[b * bs:(b + 1) * bs]) for b in range(start_batch, len(self))]
        decoder = _BatchDecoder(self.split.paths, self.split.labels, self.in_chans, self.size, self.transform,
                                flip=self.flip and self.transform == "random-resized-crop",
                                eval_resize=self.eval_resize, seed=self.seed, epoch=epoch, rank=self.rank,
                                known_bad=dict(self._bad.reasons))
        if self.workers == 0:
            return (decoder[t] for t in tasks)
        return iter(torch.utils.data.DataLoader(
            decoder, batch_size=None, sampler=tasks, num_workers=self.workers, prefetch_factor=self.prefetch,
            pin_memory=self.device.type == "cuda", persistent_workers=False, worker_init_fn=worker_init))

    def uint8_batches(self, epoch: int = 0):
        """Yields (x uint8, y int64) on the CPU, the decoded and transformed batches before any device-side
        step, bad samples left out: what ``evaluation.evaluate`` reads from a streamed split."""
        for item in self._batches(epoch, 0):
            self._bad.add(item["bad"], self._name_of)
            xy = finish_batch(item, train=False, device=torch.device("cpu"), non_blocking=False)
            if xy is not None:
                yield xy

    def iterate(self, epoch: int, start_batch: int = 0):
        """Yields (x float on device, y int64 on device) for batches ``start_batch..len(self)-1``."""
        cuda = self.device.type == "cuda"
        for item in self._batches(epoch, start_batch):
            self._bad.add(item["bad"], self._name_of)
            xy = finish_batch(item, train=self.shuffle, device=self.device, non_blocking=cuda)
            if xy is None:
                continue
            x, y = xy
            if self.transform == "fit" and (self.crop_padding or self.flip or self.erase):
                g = torch.Generator().manual_seed(seed_mix(self.seed, epoch, item["batch"], self.rank))
                x = augment(x, g, crop_padding=self.crop_padding, flip=self.flip, erase=self.erase)
            x = to_float_batch(x, resize=self.resize, mean=self.mean, std=self.std, dtype=self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def __iter__(self):
        return self.iterate(self.epoch)


def write_bad_files(path: str | os.PathLike, entries) -> None:
    """Write (or extend) ``bad_files.txt``: one ``path<TAB>reason`` line per file, sorted, atomically;
    lines already in the file (from before a resume) are kept."""
    from ..fsutil import atomic_write

    path = Path(path)
    lines = set(path.read_text(encoding="utf-8").splitlines()) if path.exists() else set()
    lines |= {f"{p}\t{r}" for p, r in entries}

    def write(tmp):
        Path(tmp).write_text("".join(f"{line}\n" for line in sorted(lines)), encoding="utf-8")
    atomic_write(path, write)


# --- memory or stream ----------------------------------------------------------------------------
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str | int) -> int:
    """"8G", "512M", "1.5g", "1000000" -> bytes (powers of 1024), or UsageError."""
    if isinstance(text, int):
        return text
    t = str(text).strip().lower().removesuffix("b").removesuffix("i")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise UsageError(f"--memory-budget: {text!r} is not a size (e.g. 8G, 512M)") from None
    if value <= 0:
        raise UsageError(f"--memory-budget must be > 0, got {text!r}")
    return int(value * _UNITS[unit])


def _ram_bytes() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for f in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):  # containers
        try:
            text = Path(f).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def default_memory_budget(device="cpu") -> int:
    """A quarter of this machine's memory (its cgroup limit, if lower); on CUDA, also at most a quarter
    of the GPU's memory (the in-memory path holds the decoded split on the device)."""
    budget = _ram_bytes() // 4
    device = torch.device(device)
    if device.type == "cuda":
        budget = min(budget, torch.cuda.get_device_properties(device.index or 0).total_memory // 4)
    return budget


def estimate_memory(dataset: str, seed: int = 0) -> int:
    """Bytes the in-memory path would hold while loading ``folder:PATH``, from the headers alone: every
    image decoded at its own size (Pillow's images, kept until stacked) plus the stacked uint8 copy at
    the most common size.  Sampled (HEADER_SCAN headers, scaled up) in larger collections."""
    from .datasets import folder_split

    root = Path(dataset.removeprefix("folder:")).expanduser().resolve()
    train, test, _, _ = folder_split(root, seed, warn=lambda m: None)
    paths = PathArray([p for p, _ in train + test])
    heads = scan_headers(paths, seed)
    if not heads:
        return 0
    chans = 1 if all(g for _, _, g, _ in heads) else 3
    w, h = Counter((w, h) for w, h, _, _ in heads).most_common(1)[0][0]
    own = sum(w * h * (1 if g else 3) for w, h, g, _ in heads) / len(heads)  # Pillow's L or RGB
    return int(len(paths) * (own + chans * h * w))


def choose_path(dataset: str, memory_budget: int | str | None = None, *, device="cpu", seed: int = 0) -> str:
    """"memory" when the dataset decoded fits ``memory_budget`` (default ``default_memory_budget``),
    else "stream".  The built-in datasets are small (memory); ``wds:`` shards always stream."""
    if dataset.startswith("wds:"):
        return "stream"
    if not dataset.startswith("folder:"):
        return "memory"
    budget = default_memory_budget(device) if memory_budget is None else parse_size(memory_budget)
    return "memory" if estimate_memory(dataset, seed) <= budget else "stream"
