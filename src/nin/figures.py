"""Figures as matplotlib ``Figure`` objects (no pyplot, no global backend): the confusion matrix and class
activation maps, and the PNG files ``nin eval`` and ``nin cam`` write."""
from __future__ import annotations

import contextlib
import os

import numpy as np
import torch

from .evaluation import EvalResult
from .inference import class_activation_maps, preprocess, upsample_maps

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
