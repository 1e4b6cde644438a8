"""Finding, parsing and validating datasets: every split held in memory as uint8 N x C x H x W.

Formats are read from plain bytes (IDX, the CIFAR *binary* versions), from MATLAB files (SVHN)
or through Pillow (image folders) -- never by unpickling.  Every malformed file raises one
DatasetError that names the file and says what is wrong.

Where files are looked for, in order: ``data_dir``; ``$NIN_DATA``; ``~/.cache/nin`` (each with
the dataset's own folder names and torchvision's layout, e.g. ``FashionMNIST/raw/``); Debian's
``/usr/share/datasets/<name>``; then, only with ``download=True``, a checksummed download.
"""
from __future__ import annotations

import gzip
import os
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import DatasetError, ImageError
from .images import IMAGE_SUFFIXES, fit_image, is_grey, load_image

__all__ = ["DATASETS", "Split", "Dataset", "load_dataset", "read_idx", "read_cifar_bin", "search_dirs"]

DATASETS = ["fashion-mnist", "mnist", "cifar10", "cifar100", "svhn"]  # plus "folder:PATH"

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DIGITS = [str(i) for i in range(10)]
FOLDER_TEST_FRACTION = 0.2  # held out per class when a folder has no train/ + val/ (or test/)

_IDX = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_CIFAR10_TRAIN = [f"data_batch_{i}.bin" for i in range(1, 6)]


@dataclass
class Split:
    images: torch.Tensor  # uint8, N x C x H x W
    labels: torch.Tensor  # int64, N
    # the names of the labels (load_dataset sets them): evaluation matches them to a model's classes by name
    classes: list[str] | None = field(default=None, compare=False)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    classes: list[str]
    mean: tuple[float, ...]  # per channel, in [0, 1] units, computed on train
    std: tuple[float, ...]
    source: str  # where the files were found
    split: dict | None = None  # how a folder's test files were chosen (folder_split's record)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # C, H, W


# --- parsing ---------------------------------------------------------------------------------
def _read_limited(path: Path, limit: int) -> bytes:
    """Up to ``limit`` bytes of a file, gunzipped when it starts with the gzip magic number."""
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            if not gz:
                return f.read(limit)
            with gzip.GzipFile(fileobj=f) as g:
                chunks, n = [], 0
                while n < limit:  # in chunks: a tiny .gz may claim gigabytes
                    chunk = g.read(min(1 << 20, limit - n))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    n += len(chunk)
                return b"".join(chunks)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DatasetError(f"{path}: not a valid gzip file (truncated or corrupt: {e})") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX file (raw or .gz) with ``ndim`` dimensions, validated, as a numpy array."""
    path = Path(path)
    head = _read_limited(path, 4 + 4 * 3)
    if not head:
        raise DatasetError(f"{path}: the file is empty")
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise DatasetError(f"{path}: not an IDX file (magic number {head[:4].hex()}, expected 0000 08 0{ndim})")
    if head[2] != 0x08:
        raise DatasetError(f"{path}: IDX data type 0x{head[2]:02x} not supported (only 0x08, unsigned byte)")
    if head[3] != ndim:
        raise DatasetError(f"{path}: IDX file has {head[3]} dimensions, expected {ndim}")
    header_len = 4 + 4 * ndim
    if len(head) < header_len:
        raise DatasetError(f"{path}: file ends inside the IDX header ({len(head)} of {header_len} bytes)")
    dims = [int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    if any(d == 0 for d in dims):
        raise DatasetError(f"{path}: IDX dimensions {dims} include a zero")
    if ndim == 3 and dims[1] * dims[2] > 4096 * 4096:
        raise DatasetError(f"{path}: IDX image size {dims[1]} x {dims[2]} is implausible")
    expected = header_len + int(np.prod(dims, dtype=object))
    if expected > 1 << 34:
        raise DatasetError(f"{path}: IDX dimensions {dims} imply {expected:,} bytes, implausibly large")
    data = _read_limited(path, expected + 1)
    if len(data) < expected:
        raise DatasetError(f"{path}: IDX dimensions {dims} need {expected:,} bytes but the file holds "
                           f"{len(data):,} (truncated, or wrong dimensions)")
    if len(data) > expected:
        raise DatasetError(f"{path}: IDX dimensions {dims} need {expected:,} bytes but the file is longer "
                           f"(wrong dimensions, or extra data)")
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims).copy()


def _idx_split(images_path: Path, labels_path: Path, num_classes: int) -> Split:
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} holds {len(images):,} images but {labels_path} holds "
                           f"{len(labels):,} labels")
    _check_labels(labels, num_classes, labels_path)
    return Split(torch.from_numpy(images)[:, None], torch.from_numpy(labels).long())


def _check_labels(labels: np.ndarray, num_classes: int, path) -> None:
    if len(labels) and int(labels.max()) >= num_classes:
        i = int(np.argmax(labels >= num_classes))
        raise DatasetError(f"{path}: label {int(labels[i])} at record {i} is out of range "
                           f"(expected 0..{num_classes - 1})")


def read_cifar_bin(path: str | os.PathLike, label_bytes: int, num_classes: int) -> Split:
    """A CIFAR binary file: records of ``label_bytes`` label bytes (the last is used) + 3072 pixels."""
    path = Path(path)
    record = label_bytes + 3 * 32 * 32
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from None
    if raw.size == 0:
        raise DatasetError(f"{path}: the file is empty")
    if raw.size % record:
        raise DatasetError(f"{path}: {raw.size:,} bytes is not a whole number of {record}-byte CIFAR records "
                           f"(the last record is cut short after {raw.size % record} bytes)")
    raw = raw.reshape(-1, record)
    if label_bytes == 2:  # CIFAR-100: coarse label, then fine label
        _check_labels(raw[:, 0], 20, path)
    labels = raw[:, label_bytes - 1]
    _check_labels(labels, num_classes, path)
    images = raw[:, label_bytes:].reshape(-1, 3, 32, 32)
    return Split(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))


def _read_names(path: Path, count: int) -> list[str]:
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read class names ({e})") from None
    if len(names) != count:
        raise DatasetError(f"{path}: {len(names)} class names, expected {count}")
    return names


def _cat(splits: list[Split]) -> Split:
    return Split(torch.cat([s.images for s in splits]), torch.cat([s.labels for s in splits]))


def read_svhn_mat(path: str | os.PathLike) -> Split:
    """SVHN's cropped-digit .mat file: X is H x W x 3 x N uint8, y is N x 1 with 10 meaning digit 0."""
    try:
        import scipy.io
    except ImportError:  # the one reader that needs scipy: an extra, not a core dependency
        raise DatasetError(f"{path}: SVHN's .mat files need scipy: pip install 'nin[svhn]'") from None

    path = Path(path)
    try:
        mat = scipy.io.loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # scipy raises ValueError, TypeError, MatReadError, NotImplementedError, ...
        raise DatasetError(f"{path}: not a readable MATLAB file ({type(e).__name__}: {e})") from None
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
        raise DatasetError(f"{path}: expected variables X and y")
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3:
        raise DatasetError(f"{path}: X is {x.dtype} {x.shape}, expected uint8 H x W x 3 x N")
    y = y.reshape(-1)
    if len(y) != x.shape[3]:
        raise DatasetError(f"{path}: X holds {x.shape[3]:,} images but y holds {len(y):,} labels")
    if not np.issubdtype(y.dtype, np.number) or len(y) and (y.min() < 1 or y.max() > 10 or np.any(y != np.round(y))):
        raise DatasetError(f"{path}: labels must be integers 1..10 (10 means digit 0)")
    labels = torch.from_numpy((y.astype(np.int64) % 10))
    return Split(torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1))), labels)


# --- image folders ---------------------------------------------------------------------------
def _class_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(root: Path, classes: list[str], warn) -> list[tuple[Path, int]]:
    """(file, label) for the images directly inside each class folder.  An empty class folder is an
    error (a class the model could never learn); images in deeper folders are not read, and ``warn``
    says how many were left out."""
    out = []
    for label, name in enumerate(classes):
        d = root / name
        mine = [(p, label) for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        if not mine:
            raise DatasetError(f"{d}: the class folder {name!r} holds no images "
                               f"({', '.join(IMAGE_SUFFIXES)}); add some or remove the folder")
        nested = sum(1 for sub in d.iterdir() if sub.is_dir()
                     for f in sub.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if nested:
            warn(f"{d}: {nested} image(s) in subfolders are not read (a class's images go directly in its folder)")
        out += mine
    return out


def _warn_untested(root: Path, classes: list[str], train_files, test_files, test_dir, warn) -> None:
    """Say which classes have no held-out image: the test accuracy then says nothing about them."""
    tested = {label for _, label in test_files}
    counts = Counter(label for _, label in train_files)
    missing = [i for i in range(len(classes)) if i not in tested]
    if not missing:
        return
    names = ", ".join(f"{classes[i]!r} ({counts[i]} image{'s' if counts[i] != 1 else ''})" for i in missing[:10])
    names += f" and {len(missing) - 10} more" if len(missing) > 10 else ""
    them = "it" if len(missing) == 1 else "them"
    if test_dir is not None:
        why = f"{test_dir} holds no images of {them}"
    else:
        least = next(n for n in range(1, 100) if round(n * FOLDER_TEST_FRACTION) >= 1)
        why = (f"{FOLDER_TEST_FRACTION:.0%} of each class is held out, rounded, so a class needs at least "
               f"{least} images to have one")
    warn(f"{root}: no test image for class(es) {names}: {why}; the test accuracy says nothing about {them}")


def folder_split(root: Path, seed: int, warn=None) -> tuple[list, list, list[str], dict]:
    """(train files, test files, classes, split record) of an image folder: train/ + val/ (or test/) when
    present, else ``FOLDER_TEST_FRACTION`` of each class held out by ``seed``.  The record says which rule
    made the split and hashes the held-out files, so evaluation can prove it uses the same ones."""
    import hashlib

    warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder (folder:PATH wants one subfolder per class)")
    test_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        classes = _class_dirs(root / "train")
        extra = sorted(set(_class_dirs(test_dir)) - set(classes))
        if extra:
            raise DatasetError(f"{test_dir}: classes {extra} are not in {root / 'train'}")
        if not classes:
            raise DatasetError(f"{root / 'train'}: no class subfolders")
        train_files = _image_files(root / "train", classes, warn)
        test_files = _image_files(test_dir, [c for c in classes if (test_dir / c).is_dir()], warn)
        test_files = [(p, classes.index(p.parent.name)) for p, _ in test_files]
        rule = f"the folder's own train/ and {test_dir.name}/"
    else:
        classes = _class_dirs(root)
        if not classes:
            raise DatasetError(f"{root}: no class subfolders (folder:PATH wants one subfolder per class)")
        files = _image_files(root, classes, warn)
        g = torch.Generator().manual_seed(seed)
        train_files, test_files = [], []
        for label in range(len(classes)):
            mine = [f for f in files if f[1] == label]
            order = torch.randperm(len(mine), generator=g).tolist()
            n_test = int(round(len(mine) * FOLDER_TEST_FRACTION))
            test_files += [mine[i] for i in sorted(order[:n_test])]
            train_files += [mine[i] for i in sorted(order[n_test:])]
        rule = f"{FOLDER_TEST_FRACTION:.0%} of each class held out by seed {seed}"
        test_dir = None
    _warn_untested(root, classes, train_files, test_files, test_dir, warn)
    digest = hashlib.sha256("\n".join(str(p.relative_to(root)) for p, _ in test_files).encode()).hexdigest()
    record = {"rule": rule, "seed": seed, "test_files": len(test_files), "test_files_sha256": digest}
    return train_files, test_files, classes, record


SHOW_BAD = 3  # unreadable files an in-memory folder's error names (then the count of the others)


def _unreadable_message(root: Path, bad: list, n_train: int, n_test: int) -> str:
    """One message for every unreadable file of a folder: the first few named with their reason, the
    count, and the way to train anyway (streaming skips unreadable files; --max-bad is a fraction of
    each split, so the suggestion admits the worse one)."""
    import math

    shown = "; ".join(f"{path}: not a readable image ({why})" for _, path, why in bad[:SHOW_BAD])
    more = f"; and {len(bad) - SHOW_BAD:,} more" if len(bad) > SHOW_BAD else ""
    in_train = sum(1 for i, _, _ in bad if i < n_train)
    worst = max(in_train / max(n_train, 1), (len(bad) - in_train) / max(n_test, 1))
    head = f"{root}: {len(bad):,} of {n_train + n_test:,} image files could not be read: {shown}{more}. "
    if worst >= 1:
        which = "training" if in_train == n_train else "test"
        return head + f"Fix or remove them: none of the {which} images can be read"
    fraction = min(math.ceil(worst * 1000 + 1e-9) / 1000, 0.999)  # --max-bad is below 1
    return (head + f"Fix or remove them, or train with --stream --max-bad {fraction:g}, which skips unreadable "
            "files and lists them in the run's bad_files.txt")


def _load_folder(path_str: str, seed: int) -> tuple[Split, Split, list[str], dict]:
    """Decode every image of the folder with ``images`` (the same pixels ``nin predict`` reads):
    grey if all are grey, else RGB; the most common size, others letterboxed to it."""
    root = Path(path_str).expanduser().resolve()
    train_files, test_files, classes, record = folder_split(root, seed)
    images, bad = [], []  # every file is tried, so one error names all that are unreadable
    for i, (path, _) in enumerate(train_files + test_files):
        try:
            images.append(load_image(path, name="the image"))
        except ImageError as e:
            bad.append((i, path, str(e).removeprefix("the image: ")))
    if bad:
        raise DatasetError(_unreadable_message(root, bad, len(train_files), len(test_files)))
    in_chans = 1 if all(is_grey(im) for im in images) else 3
    w, h = Counter(im.size for im in images).most_common(1)[0][0]
    arrays = np.stack([fit_image(im, in_chans, (h, w)) for im in images])
    labels = torch.tensor([label for _, label in train_files + test_files], dtype=torch.int64)
    x = torch.from_numpy(arrays)
    n = len(train_files)
    return Split(x[:n], labels[:n]), Split(x[n:], labels[n:]), classes, record


# --- finding ---------------------------------------------------------------------------------
# name -> (folder names under a root, files that must all be there, Debian folder)
_LAYOUT = {
    "fashion-mnist": (["fashion-mnist", "FashionMNIST/raw", "fashion_mnist"],
                      [f for pair in _IDX.values() for f in pair], "/usr/share/datasets/fashion-mnist"),
    "mnist": (["mnist", "MNIST/raw"], [f for pair in _IDX.values() for f in pair], "/usr/share/datasets/mnist"),
    "cifar10": (["cifar-10-batches-bin", "cifar10/cifar-10-batches-bin", "cifar10"],
                [*_CIFAR10_TRAIN, "test_batch.bin", "batches.meta.txt"], None),
    "cifar100": (["cifar-100-binary", "cifar100/cifar-100-binary", "cifar100"],
                 ["train.bin", "test.bin", "fine_label_names.txt"], None),
    "svhn": (["svhn", "SVHN", "."], ["train_32x32.mat", "test_32x32.mat"], None),
}

# name -> [(url, file name, md5)]; archives are extracted where they land.
_TV_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_DOWNLOADS = {
    "fashion-mnist": ("FashionMNIST/raw", [
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-images-idx3-ubyte.gz",
         "train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/train-labels-idx1-ubyte.gz",
         "train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-images-idx3-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-labels-idx1-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310")]),
    "mnist": ("MNIST/raw", [
        (_TV_MNIST + "train-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        (_TV_MNIST + "train-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
        (_TV_MNIST + "t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
        (_TV_MNIST + "t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c")]),
    "cifar10": (".", [("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", "cifar-10-binary.tar.gz",
                       "c32a1d4ab5d03f1284b67883e8d87530")]),
    "cifar100": (".", [("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz", "cifar-100-binary.tar.gz",
                        "03b5dce01913d631647c71ecec9e9cb8")]),
    "svhn": ("svhn", [
        ("http://ufldl.stanford.edu/housenumbers/train_32x32.mat", "train_32x32.mat",
         "e26dedcc434d2e4c54c9b2d4a06d8373"),
        ("http://ufldl.stanford.edu/housenumbers/test_32x32.mat", "test_32x32.mat",
         "eb5a983be6a315427106f1b164d9cef3")]),
}


def _roots(data_dir: str | os.PathLike | None) -> list[Path]:
    roots = [data_dir, os.environ.get("NIN_DATA") or None, Path.home() / ".cache" / "nin"]
    return [Path(r).expanduser() for r in roots if r]


def _has(folder: Path, name: str) -> bool:
    """Every required file there (IDX files raw or gzipped)."""
    def exists(f):
        return (folder / f).is_file() or (name in ("mnist", "fashion-mnist") and (folder / f"{f}.gz").is_file())
    return all(exists(f) for f in _LAYOUT[name][1])


def search_dirs(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders looked in for ``name``, in order."""
    subdirs, _, debian = _LAYOUT[name]
    dirs = [Path(data_dir).expanduser()] if data_dir else []
    for root in _roots(data_dir):
        dirs += [root / s for s in subdirs]
    if debian:
        dirs.append(Path(debian))
    return list(dict.fromkeys(p.resolve() if p.exists() else p for p in dirs))


DOWNLOAD_TIMEOUT = 30.0  # seconds without a byte before a download gives up ($NIN_DOWNLOAD_TIMEOUT)


def _download(name: str, root: Path) -> None:
    """Fetch ``name`` into ``root`` with MD5 checks (torchvision's downloader); raises on any failure.

    Each file announces itself on stderr, and a server that accepts the connection but sends nothing
    fails after ``$NIN_DOWNLOAD_TIMEOUT`` seconds instead of hanging."""
    import socket

    from torchvision.datasets.utils import download_url, extract_archive

    timeout = float(os.environ.get("NIN_DOWNLOAD_TIMEOUT", DOWNLOAD_TIMEOUT))
    sub, files = _DOWNLOADS[name]
    folder = root / sub
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # torchvision's urlopen takes no timeout; this is the one it uses
    try:
        for i, (url, filename, md5) in enumerate(files, 1):
            print(f"downloading {url} ({i}/{len(files)}) into {folder}", file=sys.stderr, flush=True)
            download_url(url, str(folder), filename, md5)
            if filename.endswith(".tar.gz"):
                extract_archive(str(folder / filename), str(folder))
    finally:
        socket.setdefaulttimeout(previous)


def _how_to_get(name: str) -> str:
    files = ", ".join(_LAYOUT[name][1])
    tips = []
    if name == "fashion-mnist":
        tips.append("install the Debian package (`sudo apt install dataset-fashion-mnist`)")
    tips += [f"put {files} (IDX files may be .gz) in a folder and pass `--data-dir DIR` or set NIN_DATA"
             if name in ("mnist", "fashion-mnist") else f"put {files} in a folder and pass `--data-dir DIR` "
             "or set NIN_DATA",
             f"or run `nin data fetch {name}` on a machine that is online "
             f"({', '.join(u for u, _, _ in _DOWNLOADS[name][1])})"]
    return "; ".join(tips)


def find_dataset(name: str, data_dir=None, *, download: bool = False) -> Path:
    """The folder holding ``name``'s files; downloads (with ``download``) when none holds them."""
    dirs = search_dirs(name, data_dir)
    for d in dirs:
        if _has(d, name):
            return d
    why = "download is off (pass download=True or run `nin data fetch`)"
    if download:
        target = _roots(data_dir)[0]
        try:
            _download(name, target)
        except Exception as e:  # network, HTTP, checksum, disk: all reported in the one message below
            why = f"download into {target} failed ({type(e).__name__}: {e})"
        else:
            for d in search_dirs(name, data_dir):
                if _has(d, name):
                    return d
            why = f"download into {target} finished but the files are not where expected"
    raise DatasetError(f"{name} not found. Looked in: {', '.join(map(str, dirs))}; {why}. "
                       f"To get it: {_how_to_get(name)}.")


def _idx_path(folder: Path, stem: str) -> Path:
    return folder / stem if (folder / stem).is_file() else folder / f"{stem}.gz"


def _stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std in [0, 1] units, from a 256-bin histogram per channel."""
    values = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        m = float((counts * values).sum() / counts.sum())
        var = float((counts * (values - m) ** 2).sum() / counts.sum())
        mean.append(m)
        std.append(max(var, 0.0) ** 0.5 or 1.0)  # a constant image set would divide by zero
    return tuple(mean), tuple(std)


def load_dataset(name: str = "fashion-mnist", data_dir: str | os.PathLike | None = None, *,
                 download: bool = False, seed: int = 0) -> Dataset:
    """Both splits of a dataset in memory (uint8 on the CPU), class names, train mean/std, source."""
    split = None
    if name.startswith("folder:"):
        train, test, classes, split = _load_folder(name[len("folder:"):], seed)
        source = str(Path(name[len("folder:"):]).expanduser().resolve())
        name = f"folder:{source}"  # absolute: the run can be evaluated from any directory
    elif name in _LAYOUT:
        folder = find_dataset(name, data_dir, download=download)
        source = str(folder)
        if name in ("fashion-mnist", "mnist"):
            train, test = (_idx_split(_idx_path(folder, i), _idx_path(folder, l), 10) for i, l in _IDX.values())
            classes = FASHION_CLASSES if name == "fashion-mnist" else DIGITS
        elif name == "cifar10":
            train = _cat([read_cifar_bin(folder / f, 1, 10) for f in _CIFAR10_TRAIN])
            test = read_cifar_bin(folder / "test_batch.bin", 1, 10)
            classes = _read_names(folder / "batches.meta.txt", 10)
        elif name == "cifar100":
            train, test = (read_cifar_bin(folder / f, 2, 100) for f in ("train.bin", "test.bin"))
            classes = _read_names(folder / "fine_label_names.txt", 100)
        else:
            train, test = (read_svhn_mat(folder / f) for f in ("train_32x32.mat", "test_32x32.mat"))
            classes = DIGITS
    else:
        from ..errors import UsageError
        raise UsageError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)} or folder:PATH")
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DatasetError(f"{source}: train images are {tuple(train.images.shape[1:])} but test images are "
                           f"{tuple(test.images.shape[1:])}")
    mean, std = _stats(train.images)
    train.classes = test.classes = list(classes)
    return Dataset(name, train, test, list(classes), mean, std, source, split)
