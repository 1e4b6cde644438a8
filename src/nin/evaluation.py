"""Evaluating a model on a test set: accuracy, per-class precision/recall, the confusion matrix (and its
CSV), with the data's classes matched to the model's by name.  The logits come from ``inference``."""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UsageError
from .inference import predict_logits, resolve_eval_precision
from .vocab import resolve_tta


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """K x K counts, rows = true class, columns = predicted class."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes)


@dataclass
class EvalResult:
    classes: list[str]
    confusion: np.ndarray  # rows: true class, columns: predicted class
    tta: str = "none"
    compute: str = "fp32"  # the arithmetic precision of the evaluation (fp32, or bf16 autocast)

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / max(self.n, 1))

    @property
    def precision(self) -> np.ndarray:
        """Per class: correct / predicted as that class (0 when never predicted)."""
        predicted = self.confusion.sum(0)
        return np.divide(np.diag(self.confusion), predicted, out=np.zeros(len(self.classes)),
                         where=predicted > 0)

    @property
    def recall(self) -> np.ndarray:
        """Per class: correct / examples of that class (0 when there are none)."""
        actual = self.confusion.sum(1)
        return np.divide(np.diag(self.confusion), actual, out=np.zeros(len(self.classes)), where=actual > 0)

    def most_confused(self, k: int = 5) -> list[tuple[str, str, int]]:
        """The k largest off-diagonal cells: (true class, predicted class, count), count > 0."""
        off = self.confusion.copy()
        np.fill_diagonal(off, 0)
        order = np.argsort(-off, axis=None, kind="stable")[:k]
        pairs = [np.unravel_index(i, off.shape) for i in order]
        return [(self.classes[t], self.classes[p], int(off[t, p])) for t, p in pairs if off[t, p] > 0]

    def to_json(self) -> dict:
        return {
            "n": self.n, "accuracy": self.accuracy, "tta": self.tta, "compute_precision": self.compute,
            "per_class": [{"class": c, "precision": float(p), "recall": float(r), "support": int(s)}
                          for c, p, r, s in zip(self.classes, self.precision, self.recall, self.confusion.sum(1))],
            "most_confused": [{"true": t, "predicted": p, "count": n} for t, p, n in self.most_confused()],
            "confusion": self.confusion.tolist(),
        }


def evaluate(model, split=None, *, batch_size: int = 256, tta: str | None = None, limit: int | None = None,
             precision: str | None = "fp32", classes: list[str] | None = None, class_map=None,
             progress=None) -> EvalResult:
    """Evaluate ``model`` (torch or OnnxModel, or a run folder, model file or shipped name) on a Dataset
    (its test split), a data Split (``.images`` uint8, ``.labels``) or uint8 batches ``(x, y)`` of a
    streamed one (``streamed_test_batches``), at most ``limit`` images.  Without ``split``: the model's own
    test set (``model_dataset``: a folder's split is checked to be the run's, as ``nin eval`` does).

    Classes are matched by name, never by position: the data's class names (``classes``, else the
    Split's or Dataset's own) are matched to the model's with ``nin.classes.match_classes`` (case,
    spaces and punctuation ignored; ``class_map``: a JSON file or dict naming the others), and a
    dataset class the model does not know is a ClassMismatch error listing them.
    ``tta`` defaults to what the model's run used for its reported accuracy (``model.meta.tta``);
    ``precision="run"`` evaluates as the run did (see resolve_eval_precision).  ``progress(n)``, if
    given, is told of every batch evaluated (n images; ``nin eval``'s progress bar)."""
    from .classes import label_map

    if isinstance(model, (str, os.PathLike)):  # a run folder, a model file or a shipped name
        from .hub import load_any

        model = load_any(model)
    if split is None:  # the model's own test set, checked as `nin eval` checks it (model_dataset)
        ds = model_dataset(model, class_map=class_map)
        split, _ = test_data(model, ds, batch_size)
        classes = classes or ds.classes
    tta = resolve_tta(getattr(model, "meta", None), tta)
    if limit is not None and limit < 1:
        raise UsageError(f"limit must be at least 1, got {limit}")
    if hasattr(split, "test") and hasattr(split, "classes"):  # a whole Dataset: its test split
        classes, split = classes or split.classes, split.test
    classes = classes or getattr(split, "classes", None)
    model_classes = list(model.classes)
    remap = None
    if classes is not None:
        remap = label_map(list(classes), model_classes, class_map)
    elif class_map is not None:
        raise UsageError("class_map needs the data's class names (pass classes=, or a Dataset)")
    precision = resolve_eval_precision(model, precision)
    batches = [(split.images, split.labels)] if hasattr(split, "images") else split
    logits, labels, n = [], [], 0
    for x, y in batches:
        if limit is not None:
            x, y = x[:limit - n], y[:limit - n]
        logits.append(predict_logits(model, x, batch_size=batch_size, tta=tta, precision=precision,
                                     progress=progress))
        y = torch.as_tensor(y).cpu()
        labels.append(y if remap is None else remap[y])
        n += len(y)
        if limit is not None and n >= limit:
            break
    logits = torch.cat(logits) if logits else torch.zeros(0, len(model_classes))
    if logits.shape[1] != len(model_classes):
        raise UsageError(f"the model gives {logits.shape[1]} logits but has {len(model_classes)} class names")
    labels = torch.cat(labels).numpy() if labels else np.zeros(0, np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= len(model_classes)):
        raise UsageError(f"the labels go up to {labels.max()} but the model knows {len(model_classes)} classes")
    cm = confusion_matrix(labels, logits.argmax(1).numpy(), len(model_classes))
    return EvalResult(model_classes, cm, tta or "none", precision)


def streamed_test_batches(model, ds, *, batch_size: int = 256, workers: int | None = None):
    """uint8 batches (x, y) of a streamed dataset's test split (``ds.test``: files or shards) as the run's
    own test loader decoded them: its transform ("imagenet": resize + centre crop to the model's input;
    "fit": letterbox to the collection's size, the model's resize then follows in ``preprocess``).
    Unreadable files are left out, as in training; the loader is returned too, for its ``bad_files``."""
    from .data import make_loader

    c, h, w = model.meta.input_size
    imagenet = (model.meta.preprocess or {}).get("transform") == "imagenet"
    loader = make_loader(ds.test, batch_size, in_chans=c, size=(h, w) if imagenet else tuple(ds.image_size[1:]),
                         transform="resize-center-crop" if imagenet else "fit", workers=workers)
    return loader.uint8_batches(), loader


def save_confusion_csv(result: EvalResult, path: str | os.PathLike) -> None:
    from .fsutil import atomic_write

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["true \\ predicted", *result.classes])
            for name, row in zip(result.classes, result.confusion):
                w.writerow([name, *map(int, row)])
    atomic_write(path, write)


# --- the model's own test data ----------------------------------------------------------------
def model_dataset(model, name: str | None = None, data_dir: str | None = None, class_map=None):
    """The dataset to evaluate ``model`` on: ``name``, else the one it was trained on, read as the run read
    it (a folder in memory or streamed).  A folder must hold the very files the run held out (model.json's
    split record; else the test images may have been training images: UsageError), and the dataset's
    classes must be the model's by name (``nin.classes``).  Both checked before any work."""
    from .classes import match_classes
    from .data import load_dataset, open_dataset

    split = getattr(model.meta, "split", None) if not name else None
    name = name or model.meta.dataset or "fashion-mnist"
    seed = (split or {}).get("seed", 0)
    if name.startswith(("folder:", "wds:")):  # read as the run read it: in memory, or streamed
        imagenet = (model.meta.preprocess or {}).get("transform") == "imagenet"
        ds = open_dataset(name, seed=seed, stream=True if imagenet else None)
    else:
        ds = load_dataset(name, data_dir, seed=seed)
    if split and ds.split and ds.split.get("test_files_sha256") != split.get("test_files_sha256"):
        raise UsageError(f"{ds.source}: the folder's held-out files are not the ones the run held out "
                         f"({split.get('rule')}: {split.get('test_files')} files then, {ds.split.get('test_files')} "
                         "now); files were added, removed or renamed since training, so its test images may "
                         "have been training images")
    match_classes(list(ds.classes), list(model.classes), class_map, where=ds.source)
    return ds


def test_data(model, ds, batch_size: int):
    """(ds.test, None) in memory, or (uint8 test batches, their loader) for a streamed dataset."""
    from .data import Split

    if isinstance(ds.test, Split):
        return ds.test, None
    return streamed_test_batches(model, ds, batch_size=batch_size)


def first_test_images(model, ds, n: int):
    """The first ``n`` test images (uint8) and labels, as the model takes them."""
    from .errors import DatasetError

    data, loader = test_data(model, ds, n)
    if loader is None:
        return data.images[:n], data.labels[:n]
    batch = next(data, None)  # one batch of n, its unreadable files left out
    warn_bad_files(loader)
    if batch is None:
        raise DatasetError(f"{ds.source}: none of the first {n} test images could be read")
    return batch


def warn_bad_files(loader) -> None:
    """A line on stderr when a streamed test set left out files it could not read (as training does)."""
    import sys

    bad = loader.bad_files if loader is not None else []
    if bad:
        print(f"warning: {len(bad)} test image(s) could not be read and were left out, as in training "
              f"(first: {bad[0][0]}: {bad[0][1]})", file=sys.stderr)
