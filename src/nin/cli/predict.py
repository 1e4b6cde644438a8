"""`nin predict`: files, folders or stdin -> the top classes; a mistyped model name is an error first."""
from __future__ import annotations

import argparse
import sys

from ..errors import UsageError
from ..vocab import resolve_tta
from .common import BIG, MODEL_HELP, _print_json, number, tta_arg


def _looks_like_model(text: str) -> bool:
    """A run folder, a saved/exported model file or a shipped name (else: an image or a folder of them)."""
    from pathlib import Path

    from ..hub import is_pretrained_name

    p = Path(text)
    return (is_pretrained_name(text) or p.suffix in (".onnx", ".safetensors", ".json")
            or (p.is_dir() and (p / "model.json").exists()))


RUN_FILES = ("config.json", "last.ckpt", "status.json")  # a run folder's own files (nin train writes them first)


def _meant_as_model(text: str) -> str | None:
    """Why ``text``, the first of nin predict's paths and not a model, was meant as one: a run folder with
    no saved model yet, or a name that is no file, folder or image (a mistyped shipped name).  None when
    it may be what it looks like: an image or a folder of them (a missing image is reported with the rest)."""
    import difflib
    from pathlib import Path

    from ..data.images import IMAGE_SUFFIXES
    from ..models import list_models
    from ..prediction import STDIN
    from ..hub import list_pretrained

    p = Path(text)
    if text == STDIN:
        return None
    if p.is_dir():
        if not any((p / n).exists() for n in RUN_FILES):
            return None
        return (f"{text}: a run folder with no saved model yet (no model.json: the run has not finished an "
                "epoch); wait for its first epoch, or give another model")
    if p.exists() or p.suffix.lower() in IMAGE_SUFFIXES:
        return None
    shipped = list_pretrained()
    known = shipped + [m for m in list_models() if list_pretrained(m)]
    close = difflib.get_close_matches(text, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else ""
    if text in list_models():
        what = f"{text}: the architecture has no shipped weights"
    else:
        what = f"{text}: no such file or folder, and not a model name{hint}"
    return f"{what}; give a run folder, a .safetensors, an .onnx or a shipped name ({', '.join(shipped)})"


def cmd_predict(args: argparse.Namespace) -> int:
    from ..hub import load_any
    from ..prediction import STDIN, predict_files

    paths = list(args.paths)
    spec = args.model
    if spec is None and _looks_like_model(paths[0]):
        spec = paths.pop(0)
    elif spec is None and (why := _meant_as_model(paths[0])):
        raise UsageError(why)  # before anything is predicted with the default model
    if not paths:
        raise UsageError(f"give the images to classify after {spec}")
    if paths.count(STDIN) > 1:
        raise UsageError("- (standard input) holds one image; give it once")
    if STDIN in paths and (sys.stdin is None or sys.stdin.isatty()):
        raise UsageError("- reads one image from standard input, which is a terminal here; pipe or redirect "
                         "an image in: nin predict - < photo.png")
    model = load_any(spec)  # None: the default pretrained model
    results = predict_files(model, paths, topk=args.topk, invert=args.invert, max_pixels=args.max_pixels,
                            tta=resolve_tta(model.meta, args.tta))
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"nin predict: error: {r.error}", file=sys.stderr)
    for r in results:
        if r.note:
            print(f"note: {r.note}", file=sys.stderr)
    if args.json:
        _print_json([r.to_json() for r in results])
    else:
        for r in results:
            if not r.error:
                print(f"{r.file}: " + ", ".join(f"{c} {p:.1%}" for c, p in r.top))
    if failed:
        print(f"nin predict: {len(failed)} of {len(results)} inputs failed", file=sys.stderr)
        return 1
    return 0


def _add_predict(sub) -> None:
    from ..data.images import MAX_PIXELS

    p = sub.add_parser("predict", help="classify image files (PNG, JPEG, BMP, WebP, GIF, TIFF) or folders of them")
    p.add_argument("paths", metavar="[MODEL] FILES_OR_DIRS", nargs="+",
                   help=f"optionally the model first ({MODEL_HELP}; default: the shipped "
                        "nin_fmnist.fashion_mnist_fast), then images or folders searched recursively; - reads "
                        "one image from standard input. A first name that is neither a model nor an image or "
                        "folder is an error (a mistyped model name), before anything is predicted")
    p.add_argument("--model", metavar="MODEL", help="the model, if not given first")
    p.add_argument("--topk", type=number(int, 1, BIG), default=1, metavar="K",
                   help="show the K most likely classes (default 1; at most the number of classes)")
    p.add_argument("--invert", action="store_true",
                   help="invert the images first: use for dark objects on a light background "
                        "(Fashion-MNIST is light garments on black)")
    p.add_argument("--max-pixels", type=number(int, 1, BIG), default=MAX_PIXELS, metavar="N",
                   help=f"refuse images with more pixels than N (default {MAX_PIXELS:,})")
    tta_arg(p)
    p.add_argument("--json", action="store_true", help="print a JSON list of {file, top | error}")
    p.set_defaults(func=cmd_predict)
