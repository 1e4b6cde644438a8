"""The Python API for notebooks and scripts: train, summary, plot_history, show_cam.

Each is a thin layer over the library (``nin.trainer``, ``nin.models``, ``nin.runfolder``,
``nin.evaluation``), as the command line is; ``nin summary`` prints ``str(summary(...))``.
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
    from .recipes import TrainConfig

    return [f.name for f in dataclasses.fields(TrainConfig) if f.name != "recipe"]


def make_config(recipe="fast", **overrides):
    """A TrainConfig from a recipe name (or a TrainConfig) and keyword overrides, checked: an unknown
    key is one UsageError that lists the valid ones."""
    from .recipes import TrainConfig, get_recipe

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
    ``resume=RUN`` continues that run with its saved config.  In Jupyter (``live=None``: detected) one
    figure of the curves is redrawn in place after every epoch, with a progress bar; ``live=False``
    turns that off.  Outside a notebook nothing changes: the same lines as the command line."""
    from . import runfolder
    from .export import load
    from .live import LiveCurves, in_notebook
    from .recipes import TrainConfig
    from .trainer import train as run_training

    if resume is not None:
        if overrides or recipe != "fast":
            given = ", ".join(overrides) or f"recipe={recipe!r}"
            raise UsageError(f"resume continues a run with its saved config; drop {given}")
        cfg = TrainConfig.from_dict(runfolder.read_config(resume))
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
                             on_epoch=display.update if display else None)
    finally:
        if display is not None:
            display.close()
    run_dir = Path(final.get("run_dir") or resume or out)
    model = load(run_dir) if (run_dir / "best.safetensors").exists() else None
    return TrainResult(runfolder.read_metrics(run_dir), run_dir, model, cfg, dict(final))


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
    """The layer table of a registered model name (built with ``model_kwargs``) or of a model instance
    (e.g. ``nin.load(run)`` or ``run.model``, at its own input size unless ``input_size`` is given)."""
    from .models import describe, model_info

    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    size = tuple(input_size) if input_size is not None else None
    if isinstance(model_or_name, str):
        return Summary(model_info(model_or_name, size, **model_kwargs), batch_size)
    if model_kwargs:
        raise UsageError("model keyword arguments apply to a model name, not to a built model")
    if not hasattr(model_or_name, "layers"):
        raise UsageError(f"summary needs a model name or a nin model, got {type(model_or_name).__name__}")
    return Summary(describe(model_or_name, size), batch_size)


# --- figures --------------------------------------------------------------------------------
def plot_history(run_or_history, title: str | None = None):
    """The curves of a run (a TrainResult, a run folder, or a list of per-epoch rows) as a Figure."""
    from . import runfolder

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
        from .images import read_input

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
    from .evaluation import cam_figure, cam_grid_figure

    x = _image_tensor(model, image)
    if x.ndim == 4:
        fig, _ = cam_grid_figure(model, x, labels)
    else:
        fig, _ = cam_figure(model, x, topk=topk, title=title)
    return _notebook_ready(fig)


def _notebook_ready(fig):
    """Make a returned Figure display as PNG in IPython even before pyplot was imported (the inline
    backend registers its formatter only when pyplot loads).  Elsewhere: nothing."""
    from .live import figure_png, in_notebook

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
