"""The `nin` command line: argparse subcommands, a thin layer over the library.

Heavy imports (torch, the library modules) happen inside each command so `nin --help` is instant.
User mistakes raise NinError: printed in one line, exit 1 (2 for usage errors), no traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .errors import NinError, UsageError


# --- inspecting ---------------------------------------------------------------------------
def cmd_summary(args: argparse.Namespace) -> int:
    from .api import summary

    print(summary(args.model, tuple(args.input_size) if args.input_size else None, batch_size=args.batch_size))
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


# --- training -----------------------------------------------------------------------------
TRAIN_HELP = {
    "model": "model name (see `nin models`)",
    "model_kwargs": "extra builder arguments as JSON, e.g. '{\"width\": 96}'",
    "init": "weight init: default (PyTorch's), xavier (xavier_uniform_ on conv weights, as the seed) "
            "or kaiming (kaiming_uniform_ for ReLU)",
    "dataset": "fashion-mnist, mnist, cifar10, cifar100, svhn or folder:PATH",
    "data_dir": "where the dataset files are (else $NIN_DATA, ~/.cache/nin, Debian's package)",
    "resize": "resize images to this square side on the fly (the seed: 224)",
    "normalize": "normalise inputs with the dataset's mean/std",
    "crop_padding": "random-crop augmentation with this much zero padding (0: off)",
    "flip": "random horizontal flip augmentation",
    "limit_train": "train on the first N training images only (quick checks)",
    "epochs": "number of epochs",
    "batch_size": "batch size PER PROCESS; with torchrun the global batch is this x world size",
    "lr": "peak learning rate (see --lr-scale for several processes)",
    "momentum": "SGD momentum (0: plain SGD, as the seed)",
    "nesterov": "Nesterov momentum",
    "weight_decay": "weight decay on conv weights (not on biases/BN)",
    "schedule": "lr schedule: constant, onecycle, cosine or step",
    "warmup_epochs": "linear lr warm-up over this many epochs",
    "step_epochs": "epochs at which schedule=step multiplies the lr by 0.1",
    "label_smoothing": "label smoothing for the cross-entropy",
    "lr_scale": "with several processes: none (use --lr as given) or linear (--lr x world size, the "
                "usual rule when the global batch grows with the world size)",
    "tta_flip": "test-time augmentation: average the logits of each image and its mirror",
    "eval_batch_size": "batch size for the test-set evaluation",
    "device": "auto (CUDA when present), cpu, cuda or cuda:N",
    "precision": "auto (bf16 autocast where the CPU/GPU supports it), bf16, fp16 or fp32",
    "channels_last": "channels_last memory format",
    "compile": "torch.compile the model (slower on CPU for these networks)",
    "sync_bn": "with torchrun on CUDA: batch-norm statistics over the global batch (SyncBatchNorm); "
               "CUDA only, an error on CPU, where each process normalises with its own batch",
    "seed": "random seed (same seed, same machine: same numbers on CPU)",
    "max_steps": "stop after this many optimizer steps",
    "save_every": "also checkpoint every N minutes mid-epoch (0: once per epoch)",
}


def _train_overrides(args: argparse.Namespace) -> dict:
    import json

    from .errors import UsageError
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


def cmd_train(args: argparse.Namespace) -> int:
    from .recipes import get_recipe
    from .trainer import train

    if args.resume:
        overrides = _train_overrides(args)
        if overrides:
            from .errors import UsageError
            raise UsageError("--resume continues a run with its saved config; drop "
                             + ", ".join("--" + k.replace("_", "-") for k in overrides))
        train(None, resume=args.resume, quiet=args.quiet, tensorboard=args.tensorboard)
        return 0
    cfg = get_recipe(args.recipe, **_train_overrides(args))
    train(cfg, args.out, quiet=args.quiet, dry_run=args.dry_run, tensorboard=args.tensorboard)
    return 0


def _add_train(sub) -> None:
    from .recipes import RECIPES, TrainConfig

    p = sub.add_parser("train", help="train a recipe; writes a run folder (see --help)",
                       description="Train a NiN. A recipe sets every option; any flag below overrides it. "
                                   f"Recipes: {', '.join(RECIPES)}. On several processes or machines, start it "
                                   "with torchrun (--batch-size is then per process; see --lr-scale, --sync-bn).")
    p.add_argument("--recipe", default="fast", help="named recipe (default: fast): " + ", ".join(RECIPES))
    p.add_argument("--out", help="run folder (default: runs/RECIPE-DATE-TIME)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in this folder from its last.ckpt")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("--dry-run", action="store_true", help="one train and one eval batch; write nothing")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events")
    for f in dataclasses.fields(TrainConfig):
        if f.name == "recipe":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = f.type if isinstance(f.type, str) else str(f.type)
        if kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=TRAIN_HELP[f.name])
        elif f.name == "step_epochs":
            p.add_argument(flag, type=int, nargs="*", default=None, help=TRAIN_HELP[f.name])
        else:
            typ = int if kind.startswith("int") else float if kind.startswith("float") else str
            p.add_argument(flag, type=typ, default=None, help=TRAIN_HELP[f.name])
    p.set_defaults(func=cmd_train)


# Each group of subcommands adds itself here; the functions live beside the commands they add.
_ADDERS = [_add_inspect, _add_train]


# --- using a trained model: eval, predict, cam, export ---------------------------------------
def _run_dir(path: str):
    from pathlib import Path

    p = Path(path)
    return p if p.is_dir() else p.parent


def _dataset_for(model, name: str | None, data_dir: str | None):
    from .data import load_dataset

    ds = load_dataset(name or model.meta.dataset or "fashion-mnist", data_dir)
    if len(ds.classes) != len(model.classes):
        raise UsageError(f"the dataset has {len(ds.classes)} classes but the model has {len(model.classes)}; "
                         f"choose the dataset it was trained on with --data")
    return ds


def cmd_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .evaluation import evaluate, save_confusion_csv, save_confusion_png
    from .export import load_any

    model = load_any(args.run)
    ds = _dataset_for(model, args.data, args.data_dir)
    result = evaluate(model, ds.test, batch_size=args.batch_size, tta=args.tta, limit=args.limit)
    out = Path(args.out) if args.out else _run_dir(args.run) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    png, csv_path = out / "confusion.png", out / "confusion.csv"
    save_confusion_csv(result, csv_path)
    save_confusion_png(result, png)
    if args.json:
        print(json.dumps({**result.to_json(), "confusion_png": str(png), "confusion_csv": str(csv_path)}))
        return 0
    print(f"accuracy {result.accuracy:.4f} on {result.n:,} test images (tta: {result.tta})")
    print(f"{'class':<16} {'precision':>9} {'recall':>7} {'images':>7}")
    for c, p, r, s in zip(result.classes, result.precision, result.recall, result.confusion.sum(1)):
        print(f"{c:<16} {p:>9.4f} {r:>7.4f} {int(s):>7}")
    print("most confused (true -> predicted: count):")
    for t, p, n in result.most_confused():
        print(f"  {t} -> {p}: {n}")
    print(f"confusion matrix: {png}, {csv_path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from .export import load_any
    from .predict import predict_files

    model = load_any(args.model)
    results = predict_files(model, args.inputs, topk=args.topk, invert=args.invert, max_pixels=args.max_pixels)
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"nin predict: error: {r.error}", file=sys.stderr)
    if args.json:
        print(json.dumps([r.to_json() for r in results]))
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
        if args.grid < 1:
            raise UsageError("--grid must be at least 1")
        ds = _dataset_for(model, args.data, args.data_dir)
        out = Path(args.out) if args.out else _run_dir(args.run) / "cam_grid.png"
        acc = save_cam_grid(model, ds.test.images[:args.grid], ds.test.labels[:args.grid], out)
        print(f"{out}: {args.grid} test images with their predicted class maps (accuracy {acc:.0%})")
        return 0
    import torch

    from .predict import read_image

    c, h, w = model.meta.input_size
    image = torch.from_numpy(read_image(args.image, c, (h, w), invert=args.invert))
    out = Path(args.out) if args.out else _run_dir(args.run) / f"cam_{Path(args.image).stem}.png"
    top = save_cam_figure(model, image, out, topk=args.topk, title=Path(args.image).name)
    print(f"{out}: " + ", ".join(f"{c} {p:.1%}" for c, p in top))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .errors import DatasetError
    from .export import export_model, load

    model = load(args.run)
    out = Path(args.out) if args.out else _run_dir(args.run) / f"{model.meta.model}.{args.format}"
    real = None
    if args.format == "onnx":
        try:
            real = _dataset_for(model, args.data, args.data_dir).test.images[:64]
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
    def data_args(p) -> None:
        p.add_argument("--data", metavar="NAME", help="dataset (default: the one the model was trained on)")
        p.add_argument("--data-dir", metavar="DIR", help="where the dataset files are (default: search)")

    p = sub.add_parser("eval", help="test accuracy, per-class precision/recall, confusion matrix (PNG, CSV)")
    p.add_argument("run", metavar="RUN", help="a run folder, a .safetensors or an exported .onnx")
    data_args(p)
    p.add_argument("--tta", choices=["none", "flip"], default="none",
                   help="test-time augmentation: 'flip' averages the logits with the mirrored image")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N test images")
    p.add_argument("--out", metavar="DIR", help="where confusion.png/.csv go (default: RUN/eval)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="classify image files (PNG, JPEG, BMP, WebP, GIF) or folders of them")
    p.add_argument("model", metavar="RUN", help="a run folder, a .safetensors or an exported .onnx")
    p.add_argument("inputs", metavar="FILES_OR_DIRS", nargs="+", help="images, or folders searched recursively")
    p.add_argument("--topk", type=int, default=1, metavar="K", help="show the K most likely classes (default 1)")
    p.add_argument("--invert", action="store_true",
                   help="invert the images first: use for dark objects on a light background "
                        "(Fashion-MNIST is light garments on black)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, metavar="N",
                   help="refuse images with more pixels than N (default 40,000,000)")
    p.add_argument("--json", action="store_true", help="print a JSON list of {file, top | error}")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("cam", help="class activation maps: where the network sees each class")
    p.add_argument("run", metavar="RUN", help="a run folder or a .safetensors")
    p.add_argument("image", metavar="IMAGE", nargs="?", help="an image file (or use --grid)")
    p.add_argument("--grid", type=int, metavar="N", help="show N test images with their predicted class's map")
    p.add_argument("--topk", type=int, default=3, metavar="K", help="maps of the K most likely classes (default 3)")
    p.add_argument("--invert", action="store_true", help="invert IMAGE first (dark object on light background)")
    p.add_argument("--out", metavar="FILE", help="PNG to write (default: RUN/cam_IMAGE.png or RUN/cam_grid.png)")
    data_args(p)
    p.set_defaults(func=cmd_cam)

    p = sub.add_parser("export", help="write the model as ONNX (checked against PyTorch) or one .safetensors")
    p.add_argument("run", metavar="RUN", help="a run folder or a .safetensors")
    p.add_argument("--format", choices=["onnx", "safetensors"], default="onnx", help="(default onnx)")
    p.add_argument("--out", metavar="FILE", help="file to write (default: RUN/MODEL.onnx or .safetensors)")
    p.add_argument("--dynamic-batch", action="store_true", help="ONNX: any batch size (default: batch 1)")
    p.add_argument("--opset", type=int, default=18, metavar="N", help="ONNX opset version (default 18)")
    data_args(p)
    p.set_defaults(func=cmd_export)


_ADDERS.append(_add_use)


# --- datasets: info, fetch -------------------------------------------------------------------
def cmd_data_info(args: argparse.Namespace) -> int:
    from .data import load_dataset

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
    q.add_argument("name", nargs="?", default="fashion-mnist", metavar="NAME", help=f"{names} (default fashion-mnist)")
    q.add_argument("--data-dir", metavar="DIR", help="look here first (then $NIN_DATA, ~/.cache/nin, system folders)")
    q.add_argument("--seed", type=int, default=0, help="seed of the train/test split of a folder without one")
    q.set_defaults(func=cmd_data_info)

    q = data_sub.add_parser("fetch", help="download a dataset (MD5-checked), or say how to get it offline")
    q.add_argument("name", nargs="?", default="fashion-mnist", metavar="NAME", help=f"{names} (default fashion-mnist)")
    q.add_argument("--data-dir", metavar="DIR", help="download here (default $NIN_DATA, else ~/.cache/nin)")
    q.set_defaults(func=cmd_data_fetch)


_ADDERS.append(_add_data)


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
