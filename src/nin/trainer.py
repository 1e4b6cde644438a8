"""The training loop: one process or several (torchrun + DistributedDataParallel), resumable.

Determinism: the data order and augmentation come from (seed, epoch, batch) and the dropout RNG is
re-seeded from (seed, epoch, batch, rank) before every step, so a run resumed from any checkpoint —
mid-epoch included — replays exactly the steps an uninterrupted run takes (bit for bit on CPU).
"""
from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import runfolder
from .errors import CheckpointError, TrainingDiverged, UsageError
from .recipes import TrainConfig, lr_at


# --- engine choices -----------------------------------------------------------------------
def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {name!r} (expected auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def cpu_supports_bf16() -> bool:
    """bf16 autocast only pays on CPUs with native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "auto":
        ok = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_bf16()
        return torch.bfloat16 if ok else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def step_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 100_003 + batch * 101 + rank) % (2**63 - 1)


def init_weights(model: nn.Module, scheme: str) -> None:
    """"xavier": d2l's init_weights (xavier_uniform_ on Conv2d/Linear weights only); "kaiming": He's
    uniform init for ReLU nets (gain sqrt 2 on fan_in), which keeps the signal's scale through the
    seed's 12 convs where xavier halves its variance at each; biases stay as PyTorch sets them."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
            elif scheme == "kaiming":
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")


def keep_freed_memory() -> None:
    """Keep freed memory in the process instead of handing it back to the kernel (glibc malloc).

    glibc serves every block over 32 MiB with a fresh mmap and unmaps it on free, so each of the
    seed network's large activations (44-72 MB in bf16 at batch 128) is page-faulted and zeroed by
    the kernel again on every step: about a third of a CPU step (benchmarks/README.md).  Raising
    the mmap and trim thresholds makes the heap reuse those blocks.  Process-wide; only called for
    CPU training.  A no-op where glibc is absent."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks under 1 GiB come from the heap
        libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never shrink the heap top
    except (OSError, AttributeError):
        pass


def input_dtype(amp_dtype: torch.dtype | None) -> torch.dtype:
    """The loader's output dtype: under bf16 autocast the first conv reads bf16 anyway, and resizing
    straight into bf16 is several times faster on CPU (its error is bf16's own, about 1/256)."""
    return torch.bfloat16 if amp_dtype == torch.bfloat16 else torch.float32


def make_optimizer(model: nn.Module, cfg: TrainConfig, base_lr: float, device: torch.device) -> torch.optim.SGD:
    """SGD with weight decay on weights only; the fused kernel (one pass over all parameters) on CPU/CUDA."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on biases and BN affine
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=base_lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           fused=True if device.type in ("cpu", "cuda") else None)


def train_step(net: nn.Module, opt: torch.optim.Optimizer, scaler, x: torch.Tensor, y: torch.Tensor, *, lr: float,
               amp_dtype: torch.dtype | None, label_smoothing: float, sums: torch.Tensor):
    """One optimizer step, exactly as ``train`` runs it (benchmarks/bench_train.py times this function).
    Adds (loss sum, correct, seen) to ``sums``; returns (loss, logits)."""
    for g in opt.param_groups:
        g["lr"] = lr
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        logits = net(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    with torch.no_grad():
        # no host-to-device copy here: on CUDA a blocking copy would stall the queue every step
        sums[:2] += torch.stack([loss.detach().double() * y.numel(), (logits.argmax(1) == y).sum().double()])
        sums[2] += y.numel()
    return loss, logits


def weights_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


# --- distributed --------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_name: str) -> tuple[Dist, torch.device]:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist_info = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    device = resolve_device(device_name, dist_info.local_rank)
    if dist_info.enabled:
        import datetime as _dt

        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            timeout = _dt.timedelta(seconds=float(os.environ.get("NIN_DIST_TIMEOUT", "300")))
            dist.init_process_group(backend, timeout=timeout)
        if device.type == "cuda":
            torch.cuda.set_device(device)
    return dist_info, device


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        import torch.distributed as dist

        t = t.clone()
        dist.all_reduce(t)
    return t


def debug_dump(model: nn.Module, loader, ran: list[tuple[int, int, int]], d: Dist) -> None:
    """Opt-in, for tests: with NIN_DEBUG_DUMP_DIR=DIR set, every rank of a finished run saves DIR/rankR.pt
    holding its final weights and, per epoch, the training-sample indices it stepped through -- so the
    ranks' agreement and their disjoint shards can be checked from outside.  Off unless set."""
    out = os.environ.get("NIN_DEBUG_DUMP_DIR")
    if not out:
        return
    bs = loader.batch_size
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save({"rank": d.rank, "world_size": d.world_size,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "indices": {e: loader.epoch_indices(e)[b0 * bs:b1 * bs] for e, b0, b1 in ran}},
               Path(out) / f"rank{d.rank}.pt")


# --- evaluation ---------------------------------------------------------------------------
@torch.no_grad()
def loader_accuracy(model: nn.Module, loader, amp_dtype, tta_flip: bool = False, max_batches: int | None = None) -> float:
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=loader.device)
    seen = 0
    for i, (x, y) in enumerate(loader.iterate(0)):
        if max_batches is not None and i >= max_batches:
            break
        with torch.autocast(loader.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
            logits = model(x).float()
            if tta_flip:
                logits = logits + model(x.flip(3)).float()
        correct += (logits.argmax(1) == y).sum()
        seen += y.numel()
    return correct.item() / max(1, seen)


# --- the loop -----------------------------------------------------------------------------
def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.recipe}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def train(cfg: TrainConfig, out: str | os.PathLike | None = None, *, resume: str | os.PathLike | None = None,
          quiet: bool = False, dry_run: bool = False, tensorboard: bool = False, log=print, on_epoch=None) -> dict:
    """Train ``cfg`` into the run folder ``out`` (or continue the run in ``resume``); returns final metrics.

    ``on_epoch(history)``, if given, is called on the main process after every finished epoch with the
    list of per-epoch rows so far (a notebook's live figure uses it)."""
    from .data import BatchLoader, load_dataset
    from .export import ModelMeta, save_model
    from .models import check_input_size, create_model

    state = None
    if resume is not None:
        run_dir = Path(resume)
        state = runfolder.load_for_resume(run_dir)
        cfg = TrainConfig.from_dict(state["config"])
    cfg.validate()
    d, device = setup_distributed(cfg.device)
    if state is not None and state["world_size"] != d.world_size:
        raise UsageError(f"{resume}: the run was trained with world size {state['world_size']}; "
                         f"resume it with the same number of processes (got {d.world_size})")
    if cfg.sync_bn and device.type != "cuda":
        raise UsageError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm runs on GPUs only. On CPU drop it; "
                         "each process then normalises with its own batch's statistics (batch norm over "
                         "--batch-size images) and evaluation uses rank 0's running statistics")
    amp_dtype = resolve_precision(cfg.precision, device)
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":  # every batch has the same shape: let cuDNN time its algorithms once
        torch.backends.cudnn.benchmark = True
    if not d.main:
        quiet = True

    ds = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
    train_split = ds.train
    if cfg.limit_train is not None:
        train_split = type(ds.train)(ds.train.images[:cfg.limit_train], ds.train.labels[:cfg.limit_train])
    in_chans, h, w = train_split.images.shape[1:]
    if cfg.resize:
        h = w = cfg.resize

    torch.manual_seed(cfg.seed)
    model_kwargs = {"num_classes": len(ds.classes), "in_chans": in_chans, **cfg.model_kwargs}
    try:
        model = create_model(cfg.model, **model_kwargs)
    except UsageError:
        raise
    except (TypeError, ValueError) as e:  # an argument the builder does not take, or a bad value
        raise UsageError(f"--model-kwargs {cfg.model_kwargs} do not fit {cfg.model}: {e}") from None
    check_input_size(model, (in_chans, h, w), f"{cfg.model} (with --resize {cfg.resize})" if cfg.resize else cfg.model)
    init_weights(model, cfg.init)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if cfg.sync_bn and d.enabled:  # same parameter names, so checkpoints and weights files are unchanged
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)

    mean, std = (ds.mean, ds.std) if cfg.normalize else (None, None)
    common = dict(device=device, resize=cfg.resize, mean=mean, std=std, channels_last=cfg.channels_last,
                  dtype=input_dtype(amp_dtype))
    # with several ranks, drop the epoch's tail so every rank takes the same number of steps (DDP needs it)
    train_loader = BatchLoader(train_split, cfg.batch_size, shuffle=True, seed=cfg.seed, drop_last=d.enabled,
                               crop_padding=cfg.crop_padding, flip=cfg.flip, rank=d.rank,
                               world_size=d.world_size, **common)
    test_loader = BatchLoader(ds.test, cfg.eval_batch_size, shuffle=False, **common)
    steps_per_epoch = len(train_loader)
    base_lr = cfg.lr * (d.world_size if cfg.lr_scale == "linear" else 1)

    opt = make_optimizer(model, cfg, base_lr, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    net = model
    if d.enabled:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    epoch, batch0, step, best_acc, history, train_seconds = 0, 0, 0, -1.0, [], 0.0
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, seen (this epoch)
    epoch_seconds = 0.0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise CheckpointError(f"{run_dir / 'last.ckpt'}: does not fit {cfg.model} ({first[:200]})") from None
        if "scaler" in state and scaler.is_enabled():
            scaler.load_state_dict(state["scaler"])
        epoch, batch0, step = state["epoch"], state["batch"], state["step"]
        best_acc, history, train_seconds = state["best_acc"], list(state["history"]), state["train_seconds"]
        # the saved partial sums are rank 0's own (a mid-epoch checkpoint is written without a collective);
        # the other ranks tally from the resume point, so the epoch's metrics average what was tallied
        sums = state["sums"].to(device) if d.main else torch.zeros_like(sums)
        epoch_seconds = state["epoch_seconds"]
        run_dir = Path(resume)
    elif not dry_run and d.main:
        run_dir = runfolder.prepare(out or default_run_dir(cfg), resume=False)
    else:
        run_dir = Path(out) if out else None

    writer = None
    if d.main and not dry_run:
        meta = ModelMeta(model=cfg.model, model_kwargs=model_kwargs, classes=list(ds.classes),
                         input_size=[in_chans, h, w], dataset=cfg.dataset,
                         preprocess={"resize": cfg.resize, "mean": list(mean) if mean else None,
                                     "std": list(std) if std else None})
        if state is None:
            runfolder.write_config(run_dir, cfg.to_dict(), {
                "device": str(device), "precision": str(amp_dtype or "fp32"), "world_size": d.world_size,
                "data_source": ds.source, "model_kwargs": model_kwargs})
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            writer = SummaryWriter(str(run_dir / "tensorboard"))

    def kept() -> str:
        last = run_dir / "last.ckpt" if run_dir is not None else None
        return f"; the last good checkpoint {last} is kept" if last is not None and last.exists() else ""

    def checkpoint(next_epoch: int, next_batch: int) -> None:
        if not d.main or dry_run:
            return
        # A step can leave NaN weights while its own loss was finite: never save those over the last good
        # checkpoint.  The loss check stops the run at the next step (no collective here: rank 0 only).
        if not weights_finite(model):
            return
        runfolder.save_checkpoint(run_dir / "last.ckpt", {
            "model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
            "epoch": next_epoch, "batch": next_batch, "step": step, "sums": sums.cpu(),
            "epoch_seconds": epoch_seconds, "best_acc": best_acc, "history": history,
            "train_seconds": train_seconds, "world_size": d.world_size, "config": cfg.to_dict(),
            "rng": {"scheme": "torch.manual_seed(step_seed(seed, epoch, batch, rank)) before every step",
                    "seed": cfg.seed}})

    if epoch >= cfg.epochs or (cfg.max_steps is not None and step >= cfg.max_steps):
        if d.main:
            log(f"{run_dir}: the run already finished ({len(history)} epochs); nothing to do")
        return history[-1] if history else {}

    if state is None:
        checkpoint(0, 0)  # so a run killed before its first save can still be resumed
    ln_c = math.log(len(ds.classes))
    check_every = 1 if device.type == "cpu" else 25  # a host sync; cheap on CPU, batched on GPU
    last_save = time.monotonic()
    if d.main and not quiet:
        log(f"training {cfg.model} ({sum(p.numel() for p in model.parameters()):,} params) on {cfg.dataset} "
            f"{len(train_split):,}/{len(ds.test):,} images, {in_chans}x{h}x{w}, {device}, "
            f"{'fp32' if amp_dtype is None else str(amp_dtype).replace('torch.', '')}, world size {d.world_size}"
            + (f", resuming at epoch {epoch + 1} batch {batch0}" if state is not None else ""))

    from tqdm import tqdm

    stop = False
    ran = []  # (epoch, first batch, end batch) this process stepped through, for debug_dump
    while epoch < cfg.epochs and not stop:
        net.train()
        bar = tqdm(total=steps_per_epoch, initial=batch0, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                   disable=quiet or not sys.stderr.isatty(), leave=False, dynamic_ncols=True, file=sys.stderr)
        t0 = time.perf_counter()
        batch = batch0
        for x, y in train_loader.iterate(epoch, start_batch=batch0):
            torch.manual_seed(step_seed(cfg.seed, epoch, batch, d.rank))
            lr = lr_at(cfg, step, steps_per_epoch, base_lr)
            loss, logits = train_step(net, opt, scaler, x, y, lr=lr, amp_dtype=amp_dtype,
                                      label_smoothing=cfg.label_smoothing, sums=sums)
            step += 1
            batch += 1
            if batch % check_every == 0 or batch == steps_per_epoch or dry_run:
                bad = all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1), d)
                if bad.item() > 0:
                    bar.close()
                    raise TrainingDiverged(f"loss became {loss.item()} at epoch {epoch + 1}, step {step}; "
                                           f"the run stopped{kept()}. Try a lower --lr or --warmup-epochs")
            if not bar.disable and (batch % check_every == 0 or batch == steps_per_epoch):
                seen = sums[2].item()  # host syncs for the bar only when a bar is shown
                el = epoch_seconds + time.perf_counter() - t0
                bar.set_postfix_str(f"loss {sums[0].item() / seen:.3f} acc {sums[1].item() / seen:.3f} "
                                    f"{seen * d.world_size / max(el, 1e-9):.0f} img/s lr {lr:.3g}", refresh=False)
            bar.update(1)
            if dry_run or (cfg.max_steps is not None and step >= cfg.max_steps):
                stop = True
                break
            if cfg.save_every and d.main and time.monotonic() - last_save > cfg.save_every * 60:
                epoch_seconds += time.perf_counter() - t0
                t0 = time.perf_counter()
                checkpoint(epoch, batch)
                last_save = time.monotonic()
        bar.close()
        epoch_seconds += time.perf_counter() - t0
        ran.append((epoch, batch0, batch))

        if d.enabled:  # rank 0's BN statistics, so every rank evaluates (and saves) the same model
            import torch.distributed as dist

            for b in model.buffers():
                dist.broadcast(b, 0)
        # the epoch's last step may leave NaN weights behind a finite loss: stop before they are evaluated
        # and saved as best.safetensors (every rank holds the same weights, so every rank stops here)
        if not dry_run and not weights_finite(model):
            raise TrainingDiverged(f"the weights became NaN or infinite at epoch {epoch + 1}, step {step}; "
                                   f"the run stopped{kept()}. Try a lower --lr or --warmup-epochs")
        tot = all_reduce_sum(sums, d)
        seen = tot[2].item()
        acc = loader_accuracy(model, test_loader, amp_dtype, cfg.tta_flip, max_batches=1 if dry_run else None)
        row = {"epoch": epoch + 1, "train_loss": tot[0].item() / seen, "train_acc": tot[1].item() / seen,
               "test_acc": acc, "lr": lr, "images_per_sec": seen / max(epoch_seconds, 1e-9),
               "seconds": epoch_seconds}
        if dry_run and not d.main:
            return row
        if dry_run:
            log(f"dry run: 1 train batch (loss {row['train_loss']:.4f}, input {tuple(x.shape)}), "
                f"1 test batch (acc {acc:.3f}); nothing written")
            return row
        if batch < steps_per_epoch:  # --max-steps stopped mid-epoch: save the exact point, record no epoch
            checkpoint(epoch, batch)
            if d.main:
                log(f"stopped at --max-steps {cfg.max_steps} (epoch {epoch + 1}, batch {batch}/{steps_per_epoch}):"
                    f" loss {row['train_loss']:.4f}, train acc {row['train_acc']:.4f}, test acc {acc:.4f}")
            return {**row, "partial": True, "run_dir": str(run_dir)}
        history.append(row)
        train_seconds += epoch_seconds
        if d.main and not quiet:
            log(f"epoch {epoch + 1:>3}/{cfg.epochs}  loss {row['train_loss']:.4f}  train acc {row['train_acc']:.4f}  "
                f"test acc {acc:.4f}  lr {lr:.3g}  {row['images_per_sec']:.0f} img/s  {epoch_seconds:.1f} s")
        if epoch == 0 and abs(row["train_loss"] - ln_c) <= 0.01 and row["train_acc"] < 2 / len(ds.classes) and d.main:
            print(f"warning: the training loss stayed at ln({len(ds.classes)}) = {ln_c:.3f} through the first "
                  "epoch: the logits do not depend on the input yet. Either a slow start (runs often leave this "
                  "plateau in epoch 2 or 3) or the seed's known failure: the ReLUs of the 10-channel class-map "
                  "block died, and the run stays here or ends far below the book's accuracy. "
                  "Try --recipe d2l-stable or a lower --lr", file=sys.stderr)
        if writer is not None:
            for k in ("train_loss", "train_acc", "test_acc", "lr", "images_per_sec"):
                writer.add_scalar(k, row[k], epoch + 1)
            writer.flush()
        epoch += 1
        batch0 = 0
        sums.zero_()
        epoch_seconds = 0.0
        if d.main:
            if acc > best_acc:
                best_acc = acc
                save_model(run_dir, model, meta)
            runfolder.write_metrics(run_dir, history)
            if on_epoch is not None:
                on_epoch(list(history))
            runfolder.plot_curves(run_dir, history, f"{cfg.recipe}: {cfg.model} on {cfg.dataset}")
            checkpoint(epoch, 0)
            last_save = time.monotonic()

    debug_dump(model, train_loader, ran, d)
    final = dict(history[-1])
    total_seen = sum(r["images_per_sec"] * r["seconds"] for r in history)
    final["examples_per_sec"] = total_seen / max(train_seconds, 1e-9)
    final["run_dir"] = str(run_dir)
    if d.main:
        # the seed's own two closing lines
        log(f"loss {final['train_loss']:.3f}, train acc {final['train_acc']:.3f}, test acc {final['test_acc']:.3f}")
        log(f"{final['examples_per_sec']:.1f} examples/sec on {device}")
        if not quiet:
            log(f"run folder: {run_dir}")
    if writer is not None:
        writer.close()
    return final
