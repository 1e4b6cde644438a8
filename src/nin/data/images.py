"""One way to read an image: decoding a file (or uploaded bytes) and fitting it to a model's input.

Used by folder datasets, ``nin predict``, ``nin cam``, ``nin eval`` on folders and the server, so a
model sees the same pixels in training and in prediction.  The policy, step by step:

1. Pillow decodes it (PNG, JPEG, BMP, WebP, GIF: first frame, TIFF, PPM/PGM), but ``decode_image``
   (the streaming loader's and the "imagenet" transform's reader) decodes a JPEG at full scale with
   TorchCodec (libjpeg-turbo, as Pillow's).  Files over
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
import math
import os
import warnings
from pathlib import Path

import numpy as np

from ..errors import ImageError

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


def load_image(source: str | os.PathLike | bytes, *, max_pixels: int = MAX_PIXELS, name: str | None = None,
               draft: tuple[int, int] | None = None):
    """Decode a file path or raw bytes into a PIL image (steps 1-2), or raise ImageError naming it.

    ``name`` is what error messages call the image (default: the path, or "the image" for bytes).
    ``draft=(w, h)``: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling, Pillow's
    ``draft``) as long as it stays at least w x h (sizes before EXIF rotation); other formats ignore it."""
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
                if draft is not None and im.format == "JPEG":
                    im.draft(im.mode, draft)
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


def to_channels(im, in_chans: int, *, invert: bool = False):
    """A decoded PIL image in the model's channels: "L" or "RGB" (steps 3-5 above)."""
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
    return im


def fit_image(im, in_chans: int, size: tuple[int, int], *, invert: bool = False) -> np.ndarray:
    """A decoded PIL image -> uint8 C x H x W in the model's channels and size (steps 3-6 above)."""
    from PIL import Image

    im = to_channels(im, in_chans, invert=invert)
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
               max_pixels: int = MAX_PIXELS, name: str | None = None, transform: str = "fit") -> np.ndarray:
    """Decode ``source`` (a path or bytes) into the model's uint8 C x H x W input, or raise ImageError.

    ``transform`` is the model's (``meta.preprocess["transform"]``): "fit" letterboxes the whole image
    (``fit_image``); "imagenet" resizes the short side to H / 0.875 and takes the centre H x W, as the
    streaming loader evaluates such a run (``resized_crop`` with ``center_crop_box``)."""
    if transform == "imagenet":
        return resized_crop(source, in_chans, size, lambda w, h: center_crop_box(w, h, size, eval_resize(size)),
                            invert=invert, max_pixels=max_pixels, name=name).numpy()
    if transform != "fit":
        raise ImageError(f"unknown input transform {transform!r}; expected 'fit' or 'imagenet'")
    return fit_image(load_image(source, max_pixels=max_pixels, name=name), in_chans, size, invert=invert)


def read_input(meta, source: str | os.PathLike | bytes, *, invert: bool = False, max_pixels: int = MAX_PIXELS,
               name: str | None = None) -> np.ndarray:
    """``source`` as the model that ``meta`` (its ModelMeta) describes takes it: its channels and size,
    by its transform.  The one reader of ``nin predict``, ``nin cam``, ``nin serve`` and the Python API."""
    c, h, w = meta.input_size
    return read_image(source, c, (h, w), invert=invert, max_pixels=max_pixels, name=name,
                      transform=(meta.preprocess or {}).get("transform", "fit"))


def small_input_note(meta, width: int, height: int, name: str) -> str | None:
    """A note for an image far below the model's input (either side under half the model's): what it is
    made into, so that a confident class of a few upscaled pixels is not taken at face value.  None for
    an image of a fair size."""
    _, h, w = meta.input_size
    if 2 * width >= w and 2 * height >= h:
        return None
    if (meta.preprocess or {}).get("transform", "fit") == "imagenet":  # short side resized, centre cropped
        scale, (nw, nh) = eval_resize((h, w)) / min(width, height), (w, h)
    else:  # letterboxed: scaled until it fits, aspect ratio kept (fit_image)
        scale = min(w / width, h / height)
        nw, nh = max(1, min(w, round(width * scale))), max(1, min(h, round(height * scale)))
    how = f"upscaled to {nw}x{nh}" if scale > 1 else f"a {nw}x{nh} strip of the model's {w}x{h} input"
    return f"{name} is {width}x{height}, {how}; the prediction may mean little"


def is_grey(im) -> bool:
    """True for images without colour (the folder dataset reads a collection of them as 1 channel)."""
    return im.mode in GREY_MODES or (im.mode == "P" and im.palette is not None and im.palette.mode == "L")


# --- for streaming loaders: the header first, then a decode no larger than needed -------------
def image_header(source: str | os.PathLike | bytes, *, max_pixels: int = MAX_PIXELS,
                 name: str | None = None) -> tuple[int, int, bool, str]:
    """(width, height, grey, format) from the file's header alone, width and height after EXIF rotation
    (as ``load_image`` returns the image).  Raises ImageError for a file Pillow cannot identify or one
    over ``max_pixels``; a file whose header is fine but whose data is damaged passes here."""
    from PIL import Image, UnidentifiedImageError

    is_bytes = isinstance(source, (bytes, bytearray, memoryview))
    label = name or ("the image" if is_bytes else str(source))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(bytes(source)) if is_bytes else source) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(f"{label}: {w}x{h} pixels is over the limit of {max_pixels:,} pixels")
                if im.format in ("JPEG", "MPO", "TIFF", "WEBP", "PNG") and im.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                    w, h = h, w  # rotated a quarter turn by its EXIF orientation
                return w, h, is_grey(im), im.format or ""
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{label}: not an image file Pillow can read") from None
    except Exception as e:  # OSError, struct.error, SyntaxError, DecompressionBombError ...
        raise ImageError(f"{label}: cannot read the image header ({e.__class__.__name__}: {e})") from None


def _jpeg_decoder():
    """TorchCodec's JPEG decoder (libjpeg-turbo; EXIF orientation applied, as ``load_image`` does), or None
    where TorchCodec is not installed or does not load with this torch: Pillow then decodes every JPEG.
    (torchvision.io's decoders, used here before, are deprecated since torchvision 0.29 for TorchCodec's.)"""
    global _JPEG
    if _JPEG is False:
        try:
            from torchcodec.decoders import decode_jpeg
            _JPEG = decode_jpeg
        except Exception:  # ImportError, or a TorchCodec built for another torch (OSError, RuntimeError)
            _JPEG = None
    return _JPEG


_JPEG = False


def decode_image(source: str | os.PathLike | bytes, in_chans: int, *, min_size: tuple[int, int] | None = None,
                 invert: bool = False, max_pixels: int = MAX_PIXELS, name: str | None = None, header=None):
    """Decode ``source`` into a uint8 C x H x W torch tensor in the model's channels (steps 1-5 above;
    the size is the image's own, or smaller when ``min_size=(w, h)`` allows), or raise ImageError.
    The tensor's memory may be channels-last (H x W x C permuted): what the resize after it wants.

    JPEGs take the faster of two decoders (benchmarks/bench_stream.py, "decoders"): when ``min_size``
    allows a reduction of 2x or more, Pillow's ``draft`` (libjpeg DCT scaling) decodes at 1/2-1/8 scale
    for a fraction of the full decode's time; at full scale TorchCodec's ``decode_jpeg`` is faster than
    Pillow's open + convert.  Other formats, JPEGs TorchCodec refuses (truncated, 12-bit), and every JPEG
    where TorchCodec is missing go through ``load_image`` (whose errors name the file).
    ``header``: ``image_header(source)`` when the caller has read it already."""
    import torch

    if name is None and not isinstance(source, (bytes, bytearray, memoryview)):
        name = str(source)  # errors name the file even after its bytes are read below
    w0, h0, _, fmt = header or image_header(source, max_pixels=max_pixels, name=name)
    reduce = min(w0 / min_size[0], h0 / min_size[1]) if min_size else 1.0
    decode_jpeg = _jpeg_decoder() if fmt == "JPEG" and reduce < 2 and in_chans in (1, 3) else None
    if decode_jpeg is not None:
        if isinstance(source, (bytes, bytearray, memoryview)):
            data = bytearray(source)
        else:
            with open(source, "rb") as f:
                data = bytearray(f.read())
        try:  # a writable buffer: torch.frombuffer warns on bytes
            x = decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode="GRAY" if in_chans == 1 else "RGB")
        except RuntimeError:
            x = None  # Pillow decides, and names what is wrong
        if x is not None:
            return 255 - x if invert else x
        source = bytes(data)
    # a reduction is isotropic, so asking for (w0, h0) / reduce keeps both axes >= min_size (for an
    # EXIF-rotated image Pillow's pre-rotation axes make the request stricter, never too small)
    draft = (math.ceil(w0 / reduce), math.ceil(h0 / reduce)) if reduce >= 2 else None
    im = to_channels(load_image(source, max_pixels=max_pixels, name=name, draft=draft), in_chans, invert=invert)
    x = torch.from_numpy(np.array(im, dtype=np.uint8))  # one writable copy, H x W (x C)
    return x[None] if x.ndim == 2 else x.permute(2, 0, 1)


def center_crop_box(width: int, height: int, size: tuple[int, int], resize_short: int) -> tuple[float, float, float, float]:
    """ImageNet-style evaluation as one crop box (top, left, height, width) in the image's pixels: scale
    the short side to ``resize_short``, take the centre ``size`` = (H, W).  Cropping this box and resizing
    it to ``size`` equals Resize(resize_short) + CenterCrop(size) up to the filter's edge pixels."""
    scale = resize_short / min(width, height)
    h, w = min(height, size[0] / scale), min(width, size[1] / scale)
    return (height - h) / 2, (width - w) / 2, h, w


EVAL_CROP_FRACTION = 0.875  # ImageNet evaluation resizes the short side to size / 0.875 (224 -> 256), then crops


def eval_resize(size: tuple[int, int]) -> int:
    """The short side ImageNet-style evaluation resizes to before its centre crop of ``size``."""
    return round(max(size) / EVAL_CROP_FRACTION)


def resized_crop(source, in_chans: int, size: tuple[int, int], box, *, invert: bool = False,
                 max_pixels: int = MAX_PIXELS, name: str | None = None, header=None):
    """``source`` -> uint8 C x H x W tensor: the crop ``box(width, height)`` = (top, left, height, width) of
    the image, resized to ``size`` = (H, W) with antialiasing (``v2.functional.resized_crop``).  The JPEG
    is decoded no larger than the crop needs (``decode_image``'s ``min_size``) and the box scaled to it.
    The one crop path of the streaming loader (random or centre crops) and of prediction."""
    from torchvision.transforms import v2

    out_h, out_w = size
    if header is None and not isinstance(source, (bytes, bytearray, memoryview)):
        name = name or str(source)
        try:
            with open(source, "rb") as f:  # one read for the header and the decoder (0.07 ms an image)
                source = f.read()
        except OSError as e:
            raise ImageError(f"{name}: cannot read the image ({e.strerror or e})") from None
    header = header or image_header(source, max_pixels=max_pixels, name=name)
    w, h = header[:2]
    top, left, ch, cw = box(w, h)
    x = decode_image(source, in_chans, min_size=(math.ceil(w * out_w / cw), math.ceil(h * out_h / ch)),
                     invert=invert, max_pixels=max_pixels, name=name, header=header)
    sy, sx = x.shape[1] / h, x.shape[2] / w  # 1, or the reduced decode's scale
    t, l = int(round(top * sy)), int(round(left * sx))
    bh = max(1, min(x.shape[1] - t, int(round(ch * sy))))
    bw = max(1, min(x.shape[2] - l, int(round(cw * sx))))
    if x.shape[0] == 3:  # torch's vectorised uint8 antialiased resize wants pixels interleaved (a no-op
        x = x.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # for decode_image's channels-last tensors)
    return v2.functional.resized_crop(x, t, l, bh, bw, [out_h, out_w], antialias=True).contiguous()
