"""Predicting image files: collecting them from paths and folders, and the top-k classes of each.

How a file becomes the network's input is ``nin.data.images`` (the same code as datasets, cam and serve),
then the model's own preprocessing (``inference.preprocess``), the same path as ``nin eval``.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ImageError
from .data.images import IMAGE_SUFFIXES, MAX_PIXELS, image_header, read_image, read_input, small_input_note

__all__ = ["collect_files", "Prediction", "predict_files", "probabilities", "read_image", "read_input", "ImageError",
           "IMAGE_SUFFIXES", "STDIN"]

STDIN = "-"  # the path that means one image read from standard input (``nin predict -``)


def collect_files(paths, *, warn=None) -> list["Path | Prediction"]:
    """Expand directories (recursively, sorted, image suffixes only); keep files as given.

    In input order: a Path per file to read, ``STDIN`` ("-") as given, or a Prediction with ``error``
    set for a path that does not exist or a directory that holds no images.  Symbolic links to folders inside a folder
    are not followed (a link cycle would never end); ``warn`` (default: stderr) is told of each.
    """
    warn = warn or (lambda m: print(f"warning: {m}", file=sys.stderr))
    items: list[Path | Prediction] = []
    for p in map(Path, paths):
        if str(p) == STDIN:
            items.append(STDIN)
        elif p.is_dir():
            found, skipped = [], []
            for root, dirs, files in os.walk(p):
                skipped += [Path(root) / d for d in dirs if (Path(root) / d).is_symlink()]
                for f in map(lambda n: Path(root) / n, files):
                    # a broken link named like an image is kept, so that it is reported rather than skipped
                    if f.suffix.lower() in IMAGE_SUFFIXES:
                        found.append(f)
            for d in sorted(skipped):
                warn(f"{d}: a symbolic link to a folder; not followed (name the folder itself to include it)")
            if not found:
                items.append(Prediction(str(p), error=f"{p}: no {'/'.join(IMAGE_SUFFIXES)} files in this folder"))
            items.extend(sorted(found))
        elif p.exists():
            items.append(p)
        else:
            items.append(Prediction(str(p), error=f"{p}: no such file"))
    return items


@dataclass
class Prediction:
    file: str
    top: list[tuple[str, float]] = field(default_factory=list)  # (class, probability), best first
    error: str | None = None
    note: str | None = None  # e.g. an image far smaller than the model's input (images.small_input_note)

    def to_json(self) -> dict:
        if self.error:
            return {"file": self.file, "error": self.error}
        doc = {"file": self.file, "top": [{"class": c, "prob": p} for c, p in self.top]}
        return {**doc, "note": self.note} if self.note else doc


def probabilities(model, images, *, batch_size: int = 64, tta: str | None = None):
    """Class probabilities (N x K, float32) for uint8 images N x C x H x W already fitted to the model,
    with the run's own test-time augmentation unless ``tta`` says otherwise (a row is NaN where the
    model gave non-finite logits).  The one computation behind ``nin predict`` and ``nin serve``."""
    from .inference import predict_logits

    if tta is None:
        tta = getattr(getattr(model, "meta", None), "tta", "none")
    logits = predict_logits(model, images, batch_size=batch_size, tta=tta)
    if logits.shape[1] != len(model.classes):
        raise ImageError(f"the model gives {logits.shape[1]} logits but has {len(model.classes)} class names")
    return logits.softmax(1)


def predict_files(model, paths, *, topk: int = 1, invert: bool = False, batch_size: int = 64,
                  max_pixels: int = MAX_PIXELS, tta: str | None = None) -> list[Prediction]:
    """Predict every image under ``paths``; bad files give a Prediction with ``error`` set.

    ``model`` is what hub.load_any returns (a torch model or an OnnxModel): it has ``.meta``.
    ``tta`` defaults to the run's own (``model.meta.tta``), so predictions match the reported accuracy.
    A path ``"-"`` (``STDIN``) is one image read from standard input.  An image far smaller than the
    model's input gets a ``note`` saying what it was made into (``images.small_input_note``).
    """
    import torch

    results = collect_files(paths)  # becomes a Prediction per input, in input order
    good: list[tuple[int, np.ndarray, str | None]] = []
    for i, f in enumerate(results):
        if isinstance(f, Prediction):
            continue
        name = "stdin" if f == STDIN else str(f)
        try:
            source = _stdin_bytes() if f == STDIN else f
            image = read_input(model.meta, source, invert=invert, max_pixels=max_pixels, name=name)
            w, h = image_header(source, max_pixels=max_pixels, name=name)[:2]
            good.append((i, image, small_input_note(model.meta, w, h, name)))
        except ImageError as e:
            results[i] = Prediction(str(f), error=str(e))
    if good:
        probs = probabilities(model, torch.from_numpy(np.stack([a for _, a, _ in good])), batch_size=batch_size,
                              tta=tta)
        tops = top_predictions(model, [str(results[i]) for i, _, _ in good], probs, topk,
                               [note for _, _, note in good])
        for (i, _, _), top in zip(good, tops):
            results[i] = top
    return results


def top_predictions(model, names: list[str], probs, topk: int, notes: list | None = None) -> list[Prediction]:
    """One Prediction per row of ``probs`` (N x K): its ``topk`` classes, best first, or an error where the
    model gave non-finite logits.  ``names`` say what each row is (a file, ``image[i]``)."""
    k = max(1, min(topk, probs.shape[1]))
    values, indices = probs.topk(k, dim=1)
    out = []
    for name, vs, ix, row, note in zip(names, values.tolist(), indices.tolist(), probs, notes or [None] * len(names)):
        if not bool(row.isfinite().all()):
            out.append(Prediction(name, error=f"{name}: the model gave non-finite logits"))
        else:
            out.append(Prediction(name, [(model.classes[j], v) for j, v in zip(ix, vs)], note=note))
    return out


def _stdin_bytes() -> bytes:
    """All of standard input, as bytes (``nin predict -``)."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:
        raise ImageError("stdin: there is no standard input to read an image from")
    try:
        return stream.read()
    except OSError as e:
        raise ImageError(f"stdin: cannot read ({e.strerror or e})") from None
