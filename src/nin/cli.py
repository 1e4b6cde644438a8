"""The `nin` command line: argparse subcommands, a thin layer over the library.

Heavy imports (torch, the library modules) happen inside each command so `nin --help` is instant.
User mistakes raise NinError: printed in one line, exit 1 (2 for usage errors), no traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from .errors import NinError, UsageError


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line (``nin CMD: error: ...``), like every other user error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


# --- inspecting ---------------------------------------------------------------------------
def cmd_summary(args: argparse.Namespace) -> int:
    import json

    from .api import summary

    kwargs = {}
    if args.model_kwargs is not None:
        try:
            kwargs = json.loads(args.model_kwargs)
        except ValueError:
            kwargs = None
        if not isinstance(kwargs, dict):
            raise UsageError(f"--model-kwargs must be a JSON object, e.g. '{{\"width\": 64}}', got {args.model_kwargs!r}")
    try:
        table = summary(args.model, tuple(args.input_size) if args.input_size else None, batch_size=args.batch_size,
                        **kwargs)
    except UsageError as e:  # the API's wording names keyword arguments; here they are one option
        raise UsageError(str(e).replace("model arguments", "--model-kwargs")) from None
    print(table)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models, model_info
    from .pretrained import list_pretrained, pretrained_info

    print(f"{'model':<14} {'input':<12} {'params':>11} {'GFLOPs':>8}")
    for name in list_models():
        info = model_info(name)
        size = "x".join(map(str, info.input_size))
        print(f"{name:<14} {size:<12} {info.params:>11,} {info.flops / 1e9:>8.3f}")
    names = list_pretrained()
    if names:
        print(f"\nshipped weights (nin predict/eval/cam/export/serve NAME; create_model(..., pretrained=True)):")
        print(f"{'name':<32} {'params':>9} {'size':>8} {'test acc':>9} {'with its TTA':>16}  made by")
        for n in names:
            e = pretrained_info(n)
            acc = e["accuracy"]["fp32"]
            mark = " *" if e.get("default") else ""
            own = f"{acc[e['tta']]:.4f} ({e['tta']})" if e["tta"] != "none" else "-"
            print(f"{n + mark:<32} {e['params']:>9,} {e['bytes'] / 1e6:>6.2f}MB {acc['none']:>9.4f} "
                  f"{own:>16}  {e['command']}")
        print("* the architecture's default weights; accuracy on the 10,000 Fashion-MNIST test images, fp32; "
              "its TTA is what nin eval/predict/serve use unless --tta says otherwise")
    return 0


def _add_inspect(sub) -> None:
    p = sub.add_parser("summary", help="per-layer output shapes, parameters and FLOPs of a model")
    p.add_argument("model", metavar="MODEL",
                   help="a registered model name, shipped weights, a run folder or a .safetensors (see `nin models`)")
    p.add_argument("--model-kwargs", metavar="JSON",
                   help="arguments of a registered model name as a JSON object, e.g. '{\"width\": 64}' (saved "
                        "weights fix their own)")
    p.add_argument("--input-size", type=number(int, 1, 1 << 20), nargs=3, metavar=("C", "H", "W"),
                   help="input size (default: the model's own)")
    p.add_argument("--batch-size", type=number(int, 1, 1 << 20), default=1,
                   help="batch size shown in the shapes (default 1)")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser("models", help="list the registered models with input size, parameters, FLOPs")
    p.set_defaults(func=cmd_models)


# --- training -----------------------------------------------------------------------------
# options a resumed run may change (it keeps every other one); --epochs only upwards (trainer._resumed_config)
RESUMABLE = ("max_steps", "epochs")


def _train_overrides(args: argparse.Namespace) -> dict:
    import json

    from .recipes import TrainConfig

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


def _sigterm_interrupts() -> None:
    """SIGTERM (a scheduler's or `kill`'s stop) ends a training as Ctrl-C does: status.json says
    "interrupted" and the last checkpoint is kept.  Python's default for SIGTERM is to die on the spot."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def cmd_train(args: argparse.Namespace) -> int:
    import json

    from .recipes import flag, get_recipe
    from .trainer import train

    _sigterm_interrupts()
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
    if args.print_config:
        cfg.validate()
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    train(cfg, args.out, quiet=args.quiet, dry_run=args.dry_run, tensorboard=args.tensorboard)
    return 0


def _add_train(sub) -> None:
    from .recipes import RECIPES, TrainConfig, choices_of, flag

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


# Each group of subcommands adds itself here; the functions live beside the commands they add.
_ADDERS = [_add_inspect, _add_train]


# --- using a trained model: eval, predict, cam, export ---------------------------------------
CLASS_MAP_HELP = ("a JSON object {\"dataset class\": \"model class\", ...} for dataset classes named otherwise "
                  "than the model's; the others are matched by name, ignoring case, spaces and punctuation "
                  "(a folder t-shirt_top is the class T-shirt/top), never by position")
MAX_GRID = 256  # --grid: one figure; more images than this take minutes to draw and nobody can read them


def _run_dir(path: str):
    from pathlib import Path

    p = Path(path)
    return p if p.is_dir() else p.parent


def _dataset_for(model, name: str | None, data_dir: str | None, class_map: str | None = None):
    """The dataset to evaluate on: the model's own (a folder with the very split the run held out).
    Its classes must be the model's, by name (``nin.classes``): checked here, before any work."""
    from .classes import match_classes
    from .data import load_dataset

    split = getattr(model.meta, "split", None) if not name else None
    name = name or model.meta.dataset or "fashion-mnist"
    seed = (split or {}).get("seed", 0)
    if name.startswith(("folder:", "wds:")):  # read as the run read it: in memory, or streamed
        from .data import open_dataset
        imagenet = (model.meta.preprocess or {}).get("transform") == "imagenet"
        ds = open_dataset(name, seed=seed, stream=True if imagenet else None)
    else:
        ds = load_dataset(name, data_dir, seed=seed)
    if split and ds.split and ds.split.get("test_files_sha256") != split.get("test_files_sha256"):
        raise UsageError(f"{ds.source}: the folder's held-out files are not the ones the run held out "
                         f"({split.get('rule')}: {split.get('test_files')} files then, {ds.split.get('test_files')} "
                         "now); files were added, removed or renamed since training, so its test images may "
                         "have been training images")
    match_classes(list(ds.classes), list(model.classes), class_map, where=ds.source)
    return ds


def _test_data(model, ds, batch_size: int):
    """(ds.test, None) in memory, or (uint8 test batches, their loader) for a streamed dataset."""
    from .data import Split
    from .evaluation import streamed_test_batches

    if isinstance(ds.test, Split):
        return ds.test, None
    return streamed_test_batches(model, ds, batch_size=batch_size)


def _first_test_images(model, ds, n: int):
    """The first ``n`` test images (uint8) and labels, as the model takes them."""
    from .errors import DatasetError

    data, loader = _test_data(model, ds, n)
    if loader is None:
        return data.images[:n], data.labels[:n]
    batch = next(data, None)  # one batch of n, its unreadable files left out
    _warn_bad_files(loader)
    if batch is None:
        raise DatasetError(f"{ds.source}: none of the first {n} test images could be read")
    return batch


def _warn_bad_files(loader) -> None:
    bad = loader.bad_files if loader is not None else []
    if bad:
        print(f"warning: {len(bad)} test image(s) could not be read and were left out, as in training "
              f"(first: {bad[0][0]}: {bad[0][1]})", file=sys.stderr)


def _tta(args, model) -> str:
    return model.meta.tta if args.tta == "run" else args.tta


def _out_dir(path, default):
    from pathlib import Path

    out = Path(path) if path else default
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: is a file, not a folder")
    return out


def _warn_precision_fallback(args, model, result) -> None:
    """A run that evaluated in bf16, evaluated here in fp32 because this CPU has no native bf16: its
    reported accuracy is then not reproduced to the image, and the user should know why."""
    import torch

    from .engine import cpu_supports_bf16

    run_precision = getattr(getattr(model, "meta", None), "precision", "fp32")
    if (args.precision == "run" and run_precision == "bf16" and result.compute == "fp32"
            and isinstance(model, torch.nn.Module) and not cpu_supports_bf16()):
        print("note: the run evaluated in bf16; this CPU has no native bf16 (AVX512-BF16 or AMX), so this "
              "evaluation is fp32 and may differ from the run's reported accuracy by a few images "
              "(--precision bf16 emulates it, slowly)", file=sys.stderr)


def _progress_bar(total: int, desc: str, unit: str):
    """A tqdm bar (with ETA) on stderr when it is a terminal, as training's; a silent one otherwise."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr,
                disable=not sys.stderr.isatty(), dynamic_ncols=True)


def cmd_eval(args: argparse.Namespace) -> int:
    import json

    from .errors import NinError
    from .evaluation import evaluate, save_confusion_csv, save_confusion_png
    from .export import load_any

    model = load_any(args.run)
    out = _out_dir(args.out, _run_dir(args.run) / "eval")
    ds = _dataset_for(model, args.data, args.data_dir, args.class_map)
    tta = _tta(args, model)
    data, loader = _test_data(model, ds, args.batch_size)
    total = len(ds.test) if args.limit is None else min(args.limit, len(ds.test))
    with _progress_bar(total, "eval", "img") as bar:
        result = evaluate(model, data, batch_size=args.batch_size, tta=tta, limit=args.limit,
                          precision=args.precision, classes=ds.classes, class_map=args.class_map,
                          progress=bar.update)
    _warn_bad_files(loader)
    _warn_precision_fallback(args, model, result)
    split = ds.split["rule"] if ds.split else f"the dataset's test split ({ds.source})"
    png, csv_path, written = out / "confusion.png", out / "confusion.csv", True
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_confusion_csv(result, csv_path)
        save_confusion_png(result, png)
    except (OSError, NinError) as e:
        written = False
        print(f"warning: {out}: cannot write the confusion matrix files "
              f"({getattr(e, 'strerror', None) or e}); the results are printed only", file=sys.stderr)
    if args.json:
        files = {"confusion_png": str(png), "confusion_csv": str(csv_path)} if written else {}
        _print_json({**result.to_json(), "split": split, **files})
        return 0
    how = "as the run evaluated" if args.tta == "run" else "as asked"
    print(f"accuracy {result.accuracy:.4f} on {result.n:,} test images (tta: {result.tta}, {how}; "
          f"precision: {result.compute}; split: {split})")
    print(f"{'class':<16} {'precision':>9} {'recall':>7} {'images':>7}")
    for c, p, r, s in zip(result.classes, result.precision, result.recall, result.confusion.sum(1)):
        print(f"{c:<16} {p:>9.4f} {r:>7.4f} {int(s):>7}")
    print("most confused (true -> predicted: count):")
    for t, p, n in result.most_confused():
        print(f"  {t} -> {p}: {n}")
    if written:
        print(f"confusion matrix: {png}, {csv_path}")
    return 0


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


def _looks_like_model(text: str) -> bool:
    """A run folder, a saved/exported model file or a shipped name (else: an image or a folder of them)."""
    from pathlib import Path

    from .pretrained import is_pretrained_name

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

    from .images import IMAGE_SUFFIXES
    from .models import list_models
    from .prediction import STDIN
    from .pretrained import list_pretrained

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
    from .export import load_any
    from .prediction import STDIN, predict_files

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
                            tta=_tta(args, model))
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


def cmd_cam(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .evaluation import save_cam_figure, save_cam_grid
    from .export import load

    if (args.image is None) == (args.grid is None):
        raise UsageError("give either an IMAGE or --grid N")
    if str(args.run).endswith(".onnx"):
        raise UsageError("class activation maps need the PyTorch model: give the run folder, not the .onnx")
    model = load(args.run)
    if args.grid is not None:
        import torch

        from .classes import label_map

        ds = _dataset_for(model, args.data, args.data_dir, args.class_map)
        out = Path(args.out) if args.out else _run_dir(args.run) / "cam_grid.png"
        images, labels = _first_test_images(model, ds, args.grid)
        remap = label_map(list(ds.classes), list(model.classes), args.class_map)
        labels = labels if remap is None else remap[torch.as_tensor(labels)]
        acc = save_cam_grid(model, images, labels, out)
        print(f"{out}: {args.grid} test images with their predicted class maps (accuracy {acc:.0%})")
        return 0
    import torch

    from .images import read_input

    image = torch.from_numpy(read_input(model.meta, args.image, invert=args.invert))
    out = Path(args.out) if args.out else _run_dir(args.run) / f"cam_{Path(args.image).stem}.png"
    top = save_cam_figure(model, image, out, topk=args.topk, title=Path(args.image).name)
    print(f"{out}: " + ", ".join(f"{c} {p:.1%}" for c, p in top))
    return 0


EXPORT_SUFFIXES = {".onnx": "onnx", ".safetensors": "safetensors"}


def _export_format(fmt: str | None, out: str | None) -> str:
    """The format to write: --out's suffix chooses it (.onnx, .safetensors); any other suffix, or a
    --format that the suffix contradicts, is refused (an ONNX file named x.pt is read as something else)."""
    from pathlib import Path

    if out is None:
        return fmt or "onnx"
    suffix = Path(out).suffix
    by_suffix = EXPORT_SUFFIXES.get(suffix.lower())
    if by_suffix is None:
        raise UsageError(f"--out {out}: name the file .onnx or .safetensors (the suffix says the format"
                         f"{'' if fmt is None else f'; --format {fmt} writes .{fmt}'}), not {suffix or 'no suffix'}")
    if fmt is not None and fmt != by_suffix:
        raise UsageError(f"--out {out}: a {suffix} name, but --format {fmt}; name it .{fmt}, or drop --format "
                         "(the suffix says the format)")
    return by_suffix


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .errors import DatasetError
    from .export import export_model, load

    args.format = _export_format(args.format, args.out)  # before any work: a wrong name is refused at once
    model = load(args.run)
    out = Path(args.out) if args.out else _run_dir(args.run) / f"{model.meta.model}.{args.format}"
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder; give a file name")
    real = None
    if args.format == "onnx":
        try:
            real = _first_test_images(model, _dataset_for(model, args.data, args.data_dir), 64)[0]
        except (DatasetError, UsageError) as e:
            print(f"note: no check on real images ({e})", file=sys.stderr)
    report = export_model(model, out, format=args.format, opset=args.opset, dynamic_batch=args.dynamic_batch,
                          real_images=real)
    if args.format == "safetensors":
        print(f"{out}: fp32 weights with the model description embedded (nin predict/load read it alone)")
        return 0
    summary = "; ".join(f"max |onnxruntime - torch| = {d:.2e} on {what}" for what, d in report.checks)
    batch = "dynamic batch" if args.dynamic_batch else "batch 1"
    print(f"{out}: ONNX opset {report.opset}, {batch}, model.json embedded in metadata_props; {summary}")
    return 0


def _add_use(sub) -> None:
    from .images import MAX_PIXELS

    def data_args(p) -> None:
        p.add_argument("--data", metavar="NAME", help="dataset (default: the one the model was trained on)")
        p.add_argument("--data-dir", metavar="DIR", help="where the dataset files are (default: search)")
        p.add_argument("--class-map", metavar="FILE", help=CLASS_MAP_HELP)

    def tta_arg(p) -> None:
        p.add_argument("--tta", choices=["run", "none", "flip", "shift"], default="run",
                       help="test-time augmentation: 'flip' averages the logits with the mirrored image; "
                            "'shift' over 18 views (the image and its mirror, each moved by up to one pixel, "
                            "18x the compute); 'run' (default) does what the run did for its reported accuracy")

    model_help = "a run folder, a .safetensors, an exported .onnx or a pretrained name (see `nin models`)"
    p = sub.add_parser("eval", help="test accuracy, per-class precision/recall, confusion matrix (PNG, CSV)")
    p.add_argument("run", metavar="RUN", help=model_help)
    data_args(p)
    tta_arg(p)
    p.add_argument("--batch-size", type=number(int, 1, 1 << 20), default=256,
                   help="images per forward pass (default 256)")
    p.add_argument("--limit", type=number(int, 1, BIG), metavar="N", help="evaluate only the first N test images")
    p.add_argument("--precision", choices=["run", "fp32", "bf16"], default="run",
                   help="'run' (default): as the run evaluated (bf16 autocast where it trained so and this "
                        "machine supports it), which reproduces its reported accuracy to the image; on a CPU "
                        "without native bf16 a bf16 run is evaluated in fp32, with a note saying so")
    p.add_argument("--out", metavar="DIR", help="where confusion.png/.csv go (default: RUN/eval)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="classify image files (PNG, JPEG, BMP, WebP, GIF, TIFF) or folders of them")
    p.add_argument("paths", metavar="[MODEL] FILES_OR_DIRS", nargs="+",
                   help=f"optionally the model first ({model_help}; default: the shipped "
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

    p = sub.add_parser("cam", help="class activation maps: where the network sees each class")
    p.add_argument("run", metavar="RUN", help="a run folder, a .safetensors or a pretrained name")
    p.add_argument("image", metavar="IMAGE", nargs="?", help="an image file (or use --grid)")
    p.add_argument("--grid", type=number(int, 1, MAX_GRID), metavar="N",
                   help=f"show N test images (at most {MAX_GRID}) with their predicted class's map")
    p.add_argument("--topk", type=number(int, 1, BIG), default=3, metavar="K",
                   help="maps of the K most likely classes (default 3)")
    p.add_argument("--invert", action="store_true", help="invert IMAGE first (dark object on light background)")
    p.add_argument("--out", metavar="FILE", help="PNG to write (default: RUN/cam_IMAGE.png or RUN/cam_grid.png)")
    data_args(p)
    p.set_defaults(func=cmd_cam)

    p = sub.add_parser("export", help="write the model as ONNX (checked against PyTorch) or one .safetensors")
    p.add_argument("run", metavar="RUN", help="a run folder, a .safetensors or a pretrained name")
    p.add_argument("--format", choices=["onnx", "safetensors"],
                   help="(default: --out's suffix, .onnx or .safetensors; without --out, onnx)")
    p.add_argument("--out", metavar="FILE", help="file to write, named .onnx or .safetensors (default: "
                   "RUN/MODEL.onnx or .safetensors)")
    p.add_argument("--dynamic-batch", action="store_true", help="ONNX: any batch size (default: batch 1)")
    p.add_argument("--opset", type=number(int, 18, 99), default=18, metavar="N",
                   help="ONNX opset version, 18 or newer (default 18)")
    data_args(p)
    p.set_defaults(func=cmd_export)


_ADDERS.append(_add_use)


# --- datasets: info, fetch -------------------------------------------------------------------
def cmd_data_info(args: argparse.Namespace) -> int:
    from .data import load_dataset

    if args.name.startswith("wds:"):
        return _wds_info(args.name)
    ds = load_dataset(args.name, args.data_dir, download=False, seed=args.seed)
    c, h, w = ds.image_size
    print(f"{ds.name}: {len(ds.classes)} classes, images {c} x {h} x {w} (uint8)")
    print(f"files: {ds.source}")
    print(f"mean: {', '.join(f'{m:.4f}' for m in ds.mean)}   std: {', '.join(f'{s:.4f}' for s in ds.std)}"
          "   (per channel, [0, 1] units, train split)")
    counts = {s: getattr(ds, s).labels.bincount(minlength=len(ds.classes)).tolist() for s in ("train", "test")}
    width = max(12, *(len(n) for n in ds.classes))
    print(f"{'class':<{width}} {'train':>8} {'test':>8}")
    for i, name in enumerate(ds.classes):
        print(f"{name:<{width}} {counts['train'][i]:>8,} {counts['test'][i]:>8,}")
    print(f"{'total':<{width}} {len(ds.train):>8,} {len(ds.test):>8,}")
    return 0


def _wds_info(name: str) -> int:
    from .shards import open_shards

    ds = open_shards(name)
    c, h, w = ds.image_size
    print(f"{ds.name}: {len(ds.classes)} classes, images {c} x {h} x {w} most common (decoded while training)")
    print(f"shards: {len(ds.train.urls)} train, {len(ds.test.urls)} val in {ds.source}")
    print(f"mean: {', '.join(f'{m:.4f}' for m in ds.mean)}   std: {', '.join(f'{s:.4f}' for s in ds.std)}"
          "   (per channel, [0, 1] units, estimated from a sample of the train split)")
    width = max(12, *(len(n) for n in ds.classes))
    train, test = ds.train.per_class or [0] * len(ds.classes), ds.test.per_class or [0] * len(ds.classes)
    print(f"{'class':<{width}} {'train':>8} {'test':>8}")
    for i, cname in enumerate(ds.classes):
        print(f"{cname:<{width}} {train[i]:>8,} {test[i]:>8,}")
    print(f"{'total':<{width}} {len(ds.train):>8,} {len(ds.test):>8,}")
    return 0


def cmd_data_pack(args: argparse.Namespace) -> int:
    from .shards import pack

    index = pack(args.name, args.out, shard_size=args.shard_size, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {len(index['splits']['train']['shards'])} train + {len(index['splits']['val']['shards'])} val "
          f"shard(s) and index.json to {args.out}; train with --dataset wds:{args.out}")
    return 0


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from .data import load_dataset

    ds = load_dataset(args.name, args.data_dir, download=True)  # raises, with how-to-get-it, when offline
    print(f"{ds.name}: {len(ds.train):,} train + {len(ds.test):,} test images in {ds.source}")
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="datasets: where the files are, counts, mean/std; download")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    names = "fashion-mnist, mnist, cifar10, cifar100, svhn or folder:PATH"

    q = data_sub.add_parser("info", help="where the files were found, counts per split and class, mean/std")
    q.add_argument("name", nargs="?", default="fashion-mnist", metavar="NAME",
                   help=f"{names.replace(' or ', ', ')} or wds:DIR (default fashion-mnist)")
    q.add_argument("--data-dir", metavar="DIR", help="look here first (then $NIN_DATA, ~/.cache/nin, system folders)")
    q.add_argument("--seed", type=number(int, 0, BIG), default=0,
                   help="seed of the train/test split of a folder without one")
    q.set_defaults(func=cmd_data_info)

    q = data_sub.add_parser("fetch", help="download a dataset (MD5-checked), or say how to get it offline")
    q.add_argument("name", nargs="?", default="fashion-mnist", metavar="NAME", help=f"{names} (default fashion-mnist)")
    q.add_argument("--data-dir", metavar="DIR", help="download here (default $NIN_DATA, else ~/.cache/nin)")
    q.set_defaults(func=cmd_data_fetch)

    q = data_sub.add_parser("pack", help="write an image folder as WebDataset tar shards (for wds:DIR)")
    q.add_argument("name", metavar="folder:PATH", help="the image folder (one subfolder per class, or train/ + val/)")
    q.add_argument("--out", required=True, metavar="DIR", help="where to write train-000000.tar ..., val-... and index.json")
    q.add_argument("--overwrite", action="store_true",
                   help="DIR may hold an earlier pack: its shards and index.json are replaced, once the new "
                        "ones are written (other files are kept); without it DIR must be new or empty")
    q.add_argument("--shard-size", type=int, default=1000, metavar="N", help="images per shard (default 1000)")
    q.add_argument("--seed", type=int, default=0,
                   help="seed of the train/test split of a folder without one, and of the training samples' order")
    q.set_defaults(func=cmd_data_pack)


_ADDERS.append(_add_data)


# --- serving: an HTTP API and a web page ------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    import os

    try:
        from .serve import create_app, load_served, run_server
        from .serve.model import weights_name
        from .serve.server import listen
    except ImportError as e:
        raise UsageError(f"nin serve needs the serve extra: pip install 'nin[serve]' ({e})") from None
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be between 0 and 65535 (0: any free port), got {args.port}")
    for flag, value, least in (("--max-batch", args.max_batch, 1),
                               ("--max-queue", args.max_queue, 1), ("--topk", args.topk, 1),
                               ("--max-pixels", args.max_pixels, 1)):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}, got {value}")
    if args.max_wait_ms < 0 or args.max_upload_mb <= 0:
        raise UsageError("--max-wait-ms must be >= 0 and --max-upload-mb > 0")
    key = args.api_key or os.environ.get("NIN_API_KEY") or None
    sockets = listen(args.host, args.port)  # a port in use is said now, not after loading the model
    try:
        print(f"nin serve: loading {weights_name(args.model)} ...", file=sys.stderr, flush=True)
        served = load_served(args.model, backend=args.backend, device=args.device, threads=args.threads)
        app = create_app(served, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                         max_upload_mb=args.max_upload_mb, max_pixels=args.max_pixels, api_key=key, topk=args.topk)
    except BaseException:
        for s in sockets:
            s.close()
        raise

    def ready(host, port):
        meta = served.meta
        print(f"nin serve: {served.source} ({meta.model}, {len(meta.classes)} classes, input "
              f"{'x'.join(map(str, meta.input_size))}) on {served.backend}, batches up to {args.max_batch}"
              f"{', API key required' if key else ''}", flush=True)
        print(f"nin serve: http://{host}:{port}/  (API: POST /v1/predict, /v1/cam; GET /v1/model, /health, "
              "/metrics; Ctrl+C or SIGTERM to stop)", flush=True)
    return run_server(app, host=args.host, port=args.port, log_level=args.log_level, ready=ready, sockets=sockets)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an HTTP API and a web page for a trained model (needs nin[serve])")
    p.add_argument("model", metavar="MODEL", nargs="?",
                   help="a run folder, a .safetensors, an exported .onnx or a pretrained name "
                        "(default: the default pretrained model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port, 0 to 65535 (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", metavar="KEY",
                   help="require this key (X-API-Key or Authorization: Bearer) on /v1/* and /metrics "
                        "(default: $NIN_API_KEY, else none)")
    p.add_argument("--max-batch", type=int, default=16, metavar="N",
                   help="most images in one forward pass (default 16; 1 turns batching off)")
    p.add_argument("--max-wait-ms", type=float, default=2.0, metavar="MS",
                   help="how long a batch may wait for more images while requests are arriving (default 2)")
    p.add_argument("--max-queue", type=int, default=256, metavar="N",
                   help="images waiting at most; more are answered 503 with Retry-After (default 256)")
    p.add_argument("--max-upload-mb", type=float, default=10, metavar="MB",
                   help="refuse request bodies over this size with 413 (default 10)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, metavar="N",
                   help="refuse images with more pixels than N with 413 (default 40,000,000)")
    p.add_argument("--topk", type=int, default=5, metavar="K", help="classes returned when ?topk= is not given "
                                                                    "(default 5)")
    p.add_argument("--backend", choices=["auto", "onnx", "torch"], default="auto",
                   help="what runs predictions: auto (onnxruntime on CPU when installed, else PyTorch), "
                        "onnx or torch (default auto); class maps always use PyTorch")
    p.add_argument("--device", default="auto", help="PyTorch device: auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, metavar="N", help="compute threads (default: all cores but one, left to the HTTP side)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="warning",
                   help="uvicorn's log level (default warning)")
    p.set_defaults(func=cmd_serve)


_ADDERS.append(_add_serve)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

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
