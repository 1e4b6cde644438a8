"""The engine under the training loop: device, precision, distributed set-up, optimizer, one step, EMA."""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError


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


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "auto":
        from .. import devices  # looked up at call time (the tests stand in for the CPU there)

        ok = torch.cuda.is_bf16_supported() if device.type == "cuda" else devices.cpu_supports_bf16()
        return torch.bfloat16 if ok else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def step_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    return (seed * 1_000_003 + epoch * 100_003 + batch * 101 + rank) % (2**63 - 1)


def init_weights(model: nn.Module, scheme: str) -> None:
    """"xavier": d2l's init_weights (xavier_uniform_ on Conv2d/Linear weights only); "kaiming": He's
    uniform init for ReLU nets (gain sqrt 2 on fan_in), which keeps the signal's scale through the
    book network's 12 convs where xavier halves its variance at each; biases stay as PyTorch sets them."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            if scheme == "xavier":
                nn.init.xavier_uniform_(m.weight)
            elif scheme == "kaiming":
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")


def keep_freed_memory() -> None:
    """Keep freed memory in the process instead of handing it back to the kernel (glibc malloc).

    glibc serves every block over 32 MiB with a fresh mmap and unmaps it on free, so each of the
    d2l network's large activations (44-72 MB in bf16 at batch 128) is page-faulted and zeroed by
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


def make_optimizer(model: nn.Module, cfg, base_lr: float, device: torch.device) -> torch.optim.Optimizer:
    """SGD with weight decay on weights only; the fused kernel (one pass over all parameters) on CPU/CUDA.
    ``cfg``: a TrainConfig (``momentum``, ``nesterov``, ``weight_decay``, ``optimizer``); with
    ``optimizer == "muon"`` the weights go to Muon instead (``muon_lr``, ``muon_momentum``; see muon.py)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)  # no weight decay on biases and BN affine
    if cfg.optimizer == "muon":
        from .muon import ConvMuon

        return ConvMuon([{"params": decay, "muon": True, "momentum": cfg.muon_momentum, "nesterov": True,
                          "lr_ratio": cfg.muon_lr / cfg.lr},
                         {"params": no_decay}], lr=base_lr, momentum=cfg.momentum,
                        nesterov=cfg.nesterov and cfg.momentum > 0)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=base_lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                           fused=True if device.type in ("cpu", "cuda") else None)


def train_step(net: nn.Module, opt: torch.optim.Optimizer, scaler, x: torch.Tensor, y: torch.Tensor, *, lr: float,
               amp_dtype: torch.dtype | None, label_smoothing: float, sums: torch.Tensor,
               clip_grad_norm: float = 0.0):
    """One optimizer step, exactly as ``train`` runs it (benchmarks/bench_train.py times this function).
    Adds (loss sum, correct, seen) to ``sums``; returns (loss, logits).  ``clip_grad_norm`` > 0 rescales
    the gradients to at most that global L2 norm (after unscaling fp16's loss scale) before the step."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_ratio", 1.0)  # Muon's group keeps its own peak (muon.ConvMuon)
    with torch.autocast(x.device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
        logits = net(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad_norm > 0:
        scaler.unscale_(opt)  # a no-op without fp16's scaler; clip the true gradients, not scaled ones
        # over every parameter (those without a gradient are skipped); stays on the device: no host sync
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip_grad_norm)
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


def all_reduce_sum(t: torch.Tensor, dist: Dist) -> torch.Tensor:
    if dist.enabled:
        import torch.distributed

        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


def debug_dump(model: nn.Module, loader, ran: list[tuple[int, int, int]], dist: Dist,
               tallies: dict | None = None) -> None:
    """Opt-in, for tests: with NIN_DEBUG_DUMP_DIR=DIR set, every rank of a finished run saves DIR/rankR.pt
    holding its final weights and, per epoch, the training-sample indices it stepped through and its own
    (loss sum, correct, seen) tallies -- so the ranks' agreement, their disjoint shards and the metrics'
    sums can be checked from outside.  Off unless set."""
    out = os.environ.get("NIN_DEBUG_DUMP_DIR")
    if not out:
        return
    bs = loader.batch_size
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.save({"rank": dist.rank, "world_size": dist.world_size,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "indices": {e: loader.epoch_indices(e)[b0 * bs:b1 * bs] for e, b0, b1 in ran},
                "tallies": tallies or {}},
               Path(out) / f"rank{dist.rank}.pt")


class Ema:
    """An exponential moving average of a model (timm's ModelEmaV3): parameters and floating-point buffers
    (batch-norm running statistics) are averaged, integer buffers (batches seen) copied.  The averaged
    weights are evaluated with averaged statistics: the live model's statistics belong to the live
    weights.  After step t the average moves towards the model by 1 - d with d = min(decay, (1 + t) /
    (10 + t)) (the warm-up of TensorFlow's ExponentialMovingAverage with num_updates), so it tracks the
    model closely early on (a few thousand steps with decay 0.999 would otherwise still hold the random
    init)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        mine, theirs = list(self.module.parameters()), list(model.parameters())
        for e, m in zip(self.module.buffers(), model.buffers()):
            if e.is_floating_point():
                mine.append(e)
                theirs.append(m)
            else:
                e.copy_(m)
        torch._foreach_lerp_(mine, theirs, 1 - d)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
