"""Reading image files into a model's input, and predicting them.

How a file becomes input (also in docs/use.md):

1. Pillow decodes it (PNG, JPEG, BMP, WebP, GIF: first frame; EXIF rotation applied).  Files over
   ``max_pixels`` are refused before decoding; empty, truncated or non-image files raise ImageError.
2. Transparent pixels are laid on the background: black, or white with ``invert`` (so that after
   inverting they are black too).  16-bit grey is scaled to 8 bits.
3. Colour: to grey ("L", ITU-R 601 luma) for 1-channel models, to RGB for 3-channel ones.
4. ``invert``: 255 - v.  Fashion-MNIST is a light garment on black; a photo of a garment on a
   white background needs ``--invert`` or the network sees a large bright square.
5. Size: the image is scaled, keeping its aspect ratio, until it fits the model's H x W
   (antialiased bilinear), and centred on a black canvas -- as Fashion-MNIST's own images were made.
   An image that already has the model's size is used as is, pixel for pixel.
6. ``data.to_float_batch`` with the model's ``meta.preprocess`` -- the same path as ``nin eval``.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import NinError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
MAX_PIXELS = 40_000_000  # refuse larger images before decoding them (about 160 MB as RGBA)


class ImageError(NinError):
    """A file that cannot be used as an image; the message names the file."""


def collect_files(paths) -> list["Path | Prediction"]:
    """Expand directories (recursively, sorted, image suffixes only); keep files as given.

    In input order: a Path per file to read, or a Prediction with ``error`` set for a path that
    does not exist or a directory that holds no images.
    """
    items: list[Path | Prediction] = []
    for p in map(Path, paths):
        if p.is_dir():
            # a broken link named like an image is kept, so that it is reported rather than skipped
            found = sorted(f for f in p.rglob("*") if (f.is_file() or f.is_symlink() and not f.exists())
                           and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                items.append(Prediction(str(p), error=f"{p}: no {'/'.join(IMAGE_SUFFIXES)} files in this folder"))
            items.extend(found)
        elif p.exists():
            items.append(p)
        else:
            items.append(Prediction(str(p), error=f"{p}: no such file"))
    return items


def _to_8bit(im):
    from PIL import Image

    arr = np.asarray(im, dtype=np.float64)
    if arr.max(initial=0) > 255:  # 16-bit (or wider) grey
        arr = arr * 255.0 / (65535.0 if arr.max() <= 65535 else arr.max())
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def image_to_array(im, in_chans: int, size: tuple[int, int], *, invert: bool = False) -> np.ndarray:
    """A decoded PIL image -> uint8 C x H x W in the model's channels and size (steps 2-5 above)."""
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im) or im
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        im = _to_8bit(im)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.new("RGBA", rgba.size, (255, 255, 255, 255) if invert else (0, 0, 0, 255))
        im.alpha_composite(rgba)
    if in_chans == 1:
        im = im.convert("L")
    elif in_chans == 3:
        im = im.convert("RGB")
    else:
        raise ImageError(f"models with {in_chans} input channels cannot read image files")
    if invert:
        im = ImageOps.invert(im)
    h, w = size
    if im.size != (w, h):
        scale = min(w / im.width, h / im.height)
        new = (max(1, min(w, round(im.width * scale))), max(1, min(h, round(im.height * scale))))
        small = im.resize(new, Image.Resampling.BILINEAR)
        im = Image.new(im.mode, (w, h), 0)
        im.paste(small, ((w - new[0]) // 2, (h - new[1]) // 2))
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_image(path: str | os.PathLike, in_chans: int, size: tuple[int, int], *, invert: bool = False,
               max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode ``path`` into uint8 C x H x W, or raise ImageError naming the file."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file")
        with warnings.catch_warnings():
            # We apply our own pixel limit below; Pillow's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > max_pixels:
                    raise ImageError(f"{path}: {im.width}x{im.height} pixels is over the limit of "
                                     f"{max_pixels:,} pixels")
                im.load()  # decode now: truncated data fails here, not later
                return image_to_array(im, in_chans, size, invert=invert)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image file Pillow can read") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{path}: over the limit of {max_pixels:,} pixels") from None
    except OSError as e:  # truncated, unreadable, permission
        raise ImageError(f"{path}: cannot read the image ({e.strerror or e})") from None
    except Exception as e:  # decoders raise odd things (SyntaxError, struct.error, ...) on bad data
        raise ImageError(f"{path}: cannot decode the image ({e.__class__.__name__}: {e})") from None


@dataclass
class Prediction:
    file: str
    top: list[tuple[str, float]] = field(default_factory=list)  # (class, probability), best first
    error: str | None = None

    def to_json(self) -> dict:
        if self.error:
            return {"file": self.file, "error": self.error}
        return {"file": self.file, "top": [{"class": c, "prob": p} for c, p in self.top]}


def predict_files(model, paths, *, topk: int = 1, invert: bool = False, batch_size: int = 64,
                  max_pixels: int = MAX_PIXELS) -> list[Prediction]:
    """Predict every image under ``paths``; bad files give a Prediction with ``error`` set.

    ``model`` is what export.load_any returns (a torch model or an OnnxModel): it has ``.meta``.
    """
    import torch

    from .evaluate import predict_logits

    c, h, w = model.meta.input_size
    results = collect_files(paths)  # becomes a Prediction per input, in input order
    good: list[tuple[int, np.ndarray]] = []
    for i, f in enumerate(results):
        if isinstance(f, Path):
            try:
                good.append((i, read_image(f, c, (h, w), invert=invert, max_pixels=max_pixels)))
            except ImageError as e:
                results[i] = Prediction(str(f), error=str(e))
    if good:
        images = torch.from_numpy(np.stack([a for _, a in good]))
        probs = predict_logits(model, images, batch_size=batch_size).softmax(1)
        k = max(1, min(topk, probs.shape[1]))
        values, indices = probs.topk(k, dim=1)
        for (i, _), vs, ix in zip(good, values.tolist(), indices.tolist()):
            results[i] = Prediction(str(results[i]), [(model.classes[j], v) for j, v in zip(ix, vs)])
    return results
