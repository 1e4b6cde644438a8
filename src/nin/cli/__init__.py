"""The `nin` command line: argparse subcommands, a thin layer over the library; one module per command group.

Heavy imports (torch, the library modules) happen inside each command so `nin --help` is instant.
User mistakes raise NinError: printed in one line, exit 1 (2 for usage errors), no traceback.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import NinError
from .data import _add_data
from .inspect import _add_inspect
from .serve import _add_serve
from .train import _add_train
from .use import _add_use


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line (``nin CMD: error: ...``), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Each group of subcommands adds its parsers; the command functions live beside them.
_ADDERS = [_add_inspect, _add_train, _add_use, _add_data, _add_serve]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = OneLineParser(
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
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return code
    except NinError as e:
        print(f"nin {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"nin {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`nin predict ... | head -1`): stop quietly, as Unix tools do.  Point stdout
        # at /dev/null so the interpreter's final flush does not fail again (Python's documented recipe).
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
