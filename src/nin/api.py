"""The Python API for notebooks and scripts: train, predict, summary, plot_history, show_cam.

Each is a thin layer over the library (``nin.training``, ``nin.models``, ``nin.prediction``,
``nin.figures``), as the command line is; ``nin summary`` prints ``str(summary(...))``.
Figures are matplotlib ``Figure`` objects made without pyplot, so nothing here picks a backend.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UsageError


# --- training -----------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What ``nin.train`` returns: the run's per-epoch rows, its folder, the saved model, its config."""

    history: list[dict]          # one row per epoch: epoch, train_loss, train_acc, test_acc, lr, images_per_sec, seconds
    run_dir: Path
    model: Any                   # best.safetensors loaded (nin.load), eval mode; None if no epoch finished
    config: Any                  # the TrainConfig the run used
    metrics: dict = field(default_factory=dict)  # the trainer's final metrics (last epoch, examples_per_sec)

    @property
    def test_acc(self) -> float | None:
        return self.metrics.get("test_acc")

    @property
    def train_acc(self) -> float | None:
        return self.metrics.get("train_acc")

    @property
    def train_loss(self) -> float | None:
        return self.metrics.get("train_loss")

    def __repr__(self) -> str:  # the default repr would print the whole model and history
        acc = f", test_acc={self.test_acc:.4f}" if self.test_acc is not None else ""
        return (f"TrainResult(run_dir={str(self.run_dir)!r}, model={self.config.model!r}, "
                f"epochs={len(self.history)}{acc})")


def config_fields() -> list[str]:
    """The keyword overrides ``train`` takes: every TrainConfig field but ``recipe``."""
    from .training.recipes import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig) if f.name != "recipe"]


def make_config(recipe="fast", **overrides):
    """A TrainConfig from a recipe name (or a TrainConfig) and keyword overrides, checked: an unknown
    key is one UsageError that lists the valid ones."""
    from .training.recipes import TrainConfig, get_recipe

    valid = config_fields()
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise UsageError(f"unknown training option(s): {', '.join(unknown)}; valid ones: {', '.join(valid)}")
    if "step_epochs" in overrides:
        overrides["step_epochs"] = tuple(overrides["step_epochs"])
    if isinstance(recipe, TrainConfig):
        cfg = dataclasses.replace(recipe, **overrides)
    elif isinstance(recipe, str):
        cfg = get_recipe(recipe, **overrides)
    else:
        raise UsageError(f"recipe must be a recipe name or a TrainConfig, got {type(recipe).__name__}")
    cfg.validate()
    return cfg


def train(recipe="fast", *, out: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
          quiet: bool = False, live: bool | None = None, **overrides) -> TrainResult:
    """Train a recipe (name or TrainConfig) with keyword overrides of any TrainConfig field.

    ``nin.train("fast", epochs=3, out="runs/nb")`` is ``nin train --epochs 3 --out runs/nb``.
    ``resume=RUN`` continues that run with its saved config; only ``max_steps`` and ``epochs`` (at least
    the run's: a finished run trains on, as ``nin train --resume RUN --epochs N``) may be given.  In Jupyter (``live=None``: detected) one
    figure of the curves is redrawn in place after every epoch, with a progress bar; ``live=False``
    turns that off.  Outside a notebook nothing changes: the same lines as the command line."""
    from .training import runfolder
    from .hub import load
    from .training.live import LiveCurves, in_notebook
    from .training.recipes import TrainConfig
    from .training.trainer import train as run_training

    if resume is not None:
        from .training.recipes import RESUMABLE

        other = [k for k in overrides if k not in RESUMABLE]
        if other or recipe != "fast":
            given = ", ".join(other) or f"recipe={recipe!r}"
            raise UsageError(f"resume continues a run with its saved config; drop {given} "
                             f"(only {' and '.join(RESUMABLE)} may be given)")
        cfg = TrainConfig.from_dict(runfolder.read_config(resume))
        if isinstance(overrides.get("epochs"), int) and overrides["epochs"] > cfg.epochs:  # the figure's x axis
            cfg = dataclasses.replace(cfg, epochs=overrides["epochs"])  # (the trainer checks the value)
        done = runfolder.read_metrics(resume)
    else:
        cfg = make_config(recipe, **overrides)
        done = []
    display = None
    if in_notebook() if live is None else live:
        try:
            display = LiveCurves(cfg.epochs, f"{cfg.recipe}: {cfg.model} on {cfg.dataset}", done)
        except ImportError as e:
            raise UsageError(f"live=True needs IPython ({e}); pip install 'nin[notebook]'") from None
    try:
        final = run_training(None if resume is not None else cfg, out, resume=resume, quiet=quiet,
                             on_epoch=display.update if display else None,
                             **({k: overrides.get(k) for k in RESUMABLE} if resume is not None else {}))
    finally:
        if display is not None:
            display.close()
    run_dir = Path(final.get("run_dir") or resume or out)
    model = load(run_dir) if (run_dir / "best.safetensors").exists() else None
    return TrainResult(runfolder.read_metrics(run_dir), run_dir, model, cfg, dict(final))


# --- predicting ----------------------------------------------------------------------------
def predict(model, images, *, topk: int = 1, tta: str | None = None, invert: bool = False,
            batch_size: int = 64) -> list:
    """Classify images: the Python form of ``nin predict``, the same reading and the same numbers.

    ``model``: the name of shipped weights (``"nin_fmnist.fashion_mnist_fast"``; see
    ``nin.list_pretrained()``), a run folder, a .safetensors, an exported .onnx, or a loaded model
    (``nin.load(...)``, ``TrainResult.model``).

    ``images``: an image file (PNG, JPEG, BMP, WebP, GIF, TIFF) or a folder of them (searched
    recursively), or a list of files and folders: each is letterboxed to the model's input as
    ``nin predict`` does (``invert=True`` first inverts dark-on-light images).  Or uint8 pixels already
    at the model's input size (``model.meta.input_size``): one C x H x W image (H x W for one channel)
    or an N x C x H x W batch, as a torch tensor or a numpy array.

    ``topk``: classes per image, best first.  ``tta``: test-time augmentation, "none", "flip" or
    "shift"; None (default) uses the model's own, the one its reported accuracy used.

    Returns one ``Prediction`` per image, in order: ``.file`` (the path, or ``"image[i]"`` for pixels),
    ``.top`` (a list of (class name, probability), best first) and ``.error`` (why a file could not be
    read or classified; ``.top`` is then empty).  A bad file never stops the others.

    Example: ``for p in nin.predict("nin_fmnist.fashion_mnist_fast", ["shoe.png", "photos/"], topk=2):
    print(p.file, p.error or p.top)``.
    """
    from .hub import load_any
    from .inference import check_tta
    from .prediction import predict_files

    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise UsageError(f"topk must be a whole number >= 1, got {topk!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    check_tta(tta)
    if isinstance(model, (str, os.PathLike)):
        model = load_any(model)
    elif getattr(model, "meta", None) is None or getattr(model, "classes", None) is None:
        raise UsageError(f"predict needs a trained model with its class names and preprocessing (nin.load, a "
                         f"shipped name, a run folder or a file); got a {type(model).__name__} without them")
    if isinstance(images, (str, os.PathLike)):
        images = [images]
    if isinstance(images, (list, tuple)):
        wrong = [x for x in images if not isinstance(x, (str, os.PathLike))]
        if wrong:
            raise UsageError(f"predict takes image files and folders, or one array of pixels; the list holds a "
                             f"{type(wrong[0]).__name__}")
        return predict_files(model, list(images), topk=topk, invert=invert, batch_size=batch_size, tta=tta)
    if isinstance(images, bytes):
        raise UsageError("predict takes image files and folders, or an array of pixels; for an image's bytes "
                         "use nin.read_image or write them to a file")
    return _predict_pixels(model, images, topk=topk, tta=tta, invert=invert, batch_size=batch_size)


def _predict_pixels(model, images, *, topk: int, tta, invert: bool, batch_size: int) -> list:
    """``predict`` for uint8 pixels already at the model's input size (one image or a batch)."""
    import numpy as np
    import torch

    from .prediction import probabilities, top_predictions

    x = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    want, shape = tuple(model.meta.input_size), tuple(x.shape)
    if x.dtype != torch.uint8:
        raise UsageError(f"predict takes uint8 pixels (0-255), got {x.dtype}")
    x = x[None, None] if x.ndim == 2 else x[None] if x.ndim == 3 else x
    if x.ndim != 4 or tuple(x.shape[1:]) != want:
        raise UsageError(f"predict takes pixels at the model's input size, {' x '.join(map(str, want))} (C x H x W) "
                         f"or N x {' x '.join(map(str, want))}, got shape {shape}; pass image files "
                         "to have them letterboxed to it")
    if invert:
        x = 255 - x
    probs = probabilities(model, x.cpu(), batch_size=batch_size, tta=tta)
    return top_predictions(model, [f"image[{i}]" for i in range(len(probs))], probs, topk)

# --- inspecting -----------------------------------------------------------------------------
@dataclass
class Summary:
    """Per-layer output shapes, parameters and FLOPs: what ``nin summary`` prints (``str``), and an
    HTML table in a notebook."""

    info: Any  # models.ModelInfo
    batch_size: int = 1

    def _shape(self, shape) -> str:
        return " x ".join(map(str, (self.batch_size, *shape)))

    def _totals(self) -> list[str]:
        n, info = self.batch_size, self.info
        return [f"Total parameters: {info.params:,}",
                f"Forward FLOPs: {info.flops * n / 1e9:.3f} GFLOP for batch {n} "
                f"({info.flops / 2e6:.1f} M multiply-adds per image)"]

    def _memory_note(self) -> list[str]:
        """A note when one forward pass at this size cannot fit this machine's memory."""
        import os

        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        need = self.info.activation_bytes * self.batch_size
        if total and need > total / 2:
            return [f"note: a forward pass at this size holds about {need / 2**30:,.1f} GiB of fp32 activations "
                    f"(this machine has {total / 2**30:.0f} GiB): more than it can run"]
        return []

    def __str__(self) -> str:
        lines = [f"{self.info.name}: input {self._shape(self.info.input_size)}"]
        lines += [f"{layer:<20} output shape:\t{self._shape(shape)}" for layer, shape in self.info.layers]
        return "\n".join(lines + self._totals() + self._memory_note())

    __repr__ = __str__

    def _repr_html_(self) -> str:
        from html import escape

        rows = "".join(f"<tr><td>{escape(layer)}</td><td>{self._shape(shape)}</td></tr>"
                       for layer, shape in self.info.layers)
        return (f"<p><b>{escape(self.info.name)}</b>: input {self._shape(self.info.input_size)}</p>"
                f"<table><thead><tr><th style='text-align:left'>layer</th><th style='text-align:left'>"
                f"output shape</th></tr></thead><tbody>{rows}</tbody></table>"
                f"<p>{'<br>'.join(escape(t) for t in self._totals())}</p>")


def summary(model_or_name, input_size: tuple[int, int, int] | None = None, *, batch_size: int = 1,
            **model_kwargs) -> Summary:
    """The layer table of a model, at its own input size unless ``input_size`` is given:

    - a registered model name, built with ``model_kwargs`` (``nin.summary("nin_fmnist", width=64)``);
    - shipped weights (``"nin_fmnist.fashion_mnist_best"``), a run folder or a .safetensors: the
      architecture they were trained with (``nin.load``);
    - a model instance (``nin.load(run)``, ``run.model``, ``nin.create_model(...)``).
    ``model_kwargs`` apply to a registered name only: saved weights fix their architecture."""
    from .models import describe, list_models, model_info

    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    size = tuple(input_size) if input_size is not None else None
    if isinstance(model_or_name, (str, os.PathLike)):
        text = str(model_or_name)
        if isinstance(model_or_name, str) and text in list_models():
            try:
                return Summary(model_info(text, size, **model_kwargs), batch_size)
            except (TypeError, ValueError) as e:  # an argument the builder does not take, or a bad value
                raise UsageError(f"model arguments {model_kwargs} do not fit {text}: {e}") from None
        model = _saved_model(text)
        if model_kwargs:
            raise UsageError(f"model arguments apply to a registered model name ({', '.join(list_models())}), "
                             f"not to {text}: its weights fix the architecture, "
                             f"{model.meta.model}{_kwargs_text(model.meta.model_kwargs)}")
        name = f"{model.meta.model}{_kwargs_text(model.meta.model_kwargs)} from {text}"
        return Summary(describe(model, size, name=name), batch_size)
    if model_kwargs:
        raise UsageError("model keyword arguments apply to a model name, not to a built model")
    if not hasattr(model_or_name, "layers"):
        raise UsageError(f"summary needs a model name or a nin model, got {type(model_or_name).__name__}")
    return Summary(describe(model_or_name, size), batch_size)


def _kwargs_text(kwargs: dict) -> str:
    return "(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")"


def _saved_model(text: str):
    """The PyTorch model saved as ``text``: shipped weights, a run folder or a .safetensors (not ONNX)."""
    from .hub import load
    from .models import list_models
    from .hub import is_pretrained_name

    if Path(text).suffix == ".onnx":
        raise UsageError(f"{text}: an ONNX file; give the run folder or .safetensors it was exported from")
    if not is_pretrained_name(text) and not os.path.exists(text):
        raise UsageError(f"{text!r} is not a registered model ({', '.join(list_models())}), shipped weights "
                         "(see `nin models`), a run folder or a .safetensors file")
    return load(text)


# --- figures --------------------------------------------------------------------------------
def plot_history(run_or_history, title: str | None = None):
    """The curves of a run (a TrainResult, a run folder, or a list of per-epoch rows) as a Figure."""
    from .training import runfolder

    cfg = None
    if isinstance(run_or_history, TrainResult):
        history, cfg = run_or_history.history, dataclasses.asdict(run_or_history.config)
    elif isinstance(run_or_history, (str, os.PathLike)):
        folder = Path(run_or_history)
        if not folder.is_dir():
            raise UsageError(f"{folder}: no such run folder")
        history = runfolder.read_metrics(folder)
        if (folder / "config.json").exists():
            cfg = runfolder.read_config(folder)
    else:
        history = list(run_or_history)
    if title is None:
        title = f"{cfg['recipe']}: {cfg['model']} on {cfg['dataset']}" if cfg else ""
    return _notebook_ready(runfolder.curves_figure(history, title))


def _image_tensor(model, image):
    """uint8 C x H x W (or N x C x H x W) tensor from a tensor, a numpy array or an image file/bytes."""
    import numpy as np
    import torch

    if isinstance(image, (str, os.PathLike, bytes)):
        from .data.images import read_input

        return torch.from_numpy(read_input(model.meta, image))  # a fresh, writable array
    t = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image)
    if t.dtype != torch.uint8:
        raise UsageError(f"show_cam takes uint8 images (as the datasets hold them), got {t.dtype}")
    if t.ndim == 2:
        t = t[None]
    if t.ndim not in (3, 4):
        raise UsageError(f"show_cam takes one C x H x W image or an N x C x H x W batch, got shape {tuple(t.shape)}")
    return t


def show_cam(model, image, *, labels=None, topk: int = 3, title: str = ""):
    """Class activation maps as a Figure.  One image (uint8 C x H x W, an array, a file or bytes):
    the image and its top-k classes' maps.  A batch (N x C x H x W): a grid, each image with its
    predicted class's map (``labels`` mark the mistakes)."""
    from .figures import cam_figure, cam_grid_figure

    x = _image_tensor(model, image)
    if x.ndim == 4:
        fig, _ = cam_grid_figure(model, x, labels)
    else:
        fig, _ = cam_figure(model, x, topk=topk, title=title)
    return _notebook_ready(fig)


def _notebook_ready(fig):
    """Make a returned Figure display as PNG in IPython even before pyplot was imported (the inline
    backend registers its formatter only when pyplot loads).  Elsewhere: nothing."""
    from .training.live import figure_png, in_notebook

    if in_notebook():
        import sys

        from matplotlib.figure import Figure

        shell = sys.modules["IPython"].get_ipython()
        png = getattr(getattr(shell, "display_formatter", None), "formatters", {}).get("image/png")
        if png is None:
            return fig
        try:
            png.lookup_by_type(Figure)
        except KeyError:
            png.for_type(Figure, figure_png)
    return fig
