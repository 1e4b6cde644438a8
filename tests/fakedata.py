"""Small datasets in the official file formats, written by the tests themselves."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")


def has_real_fmnist() -> bool:
    """Whether nin finds real Fashion-MNIST the way it always does (--data-dir, $NIN_DATA, ~/.cache/nin,
    Debian's package), not only at Debian's path."""
    from nin.data.datasets import find_dataset
    from nin.errors import DatasetError

    try:
        folder = find_dataset("fashion-mnist")
    except DatasetError:
        return False
    sizes = [p.stat().st_size for p in folder.glob("train-images-idx3-ubyte*")]
    return bool(sizes) and max(sizes) > 20_000_000  # the real 60,000 images, not a test's tiny fake


def idx_bytes(array: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array: magic (0, 0, 0x08, ndim), big-endian dims, then the data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def learnable_images(n: int, seed: int, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    """Noisy images whose class is a bright horizontal band position: easy to learn, not trivial."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
    band = size // 10
    for i, c in enumerate(labels):
        images[i, c * band:(c + 1) * band + 1, 4:size - 4] = 200
    return images, labels


def fake_fashion_dir(root: Path, n_train: int = 600, n_test: int = 200, columns: bool = False) -> Path:
    """Fashion-MNIST's four .gz files in torchvision's layout under ``root`` (root/FashionMNIST/raw).
    ``columns``: the class is a vertical band's column instead of a row's, so a mirror image shows
    another class (the row bands are mirror-symmetric: flip TTA would change nothing)."""
    raw = Path(root) / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = learnable_images(n, seed)
        if columns:
            images = images.transpose(0, 2, 1)
        (raw / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (raw / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    return Path(root)
