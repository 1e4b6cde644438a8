"""What every command group shares: number options, output folders, JSON printing."""
from __future__ import annotations

import argparse

from ..errors import UsageError


BIG = 2**62  # the bound of "any whole number" options: larger ones are typos, and overflow int64


def number(kind, lo=None, hi=None):
    """An argparse type: an int or a finite float within [lo, hi]."""
    import math

    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if kind is float and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if lo is not None and v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi:,}, got {text}")
        return v

    return parse


def _run_dir(path: str):
    from pathlib import Path

    p = Path(path)
    return p if p.is_dir() else p.parent


def _out_dir(path, default):
    from pathlib import Path

    out = Path(path) if path else default
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file, not a folder")
    return out


def _print_json(doc) -> None:
    """JSON with no NaN/Infinity (not JSON): non-finite numbers become null."""
    import json
    import math

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    print(json.dumps(clean(doc), allow_nan=False))


MODEL_HELP = "a run folder, a .safetensors, an exported .onnx or a pretrained name (see `nin models`)"


def tta_arg(p) -> None:
    """--tta of eval, predict (and serve): the model's own ("run") or one of vocab.TTA_CHOICES."""
    from ..vocab import TTA_REQUESTS

    p.add_argument("--tta", choices=TTA_REQUESTS, default="run",
                   help="test-time augmentation: 'flip' averages the logits with the mirrored image; "
                        "'shift' over 18 views (the image and its mirror, each moved by up to one pixel, "
                        "18x the compute); 'run' (default) does what the run did for its reported accuracy")
