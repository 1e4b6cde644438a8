"""Operations on whole uint8 batches, shared by every loader: resize + normalise, augment, epoch order.

This is the data folder's basement: it imports nothing else of nin.  Augmentation, conversion,
resizing and normalisation run on the whole batch, on its device (as in airbench): no per-image PIL calls.

Resizing is two matrix products, ``A_h @ x @ A_w^T`` (the second by row blocks that skip A_h's
zeros), with the weights of PIL's bilinear
filter (the same weights as ``F.interpolate(mode="bilinear", antialias=True, align_corners=False)``),
so ``to_float_batch(x, resize=224)`` matches the book's ``Resize(224)`` + ``ToTensor()``.  Scaling
by 1/255 and the mean/std normalisation are folded into ``A_h`` and one bias add.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

__all__ = ["to_float_batch", "resize_matrix", "erase_boxes", "augment", "alternating_flips", "seed_mix", "epoch_order",
           "num_batches"]


@lru_cache(maxsize=64)
def _resize_weights(n_in: int, n_out: int) -> torch.Tensor:
    """n_out x n_in float64 weights of PIL's bilinear (triangle) filter, widened when shrinking."""
    scale = n_in / n_out
    support = max(scale, 1.0)  # antialias: the filter covers `scale` input pixels when shrinking
    centers = (torch.arange(n_out, dtype=torch.float64) + 0.5) * scale
    pos = torch.arange(n_in, dtype=torch.float64) + 0.5
    w = (1 - ((pos[None, :] - centers[:, None]) / support).abs()).clamp_(min=0)
    return w / w.sum(1, keepdim=True)


def resize_matrix(n_in: int, n_out: int, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Resizing a length-``n_in`` axis to ``n_out`` is ``resize_matrix(n_in, n_out) @ axis``."""
    return _resize_weights(n_in, n_out).to(device=device, dtype=dtype)


@lru_cache(maxsize=64)
def _row_blocks(n_in: int, n_out: int, banded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The resize matrix cut into G blocks of B output rows, each with its band of k input rows:
    weights G x B x k (float64) and input-row indices G x k.  Enlarging 28 -> 224, every output
    reads 2 inputs, so a dense K = 28 product would do ~5x the needed work."""
    w = _resize_weights(n_in, n_out)
    b = next((b for b in range(32, 7, -1) if n_out % b == 0), n_out) if banded else n_out
    bands = [w[r:r + b].abs().sum(0).nonzero().flatten() for r in range(0, n_out, b)]
    k = max(int(nz[-1] - nz[0]) + 1 for nz in bands)
    if k * 4 > n_in * 3:  # the bands would cover nearly everything: one dense block
        b, k, bands = n_out, n_in, [torch.zeros(1, dtype=torch.long)]
    starts = [min(int(nz[0]), n_in - k) for nz in bands]
    index = torch.tensor([list(range(s, s + k)) for s in starts])
    blocks = torch.stack([w[g * b:(g + 1) * b, s:s + k] for g, s in enumerate(starts)])
    return blocks, index


def _channel_params(values, c: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if t.numel() == 1:
        t = t.expand(c)
    if t.numel() != c:
        raise ValueError(f"{what} has {t.numel()} values for {c} channels")
    return t


def to_float_batch(x: torch.Tensor, *, resize: int | None = None, mean=None, std=None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 N x C x H x W (any device) -> float in [0, 1], resized to ``resize`` x ``resize`` as PIL's
    bilinear ``Resize`` + ``ToTensor`` would, then ``(x - mean) / std`` per channel if given.

    The arithmetic runs in ``dtype`` (bfloat16 is several times faster on CPUs with AVX-512 bf16;
    its error is that of bfloat16 itself, about 1/256 relative)."""
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"expected a uint8 N x C x H x W tensor, got {x.dtype} {tuple(x.shape)}")
    n, c, h, w = x.shape
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None:  # y = (v / 255 - mean) / std = v * scale + bias
        scale64 = 1 / (255 * _channel_params(std, c, "std"))
        bias64 = -_channel_params(mean, c, "mean") / _channel_params(std, c, "std")
    if resize is None or (resize == h and resize == w):
        y = x.to(dtype)
        if mean is None:
            return y.div_(255)
        return y.mul_(scale64.to(x.device, dtype).view(1, c, 1, 1)).add_(bias64.to(x.device, dtype).view(1, c, 1, 1))
    # y_i = A_h x_i A_w^T for every image: t = x A_w^T (one GEMM), then A_h t by row blocks, each
    # block of output rows reading only its band of t's rows; the result lands in N x C x H x W order.
    dev = x.device
    stats = None if mean is None else (tuple(scale64.tolist()), tuple(bias64.tolist()))
    a_w, blocks, index, bias = _resize_operands(h, w, resize, c, str(dev), dtype, stats)
    t = torch.matmul(x.to(dtype), a_w.T)  # N x C x H x resize
    g, k = index.shape  # G blocks of B output rows, each reading k input rows
    rows = t if g == 1 else t[:, :, index]  # N x C x G x k x resize
    y = torch.matmul(blocks, rows.view(n, c, g, k, resize))  # N x C x G x B x resize
    if bias is not None:
        y.add_(bias)
    return y.view(n, c, resize, resize)


@lru_cache(maxsize=64)
def _resize_operands(h: int, w: int, resize: int, c: int, device: str, dtype: torch.dtype, stats):
    """to_float_batch's constant operands, built once per shape and device: copying them to a GPU
    on every batch would be a blocking host-to-device copy (a stall) per training step."""
    dev = torch.device(device)
    a_w = resize_matrix(w, resize, dev, dtype)  # resize x W
    blocks, index = _row_blocks(h, resize, dev.type == "cpu" and dtype in (torch.float32, torch.float64))
    blocks = blocks / 255  # G x B x k, carries the 1/255 of ToTensor
    bias = None
    if stats is not None:
        scale64, bias64 = (torch.tensor(v, dtype=torch.float64) for v in stats)
        blocks = blocks[None] * (255 * scale64).view(c, 1, 1, 1)  # C x G x B x k
        bias = bias64.to(dev, dtype).view(1, c, 1, 1, 1)
    return a_w, blocks.to(dev, dtype), index.to(dev), bias


def erase_boxes(n: int, h: int, w: int, generator: torch.Generator, p: float) -> torch.Tensor:
    """Random erasing (Zhong et al.): for each of n images, with probability ``p``, a box of 2-40% of the
    image with aspect ratio 0.3-3.3 at a random place; returns an N x H x W bool mask of erased pixels."""
    on = torch.rand(n, generator=generator) < p
    area = (0.02 + 0.38 * torch.rand(n, generator=generator)) * h * w
    log_r = math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * torch.rand(n, generator=generator)
    bh = (area * log_r.exp()).sqrt().round().clamp(1, h).long()
    bw = (area / log_r.exp()).sqrt().round().clamp(1, w).long()
    y0 = (torch.rand(n, generator=generator) * (h - bh + 1)).long()
    x0 = (torch.rand(n, generator=generator) * (w - bw + 1)).long()
    ys, xs = torch.arange(h)[None, :, None], torch.arange(w)[None, None, :]
    inside = ((ys >= y0[:, None, None]) & (ys < (y0 + bh)[:, None, None]) &
              (xs >= x0[:, None, None]) & (xs < (x0 + bw)[:, None, None]))
    return inside & on[:, None, None]


def augment(x: torch.Tensor, generator: torch.Generator, *, crop_padding: int = 0, flip: bool = False,
            erase: float = 0.0, flips: torch.Tensor | None = None) -> torch.Tensor:
    """Random crop with zero padding, horizontal flip and random erasing (to 0, the background) on a
    uint8 batch, each image its own draw.

    Draws come from ``generator`` (a CPU generator) in a fixed order -- crop rows, crop columns,
    flips, then the erasing boxes -- so a batch's augmentation depends only on the generator's seed,
    never on the device.  ``flips`` (N bools, CPU) mirrors exactly those images instead of drawing
    coins (alternating flip, see ``alternating_flips``)."""
    n, c, h, w = x.shape
    p = crop_padding
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator) if p else torch.zeros(n, dtype=torch.long)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator) if p else torch.zeros(n, dtype=torch.long)
    if flips is not None:
        flip = bool(flips.any())
    else:
        flips = torch.rand(n, generator=generator) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    if erase:
        mask = erase_boxes(n, h, w, generator, erase).to(x.device)
        x = x.masked_fill(mask[:, None], 0)  # erased before the crop: the box moves with the image
    if not p and not flip:
        return x
    cols = torch.arange(w)
    cols = torch.where(flips[:, None], w - 1 - cols, cols) + dx[:, None]  # N x W, in padded coordinates
    rows = torch.arange(h) + dy[:, None]  # N x H
    xp = torch.nn.functional.pad(x, (p, p, p, p)) if p else x
    dev = x.device
    i = torch.arange(n, device=dev)[:, None, None, None]
    ch = torch.arange(c, device=dev)[None, :, None, None]
    return xp[i, ch, rows.to(dev)[:, None, :, None], cols.to(dev)[:, None, None, :]]


def alternating_flips(ids: torch.Tensor, epoch: int, seed: int, n: int) -> torch.Tensor:
    """airbench's alternating flip: sample ``i`` of ``n`` is mirrored in epoch ``e`` iff its own coin (fixed
    by ``seed``) XOR ``e`` is odd, so every image is seen both ways round in any two consecutive epochs
    instead of by chance.  ``ids``: int64 sample indices (CPU); returns one bool per id."""
    coins = torch.rand(n, generator=torch.Generator().manual_seed(seed_mix(seed, 0x464C4950))) < 0.5  # "FLIP"
    return coins[ids] ^ bool(epoch % 2)


def seed_mix(*values: int) -> int:
    """A 63-bit seed from several integers (distinct tuples give unrelated seeds)."""
    s = 0x9E3779B97F4A7C15
    for v in values:
        s = (s ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        s ^= s >> 31
    return s & 0x7FFFFFFFFFFFFFFF


def epoch_order(n: int, epoch: int, *, shuffle: bool, seed: int, drop_last: bool, rank: int = 0,
                world_size: int = 1) -> torch.Tensor:
    """The sample indices (int64, CPU) rank ``rank`` takes in ``epoch``, in order: ``randperm`` from a CPU
    generator seeded with ``seed + 1000003 * epoch`` (or 0..n-1 without ``shuffle``), cut to a multiple of
    ``world_size`` with ``drop_last``, then every ``world_size``-th from ``rank``.  Shared by every loader
    (in memory and streaming), so each path sees the same order."""
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1000003 * epoch))
    else:
        order = torch.arange(n)
    if drop_last:
        order = order[: n - n % world_size]
    return order[rank::world_size]


def num_batches(n: int, batch_size: int, *, drop_last: bool, rank: int = 0, world_size: int = 1) -> int:
    """Batches per epoch on ``rank``: with ``drop_last`` the same on every rank (full batches only)."""
    if drop_last:
        return n // world_size // batch_size
    return math.ceil(len(range(rank, n, world_size)) / batch_size)


