"""`nin train`: every TrainConfig field is a flag (help, limits and choices come from the field)."""
from __future__ import annotations

import argparse
import dataclasses

from ..errors import UsageError
from ..training.recipes import RESUMABLE
from .common import number


def _train_overrides(args: argparse.Namespace) -> dict:
    import json

    from ..training.recipes import TrainConfig

    out = {}
    for f in dataclasses.fields(TrainConfig):
        v = getattr(args, f.name, None)
        if v is None or f.name == "recipe":
            continue
        if f.name == "model_kwargs":
            try:
                v = json.loads(v)
                assert isinstance(v, dict)
            except (ValueError, AssertionError):
                raise UsageError(f"--model-kwargs must be a JSON object, got {v!r}") from None
        out[f.name] = tuple(v) if f.name == "step_epochs" else v
    return out


def _stop_on_signals() -> None:
    """SIGTERM (a scheduler's or `kill`'s stop) ends a training as Ctrl-C does: status.json says
    "interrupted" and the last checkpoint is kept.  Python's default for SIGTERM is to die on the spot.
    Both also set a flag the step loop checks, for a raise that lands where Python ignores it."""
    import signal
    import sys
    import threading

    from ..training.trainer import stop_requested

    def interrupt(signum, frame):
        stop_requested.set()  # in case the raise lands where Python ignores it: the step loop raises then
        raise KeyboardInterrupt

    def unraisable(u):  # and Python's "Exception ignored in ... Traceback" report of that lost raise is not shown
        if not (stop_requested.is_set() and isinstance(u.exc_value, KeyboardInterrupt)):
            sys.__unraisablehook__(u)

    stop_requested.clear()  # a stop from before this command (in the same process) is not for it
    sys.unraisablehook = unraisable
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # Ctrl-C: the same, flag included
            signal.signal(signal.SIGINT, interrupt)


def cmd_train(args: argparse.Namespace) -> int:
    import json

    from ..training.recipes import flag, get_recipe
    from ..training.trainer import train

    _stop_on_signals()
    overrides = _train_overrides(args)
    if args.resume:
        other = [k for k in overrides if k not in RESUMABLE]
        if other:
            raise UsageError("--resume continues a run with its saved config; drop "
                             + ", ".join(map(flag, other)) + " (only " + " and ".join(map(flag, RESUMABLE))
                             + " may be given)")
        train(None, resume=args.resume, max_steps=overrides.get("max_steps"), epochs=overrides.get("epochs"),
              quiet=args.quiet, tensorboard=args.tensorboard)
        return 0
    cfg = get_recipe(args.recipe, **overrides)
    unused = [k for k in ("muon_lr", "muon_momentum") if k in overrides and cfg.optimizer != "muon"]
    if unused:  # else they would be silently ignored
        raise UsageError(" and ".join(map(flag, unused)) + f" set the Muon optimizer's values; the {cfg.optimizer} "
                         "optimizer takes none (add --optimizer muon, or drop them)")
    if args.print_config:
        cfg.validate()
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    train(cfg, args.out, quiet=args.quiet, dry_run=args.dry_run, tensorboard=args.tensorboard)
    return 0


def _add_train(sub) -> None:
    from ..training.recipes import RECIPES, TrainConfig, choices_of, flag

    p = sub.add_parser("train", help="train a recipe; writes a run folder (see --help)",
                       description="Train a NiN. A recipe sets every option; any flag below overrides it "
                                   "(`nin train --recipe NAME --print-config` shows a recipe's values). "
                                   f"Recipes: {', '.join(RECIPES)}. On several processes or machines, start it "
                                   "with torchrun (--batch-size is then per process; see --lr-scale, --sync-bn).")
    p.add_argument("--recipe", default="fast", metavar="{" + ",".join(RECIPES) + "}",
                   help="named recipe (default: fast)")
    p.add_argument("--out", help="run folder (default: runs/RECIPE-DATE-TIME)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last.ckpt "
                   "(to its end, or to a new --max-steps); --epochs N (at least the run's) trains a run on, a "
                   "finished one too: constant and step schedules are unchanged; onecycle and cosine follow the "
                   "N-epoch curve from the current step on (a note says the lr it jumps to), so the result is not "
                   "what a fresh N-epoch run gives")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (recipe + flags) and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("--dry-run", action="store_true", help="one train and one eval batch; write nothing")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "recipe":
            continue
        name, kind, help_text = flag(f.name), str(f.type), f.metadata["help"]
        choices = choices_of(f)
        if kind.startswith("bool"):
            p.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif f.name == "step_epochs":
            p.add_argument(name, type=number(int, 1), nargs="*", default=None, metavar="EPOCH", help=help_text)
        else:
            # choices are shown, not enforced by argparse: TrainConfig.validate gives the one-line error
            typ = int if kind.startswith("int") else float if kind.startswith("float") else str
            p.add_argument(name, type=typ, default=None, help=help_text,
                           metavar="{" + ",".join(choices) + "}" if choices else None)
    p.set_defaults(func=cmd_train)
