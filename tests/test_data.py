"""Datasets and the batch loader, against files the tests write in each official format and direct
numpy / PIL / torch computations."""
import gzip
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from nin.data import datasets
from nin.cli import main
from nin.data.loader import BatchLoader
from nin.data.datasets import Split, load_dataset
from nin.data.batchops import augment, to_float_batch
from nin.data.datasets import read_idx
from nin.errors import DatasetError

FMNIST = Path("/usr/share/datasets/fashion-mnist")
HAVE_FMNIST = (FMNIST / "t10k-images-idx3-ubyte.gz").is_file()
RNG = np.random.default_rng(0)


pytestmark = pytest.mark.usefixtures("isolated")  # no test sees the user's $NIN_DATA or ~/.cache/nin


# --- writers for the official formats --------------------------------------------------------
def idx_bytes(a: np.ndarray) -> bytes:
    return bytes([0, 0, 8, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape) + a.tobytes()


def write_idx(path: Path, a: np.ndarray, gz: bool) -> Path:
    data = idx_bytes(a.astype(np.uint8))
    path = path.with_name(path.name + ".gz") if gz else path
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_mnist(folder: Path, n_train=60, n_test=20, gz=True, hw=(28, 28)):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = RNG.integers(0, 256, (n, *hw), dtype=np.uint8)
        y = RNG.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte", x, gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte", y, not gz)  # mixed raw and .gz on purpose
        arrays[split] = (x, y)
    return arrays


def write_cifar10(folder: Path, per_batch=7):
    folder.mkdir(parents=True, exist_ok=True)
    x = RNG.integers(0, 256, (6 * per_batch, 3, 32, 32), dtype=np.uint8)
    y = RNG.integers(0, 10, 6 * per_batch, dtype=np.uint8)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for k, name in enumerate(names):
        s = slice(k * per_batch, (k + 1) * per_batch)
        rec = np.concatenate([y[s, None], x[s].reshape(per_batch, -1)], axis=1)
        (folder / name).write_bytes(rec.tobytes())
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta.txt").write_text("\n".join(classes) + "\n\n")
    return x, y, classes


# --- formats -----------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_idx_dataset_matches_written_arrays(tmp_path, gz):
    arrays = write_mnist(tmp_path / "MNIST" / "raw", gz=gz)  # torchvision's layout under --data-dir
    ds = load_dataset("mnist", tmp_path)
    for split, key in (("train", "train"), ("test", "t10k")):
        x, y = arrays[key]
        s = getattr(ds, split)
        assert s.images.dtype == torch.uint8 and s.images.shape == (len(x), 1, 28, 28)
        assert np.array_equal(s.images[:, 0].numpy(), x) and np.array_equal(s.labels.numpy(), y)
        assert s.labels.dtype == torch.int64
    assert ds.classes == [str(i) for i in range(10)] and Path(ds.source) == (tmp_path / "MNIST" / "raw").resolve()
    pix = arrays["train"][0].astype(np.float64) / 255
    assert ds.mean[0] == pytest.approx(pix.mean(), abs=1e-12) and ds.std[0] == pytest.approx(pix.std(), abs=1e-12)


def test_search_order_data_dir_then_env_then_cache(tmp_path, monkeypatch):
    for d in ("a", "env", "home/.cache/nin"):
        write_mnist(tmp_path / d / "mnist", n_train=3, n_test=2)
    monkeypatch.setenv("NIN_DATA", str(tmp_path / "env"))
    assert Path(load_dataset("mnist", tmp_path / "a").source) == (tmp_path / "a" / "mnist").resolve()
    assert Path(load_dataset("mnist").source) == (tmp_path / "env" / "mnist").resolve()
    monkeypatch.delenv("NIN_DATA")
    assert Path(load_dataset("mnist").source) == (tmp_path / "home/.cache/nin/mnist").resolve()


def test_cifar10_binary(tmp_path):
    x, y, classes = write_cifar10(tmp_path / "cifar-10-batches-bin")
    ds = load_dataset("cifar10", tmp_path)
    n_train = len(x) * 5 // 6
    assert ds.train.images.shape == (n_train, 3, 32, 32) and ds.test.images.shape == (len(x) - n_train, 3, 32, 32)
    assert np.array_equal(ds.train.images.numpy(), x[:n_train]) and np.array_equal(ds.test.images.numpy(), x[n_train:])
    assert np.array_equal(ds.train.labels.numpy(), y[:n_train]) and ds.classes == classes
    assert ds.mean == pytest.approx(tuple(x[:n_train].transpose(1, 0, 2, 3).reshape(3, -1).mean(1) / 255))


def test_cifar100_binary_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    data = {}
    for name, n in (("train", 9), ("test", 4)):
        x = RNG.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        coarse, fine = RNG.integers(0, 20, n, dtype=np.uint8), RNG.integers(0, 100, n, dtype=np.uint8)
        (folder / f"{name}.bin").write_bytes(np.concatenate([coarse[:, None], fine[:, None],
                                                             x.reshape(n, -1)], axis=1).tobytes())
        data[name] = (x, fine)
    (folder / "fine_label_names.txt").write_text("\n".join(f"class_{i}" for i in range(100)))
    ds = load_dataset("cifar100", tmp_path)
    for name in ("train", "test"):
        assert np.array_equal(getattr(ds, name).images.numpy(), data[name][0])
        assert np.array_equal(getattr(ds, name).labels.numpy(), data[name][1])
    assert ds.classes[42] == "class_42" and len(ds.classes) == 100


def test_svhn_mat_label_10_is_digit_0(tmp_path):
    for name, n in (("train", 6), ("test", 3)):
        x = RNG.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [9], [10], [5], [3]][:n], dtype=np.uint8)
        scipy.io.savemat(tmp_path / f"{name}_32x32.mat", {"X": x, "y": y})
        if name == "train":
            ref_x, ref_y = x, y
    ds = load_dataset("svhn", tmp_path)
    assert ds.train.labels.tolist() == [0, 1, 9, 0, 5, 3]
    assert ds.train.images.shape == (6, 3, 32, 32)
    assert np.array_equal(ds.train.images[4].numpy(), ref_x[:, :, :, 4].transpose(2, 0, 1))
    assert ref_y.shape == (6, 1)


def _png(path: Path, value, mode="L", size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


def test_image_folder_with_train_and_val(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for c, cls in enumerate(["cat", "dog"]):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", (10 * c + i, 100, 200), mode="RGB")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.classes == ["cat", "dog"] and ds.train.images.shape == (6, 3, 6, 8)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.test.labels.tolist() == [0, 0, 1, 1]
    assert ds.train.images[4, :, 0, 0].tolist() == [11, 100, 200]  # dog/1.png, channels first


def test_image_folder_seeded_split_is_stratified_and_repeatable(tmp_path):
    for cls in ("a", "b"):
        for i in range(10):
            _png(tmp_path / cls / f"{i:02d}.png", i + (100 if cls == "b" else 0))
    one, two, other = (load_dataset(f"folder:{tmp_path}", seed=s) for s in (0, 0, 1))
    assert one.train.images.shape == (16, 1, 6, 8) and one.test.labels.tolist() == [0, 0, 1, 1]
    assert torch.equal(one.test.images, two.test.images) and not torch.equal(one.test.images, other.test.images)
    values = sorted(one.train.images[:, 0, 0, 0].tolist() + one.test.images[:, 0, 0, 0].tolist())
    assert values == sorted(list(range(10)) + list(range(100, 110)))  # disjoint and covering


def test_image_folder_bad_image_is_named(tmp_path):
    _png(tmp_path / "a" / "ok.png", 3)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError, match=r"broken\.png"):
        load_dataset(f"folder:{tmp_path}")


@pytest.mark.skipif(not HAVE_FMNIST, reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    ds = load_dataset("fashion-mnist")
    assert ds.train.images.shape == (60000, 1, 28, 28) and ds.test.images.shape == (10000, 1, 28, 28)
    assert ds.train.labels.bincount().tolist() == [6000] * 10 and ds.test.labels.bincount().tolist() == [1000] * 10
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    assert ds.mean[0] == pytest.approx(0.2860, abs=1e-4) and ds.std[0] == pytest.approx(0.3530, abs=1e-4)


# --- resizing ----------------------------------------------------------------------------------
def _pil_reference(x: torch.Tensor, size: int) -> torch.Tensor:
    """The seed's transforms: torchvision's Resize(size) on PIL images, then ToTensor (uint8 / 255,
    done here in numpy: per-image torch calls are slow when other processes hold the cores)."""
    from torchvision import transforms as T

    resize = T.Resize(size)
    arrays = [np.asarray(resize(Image.fromarray(img[0].numpy())), dtype=np.float32) / 255 for img in x]
    return torch.from_numpy(np.stack(arrays)[:, None])


@pytest.mark.skipif(not HAVE_FMNIST, reason="Debian's dataset-fashion-mnist is not installed")
def test_resize_matches_seed_pil_pipeline_on_real_images():
    images = torch.from_numpy(read_idx(FMNIST / "t10k-images-idx3-ubyte.gz", 3)[::20, None])  # 500 images
    ours = to_float_batch(images, resize=224)
    diff = (ours - _pil_reference(images, 224)).abs()
    assert ours.shape == (500, 1, 224, 224)
    assert diff.mean() < 1 / 255 and diff.max() <= 1.01 / 255  # PIL rounds to uint8


def test_resize_matches_pil_and_torch_interpolate():
    x = torch.from_numpy(RNG.integers(0, 256, (16, 3, 20, 20), dtype=np.uint8))
    assert (to_float_batch(x[:, :1], resize=96) - _pil_reference(x[:, :1], 96)).abs().max() <= 1.01 / 255
    for size in (7, 16, 20, 33, 224):  # shrinking needs the antialiased filter, growing the plain one
        ref = F.interpolate(x.double() / 255, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        assert torch.allclose(to_float_batch(x, resize=size, dtype=torch.float64), ref, atol=1e-12)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    ref = F.interpolate(x.float() / 255, size=(50, 50), mode="bilinear", antialias=True)
    ref = (ref - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(to_float_batch(x, resize=50, mean=mean, std=std), ref, atol=1e-5)
    ref1 = (F.interpolate(x[:, :1].float() / 255, size=(50, 50), mode="bilinear", antialias=True) - 0.3) / 0.4
    assert torch.allclose(to_float_batch(x[:, :1], resize=50, mean=(0.3,), std=(0.4,)), ref1, atol=1e-5)
    assert torch.equal(to_float_batch(x), x.float() / 255)  # no resize: exactly ToTensor
    bf = to_float_batch(x, resize=64, dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and (bf.float() - to_float_batch(x, resize=64)).abs().max() < 0.01


# --- augmentation ------------------------------------------------------------------------------
def _all_crops_and_flips(img: torch.Tensor, p: int) -> list[torch.Tensor]:
    c, h, w = img.shape
    padded = torch.zeros(c, h + 2 * p, w + 2 * p, dtype=img.dtype)
    padded[:, p:p + h, p:p + w] = img
    crops = [padded[:, dy:dy + h, dx:dx + w] for dy in range(2 * p + 1) for dx in range(2 * p + 1)]
    return crops + [crop.flip(-1) for crop in crops]


def test_augment_each_image_is_a_crop_or_flip_of_its_own_input():
    x = torch.from_numpy(RNG.integers(1, 256, (64, 3, 6, 5), dtype=np.uint8))
    out = augment(x, torch.Generator().manual_seed(3), crop_padding=2, flip=True)
    assert out.shape == x.shape and out.dtype == torch.uint8
    for img, res in zip(x, out):
        assert any(torch.equal(res, cand) for cand in _all_crops_and_flips(img, 2))
    # independent draws: the same image 64 times comes out in many different ways
    same = augment(x[:1].expand(64, -1, -1, -1), torch.Generator().manual_seed(3), crop_padding=2, flip=True)
    assert len({bytes(im.numpy().tobytes()) for im in same}) > 20
    flipped = augment(x, torch.Generator().manual_seed(0), flip=True)
    is_flip = [torch.equal(o, i.flip(-1)) for o, i in zip(flipped, x)]
    assert 10 < sum(is_flip) < 54 and all(f or torch.equal(o, i) for f, o, i in zip(is_flip, flipped, x))


def test_loader_augmentation_keeps_labels_aligned():
    n = 100
    labels = torch.arange(n) % 10
    images = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
    images[:, :, 2:6, 2:6] = (labels * 20 + 30).view(n, 1, 1, 1).to(torch.uint8)  # a block the crop keeps
    loader = BatchLoader(Split(images, labels), 16, shuffle=True, seed=5, crop_padding=2, flip=True, resize=16)
    seen = 0
    for x, y in loader:
        assert x.shape[1:] == (1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
        top = (x.flatten(1).max(1).values * 255).round()
        assert torch.equal(top, (y * 20 + 30).float())
        seen += len(y)
    assert seen == n


def _orientations(loader, epoch: int) -> dict[int, bool]:
    """label (= sample id) -> mirrored?, read off images whose columns are numbered 1..W."""
    out = {}
    for x, y in loader.iterate(epoch):
        first, last = x[:, 0, 0, 0], x[:, 0, 0, -1]
        assert bool(((first - last).abs() > 0).all())  # every image is one of the two orientations
        out.update({int(i): bool(f) for i, f in zip(y, first > last)})
    return out


def test_alternating_flip_mirrors_each_image_in_every_other_epoch():
    n, w = 97, 7
    images = torch.arange(1, w + 1, dtype=torch.uint8).repeat(n, 1, 3, 1) * 30  # columns 30, 60, ..., 210
    split = Split(images, torch.arange(n))
    loader = BatchLoader(split, 16, shuffle=True, seed=11, flip=True, alt_flip=True)
    e0, e1, e2, e3 = (_orientations(loader, e) for e in range(4))
    assert sorted(e0) == list(range(n))
    assert all(e1[i] != e0[i] and e2[i] == e0[i] and e3[i] != e0[i] for i in range(n))
    assert 25 < sum(e0.values()) < 72  # which epoch comes first is a coin per image, not all alike
    again = BatchLoader(split, 16, shuffle=True, seed=11, flip=True, alt_flip=True)
    assert _orientations(again, 0) == e0  # fixed by the seed
    other = BatchLoader(split, 16, shuffle=True, seed=12, flip=True, alt_flip=True)
    assert _orientations(other, 0) != e0
    # the coin per epoch, for contrast: about half the images keep their orientation from one epoch to the next
    coin = BatchLoader(split, 16, shuffle=True, seed=11, flip=True)
    c0, c1 = _orientations(coin, 0), _orientations(coin, 1)
    assert 25 < sum(c0[i] == c1[i] for i in range(n)) < 72


def test_alternating_flip_needs_flip_and_images_in_memory(tmp_path, capsys):
    assert main(["train", "--alt-flip", "--no-flip", "--dry-run", "--out", str(tmp_path / "r")]) == 2
    assert "--alt-flip alternates the flips of --flip; give both" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# --- loader order, determinism, sharding -------------------------------------------------------
def _split(n=50):
    return Split(torch.from_numpy(RNG.integers(0, 256, (n, 1, 4, 4), dtype=np.uint8)), torch.arange(n) % 10)


def test_loader_length_order_and_last_batch():
    s = _split(50)
    keep, drop = BatchLoader(s, 16), BatchLoader(s, 16, drop_last=True)
    assert len(keep) == 4 and len(drop) == 3
    assert [len(y) for _, y in keep] == [16, 16, 16, 2] and [len(y) for _, y in drop] == [16, 16, 16]
    assert torch.equal(torch.cat([y for _, y in keep]), s.labels)  # shuffle=False: 0..N-1
    assert torch.equal(torch.cat([x for x, _ in keep]), s.images.float() / 255)


def test_epochs_are_seeded_permutations():
    s = _split(50)
    a, b = BatchLoader(s, 8, shuffle=True, seed=1), BatchLoader(s, 8, shuffle=True, seed=1)
    assert torch.equal(a.epoch_indices(0).sort().values, torch.arange(50))
    assert torch.equal(a.epoch_indices(3), b.epoch_indices(3))
    assert not torch.equal(a.epoch_indices(0), a.epoch_indices(1))
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(1 + 1000003 * 2))
    assert torch.equal(a.epoch_indices(2), expected)
    a.set_epoch(2)
    assert torch.equal(torch.cat([y for _, y in a]), s.labels[expected])


def test_resume_mid_epoch_is_bit_identical():
    loader = BatchLoader(_split(70), 8, shuffle=True, seed=7, crop_padding=1, flip=True, resize=6,
                         mean=(0.5,), std=(0.25,))
    full = list(loader.iterate(4))
    fresh = BatchLoader(_split(70), 8, shuffle=True, seed=7, crop_padding=1, flip=True, resize=6,
                        mean=(0.5,), std=(0.25,))
    fresh.images = loader.images  # _split draws new random images; resume on the same data
    tail = list(fresh.iterate(4, start_batch=5))
    assert len(full) == len(loader) == 9 and len(tail) == 4
    for (x1, y1), (x2, y2) in zip(full[5:], tail):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    other = list(loader.iterate(5))
    assert not torch.equal(full[0][0], other[0][0])


@pytest.mark.parametrize("n,world,drop_last", [(50, 3, False), (50, 3, True), (48, 4, True), (7, 2, False)])
def test_shards_are_disjoint_and_cover_the_epoch(n, world, drop_last):
    loaders = [BatchLoader(_split(n), 4, shuffle=True, seed=2, drop_last=drop_last, rank=r, world_size=world)
               for r in range(world)]
    shards = [ld.epoch_indices(1) for ld in loaders]
    together = torch.cat(shards)
    assert len(set(together.tolist())) == len(together)  # disjoint
    if drop_last:
        assert len({len(s) for s in shards}) == 1 and len({len(ld) for ld in loaders}) == 1
        assert len(together) == n - n % world
    else:
        assert sorted(together.tolist()) == list(range(n))  # every sample exactly once
    full = BatchLoader(_split(n), 4, shuffle=True, seed=2).epoch_indices(1)
    assert set(together.tolist()) <= set(full.tolist())
    labels = torch.cat([torch.cat([y for _, y in ld.iterate(1)]) for ld in loaders])
    assert sorted(labels.tolist()) == sorted((together % 10).tolist())


def test_channels_last_option():
    x, _ = next(iter(BatchLoader(Split(torch.zeros(4, 3, 5, 5, dtype=torch.uint8), torch.zeros(4).long()), 4,
                                 channels_last=True, resize=8)))
    assert x.is_contiguous(memory_format=torch.channels_last) and x.shape == (4, 3, 8, 8)


# --- malformed files -----------------------------------------------------------------------------
def _break(folder: Path, name: str, data: bytes) -> Path:
    for old in folder.glob(name + "*"):
        old.unlink()
    (folder / name).write_bytes(data)
    return folder / name


def _good_images(n=60):
    return idx_bytes(np.zeros((n, 28, 28), np.uint8))


@pytest.mark.parametrize("case,data,message", [
    ("truncated gz", gzip.compress(_good_images())[:-40], "gzip"),
    ("wrong magic", b"\x01\x00\x08\x03" + _good_images()[4:], "not an IDX file"),
    ("not idx", b"GIF89a" + bytes(100), "not an IDX file"),
    ("wrong ndim", b"\x00\x00\x08\x02" + _good_images()[4:], "2 dimensions, expected 3"),
    ("wrong dims", _good_images()[:12] + (27).to_bytes(4, "big") + _good_images()[16:], "longer"),
    ("truncated raw", _good_images()[:-1], "truncated"),
    ("extra bytes", _good_images() + b"\x00", "longer"),
    ("count differs", _good_images(59), "59"),
    ("empty", b"", "empty"),
    ("data type", b"\x00\x00\x0d\x03" + _good_images()[4:], "0x0d"),
])
def test_malformed_idx_images_name_the_file(tmp_path, case, data, message):
    write_mnist(tmp_path, n_train=60, n_test=5)
    bad = _break(tmp_path, "train-images-idx3-ubyte", data)
    with pytest.raises(DatasetError, match=message) as e:
        load_dataset("mnist", tmp_path)
    assert str(bad) in str(e.value)


def test_labels_out_of_range_name_the_file(tmp_path):
    write_mnist(tmp_path, n_train=60, n_test=5)
    bad = _break(tmp_path, "t10k-labels-idx1-ubyte", idx_bytes(np.array([1, 2, 10, 3, 4], np.uint8)))
    with pytest.raises(DatasetError, match=r"label 10 at record 2 is out of range") as e:
        load_dataset("mnist", tmp_path)
    assert str(bad) in str(e.value)


def test_cifar_record_cut_short_and_bad_labels(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    write_cifar10(folder)
    good = (folder / "data_batch_3.bin").read_bytes()
    (folder / "data_batch_3.bin").write_bytes(good[:-100])
    with pytest.raises(DatasetError, match=r"data_batch_3\.bin.*cut short"):
        load_dataset("cifar10", tmp_path)
    (folder / "data_batch_3.bin").write_bytes(b"\x0b" + good[1:])
    with pytest.raises(DatasetError, match=r"data_batch_3\.bin: label 11 at record 0"):
        load_dataset("cifar10", tmp_path)
    (folder / "data_batch_3.bin").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"data_batch_3\.bin: the file is empty"):
        load_dataset("cifar10", tmp_path)


def test_svhn_bad_files_are_named(tmp_path):
    (tmp_path / "train_32x32.mat").write_bytes(b"MATLAB? no" * 20)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": [[1], [11]]})
    with pytest.raises(DatasetError, match=r"train_32x32\.mat: not a readable MATLAB file"):
        load_dataset("svhn", tmp_path)
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": [[1], [2]]})
    with pytest.raises(DatasetError, match=r"test_32x32\.mat: labels must be integers 1\.\.10"):
        load_dataset("svhn", tmp_path)


# --- not found -----------------------------------------------------------------------------------
def test_not_found_says_where_it_looked_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(datasets._LAYOUT, "fashion-mnist",
                        (*datasets._LAYOUT["fashion-mnist"][:2], str(tmp_path / "no-debian")))
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist", tmp_path / "mine")
    msg = str(e.value)
    for part in (str(tmp_path / "mine"), "FashionMNIST/raw", str(tmp_path / "no-debian"), "download is off",
                 "dataset-fashion-mnist", "--data-dir", "nin data fetch fashion-mnist", ".cache/nin"):
        assert part in msg


def test_failed_download_is_reported(tmp_path, monkeypatch):
    calls = []

    def offline(name, root):
        calls.append((name, root))
        raise OSError("network is unreachable")

    monkeypatch.setattr(datasets, "_download", offline)
    with pytest.raises(DatasetError, match=r"download into .* failed \(OSError: network is unreachable\)"):
        load_dataset("cifar100", tmp_path, download=True)
    assert calls == [("cifar100", tmp_path)]


def test_download_then_found(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "_download", lambda name, root: write_mnist(root / "MNIST" / "raw", 5, 5))
    assert load_dataset("mnist", tmp_path, download=True).train.images.shape == (5, 1, 28, 28)


# --- CLI -----------------------------------------------------------------------------------------
def test_cli_data_info_and_errors(tmp_path, capsys):
    arrays = write_mnist(tmp_path / "mnist", n_train=30, n_test=10)
    assert main(["data", "info", "mnist", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert str((tmp_path / "mnist").resolve()) in out and "1 x 28 x 28" in out
    counts = np.bincount(arrays["train"][1], minlength=10)
    assert f"{'3':<12} {counts[3]:>8,} {np.bincount(arrays['t10k'][1], minlength=10)[3]:>8,}" in out
    assert f"{arrays['train'][0].mean() / 255:.4f}" in out and "total" in out
    _break(tmp_path / "mnist", "train-labels-idx1-ubyte", b"")
    assert main(["data", "info", "mnist", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("nin data: error: ") and "empty" in err and "Traceback" not in err
    assert main(["data", "info", "cifar10", "--data-dir", str(tmp_path)]) == 1
    assert "nin data fetch cifar10" in capsys.readouterr().err


# --- fuzz ----------------------------------------------------------------------------------------
def _idx_like():
    header = st.tuples(st.sampled_from([0, 1]), st.sampled_from([0, 8]), st.sampled_from([0x08, 0x0d, 0]),
                       st.integers(0, 4)).map(bytes)
    dims = st.lists(st.integers(0, 40), min_size=0, max_size=4).map(
        lambda ds: b"".join(d.to_bytes(4, "big") for d in ds))
    return st.one_of(st.binary(max_size=200), st.tuples(header, dims, st.binary(max_size=400)).map(b"".join))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_idx_like(), gz=st.booleans(), cut=st.integers(0, 30), ndim=st.sampled_from([1, 3]))
def test_fuzz_idx_parser_raises_only_dataset_error(tmp_path, data, gz, cut, ndim):
    blob = gzip.compress(data) if gz else data
    if gz and cut:
        blob = blob[:-cut]
    path = tmp_path / "fuzz.idx"
    path.write_bytes(blob)
    try:
        a = read_idx(path, ndim)
    except DatasetError as e:
        assert str(path) in str(e)
    else:  # accepted: must agree with the header exactly
        assert data[:4] == bytes([0, 0, 8, ndim]) and a.dtype == np.uint8 and a.ndim == ndim
        dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
        assert list(a.shape) == dims and a.tobytes() == data[4 + 4 * ndim:]


# guards against: a folder dataset reading odd images (16-bit, palette, CMYK, EXIF) otherwise than predict
def test_folder_dataset_and_predict_see_the_same_pixels(tmp_path):
    """16-bit, palette, RGBA, CMYK, EXIF-rotated and non-square images in a folder dataset: its tensors are
    exactly what predict feeds the network for the same files."""
    from nin.data.datasets import load_dataset
    from nin.data.images import read_image

    rng = np.random.default_rng(1)
    root = tmp_path / "odd"
    for c in ("x", "y"):
        (root / c).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / c / "rgb.png")
        Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)).save(root / c / "grey16.png")
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).convert("P").save(root / c / "pal.png")
        Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8), "RGBA").save(root / c / "rgba.png")
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).convert("CMYK").save(root / c / "cmyk.jpg")
        Image.fromarray(rng.integers(0, 255, (10, 20, 3), dtype=np.uint8)).save(root / c / "wide.png")
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 on display
        Image.fromarray(rng.integers(0, 255, (20, 10, 3), dtype=np.uint8)).save(root / c / "rot.jpg", exif=exif)
    ds = load_dataset(f"folder:{root}", seed=0)
    c, h, w = ds.image_size
    assert (c, h, w) == (3, 20, 20)
    from nin.data.datasets import folder_split

    train_files, test_files, _, _ = folder_split(root, 0)
    for split, files in ((ds.train, train_files), (ds.test, test_files)):
        for img, (path, label) in zip(split.images, files):
            want = torch.from_numpy(read_image(path, c, (h, w)))
            assert torch.equal(img, want), path
    # a 16-bit grey value is scaled, not clipped: 30000 -> round(30000 * 255 / 65535) = 117
    Image.fromarray(np.full((4, 4), 30000, np.uint16)).save(tmp_path / "g16.png")
    assert read_image(tmp_path / "g16.png", 1, (4, 4)).max() == 117


# guards against: float or unbatched input converted as if it were uint8 pixels
def test_to_float_batch_refuses_anything_but_uint8_batches():
    from nin.data.batchops import to_float_batch

    for bad in (torch.zeros(2, 1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.uint8)):
        with pytest.raises(ValueError, match=r"expected a uint8 N x C x H x W tensor, got torch\.\w+ \(.*4, 4\)"):
            to_float_batch(bad)
    with pytest.raises(ValueError, match=r"^give both mean and std, or neither$"):
        to_float_batch(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), mean=(0.5,))


# guards against: per-channel normalization or the resize of a non-square image off the formula
def test_to_float_batch_normalizes_each_channel_without_a_resize_and_resizes_non_square_images():
    """Per-channel (x / 255 - mean) / std on 3 channels at the input's size, with the arithmetic in the given
    dtype (x * scale + bias, each rounded to it, as documented) and within that dtype's rounding of float64's
    exact answer; a non-square image is resized to the square side asked for; a mean or std of the wrong
    length is refused by name."""
    import torch.nn.functional as F

    from nin.data.batchops import to_float_batch

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8, generator=g)
    mean, std = (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)
    m64, s64 = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
    exact = (x.double() / 255 - m64.view(1, 3, 1, 1)) / s64.view(1, 3, 1, 1)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 0.05)):
        got = to_float_batch(x, mean=mean, std=std, dtype=dtype)
        scale, bias = (1 / (255 * s64)).to(dtype), (-m64 / s64).to(dtype)
        assert got.dtype == dtype and got.shape == x.shape
        assert torch.equal(got, x.to(dtype) * scale.view(1, 3, 1, 1) + bias.view(1, 3, 1, 1))
        torch.testing.assert_close(got.double(), exact, atol=tol, rtol=0)
    wide = torch.randint(0, 256, (2, 3, 6, 9), dtype=torch.uint8, generator=g)
    for side in (6, 9):  # equal to one side only: still resized to side x side
        ref = F.interpolate(wide.double() / 255, size=(side, side), mode="bilinear", antialias=True)
        torch.testing.assert_close(to_float_batch(wide, resize=side, dtype=torch.float64), ref, atol=1e-12, rtol=0)
    for kw, name in ((dict(mean=(0.1, 0.2), std=std), "mean"), (dict(mean=mean, std=(1.0, 2.0)), "std")):
        with pytest.raises(ValueError, match=rf"^{name} has 2 values for 3 channels$"):
            to_float_batch(x, **kw)
