"""One way to read an image: decoding a file (or uploaded bytes) and fitting it to a model's input.

Used by folder datasets, ``nin predict``, ``nin cam``, ``nin eval`` on folders and the server, so a
model sees the same pixels in training and in prediction.  The policy, step by step:

1. Pillow decodes it (PNG, JPEG, BMP, WebP, GIF: first frame, TIFF, PPM/PGM).  Files over
   ``max_pixels`` are refused before decoding; empty, truncated or non-image files raise ImageError.
2. EXIF orientation is applied.  16-bit (or float) grey is scaled to 8 bits (65535 -> 255).
3. Transparent pixels are laid on the background: black, or white with ``invert`` (so that after
   inverting they are black too).
4. Colour: to grey ("L", ITU-R 601 luma) for 1-channel models, to RGB for 3-channel ones.
5. ``invert``: 255 - v.  Fashion-MNIST is a light garment on black; a photo of a garment on a
   white background needs ``--invert`` or the network sees a large bright square.
6. Size (aspect ratio kept): the image is scaled until it fits the model's H x W (antialiased
   bilinear) and centred on a black canvas ("letterbox"), as Fashion-MNIST's own images were made.
   An image that already has the model's size is used as is, pixel for pixel.
"""
from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np

from .errors import ImageError

# The one list of suffixes read as images (folder datasets, predict's folder search, the server).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
MAX_PIXELS = 40_000_000  # refuse larger images before decoding them (about 160 MB as RGBA)
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def _to_8bit(im):
    from PIL import Image

    arr = np.asarray(im, dtype=np.float64)
    if arr.max(initial=0) > 255:  # 16-bit (or wider) grey
        arr = arr * 255.0 / (65535.0 if arr.max() <= 65535 else arr.max())
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def load_image(source: str | os.PathLike | bytes, *, max_pixels: int = MAX_PIXELS, name: str | None = None):
    """Decode a file path or raw bytes into a PIL image (steps 1-2), or raise ImageError naming it.

    ``name`` is what error messages call the image (default: the path, or "the image" for bytes)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    label = name or ("the image" if is_bytes else str(source))
    try:
        if (len(source) if is_bytes else Path(source).stat().st_size) == 0:
            raise ImageError(f"{label}: empty file")
        with warnings.catch_warnings():
            # We apply our own pixel limit below; Pillow's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(bytes(source)) if is_bytes else source) as im:
                if im.width * im.height > max_pixels:
                    raise ImageError(f"{label}: {im.width}x{im.height} pixels is over the limit of "
                                     f"{max_pixels:,} pixels")
                im.load()  # decode now: truncated data fails here, not later
                im = ImageOps.exif_transpose(im) or im
                if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                    im = _to_8bit(im)
                return im.copy()
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image file Pillow can read") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{label}: over the limit of {max_pixels:,} pixels") from None
    except OSError as e:  # truncated, unreadable, permission
        raise ImageError(f"{label}: cannot read the image ({e.strerror or e})") from None
    except Exception as e:  # decoders raise odd things (SyntaxError, struct.error, ...) on bad data
        raise ImageError(f"{label}: cannot decode the image ({e.__class__.__name__}: {e})") from None


def fit_image(im, in_chans: int, size: tuple[int, int], *, invert: bool = False) -> np.ndarray:
    """A decoded PIL image -> uint8 C x H x W in the model's channels and size (steps 3-6 above)."""
    from PIL import Image, ImageOps

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
    arr = np.array(im, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on Pillow's read-only view
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def read_image(source: str | os.PathLike | bytes, in_chans: int, size: tuple[int, int], *, invert: bool = False,
               max_pixels: int = MAX_PIXELS, name: str | None = None) -> np.ndarray:
    """Decode ``source`` (a path or bytes) into the model's uint8 C x H x W input, or raise ImageError."""
    return fit_image(load_image(source, max_pixels=max_pixels, name=name), in_chans, size, invert=invert)


def is_grey(im) -> bool:
    """True for images without colour (the folder dataset reads a collection of them as 1 channel)."""
    return im.mode in GREY_MODES or (im.mode == "P" and im.palette is not None and im.palette.mode == "L")
