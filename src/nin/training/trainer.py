"""The training loop: one process or several (torchrun + DistributedDataParallel), resumable.

``train()`` reads in phases: set up (model, data, optimizer) -> maybe resume -> epochs -> finish.
The state a checkpoint saves and restores is one object, ``TrainState``.

Determinism: the data order and augmentation come from (seed, epoch, batch) and the dropout RNG is
re-seeded from (seed, epoch, batch, rank) before every step, so a run resumed from any checkpoint —
mid-epoch included — replays exactly the steps an uninterrupted run takes (bit for bit on CPU).

Honest selection: the test set is evaluated every epoch for the curves but never chooses anything.
The saved model is the final epoch's, or, with ``--val-split N``, the epoch best on the validation
images held out from the training set.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import runfolder
from .engine import (Dist, Ema, all_reduce_sum, debug_dump, init_weights, input_dtype, keep_freed_memory, make_optimizer, resolve_precision, setup_distributed, step_seed, train_step, weights_finite)
from ..errors import CheckpointError, TrainingDiverged, UsageError
from .fused import fuse_conv_relu
from .recipes import RECIPES, TrainConfig, lr_at, min_steps_per_epoch

__all__ = ["train", "set_up", "Setup", "TrainState", "TrainingDiverged", "loader_accuracy", "loader_eval",
           "init_weights", "input_dtype", "make_optimizer", "train_step", "default_run_dir"]


# --- evaluation during training -------------------------------------------------------------
@torch.no_grad()
def loader_eval(model: nn.Module, loader, amp_dtype, tta: str = "none",
                max_batches: int | None = None, max_images: int | None = None) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` over a loader's batches (the first ``max_batches`` or
    ``max_images`` of them), with ``tta`` as nin eval does."""
    from ..inference import tta_logits

    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=loader.device)
    loss = torch.zeros((), dtype=torch.float64, device=loader.device)
    seen = 0
    for i, (x, y) in enumerate(loader.iterate(0)):
        if (max_batches is not None and i >= max_batches) or (max_images is not None and seen >= max_images):
            break
        if max_images is not None and seen + y.numel() > max_images:
            x, y = x[:max_images - seen], y[:max_images - seen]
        with torch.autocast(loader.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = tta_logits(model, x, tta)
        correct += (logits.argmax(1) == y).sum()
        loss += F.cross_entropy(logits, y, reduction="sum").double()
        seen += y.numel()
    return correct.item() / max(1, seen), loss.item() / max(1, seen)


def loader_accuracy(model: nn.Module, loader, amp_dtype, tta_flip: bool = False, max_batches: int | None = None):
    return loader_eval(model, loader, amp_dtype, "flip" if tta_flip else "none", max_batches)[0]


# --- the state a checkpoint holds -----------------------------------------------------------
@dataclass
class TrainState:
    """Where the run is.  ``to_checkpoint``/``from_checkpoint`` are the only places its keys are named."""

    epoch: int = 0            # the epoch in progress (0-based)
    batch: int = 0            # the next batch of that epoch
    step: int = 0             # optimizer steps taken
    sums: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))  # loss, correct, seen
    epoch_seconds: float = 0.0
    best_acc: float = -1.0    # the best validation accuracy so far (-1: none yet, or no validation split)
    best_epoch: int = 0
    history: list = field(default_factory=list)
    train_seconds: float = 0.0
    warned_chance: bool = False  # the at-chance warning was given (once a run)
    lr: float | None = None   # the lr the last optimizer step applied (what the metrics row records)
    # the saved model awaits its closing evaluation (--final-tta, or chosen at a --curve-test-images epoch);
    # None: a checkpoint older than this field, for which model.json tells (closing_eval_pending)
    closing_pending: bool | None = None

    def to_checkpoint(self) -> dict:
        return {f.name: (self.sums.cpu() if f.name == "sums" else getattr(self, f.name))
                for f in dataclasses.fields(self)}

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The keys a checkpoint must hold (best_epoch is newer than the first checkpoints: optional)."""
        return tuple(f.name for f in dataclasses.fields(cls)
                     if f.name not in ("best_epoch", "warned_chance", "lr", "closing_pending"))

    @classmethod
    def from_checkpoint(cls, ckpt: dict, device: torch.device, main: bool) -> "TrainState":
        state = cls(**{f.name: ckpt[f.name] for f in dataclasses.fields(cls) if f.name in ckpt})
        state.history = list(state.history)
        # the saved partial sums are rank 0's own (a mid-epoch checkpoint is written without a collective);
        # the other ranks tally from the resume point, so the epoch's metrics average what was tallied
        state.sums = state.sums.to(device) if main else torch.zeros(3, dtype=torch.float64, device=device)
        return state


# --- set-up ---------------------------------------------------------------------------------
@dataclass
class Setup:
    """Everything built from a config before the first step (the benchmarks build through it too)."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    amp_dtype: torch.dtype | None
    ds: object                 # the Dataset
    model: nn.Module
    net: nn.Module             # what the step calls: the model, maybe DDP- and compile-wrapped
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: Ema | None
    train_loader: object
    test_loader: object
    val_loader: object | None
    meta: object               # export.ModelMeta
    base_lr: float
    n_train: int = 0           # training images (after --val-split and --limit-train)
    calib_loader: object | None = None  # training images without augmentation, for recalibrate_bn

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and saved: the EMA when on."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def tta(self) -> str:
        return "flip" if self.cfg.tta_flip else "none"

    @property
    def streamed(self) -> bool:
        """Whether the training images are read from files during training (not held in memory)."""
        return self.train_loader.streamed

    def on_bad_files(self, callback) -> None:
        """Have every streamed loader (train, validation, test) report the files it could not read."""
        for loader in (self.train_loader, self.val_loader, self.test_loader):
            if loader is not None and loader.streamed:
                loader.on_bad = callback

    def state_dict(self, state: "TrainState") -> dict | None:
        """What a checkpoint holds and ``restore`` puts back: weights, optimizer, scaler, EMA, the run's
        position (TrainState) and config.  None when the weights are not finite: a step can leave NaN weights
        while its own loss was finite, and those must never replace the last good checkpoint (the loss check
        stops the run at the next step)."""
        if not weights_finite(self.model):
            return None
        ckpt = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                 "scaler": self.scaler.state_dict(), **state.to_checkpoint(), "world_size": self.dist.world_size,
                 "config": self.cfg.to_dict(),
                 "rng": {"scheme": "torch.manual_seed(step_seed(seed, epoch, batch, rank)) before every step",
                         "seed": self.cfg.seed}}
        if self.ema is not None:
            ckpt["ema"] = self.ema.state_dict()
        return ckpt

    @property
    def final_tta(self) -> str:
        """The TTA of the saved model's closing evaluation (model.json's ``tta``)."""
        return self.tta if self.cfg.final_tta == "same" else self.cfg.final_tta


def stratified_mask(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """A bool mask choosing ``n`` of ``labels`` stratified by class (each class its share, rounded by
    largest remainders so the total is n), drawn by ``seed``."""
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    counts = torch.bincount(labels)
    quota = (counts.double() * n / len(labels)).floor().long()
    for c in torch.argsort(counts.double() * n / len(labels) - quota, descending=True)[: n - int(quota.sum())]:
        quota[c] += 1  # largest remainders first: the quotas sum to n
    chosen = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(len(counts)):
        idx = (labels == c).nonzero().flatten()
        chosen[idx[torch.randperm(len(idx), generator=g)[: int(quota[c])]]] = True
    return chosen


def split_validation(split, n: int, seed: int):
    """(train, val): ``n`` images held out stratified by class (each class its share, rounded so the
    total is n), chosen by ``seed``.  Both keep the original order."""
    from ..data.datasets import Split

    labels = split.labels
    if not 0 < n < len(labels):
        raise UsageError(f"--val-split must be between 1 and {len(labels) - 1} (the training images), got {n}")
    val = stratified_mask(labels, n, seed + 7919)
    return Split(split.images[~val], labels[~val]), Split(split.images[val], labels[val])


def limit_train(split, n: int, seed: int):
    """--limit-train: ``n`` training images stratified by class and drawn by ``seed`` (in their original
    order), for an in-memory Split or a streamed folder's files; shards, read in order, give their first
    ``n`` (``nin data pack`` wrote them in a shuffled order)."""
    from ..data.datasets import Split
    from ..data.stream import FileSplit

    if n >= len(split):
        return split
    if isinstance(split, Split):
        keep = stratified_mask(split.labels, n, seed + 104729)
        return Split(split.images[keep], split.labels[keep])
    if isinstance(split, FileSplit):
        keep = stratified_mask(torch.from_numpy(split.labels), n, seed + 104729)
        return split.take(keep.nonzero().flatten().numpy())
    return split.head(n)


def init_source(cfg: TrainConfig):
    """--init-from's trained model, loaded once (its options and its weights are both used), or None."""
    if not cfg.init_from:
        return None
    from ..hub import load

    src = load(cfg.init_from)
    if src.meta.model != cfg.model:
        raise UsageError(f"--init-from {cfg.init_from}: holds a {src.meta.model}, but --model is {cfg.model}")
    return src


def init_from(model: nn.Module, cfg: TrainConfig, src, classes: list[str] | None = None) -> None:
    """--init-from: copy the weights of ``src`` (init_source) into ``model``, its class maps matched to
    ``classes`` (the dataset's) by name (see hub.transfer_weights)."""
    from ..hub import transfer_weights

    note = transfer_weights(model, src.state_dict(), f"--init-from {cfg.init_from}", source_classes=src.classes,
                            classes=classes, class_map=cfg.class_map)
    if note:
        print(f"note: --init-from {cfg.init_from}: {note}", file=sys.stderr)


def init_from_kwargs(cfg: TrainConfig, src) -> dict | None:
    """The model options of --init-from's weights (width, ...), which the run takes instead of its recipe's
    when the user sets none: ``--init-from nin_fmnist.fashion_mnist_best`` builds the width-64 network it
    holds.  None when there are no such weights or --model-kwargs chose the options."""
    recipe_default = RECIPES.get(cfg.recipe, {}).get("model_kwargs") or {}
    if src is None or (cfg.model_kwargs and cfg.model_kwargs != recipe_default):
        return None
    return {k: v for k, v in src.meta.model_kwargs.items() if k not in ("num_classes", "in_chans")}


def _engine(cfg: TrainConfig) -> tuple[Dist, torch.device, torch.dtype | None]:
    """The process group, device and autocast dtype, with the device's process-wide settings."""
    dist, device = setup_distributed(cfg.device)
    if cfg.sync_bn and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only. On CPU drop it; "
                         "each process then normalises with its own batch's statistics (batch norm over "
                         "--batch-size images) and evaluation uses rank 0's running statistics")
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":  # every batch has the same shape: let cuDNN time its algorithms once
        torch.backends.cudnn.benchmark = True
    return dist, device, resolve_precision(cfg.precision, device)


def _splits(cfg: TrainConfig, ds):
    """(train, validation or None) after --val-split and --limit-train."""
    from ..data.datasets import Split

    train_split, val_split = ds.train, None
    if cfg.val_split:
        from ..data.stream import FileSplit

        if isinstance(train_split, FileSplit):  # a streamed folder: the very files held out in memory
            index = Split(torch.arange(len(train_split)), torch.from_numpy(train_split.labels))
            kept, held = split_validation(index, cfg.val_split, cfg.seed)
            train_split, val_split = train_split.take(kept.images.numpy()), train_split.take(held.images.numpy())
        elif not isinstance(train_split, Split):
            raise UsageError(f"--val-split cannot hold images out of {cfg.dataset}: shards are read whole, in "
                             "order; train on the image folder (folder:PATH, with --stream if it is larger than "
                             "memory) to hold out a validation set")
        else:
            train_split, val_split = split_validation(train_split, cfg.val_split, cfg.seed)
    if cfg.limit_train is not None:
        train_split = limit_train(train_split, cfg.limit_train, cfg.seed)
    return train_split, val_split


def _model(cfg: TrainConfig, model_kwargs: dict, input_size: tuple[int, int, int], dist: Dist, device,
           classes: list[str] | None = None, src=None) -> nn.Module:
    """The initialised model on ``device`` (seeded by --seed), checked against the input size."""
    from ..models import build_model, check_input_size

    torch.manual_seed(cfg.seed)
    try:
        model = build_model(cfg.model, **model_kwargs)
    except UsageError:
        raise
    except (TypeError, ValueError) as e:  # an argument the builder does not take, or a bad value
        raise UsageError(f"--model-kwargs {cfg.model_kwargs} do not fit {cfg.model}: {e}") from None
    check_input_size(model, input_size, f"{cfg.model} (with --resize {cfg.resize})" if cfg.resize else cfg.model)
    init_weights(model, cfg.init)
    if src is not None:
        init_from(model, cfg, src, classes)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and dist.enabled:  # same parameter names, so checkpoints and weights files are unchanged
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def set_up(cfg: TrainConfig) -> Setup:
    """Validate ``cfg`` and build the process group, data, model, optimizer and loaders it describes."""
    from ..data import open_dataset

    cfg.validate()
    dist, device, amp_dtype = _engine(cfg)
    ds = open_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed, stream=cfg.stream, memory_budget=cfg.memory_budget,
                      device=device)
    train_split, val_split = _splits(cfg, ds)
    cfg = _fit_batch(cfg, len(train_split), dist)
    imagenet = cfg.transform == "imagenet"
    in_chans, h, w = ds.image_size
    if imagenet or cfg.resize:  # square inputs: the crop, or the on-the-fly resize
        h = w = cfg.crop_size if imagenet else cfg.resize
    src = init_source(cfg)
    own = init_from_kwargs(cfg, src)
    model_kwargs = {"num_classes": len(ds.classes), "in_chans": in_chans, **(cfg.model_kwargs if own is None else own)}
    model = _model(cfg, model_kwargs, (in_chans, h, w), dist, device, list(ds.classes), src)
    loaders = _loaders(cfg, ds, train_split, val_split, model, dist, device, amp_dtype, (h, w))
    base_lr = cfg.lr * (dist.world_size if cfg.lr_scale == "linear" else 1)
    if device.type == "cpu" and not cfg.compile:
        fuse_conv_relu(model)  # each conv and its ReLU in one oneDNN call (fused.py): the pair's numbers
    net = model
    if dist.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    meta = _model_meta(cfg, ds, model_kwargs, [int(in_chans), int(h), int(w)], amp_dtype)
    train_loader, test_loader, val_loader, calib_loader = loaders
    return Setup(cfg, dist, device, amp_dtype, ds, model, net, make_optimizer(model, cfg, base_lr, device),
                 torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16),
                 Ema(model, cfg.ema) if cfg.ema else None, train_loader, test_loader, val_loader, meta, base_lr,
                 len(train_split), calib_loader)


def _fit_batch(cfg: TrainConfig, n_train: int, dist: Dist) -> TrainConfig:
    """``cfg`` with --batch-size (and the lr) lowered for a small training set (fitted_batch_size)."""
    min_steps = min_steps_per_epoch(cfg)
    batch = fitted_batch_size(cfg.batch_size, n_train // dist.world_size, min_steps)
    if batch == cfg.batch_size:
        return cfg
    # the lr follows the batch by its square root: on 480 images the fast recipe's 0.2 and 0.05 reached the
    # same held-out accuracy from scratch (0.775), and fine-tuning shipped weights kept more at 0.05 (0.875
    # against 0.708 after 2 epochs at 0.2).  Recorded in config.json, so a resumed run takes the same steps.
    lr = cfg.lr * math.sqrt(batch / cfg.batch_size)
    if dist.main:
        print(f"note: {n_train:,} training images: batch size {batch} instead of {cfg.batch_size} and "
              f"lr {lr:.3g} instead of {cfg.lr:.3g}, so that an epoch takes at least {min_steps} "
              "steps (--min-steps-per-epoch 0 keeps --batch-size and --lr)", file=sys.stderr)
    return dataclasses.replace(cfg, batch_size=batch, lr=lr)


def _loaders(cfg: TrainConfig, ds, train_split, val_split, model, dist: Dist, device, amp_dtype, size):
    """(train, test, validation or None, batch-norm calibration or None) loaders."""
    from ..data import Split, make_loader

    imagenet = cfg.transform == "imagenet"
    mean, std = (ds.mean, ds.std) if cfg.normalize else (None, None)
    common = dict(device=device, resize=None if imagenet else cfg.resize, mean=mean, std=std,
                  channels_last=cfg.channels_last, dtype=input_dtype(amp_dtype))
    if not isinstance(ds.train, Split):  # streamed: decoded per sample in worker processes
        common.update(in_chans=ds.image_size[0], size=size if imagenet else tuple(ds.image_size[1:]),
                      workers=cfg.workers, max_bad=cfg.max_bad)
    held_out = dict(shuffle=False, transform="resize-center-crop" if imagenet else "fit", **common)
    # with several ranks, drop the epoch's tail so every rank takes the same number of steps (DDP needs it)
    train = make_loader(train_split, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=dist.enabled,
                        crop_padding=0 if imagenet else cfg.crop_padding, flip=cfg.flip, erase=cfg.erase,
                        alt_flip=cfg.alt_flip, rank=dist.rank, world_size=dist.world_size,
                        transform="random-resized-crop" if imagenet else "fit", **common)
    test = make_loader(ds.test, cfg.eval_batch_size, **held_out)
    val = make_loader(val_split, cfg.eval_batch_size, **held_out) if val_split else None
    # up to CALIBRATION_IMAGES training images, unaugmented: what recalibrate_bn reads (see there)
    calib = limit_train(train_split, CALIBRATION_IMAGES, cfg.seed + 1) if bn_layers(model) else None
    return train, test, val, make_loader(calib, cfg.eval_batch_size, **held_out) if calib else None


def _model_meta(cfg: TrainConfig, ds, model_kwargs: dict, input_size: list[int], amp_dtype):
    """The ModelMeta the run's model files carry (how to rebuild it and feed it)."""
    from ..modelfile import ModelMeta

    mean, std = (ds.mean, ds.std) if cfg.normalize else (None, None)
    preprocess = {"resize": cfg.resize, "mean": list(mean) if mean else None, "std": list(std) if std else None}
    if cfg.transform == "imagenet":
        preprocess["transform"] = "imagenet"  # evaluated and predicted with resize + centre crop
    return ModelMeta(model=cfg.model, model_kwargs=model_kwargs, classes=list(ds.classes), input_size=input_size,
                     dataset=ds.name, preprocess=preprocess, tta="flip" if cfg.tta_flip else "none", split=ds.split,
                     precision="bf16" if amp_dtype == torch.bfloat16 else "fp32")


def fitted_batch_size(batch_size: int, n_train: int, min_steps: int) -> int:
    """``batch_size``, lowered (to a power of two, at least 8) on a training set too small for
    ``min_steps`` steps an epoch.  Idempotent, so a resumed run keeps the batch it started with."""
    if not min_steps or n_train >= batch_size * min_steps:
        return batch_size
    fitted = 1 << max(3, (max(n_train // min_steps, 1)).bit_length() - 1)
    return min(batch_size, fitted)


# --- batch-norm statistics ------------------------------------------------------------------
# Batch norm's running statistics follow the weights with momentum 0.1: they need tens of steps to forget
# their start and, while the lr is high, lag the weights.  A run of 600 images at batch 256 (2 steps an
# epoch) evaluated at 10% with a train-mode accuracy of 66%.  So until a run has taken this many steps, the
# statistics are recomputed from training images before each evaluation (and so before each save).
BN_SETTLE_STEPS = 100
CALIBRATION_IMAGES = 4096


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader, amp_dtype) -> None:
    """Recompute every batch norm's running mean and variance as the plain average over ``loader``'s
    batches (momentum None), the rest of the model in eval mode (no dropout); the step counters stay."""
    layers = bn_layers(model)
    if not layers:
        return
    was_training = model.training
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for x, _ in loader.iterate(0):
        with torch.autocast(loader.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            model(x)
    for m, (momentum, count) in zip(layers, saved):
        m.momentum = momentum
        if count is not None:
            m.num_batches_tracked.copy_(count)
    model.train(was_training)


def restore(setup: Setup, ckpt: dict, path: Path) -> TrainState:
    """Load a checkpoint's weights, optimizer, scaler and EMA into ``s``; return its TrainState."""
    try:
        setup.model.load_state_dict(ckpt["model"])
        setup.opt.load_state_dict(ckpt["optimizer"])
        if setup.ema is not None:
            setup.ema.load_state_dict(ckpt["ema"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise CheckpointError(f"{path}: does not fit {setup.cfg.model} ({first[:200]})") from None
    if "scaler" in ckpt and setup.scaler.is_enabled():
        setup.scaler.load_state_dict(ckpt["scaler"])
    return TrainState.from_checkpoint(ckpt, setup.device, setup.dist.main)


# --- one epoch ------------------------------------------------------------------------------
def diverged(what: str, state: TrainState, run) -> TrainingDiverged:
    if run is not None:
        run.status("diverged", f"{what} at epoch {state.epoch + 1}, step {state.step}")
    kept = run.kept() if run is not None else ""
    return TrainingDiverged(f"{what} at epoch {state.epoch + 1}, step {state.step}; the run stopped{kept}. "
                            "Try a lower --lr or --warmup-epochs")


def epoch_bar(setup: Setup, state: TrainState, quiet: bool):
    """The epoch's progress bar (tqdm, with ETA), drawn only on a terminal."""
    from tqdm import tqdm

    return tqdm(total=setup.steps_per_epoch, initial=state.batch, desc=f"epoch {state.epoch + 1}/{setup.cfg.epochs}",
                unit="batch", disable=quiet or not sys.stderr.isatty(), leave=False, dynamic_ncols=True, file=sys.stderr)


def show_progress(bar, state: TrainState, world_size: int, seconds: float, lr: float) -> None:
    """The bar's running numbers: the epoch's mean loss and accuracy so far, images/s, the step's lr."""
    seen = state.sums[2].item()
    bar.set_postfix_str(f"loss {state.sums[0].item() / seen:.3f} acc {state.sums[1].item() / seen:.3f} "
                        f"{seen * world_size / max(seconds, 1e-9):.0f} img/s lr {lr:.3g}", refresh=False)


# Set by `nin train`'s SIGTERM and Ctrl-C handler besides raising KeyboardInterrupt: a signal that lands
# while Python runs a callback whose exceptions it ignores (an import lock's or a weakref's) loses that
# raise, and the run would go on to its end; the step loop raises it instead, at the next step.
stop_requested = threading.Event()


def run_epoch(setup: Setup, state: TrainState, run, *, quiet: bool, dry_run: bool = False) -> bool:
    """Train from (st.epoch, st.batch) to the epoch's end; True if --max-steps (or the dry run) stopped it."""
    cfg, dist = setup.cfg, setup.dist
    setup.net.train()
    check_every = 1 if setup.device.type == "cpu" else 25  # a host sync; cheap on CPU, batched on GPU
    bar = epoch_bar(setup, state, quiet)
    t0, last_save, stop = time.perf_counter(), time.monotonic(), False
    for x, y in setup.train_loader.iterate(state.epoch, start_batch=state.batch):
        if stop_requested.is_set():
            bar.close()
            raise KeyboardInterrupt
        torch.manual_seed(step_seed(cfg.seed, state.epoch, state.batch, dist.rank))
        lr = lr_at(cfg, state.step, setup.steps_per_epoch, setup.base_lr)
        loss, _ = train_step(setup.net, setup.opt, setup.scaler, x, y, lr=lr, amp_dtype=setup.amp_dtype,
                             label_smoothing=cfg.label_smoothing, sums=state.sums,
                             clip_grad_norm=cfg.clip_grad_norm)
        state.lr = lr  # the lr this step applied: the one the epoch's row records
        if setup.ema is not None:
            setup.ema.update(setup.model, state.step)
        state.step += 1
        state.batch += 1
        last = state.batch == setup.steps_per_epoch
        if state.batch % check_every == 0 or last or dry_run:
            if all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1), dist).item() > 0:
                bar.close()
                raise diverged(f"loss became {loss.item()}", state, run)
        if not bar.disable and (state.batch % check_every == 0 or last):  # host syncs only when a bar is shown
            show_progress(bar, state, dist.world_size, state.epoch_seconds + time.perf_counter() - t0, lr)
        bar.update(1)
        if dry_run or (cfg.max_steps is not None and state.step >= cfg.max_steps):
            stop = True
            break
        if cfg.save_every and run is not None and time.monotonic() - last_save > cfg.save_every * 60:
            state.epoch_seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            run.checkpoint(setup.state_dict(state))
            last_save = time.monotonic()
    bar.close()
    state.epoch_seconds += time.perf_counter() - t0
    return stop


def epoch_metrics(setup: Setup, state: TrainState, *, dry_run: bool = False, final: bool = True) -> dict:
    """The epoch's row: train tallies (summed over ranks), validation and test accuracy (on the first
    --curve-test-images test images unless ``final``: the run's last row)."""
    if setup.calib_loader is not None and state.step < BN_SETTLE_STEPS and not dry_run:
        recalibrate_bn(setup.eval_model, setup.calib_loader, setup.amp_dtype)  # then rank 0's, as always, below
    if setup.dist.enabled:  # rank 0's BN statistics, so every rank evaluates (and saves) the same model
        import torch.distributed

        for b in setup.eval_model.buffers():
            torch.distributed.broadcast(b, 0)
    tot = all_reduce_sum(state.sums, setup.dist)
    seen = tot[2].item()
    limit = 1 if dry_run else None
    subset = None if final or dry_run else setup.cfg.curve_test_images
    test_acc, test_loss = loader_eval(setup.eval_model, setup.test_loader, setup.amp_dtype, setup.tta, limit, subset)
    row = {"epoch": state.epoch + 1, "train_loss": tot[0].item() / seen, "train_acc": tot[1].item() / seen,
           "test_acc": test_acc, "test_loss": test_loss, "val_acc": None, "val_loss": None,
           "lr": state.lr if state.lr is not None
           else lr_at(setup.cfg, max(state.step - 1, 0), setup.steps_per_epoch, setup.base_lr),
           "images_per_sec": seen / max(state.epoch_seconds, 1e-9),
           "seconds": state.epoch_seconds, "images": int(seen)}
    if subset is not None and subset < len(setup.ds.test):
        row["test_images"] = subset  # a curve's point: the first N test images only
    if setup.val_loader is not None:
        row["val_acc"], row["val_loss"] = loader_eval(setup.eval_model, setup.val_loader, setup.amp_dtype,
                                                      setup.tta, limit)
    return row


def end_epoch(setup: Setup, state: TrainState, row: dict, run, *, quiet: bool, log, on_epoch) -> None:
    """Record the finished epoch: history, the selected model, metrics, curves, checkpoint, the log line."""
    cfg = setup.cfg
    state.history.append(row)
    state.train_seconds += state.epoch_seconds
    if setup.dist.main and not quiet:
        val = f"  val acc {row['val_acc']:.4f}" if row["val_acc"] is not None else ""
        part = f" (first {row['test_images']:,})" if row.get("test_images") else ""
        log(f"epoch {row['epoch']:>3}/{cfg.epochs}  loss {row['train_loss']:.4f}  train acc {row['train_acc']:.4f}"
            f"{val}  test acc {row['test_acc']:.4f}{part}  lr {row['lr']:.3g}  {row['images_per_sec']:.0f} img/s  "
            f"{row['seconds']:.1f} s")
    ln_c = math.log(len(setup.ds.classes))
    if state.epoch == 0 and abs(row["train_loss"] - ln_c) <= 0.01 and row["train_acc"] < 2 / len(setup.ds.classes) \
            and setup.dist.main:
        print(f"warning: the training loss stayed at ln({len(setup.ds.classes)}) = {ln_c:.3f} through the first "
              "epoch: the logits do not depend on the input yet. Either a slow start (runs often leave this "
              "plateau in epoch 2 or 3) or the book recipe's known failure: the ReLUs of the 10-channel "
              "class-map block died, and the run stays here or ends far below the book's accuracy. "
              "Try --recipe d2l-stable or a lower --lr", file=sys.stderr)
    if setup.dist.main and not state.warned_chance:
        state.warned_chance = warn_at_chance(setup, row)
    state.epoch += 1
    state.batch = 0
    state.sums.zero_()
    state.epoch_seconds = 0.0
    if run is None:
        return
    # honest selection: the validation split chooses when there is one, else the latest epoch wins
    if setup.val_loader is None or row["val_acc"] > state.best_acc:
        state.best_acc = row["val_acc"] if setup.val_loader is not None else -1.0
        state.best_epoch = row["epoch"]
        run.save_model(setup, state, "best validation accuracy" if setup.val_loader is not None else "final epoch")
        # its test accuracy is still to be measured: with another TTA, or on all test images (a curve's subset)
        state.closing_pending = setup.final_tta != setup.tta or bool(row.get("test_images"))
    run.epoch_done(setup, state, row)
    if on_epoch is not None:
        on_epoch(list(state.history))


def chance_level(setup: Setup) -> float:
    """The accuracy of always answering the test set's most common class (1/K when its labels are unknown)."""
    labels = getattr(setup.ds.test, "labels", None)
    k = len(setup.ds.classes)
    if labels is None or not len(labels):
        return 1 / k
    counts = torch.bincount(torch.as_tensor(labels).reshape(-1).cpu(), minlength=k)
    return float(counts.max()) / float(counts.sum())


def warn_at_chance(setup: Setup, row: dict) -> bool:
    """Warn (once) when the held-out accuracy sits at chance while the training accuracy has risen well
    above it: the saved model would predict one class.  Returns whether it warned."""
    chance = chance_level(setup)
    held = row["val_acc"] if row.get("val_acc") is not None else row["test_acc"]
    which = "validation" if row.get("val_acc") is not None else "test"
    if held > chance + 0.02 or row["train_acc"] < chance + 0.15:
        return False
    print(f"warning: {which} accuracy {held:.4f} is at chance ({chance:.2f}) while training accuracy rose to "
          f"{row['train_acc']:.4f} (epoch {row['epoch']}, {setup.steps_per_epoch} steps an epoch, batch "
          f"{setup.cfg.batch_size}): the model predicts nearly one class on held-out images. With few steps the "
          "batch-norm statistics may not have settled (try a smaller --batch-size or more --epochs); or the "
          "held-out images differ from the training images (another size, colour or class order)",
          file=sys.stderr)
    return True


# --- the loop -------------------------------------------------------------------------------
def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.recipe}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _dry_run(setup: Setup, log) -> dict:
    state = TrainState(sums=torch.zeros(3, dtype=torch.float64, device=setup.device))
    run_epoch(setup, state, None, quiet=True, dry_run=True)
    row = epoch_metrics(setup, state, dry_run=True)
    if setup.dist.main:
        shape = tuple(next(iter(setup.train_loader.iterate(0)))[0].shape)
        log(f"dry run: 1 train batch (loss {row['train_loss']:.4f}, input {shape}), "
            f"1 test batch (acc {row['test_acc']:.3f}); nothing written")
    return row


def _resumed_config(ckpt: dict, resume, max_steps: int | None, epochs: int | None) -> tuple[TrainConfig, int]:
    """(the config a resumed run goes on with, its saved epochs): the saved one, with a new ``max_steps``
    and, if given, ``epochs`` raised (never lowered: the epochs already run are in its history)."""
    saved = TrainConfig.from_dict(ckpt["config"])
    cfg = dataclasses.replace(saved, max_steps=max_steps)
    if epochs is not None and epochs != saved.epochs:
        if epochs < saved.epochs:
            raise UsageError(f"--epochs {epochs}: {resume} is a {saved.epochs}-epoch run; a resumed run keeps or "
                             f"raises its epochs (--epochs {saved.epochs} or more; --max-steps stops it earlier)")
        cfg = dataclasses.replace(cfg, epochs=epochs)
    return cfg, saved.epochs


def _extended(setup: Setup, state: TrainState, run, was: int) -> None:
    """A resumed run's --epochs was raised: say what that does to the lr schedule (stderr), and record
    the new epochs in config.json and in last.ckpt (rewritten at once with the same state, so a run
    stopped before its next save still resumes to the new end)."""
    cfg, step = setup.cfg, state.step
    if cfg.schedule in ("onecycle", "cosine"):  # the only schedules that depend on --epochs
        old = lr_at(dataclasses.replace(cfg, epochs=was), step, setup.steps_per_epoch, setup.base_lr)
        new = lr_at(cfg, step, setup.steps_per_epoch, setup.base_lr)
        print(f"note: --epochs {cfg.epochs} (was {was}): the {cfg.schedule} lr schedule is recomputed for "
              f"{cfg.epochs} epochs, so from step {step} the lr is {new:.3g} (the {was}-epoch schedule had "
              f"{old:.3g} there) and falls to 0 by epoch {cfg.epochs}; the steps already taken keep the lrs of "
              f"the {was}-epoch schedule, so this is not the run a fresh --epochs {cfg.epochs} would be",
              file=sys.stderr)
    if run is None:
        return
    from ..fsutil import atomic_write

    path = run.path / "config.json"
    try:
        doc = json.loads(path.read_text())
        doc["config"]["epochs"] = cfg.epochs
    except (OSError, ValueError, KeyError, TypeError):  # no readable config.json: write one from the config
        doc = {"config": cfg.to_dict()}
    doc.setdefault("epochs_raised", []).append({"from": was, "to": cfg.epochs, "at_step": step})
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(doc, indent=2)))
    run.checkpoint(setup.state_dict(state))


def _print_or_drop(*args) -> None:
    """print, flushed; a closed pipe (the reader went away) drops this and later output (stdout then
    writes to /dev/null, Python's documented recipe) instead of ending the run with BrokenPipeError."""
    try:
        print(*args, flush=True)
    except BrokenPipeError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):  # no real file descriptor behind sys.stdout
            pass


def train(cfg: TrainConfig | None, out: str | os.PathLike | None = None, *, resume: str | os.PathLike | None = None,
          max_steps: int | None = None, epochs: int | None = None, quiet: bool = False, dry_run: bool = False,
          tensorboard: bool = False, log=print, on_epoch=None) -> dict:
    """Train ``cfg`` into the run folder ``out``, or continue the run in ``resume`` (to its end, or to
    ``max_steps`` optimizer steps in all, or to a raised number of ``epochs``: see ``_extended``);
    returns the final metrics.

    ``on_epoch(history)``, if given, is called on the main process after every finished epoch with the
    list of per-epoch rows so far (a notebook's live figure uses it).  ``log=print`` (the default) prints
    each line at once, and drops the output once its reader has gone (``nin train | head -1``): the run
    goes on to its end."""
    if log is print:
        log = _print_or_drop
    ckpt, saved_epochs = None, None
    if resume is not None:
        ckpt = runfolder.load_for_resume(resume, TrainState.keys())
        cfg, saved_epochs = _resumed_config(ckpt, resume, max_steps, epochs)
    setup = set_up(cfg)
    if dry_run:
        return _dry_run(setup, log)
    if ckpt is not None and ckpt["world_size"] != setup.dist.world_size:
        raise UsageError(f"{resume}: the run was trained with world size {ckpt['world_size']}; "
                         f"resume it with the same number of processes (got {setup.dist.world_size})")
    quiet = quiet or not setup.dist.main
    run = runfolder.Run.open(resume if resume is not None else out or default_run_dir(cfg), setup, fresh=ckpt is None,
                             tensorboard=tensorboard) if setup.dist.main else None
    try:
        state = restore(setup, ckpt, Path(resume) / "last.ckpt") if ckpt is not None else \
            TrainState(sums=torch.zeros(3, dtype=torch.float64, device=setup.device))
        if ckpt is not None and cfg.epochs != saved_epochs and setup.dist.main:
            _extended(setup, state, run, saved_epochs)
        return _loop(setup, state, run, quiet=quiet, log=log, on_epoch=on_epoch, resumed=ckpt is not None)
    except KeyboardInterrupt:
        if run is not None:
            run.status("interrupted", "stopped by the user (Ctrl-C or SIGTERM)")
        raise
    finally:
        if run is not None:
            run.close()


def _loop(setup: Setup, state: TrainState, run, *, quiet: bool, log, on_epoch, resumed: bool) -> dict:
    cfg, dist = setup.cfg, setup.dist
    if state.epoch >= cfg.epochs or (cfg.max_steps is not None and state.step >= cfg.max_steps):
        if run is not None and state.epoch >= cfg.epochs and closing_eval_pending(setup, state, run):
            # stopped during its closing evaluation: do that, the one thing left
            return {**state.history[-1], **closing_eval(setup, state, run, log=log), "run_dir": str(run.path)}
        if dist.main:
            log(f"{run.path}: the run already finished ({len(state.history)} epochs, {state.step} steps); nothing to do"
                + (" (give a higher --max-steps to continue)" if cfg.max_steps is not None else ""))
        return {**(state.history[-1] if state.history else {}), "run_dir": str(run.path) if run else None}
    if run is not None:
        run.status("running", "")
        if not resumed:
            run.checkpoint(setup.state_dict(state))  # so a run killed before its first save can still be resumed
    if dist.main and not quiet:
        log(_start_line(setup, state, resumed))
    ran, tallies = [], {}  # for debug_dump: (epoch, first batch, end batch) stepped through; this rank's sums
    while state.epoch < cfg.epochs:
        first = state.batch
        stopped = run_epoch(setup, state, run, quiet=quiet)
        ran.append((state.epoch, first, state.batch))
        # the epoch's last step may leave NaN weights behind a finite loss: stop before they are evaluated
        # and saved (every rank holds the same weights, so every rank stops here)
        if not weights_finite(setup.model):
            raise diverged("the weights became NaN or infinite", state, run)
        if stopped and state.batch < setup.steps_per_epoch:  # --max-steps mid-epoch: keep the point and a model
            row = epoch_metrics(setup, state)
            if run is not None:
                run.stopped_at_max_steps(setup, state, row)
                log(f"stopped at --max-steps {cfg.max_steps} (epoch {state.epoch + 1}, batch {state.batch}/"
                    f"{setup.steps_per_epoch}): loss {row['train_loss']:.4f}, train acc {row['train_acc']:.4f}, "
                    f"test acc {row['test_acc']:.4f}; the current weights are saved as the model. "
                    f"Continue with: nin train --resume {run.path}")
            return {**row, "partial": True, "run_dir": str(run.path) if run else None}
        tallies[state.epoch] = state.sums.tolist()
        final = stopped or state.epoch + 1 >= cfg.epochs
        end_epoch(setup, state, epoch_metrics(setup, state, final=final), run, quiet=quiet, log=log, on_epoch=on_epoch)
        if stopped:
            break
    debug_dump(setup.model, setup.train_loader, ran, dist, tallies)
    return _finish(setup, state, run, quiet=quiet, log=log)


def _start_line(setup: Setup, state: TrainState, resumed: bool) -> str:
    cfg, dist = setup.cfg, setup.dist
    precision = "fp32" if setup.amp_dtype is None else str(setup.amp_dtype).replace("torch.", "")
    return (f"training {cfg.model} ({sum(p.numel() for p in setup.model.parameters()):,} params) on {cfg.dataset} "
            f"{setup.n_train:,}/{len(setup.ds.test):,} images"
            + (f" (+{len(setup.val_loader.labels):,} validation)" if setup.val_loader is not None else "")
            + f", {'x'.join(map(str, setup.meta.input_size))}, {setup.device}, "
            f"{precision}, world size {dist.world_size}"
            + (f", resuming at epoch {state.epoch + 1} batch {state.batch}" if resumed else ""))


def _finish(setup: Setup, state: TrainState, run, *, quiet: bool, log) -> dict:
    """After the last epoch (or --max-steps at an epoch's end): the closing evaluation, the status, the
    book's closing lines; returns the final metrics."""
    final = dict(state.history[-1])
    total_seen = sum(r["images_per_sec"] * r["seconds"] for r in state.history)
    final["examples_per_sec"] = total_seen / max(state.train_seconds, 1e-9)
    final["run_dir"] = str(run.path) if run else None
    if run is None:
        return final
    done = state.epoch >= setup.cfg.epochs
    if done and closing_eval_pending(setup, state, run):
        final.update(closing_eval(setup, state, run, log=log if not quiet else None))
    run.status("finished" if done else "stopped", "" if done else f"--max-steps {setup.cfg.max_steps}")
    # the book's own two closing lines
    log(f"loss {final['train_loss']:.3f}, train acc {final['train_acc']:.3f}, test acc {final['test_acc']:.3f}")
    log(f"{final['examples_per_sec']:.1f} examples/sec on {setup.device}")
    if not quiet:
        log(f"saved model: {run.path / 'best.safetensors'} ({run.selected})")
        if "tta_test_acc" in final:
            log(f"saved model's test acc with {final['tta']} TTA: {final['tta_test_acc']:.4f} (what nin eval "
                "reports for it; evaluated once, after the model was chosen)")
        log(f"run folder: {run.path}")
    return final


# --- the closing evaluation -----------------------------------------------------------------
def closing_eval_pending(setup: Setup, state: TrainState, run) -> bool:
    """Whether the saved model still awaits its closing evaluation: ``state.closing_pending``, set when the
    model was saved and cleared (and checkpointed) once it is done.  A checkpoint from before that field
    leaves it to model.json: with ``--final-tta`` its ``tta`` says which TTA its reported accuracy used; a
    model chosen at an epoch whose test accuracy was a --curve-test-images subset records none."""
    if state.closing_pending is not None:
        return state.closing_pending
    try:
        doc = json.loads((run.path / "model.json").read_text())
    except (OSError, ValueError):
        return False
    if setup.final_tta != setup.tta:
        return doc.get("tta") != setup.final_tta
    info = doc.get("info") or {}
    return info.get("test_acc") is None and "tta_test_acc" not in info and info.get("epoch") is not None


def closing_eval(setup: Setup, state: TrainState, run, *, log=None) -> dict:
    """Evaluate the saved model (whichever epoch was chosen) once on the test set with ``--final-tta``
    and record that TTA and accuracy in its model.json, so nin eval/predict/serve use the same TTA.
    The test set chooses nothing here: the weights were fixed before."""
    from ..hub import load
    from ..modelfile import save_model

    model = load(run.path).to(setup.device)
    if setup.cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    acc, loss = loader_eval(model, setup.test_loader, setup.amp_dtype, setup.final_tta)
    seconds = time.perf_counter() - t0
    info = {**model.meta.info, "tta_test_acc": acc, "tta_test_loss": loss}
    save_model(run.path, model, dataclasses.replace(model.meta, tta=setup.final_tta, info=info))
    state.closing_pending = False
    run.checkpoint(setup.state_dict(state))  # so a resume knows it is done
    if log is not None:
        log(f"closing evaluation of the saved model with {setup.final_tta} TTA: test acc {acc:.4f} ({seconds:.0f} s)")
    return {"tta": setup.final_tta, "tta_test_acc": acc, "tta_test_loss": loss}
