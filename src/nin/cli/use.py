"""Using a trained model: `nin eval`, `nin cam`, `nin export` (and the `nin predict` parser)."""
from __future__ import annotations

import argparse
import sys

from ..errors import UsageError
from ..vocab import PRECISIONS, resolve_tta
from .common import BIG, MODEL_HELP, _out_dir, _print_json, _run_dir, number, tta_arg
from .predict import _add_predict


# --- using a trained model: eval, predict, cam, export ---------------------------------------
CLASS_MAP_HELP = ("a JSON object {\"dataset class\": \"model class\", ...} for dataset classes named otherwise "
                  "than the model's; the others are matched by name, ignoring case, spaces and punctuation "
                  "(a folder t-shirt_top is the class T-shirt/top), never by position")


MAX_GRID = 256  # --grid: one figure; more images than this take minutes to draw and nobody can read them


def _warn_precision_fallback(args, model, result) -> None:
    """A run that evaluated in bf16, evaluated here in fp32 because this CPU has no native bf16: its
    reported accuracy is then not reproduced to the image, and the user should know why."""
    import torch

    from ..devices import cpu_supports_bf16

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
    from ..evaluation import model_dataset, test_data, warn_bad_files
    from ..errors import NinError
    from ..evaluation import evaluate, save_confusion_csv
    from ..figures import save_confusion_png
    from ..hub import load_any

    model = load_any(args.run)
    out = _out_dir(args.out, _run_dir(args.run) / "eval")
    ds = model_dataset(model, args.data, args.data_dir, args.class_map)
    tta = resolve_tta(model.meta, args.tta)
    data, loader = test_data(model, ds, args.batch_size)
    total = len(ds.test) if args.limit is None else min(args.limit, len(ds.test))
    with _progress_bar(total, "eval", "img") as bar:
        result = evaluate(model, data, batch_size=args.batch_size, tta=tta, limit=args.limit,
                          precision=args.precision, classes=ds.classes, class_map=args.class_map,
                          progress=bar.update)
    warn_bad_files(loader)
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


def cmd_cam(args: argparse.Namespace) -> int:
    from ..evaluation import first_test_images, model_dataset
    from pathlib import Path

    from ..figures import save_cam_figure, save_cam_grid
    from ..hub import load

    if (args.image is None) == (args.grid is None):
        raise UsageError("give either an IMAGE or --grid N")
    if str(args.run).endswith(".onnx"):
        raise UsageError("class activation maps need the PyTorch model: give the run folder, not the .onnx")
    model = load(args.run)
    if args.grid is not None:
        import torch

        from ..classes import label_map

        ds = model_dataset(model, args.data, args.data_dir, args.class_map)
        out = Path(args.out) if args.out else _run_dir(args.run) / "cam_grid.png"
        images, labels = first_test_images(model, ds, args.grid)
        remap = label_map(list(ds.classes), list(model.classes), args.class_map)
        labels = labels if remap is None else remap[torch.as_tensor(labels)]
        acc = save_cam_grid(model, images, labels, out)
        print(f"{out}: {args.grid} test images with their predicted class maps (accuracy {acc:.0%})")
        return 0
    import torch

    from ..data.images import read_input

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
    from ..evaluation import first_test_images, model_dataset
    from pathlib import Path

    from ..errors import DatasetError
    from ..export import export_model
    from ..hub import load

    args.format = _export_format(args.format, args.out)  # before any work: a wrong name is refused at once
    model = load(args.run)
    out = Path(args.out) if args.out else _run_dir(args.run) / f"{model.meta.model}.{args.format}"
    if out.is_dir():
        raise UsageError(f"--out {out}: is a folder; give a file name")
    real = None
    if args.format == "onnx":
        try:
            real = first_test_images(model, model_dataset(model, args.data, args.data_dir), 64)[0]
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


def _data_args(p) -> None:
    p.add_argument("--data", metavar="NAME", help="dataset (default: the one the model was trained on)")
    p.add_argument("--data-dir", metavar="DIR", help="where the dataset files are (default: search)")
    p.add_argument("--class-map", metavar="FILE", help=CLASS_MAP_HELP)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="test accuracy, per-class precision/recall, confusion matrix (PNG, CSV)")
    p.add_argument("run", metavar="RUN", help=MODEL_HELP)
    _data_args(p)
    tta_arg(p)
    p.add_argument("--batch-size", type=number(int, 1, 1 << 20), default=256,
                   help="images per forward pass (default 256)")
    p.add_argument("--limit", type=number(int, 1, BIG), metavar="N", help="evaluate only the first N test images")
    p.add_argument("--precision", choices=["run", *PRECISIONS], default="run",
                   help="'run' (default): as the run evaluated (bf16 autocast where it trained so and this "
                        "machine supports it), which reproduces its reported accuracy to the image; on a CPU "
                        "without native bf16 a bf16 run is evaluated in fp32, with a note saying so")
    p.add_argument("--out", metavar="DIR", help="where confusion.png/.csv go (default: RUN/eval)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=cmd_eval)


def _add_cam(sub) -> None:
    p = sub.add_parser("cam", help="class activation maps: where the network sees each class")
    p.add_argument("run", metavar="RUN", help="a run folder, a .safetensors or a pretrained name")
    p.add_argument("image", metavar="IMAGE", nargs="?", help="an image file (or use --grid)")
    p.add_argument("--grid", type=number(int, 1, MAX_GRID), metavar="N",
                   help=f"show N test images (at most {MAX_GRID}) with their predicted class's map")
    p.add_argument("--topk", type=number(int, 1, BIG), default=3, metavar="K",
                   help="maps of the K most likely classes (default 3)")
    p.add_argument("--invert", action="store_true", help="invert IMAGE first (dark object on light background)")
    p.add_argument("--out", metavar="FILE", help="PNG to write (default: RUN/cam_IMAGE.png or RUN/cam_grid.png)")
    _data_args(p)
    p.set_defaults(func=cmd_cam)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write the model as ONNX (checked against PyTorch) or one .safetensors")
    p.add_argument("run", metavar="RUN", help="a run folder, a .safetensors or a pretrained name")
    p.add_argument("--format", choices=["onnx", "safetensors"],
                   help="(default: --out's suffix, .onnx or .safetensors; without --out, onnx)")
    p.add_argument("--out", metavar="FILE", help="file to write, named .onnx or .safetensors (default: "
                   "RUN/MODEL.onnx or .safetensors)")
    p.add_argument("--dynamic-batch", action="store_true", help="ONNX: any batch size (default: batch 1)")
    p.add_argument("--opset", type=number(int, 18, 99), default=18, metavar="N",
                   help="ONNX opset version, 18 or newer (default 18)")
    _data_args(p)
    p.set_defaults(func=cmd_export)


def _add_use(sub) -> None:
    """The commands that use a trained model, in the order `nin --help` lists them."""
    for add in (_add_eval, _add_predict, _add_cam, _add_export):
        add(sub)
