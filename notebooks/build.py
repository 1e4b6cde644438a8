"""Write notebooks/nin.ipynb from the cells below, then (with --execute) run it in place with outputs.

    .venv/bin/python notebooks/build.py --execute     # what the committed notebook holds (a few minutes)

The notebook is the source readers open; this script keeps its cells reviewable as a diff and runs it
the way CI does (tests/test_notebook.py): nbclient, a `python3` kernel that is the Python running this.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
NOTEBOOK = HERE / "nin.ipynb"

CELLS = [
    ("md", """# Network in Network (NiN) with `nin`

The d2l.ai chapter *Network in Network* builds NiN cell by cell, prints its layer shapes and trains it on
Fashion-MNIST with `train_ch6`. This notebook walks the same chapter, in the book's order, with `nin`:
the NiN block, the network, training (the book's recipe, and a faster one for a CPU), the curves,
evaluation, class activation maps (the part the book does not show, and NiN makes free) and export.

Set-up from the repository root: `make notebook` (or `pip install -e ".[notebook]"`, then
`jupyter lab notebooks/nin.ipynb`). Fashion-MNIST is found on its own where Debian's
`dataset-fashion-mnist` put it, or fetched with `nin data fetch`."""),
    ("md", """**Parameters.** `QUICK` trains on a few hundred images for one epoch: CI runs the notebook that way
(`NIN_NOTEBOOK_QUICK=1`) to check that every cell works. Leave it off to get the real result."""),
    ("code", """import os

QUICK = os.environ.get("NIN_NOTEBOOK_QUICK") == "1"
QUICK"""),
    ("code", """%matplotlib inline
import torch

import nin"""),
    ("md", """## The NiN block

AlexNet and VGG end in fully connected layers that see the whole feature map at once. NiN instead puts a
small multilayer perceptron at *every pixel*: a 1x1 convolution is a fully connected layer applied to
each pixel's channels. A NiN block is one ordinary convolution followed by two 1x1 convolutions, each
with a ReLU: the same block as the book's `nin_block`."""),
    ("code", """nin.nin_block(1, 96, kernel_size=11, stride=4, padding=0)"""),
    ("md", """## The network

Four NiN blocks with the book's channel numbers (96, 256, 384, then 10, one per class), max pooling
between them and dropout before the last. There is no fully connected layer: the last block outputs one
map per class and global average pooling turns each map into a logit. The book checks the shapes by
passing a 224 x 224 image through the layers one by one; `nin_d2l` is that network."""),
    ("code", """net = nin.create_model("nin_d2l")
X = torch.randn(1, 1, 224, 224)
for layer in net.layers():
    X = layer(X)
    print(layer.__class__.__name__, "output shape:\\t", X.shape)"""),
    ("md", """`nin.summary` gives the same table with the parameter count and the cost of one forward pass
(the `nin summary nin_d2l` command prints exactly this):"""),
    ("code", """nin.summary("nin_d2l")"""),
    ("md", """## Training the book's way

The book trains with `train_ch6`: plain SGD at learning rate 0.1, 10 epochs, batch 128, Xavier
initialisation, images resized from 28 to 224. That is `nin`'s `d2l` recipe:"""),
    ("code", """nin.get_recipe("d2l")"""),
    ("md", """At 224 x 224 one training image costs about 4.5 GFLOP. On the book's GPU `train_ch6` runs at about
3,100 images/s: the 10 epochs (600,000 images) take about 3 minutes. On the 2-core CPU this notebook was
run on, `nin` trains this recipe at about 160 images/s (the book's own pipeline: about 39), so the
10 epochs take **about an hour**. The book's runs end at 0.79-0.88 test accuracy, and some get stuck at
`loss 2.303, train acc 0.100`; the `d2l-stable` recipe avoids that. Set `BOOK = True` to run it."""),
    ("code", """BOOK = False  # about an hour on a 2-core CPU, a few minutes on a GPU
if BOOK:
    book = nin.train("d2l")"""),
    ("md", """## Training fast on a CPU

The `fast` recipe trains `nin_fmnist`, a NiN for the native 28 x 28 images (three NiN blocks with batch
norm, no fully connected layer), with Muon for the filters and SGD for batch norm, a one-cycle learning rate,
flips as augmentation and label smoothing. Its 4 epochs take about 1.5 minutes on 2 idle CPU cores (93% test
accuracy); the output saved below is of an earlier version of the recipe (6 epochs of SGD, a wider first block)."""),
    ("code", """nin.summary("nin_fmnist")"""),
    ("md", """`nin.train` takes the recipe's name and any option as a keyword (`epochs=3`, `lr=0.1`, ...). In a
notebook it draws the curves as they grow, like the book's `Animator`, and returns the run: its
per-epoch history, its folder (`runs/...`: weights, metrics, config, checkpoint) and the trained model."""),
    ("code", """quick = dict(limit_train=512, epochs=1, warmup_epochs=0) if QUICK else {}
run = nin.train("fast", **quick)"""),
    ("md", """## The curves

The live figure above is also saved as `curves.png` in the run folder. The numbers behind it are in
`run.history`, one row per epoch:"""),
    ("code", """for row in run.history:
    print(f"epoch {row['epoch']}: loss {row['train_loss']:.3f}, train acc {row['train_acc']:.3f}, "
          f"test acc {row['test_acc']:.3f}, {row['images_per_sec']:.0f} img/s")"""),
    ("md", """`nin.plot_history` draws the curves of any run again, from the result or from its folder:"""),
    ("code", """nin.plot_history(run.run_dir)"""),
    ("md", """## Evaluation

The test accuracy alone hides which classes the network confuses. `nin.evaluate` counts every
(true, predicted) pair on the test set; `tta="flip"` averages each image's logits with its mirror's,
as the `fast` recipe does during training."""),
    ("code", """ds = nin.load_dataset("fashion-mnist")
result = nin.evaluate(run.model, ds.test, tta="flip", limit=1000 if QUICK else None)
print(f"accuracy {result.accuracy:.4f} on {result.n:,} test images")
print(f"{'class':<12} {'precision':>9} {'recall':>7}")
for c, p, r in zip(result.classes, result.precision, result.recall):
    print(f"{c:<12} {p:>9.3f} {r:>7.3f}")"""),
    ("md", """Shirts, T-shirts, pullovers and coats are the hard classes: the matrix's rows are the true classes,
its columns the predictions."""),
    ("code", """from nin.figures import confusion_figure

confusion_figure(result)"""),
    ("md", """## Class activation maps

NiN's last block already outputs one map per class, and the logits are those maps' averages. So the map
of a class shows *where* the network sees that class, without gradients or extra layers. Here are the
first 16 test images, each with the map of its predicted class (wrong predictions name the true class):"""),
    ("code", """nin.show_cam(run.model, ds.test.images[:16], labels=ds.test.labels[:16])"""),
    ("md", """One image with the maps of its three most likely classes:"""),
    ("code", """nin.show_cam(run.model, ds.test.images[0], topk=3)"""),
    ("md", """## Export

A run folder already holds `best.safetensors` and `model.json`. `export_model` writes one self-contained
file (safetensors with the description inside, or ONNX for other runtimes) and checks that it gives
the same outputs as the model before keeping it."""),
    ("code", """from nin.export import export_model

report = export_model(run.model, run.run_dir / "nin_fmnist.safetensors", format="safetensors")
again = nin.load(report.path)  # the file alone: weights and description
n = 1000
print(f"{report.path}: accuracy on {n:,} test images {nin.evaluate(again, ds.test, limit=n).accuracy:.4f}, "
      f"the trained model's {nin.evaluate(run.model, ds.test, limit=n).accuracy:.4f}")"""),
    ("code", """import importlib.util

if importlib.util.find_spec("onnxruntime"):  # pip install -e ".[onnx]"
    report = export_model(run.model, run.run_dir / "nin_fmnist.onnx", format="onnx",
                          real_images=ds.test.images[:64])
    for what, diff in report.checks:
        print(f"{report.path}: max |onnxruntime - torch| = {diff:.1e} on {what}")"""),
    ("md", """From the command line the same run is `nin train`, `nin eval runs/...`, `nin cam runs/... --grid 16`
and `nin export runs/...`; see the README."""),
]


def build() -> nbformat.NotebookNode:
    cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in CELLS]
    nb = new_notebook(cells=cells)
    nb.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
                   "language_info": {"name": "python"}}
    return nb


def execute(nb: nbformat.NotebookNode, cwd: Path, timeout: int = 1800) -> nbformat.NotebookNode:
    """Run every cell with nbclient in ``cwd``, on a ``python3`` kernel that is this very Python.

    A ``python3`` kernelspec in the user's ~/.local/share/jupyter (e.g. the system Python's) would
    otherwise win over the venv's; so one naming sys.executable is written to a temporary folder that
    JUPYTER_PATH puts first, for this run only."""
    import json
    import os
    import tempfile

    from nbclient import NotebookClient

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "kernels" / "python3"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (ipykernel)", "language": "python"}))
        before = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = os.pathsep.join([tmp, *filter(None, [before])])
        try:
            NotebookClient(nb, timeout=timeout, kernel_name="python3",
                           resources={"metadata": {"path": str(cwd)}}).execute()
        finally:
            if before is None:
                del os.environ["JUPYTER_PATH"]
            else:
                os.environ["JUPYTER_PATH"] = before
    return nb


def save_live_figure(nb: nbformat.NotebookNode, out: Path) -> Path:
    """The live curves as the executed notebook shows them at the end of the run (the README's picture)."""
    import base64

    cell = next(c for c in nb.cells if c.cell_type == "code" and "run = nin.train(" in c.source)
    png = next(o["data"]["image/png"] for o in cell.outputs if "image/png" in o.get("data", {}))
    out.write_bytes(base64.b64decode(png))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--execute", action="store_true", help="run the notebook and keep its outputs")
    p.add_argument("--cwd", default=str(HERE.parent), help="the folder the kernel runs in (runs/ goes there)")
    p.add_argument("--figure", metavar="PNG", help="also save the live curves of the executed notebook here "
                                                   "(docs/notebook-curves.png)")
    args = p.parse_args()
    nb = build()
    if args.execute:
        execute(nb, Path(args.cwd))
    nbformat.write(nb, NOTEBOOK)
    if args.figure:
        save_live_figure(nbformat.read(NOTEBOOK, as_version=4), Path(args.figure))
    print(f"{NOTEBOOK}: {NOTEBOOK.stat().st_size:,} bytes", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
