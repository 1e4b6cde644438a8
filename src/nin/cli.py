"""The `nin` command line: argparse subcommands, a thin layer over the library.

Heavy imports (torch, the library modules) happen inside each command so `nin --help` is instant.
User mistakes raise NinError: printed in one line, exit 1 (2 for usage errors), no traceback.
"""
from __future__ import annotations

import argparse
import sys

from .errors import NinError


# --- inspecting ---------------------------------------------------------------------------
def cmd_summary(args: argparse.Namespace) -> int:
    from .models import model_info

    info = model_info(args.model, tuple(args.input_size) if args.input_size else None)
    n = args.batch_size
    print(f"{info.name}: input {n} x {' x '.join(map(str, info.input_size))}")
    for layer, shape in info.layers:
        print(f"{layer:<20} output shape:\t{' x '.join(map(str, (n, *shape)))}")
    print(f"Total parameters: {info.params:,}")
    print(f"Forward FLOPs: {info.flops * n / 1e9:.3f} GFLOP for batch {n} "
          f"({info.flops / 2e6:.1f} M multiply-adds per image)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models, model_info

    print(f"{'model':<14} {'input':<12} {'params':>11} {'GFLOPs':>8}")
    for name in list_models():
        info = model_info(name)
        size = "x".join(map(str, info.input_size))
        print(f"{name:<14} {size:<12} {info.params:>11,} {info.flops / 1e9:>8.3f}")
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("summary", help="per-layer output shapes, parameters and FLOPs of a model")
    p.add_argument("model", help="a registered model name (see `nin models`)")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="input size (default: the model's own)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size shown in the shapes (default 1)")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("models", help="list the registered models with input size, parameters, FLOPs")
    p.set_defaults(func=cmd_models)


# Each group of subcommands adds itself here; the functions live beside the commands they add.
_ADDERS = [_add_inspect]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="nin", description="Network in Network image classifiers: inspect, train, evaluate, explain, export.")
    parser.add_argument("--version", action="version", version=f"nin {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _ADDERS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except NinError as e:
        print(f"nin {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"nin {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
