"""The in-memory loader: a split held on its device as uint8, batches indexed out of it (airbench's data path)."""
from __future__ import annotations

import torch

from .batchops import alternating_flips, augment, epoch_order, num_batches, seed_mix, to_float_batch
from .datasets import Split


class BatchLoader:
    """Batches of one split, held on ``device`` as uint8: ``for x, y in loader`` yields float x, int64 y.

    Epoch ``e`` is ``randperm`` from a CPU generator seeded with ``seed + 1000003 * e`` (or 0..N-1 without
    ``shuffle``); batch ``b``'s augmentation draws come from a generator seeded from (seed, e, b, rank).
    So ``iterate(e, start_batch=k)`` yields exactly the tail of ``iterate(e)`` (resume mid-epoch).

    Sharding: every rank computes the same order and takes ``order[rank::world_size]``.  With
    ``drop_last`` the order is first cut to a multiple of ``world_size`` (every rank gets the same
    number of samples and batches, as DDP training needs); without it nothing is dropped or repeated
    and shards differ by at most one sample (what evaluation needs: each sample counted once).
    """

    streamed = False  # every image is in memory (StreamLoader reads them from files)

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, device="cpu", resize: int | None = None, mean=None, std=None,
                 crop_padding: int = 0, flip: bool = False, erase: float = 0.0, alt_flip: bool = False, rank: int = 0,
                 world_size: int = 1, channels_last: bool = False, dtype: torch.dtype = torch.float32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.resize, self.mean, self.std, self.dtype = resize, mean, std, dtype
        self.crop_padding, self.flip, self.channels_last = crop_padding, flip, channels_last
        self.erase, self.alt_flip = erase, alt_flip and flip
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def __len__(self) -> int:
        return num_batches(len(self.labels), self.batch_size, drop_last=self.drop_last, rank=self.rank,
                           world_size=self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """The sample indices (int64, CPU) this rank sees in ``epoch``, in order."""
        return epoch_order(len(self.labels), epoch, shuffle=self.shuffle, seed=self.seed, drop_last=self.drop_last,
                           rank=self.rank, world_size=self.world_size)

    def iterate(self, epoch: int, start_batch: int = 0):
        """Yields (x float on device, y int64 on device) for batches ``start_batch..len(self)-1``."""
        order = self.epoch_indices(epoch)
        idx = order.to(self.device)
        flips = alternating_flips(order, epoch, self.seed, len(self.labels)) if self.alt_flip else None
        b_size = self.batch_size
        for b in range(start_batch, len(self)):
            i = idx[b * b_size:(b + 1) * b_size]
            x = self.images[i]
            if self.crop_padding or self.flip or self.erase:
                g = torch.Generator().manual_seed(seed_mix(self.seed, epoch, b, self.rank))
                x = augment(x, g, crop_padding=self.crop_padding, flip=self.flip, erase=self.erase,
                            flips=None if flips is None else flips[b * b_size:(b + 1) * b_size])
            x = to_float_batch(x, resize=self.resize, mean=self.mean, std=self.std, dtype=self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.labels[i]

    def __iter__(self):
        return self.iterate(self.epoch)
