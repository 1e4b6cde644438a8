"""Accuracy, per-class precision/recall, the confusion matrix, and class activation maps.

Every model here is used through two calls: ``model(x)`` -> logits and, for CAMs,
``model.forward_features(x)`` -> one map per class (N x K x h x w) before global average pooling.
Raw images (uint8 N x C x H x W) become model input only through ``data.to_float_batch`` with the
model's ``meta.preprocess``, so ``nin eval`` and ``nin predict`` see exactly the same numbers.
"""
from __future__ import annotations

import contextlib
import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UsageError

TTA_CHOICES = ("none", "flip", "shift")
# "shift": the image and its mirror, each at the 9 positions of a 1-pixel translation (3 x 3), 18 views
SHIFTS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def preprocess(model, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 N x C x H x W -> the float input ``model`` was trained on (its meta.preprocess)."""
    from .data import to_float_batch

    p = getattr(getattr(model, "meta", None), "preprocess", None) or {}
    return to_float_batch(images, resize=p.get("resize"), mean=p.get("mean"), std=p.get("std"), dtype=dtype)


PRECISIONS = ("fp32", "bf16")


def resolve_eval_precision(model, precision: str | None) -> str:
    """"run" (or None): what the model's run evaluated with, where this machine can do it; else as given.
    Training evaluates under bf16 autocast where the CPU/GPU supports it; evaluating the same way
    reproduces its reported accuracy to the image (fp32 may differ by a few images)."""
    if precision in (None, "run"):
        precision = getattr(getattr(model, "meta", None), "precision", "fp32")
        if precision == "bf16":
            from .engine import cpu_supports_bf16

            precision = "bf16" if cpu_supports_bf16() else "fp32"
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of: run, {', '.join(PRECISIONS)}")
    if not isinstance(model, torch.nn.Module):
        return "fp32"  # onnxruntime runs the file as exported
    return precision


def tta_logits(model, x: torch.Tensor, tta: str | None = "none") -> torch.Tensor:
    """float32 logits of a preprocessed batch; ``tta="flip"`` averages them with the horizontal mirror's,
    ``tta="shift"`` over the image and its mirror each moved by up to one pixel (SHIFTS), the border
    filled with the background (what a zero pixel preprocesses to), as training's crops pad.
    The one test-time augmentation of nin: training's evaluation, ``nin eval``, predict and serve."""
    check_tta(tta)
    if tta == "shift":
        n, c, h, w = x.shape
        background = preprocess(model, torch.zeros(1, c, 1, 1, dtype=torch.uint8), x.dtype)[..., :1, :1]
        padded = background.to(x.device).expand(n, c, h + 2, w + 2).clone()
        padded[..., 1:-1, 1:-1] = x
        views = [padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w] for dy, dx in SHIFTS]
        return sum(model(v).float() + model(v.flip(-1)).float() for v in views) / (2 * len(views))
    logits = model(x).float()
    if tta == "flip":
        logits = (logits + model(x.flip(-1)).float()) / 2
    return logits


def check_tta(tta: str | None) -> None:
    if tta not in (None, *TTA_CHOICES):
        raise UsageError(f"unknown test-time augmentation {tta!r}; choose one of: {', '.join(TTA_CHOICES)}")


@torch.inference_mode()
def predict_logits(model, images: torch.Tensor, *, batch_size: int = 256, tta: str | None = None,
                   precision: str = "fp32", progress=None) -> torch.Tensor:
    """Logits (N x K, float32, CPU) for uint8 images, in batches.  ``tta="flip"`` averages the
    logits of the image and its horizontal mirror, ``"shift"`` 18 views (see tta_logits).
    ``precision="bf16"``: as the training loop evaluates (bf16 input and autocast), see
    resolve_eval_precision.  A PyTorch model runs channels_last, as in training, in both precisions: in
    fp32 that halved the time of a 2-core AVX2 CPU (benchmarks/eval_layout.py).
    ``progress(n)``, if given, is called after each batch with the number of images it held."""
    check_tta(tta)
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    torch_model = isinstance(model, torch.nn.Module)
    bf16 = precision == "bf16" and torch_model
    if torch_model:
        model = model.to(memory_format=torch.channels_last)
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = preprocess(model, images[i:i + batch_size], torch.bfloat16 if bf16 else torch.float32)
        if torch_model:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out.append(tta_logits(model, x, tta).cpu())
        if progress is not None:
            progress(x.shape[0])
    if not out:
        return torch.zeros(0, len(getattr(model, "classes", [])))
    return torch.cat(out)


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


def evaluate(model, split, *, batch_size: int = 256, tta: str | None = None, limit: int | None = None,
             precision: str | None = "fp32", classes: list[str] | None = None, class_map=None,
             progress=None) -> EvalResult:
    """Evaluate ``model`` (torch or OnnxModel) on a Dataset (its test split), a data Split (``.images``
    uint8, ``.labels``) or uint8 batches ``(x, y)`` of a streamed one (``streamed_test_batches``), at
    most ``limit`` images.

    Classes are matched by name, never by position: the data's class names (``classes``, else the
    Split's or Dataset's own) are matched to the model's with ``nin.classes.match_classes`` (case,
    spaces and punctuation ignored; ``class_map``: a JSON file or dict naming the others), and a
    dataset class the model does not know is a ClassMismatch error listing them.
    ``tta`` defaults to what the model's run used for its reported accuracy (``model.meta.tta``);
    ``precision="run"`` evaluates as the run did (see resolve_eval_precision).  ``progress(n)``, if
    given, is told of every batch evaluated (n images; ``nin eval``'s progress bar)."""
    from .classes import label_map

    if tta is None:
        tta = getattr(getattr(model, "meta", None), "tta", "none")
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


def confusion_figure(result: EvalResult):
    """The confusion matrix as a matplotlib Figure (no pyplot: no global backend state)."""
    from matplotlib.figure import Figure

    k = len(result.classes)
    fig = Figure(figsize=(1.0 + 0.6 * k, 0.6 + 0.55 * k), layout="constrained")
    ax = fig.add_subplot()
    # Colour by row share (recall) so rare classes are as visible as common ones; print the counts.
    share = result.confusion / np.maximum(result.confusion.sum(1, keepdims=True), 1)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for t in range(k):
        for p in range(k):
            n = result.confusion[t, p]
            if n:
                ax.text(p, t, str(n), ha="center", va="center", fontsize=7,
                        color="white" if share[t, p] > 0.5 else "black")
    ax.set_xticks(range(k), result.classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), result.classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"accuracy {result.accuracy:.4f} on {result.n:,} images", fontsize=9)
    return fig


@contextlib.contextmanager
def no_glyph_warnings():
    """Silence matplotlib's "Glyph ... missing from font(s)" warnings, and only those: class names in a
    script its fonts lack (CJK, ...) are drawn as boxes, and a warning per character tells a user nothing."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from (current )?font")
        yield


def save_confusion_png(result: EvalResult, path: str | os.PathLike) -> None:
    from .fsutil import atomic_write

    fig = confusion_figure(result)
    with no_glyph_warnings():  # the text is laid out and drawn here
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


# --- class activation maps ------------------------------------------------------------------
@torch.inference_mode()
def class_activation_maps(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps N x K x h x w, logits N x K) for a preprocessed float batch.

    NiN's last block already gives one map per class and the head only averages it, so these are
    the class activation maps, no gradient needed: ``maps.mean((2, 3)) == logits``.
    """
    maps = model.forward_features(x)
    return maps, model.forward_head(maps)


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """N x K x h x w -> N x K x H x W (bilinear), for overlaying on the input image."""
    return F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)


CAM_DPI = 130


def _show_image(ax, image: torch.Tensor) -> None:
    img = image.cpu().numpy()
    if img.shape[0] == 1:
        ax.imshow(img[0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(img.transpose(1, 2, 0))
    ax.set_xticks([])
    ax.set_yticks([])


def _overlay(ax, image: torch.Tensor, cam: torch.Tensor, title: str) -> None:
    """The image in grey with one class map (min-max scaled) in colour on top."""
    _show_image(ax, image.float().mean(0, keepdim=True).to(torch.uint8))
    cam = cam.cpu().numpy()
    span = cam.max() - cam.min()
    ax.imshow((cam - cam.min()) / span if span > 0 else np.zeros_like(cam), cmap="jet", alpha=0.45,
              vmin=0, vmax=1)
    ax.set_title(title, fontsize=8)


def _cam_probabilities(model, images: torch.Tensor) -> torch.Tensor:
    """The probabilities a cam figure prints: ``nin predict``'s (nin.prediction.probabilities, the model's
    own TTA), so that an image has one number everywhere; the maps are the plain forward's."""
    from .prediction import probabilities

    return probabilities(model, images.to(next(model.parameters()).device)).float().cpu()


def _maps(model, images: torch.Tensor) -> torch.Tensor:
    """The class maps (N x K x h x w, CPU) of uint8 images, on the model's device."""
    dev = next(model.parameters()).device
    return class_activation_maps(model, preprocess(model, images.to(dev)))[0].float().cpu()


def cam_figure(model, image: torch.Tensor, *, topk: int = 3, title: str = "", probs: torch.Tensor | None = None):
    """(matplotlib Figure, top-k [(class, probability)]): the image (uint8 C x H x W, model-sized) and
    its top-k classes' maps overlaid, with their probabilities.  ``nin cam`` and ``nin serve`` draw it.

    The probabilities (and so which classes are the top k) are ``nin predict``'s, with the model's own
    TTA (``probs``, K values, when already computed: the server's); each map is the plain forward's."""
    from matplotlib.figure import Figure

    maps = _maps(model, image[None])
    probs = (_cam_probabilities(model, image[None])[0] if probs is None
             else torch.as_tensor(probs, dtype=torch.float32).cpu())
    k = max(1, min(topk, probs.numel()))
    top = probs.topk(k)
    cams = upsample_maps(maps, tuple(image.shape[1:]))[0]
    image = image.cpu()
    fig = Figure(figsize=(2.1 * (k + 1), 2.5), layout="constrained")
    axes = fig.subplots(1, k + 1, squeeze=False)[0]
    _show_image(axes[0], image)
    axes[0].set_title(title or "input", fontsize=8)
    result = []
    for ax, p, c in zip(axes[1:], top.values.tolist(), top.indices.tolist()):
        _overlay(ax, image, cams[c], f"{model.classes[c]}  {p:.1%}")
        result.append((model.classes[c], p))
    return fig, result


def save_cam_figure(model, image: torch.Tensor, path: str | os.PathLike, *, topk: int = 3,
                    title: str = "") -> list[tuple[str, float]]:
    """Write ``cam_figure`` as a PNG; returns the top-k (class, probability), as ``nin predict`` gives them."""
    from .fsutil import atomic_write

    fig, top = cam_figure(model, image, topk=topk, title=title)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=CAM_DPI))
    return top


def cam_grid_figure(model, images: torch.Tensor, labels=None, *, cols: int = 0):
    """(Figure, accuracy): N images each with the map of its predicted class, titled 'predicted p'
    and, when ``labels`` are given and the prediction is wrong, '(true: ...)'.  The accuracy on these
    images is None without labels.  Predictions and probabilities are ``nin predict``'s (the model's own
    TTA, as ``nin eval`` counts them); the maps are the plain forward's."""
    from matplotlib.figure import Figure

    n = images.shape[0]
    cols = cols or min(n, 8)
    rows = max(1, -(-n // max(cols, 1)))
    maps = _maps(model, images)
    probs = _cam_probabilities(model, images)
    pred = probs.argmax(1)
    images = images.cpu()
    cams = upsample_maps(maps, tuple(images.shape[2:]))
    fig = Figure(figsize=(1.7 * cols, 1.9 * rows), layout="constrained")
    axes = fig.subplots(rows, max(cols, 1), squeeze=False).ravel()
    for i, ax in enumerate(axes):
        if i >= n:
            ax.axis("off")
            continue
        c = int(pred[i])
        t = int(labels[i]) if labels is not None else c
        mark = "" if c == t else f"\n(true: {model.classes[t]})"
        _overlay(ax, images[i], cams[i, c], f"{model.classes[c]} {probs[i, c]:.0%}{mark}")
    if labels is None:
        return fig, None
    return fig, float((pred == torch.as_tensor(labels).cpu()).float().mean()) if n else 0.0


def save_cam_grid(model, images: torch.Tensor, labels, path: str | os.PathLike, *, cols: int = 0) -> float:
    """Write ``cam_grid_figure`` as a PNG; returns the accuracy on these images."""
    from .fsutil import atomic_write

    fig, acc = cam_grid_figure(model, images, labels, cols=cols)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=130))
    return acc
