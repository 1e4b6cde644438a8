"""Training augmentation against loop references: random erasing's boxes, augment()'s draw order, and the
in-memory loader's augmentation of every batch with its own draws."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F


def _boxes(mask: torch.Tensor) -> list[tuple[int, int, int, int] | None]:
    """(y0, x0, h, w) of each image's erased pixels, or None; asserts they form one filled rectangle."""
    out = []
    for m in mask:
        if not m.any():
            out.append(None)
            continue
        ys, xs = m.any(1).nonzero().flatten(), m.any(0).nonzero().flatten()
        y0, x0, h, w = int(ys[0]), int(xs[0]), len(ys), len(xs)
        assert int(ys[-1]) - y0 + 1 == h and int(xs[-1]) - x0 + 1 == w  # contiguous rows and columns
        assert int(m.sum()) == h * w  # and the whole box, nothing else
        out.append((y0, x0, h, w))
    return out


# guards against: erasing boxes off the paper's rule (probability, area, aspect ratio, position)
def test_erase_boxes_follow_the_random_erasing_rule():
    from nin.data.batchops import erase_boxes

    n, h, w = 4000, 28, 28
    g = torch.Generator().manual_seed(0)
    boxes = _boxes(erase_boxes(n, h, w, g, 0.3))
    on = [b for b in boxes if b is not None]
    assert 0.27 < len(on) / n < 0.33  # each image erased with probability p
    areas = np.array([bh * bw for _, _, bh, bw in on]) / (h * w)
    ratios = np.array([bh / bw for _, _, bh, bw in on])
    assert areas.min() > 0.01 and areas.max() < 0.45  # 2-40% of the image, up to rounding and clamping
    assert 0.18 < areas.mean() < 0.24  # uniform in [0.02, 0.40]: mean 0.21 (clamping trims a little)
    assert ratios.min() > 0.2 and ratios.max() < 5  # 0.3-3.3, up to rounding small boxes to whole pixels
    assert 0.9 < np.exp(np.log(ratios).mean()) < 1.1  # log-uniform aspect ratio in [0.3, 3.3]: centred on 1
    ys = np.array([y0 + bh / 2 for y0, _, bh, _ in on])
    xs = np.array([x0 + bw / 2 for _, x0, _, bw in on])
    assert abs(ys.mean() - h / 2) < 1.0 and abs(xs.mean() - w / 2) < 1.0  # placed uniformly: centred on average
    # every position a box fits in is drawn: some boxes touch each edge
    heights, widths = np.array([b[2] for b in on]), np.array([b[3] for b in on])
    assert abs(heights.mean() - widths.mean()) < 0.5  # the ratio's range is symmetric in log: h and w alike
    small = [b for b in on if b[2] < h - 2 and b[3] < w - 2]  # boxes that can move (not clamped to the side)
    assert min(y0 for y0, _, _, _ in small) == 0 and max(y0 + bh for y0, _, bh, _ in small) == h
    assert min(x0 for _, x0, _, _ in small) == 0 and max(x0 + bw for _, x0, _, bw in small) == w
    assert all(y0 >= 0 and x0 >= 0 and y0 + bh <= h and x0 + bw <= w for y0, x0, bh, bw in on)
    assert not erase_boxes(50, h, w, g, 0.0).any() and all(b is not None for b in _boxes(erase_boxes(50, h, w, g, 1.0)))


# guards against: a box placed past the last row or column where it fits, then clipped
def test_erase_boxes_match_a_per_image_reference_of_the_same_draws():
    """Box by box against a loop over the images with the same generator's draws (erased or not, area,
    log aspect ratio, then the top-left corner drawn uniformly over the places the box fits): a box that
    could start past the last fitting row or column, and is then clipped, shows here."""
    from nin.data.batchops import erase_boxes

    n, h, w, p = 600, 12, 9, 0.8
    got = erase_boxes(n, h, w, torch.Generator().manual_seed(3), p)
    g = torch.Generator().manual_seed(3)
    on, u_area, u_ratio, u_y, u_x = (torch.rand(n, generator=g) for _ in range(5))
    want = torch.zeros(n, h, w, dtype=torch.bool)
    for k in range(n):
        if not on[k] < p:
            continue
        area = (0.02 + 0.38 * u_area[k]) * h * w
        r = (math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * u_ratio[k]).exp()
        bh = min(max(int((area * r).sqrt().round()), 1), h)
        bw = min(max(int((area / r).sqrt().round()), 1), w)
        y0 = int(u_y[k] * (h - bh + 1))  # one of the h - bh + 1 rows where the box fits
        x0 = int(u_x[k] * (w - bw + 1))
        assert 0 <= y0 <= h - bh and 0 <= x0 <= w - bw
        want[k, y0:y0 + bh, x0:x0 + bw] = True
    assert torch.equal(got, want)


# guards against: erasing after the crop and flip, or to another value than 0
def test_augment_erases_to_zero_before_cropping_and_flipping():
    """augment() against a reference written with loops: the same draws from the same generator
    (crop rows, crop columns, flips, then the erasing boxes), erased pixels 0, then pad, crop, flip."""
    from nin.data.batchops import augment, erase_boxes

    x = torch.randint(1, 256, (16, 2, 10, 12), dtype=torch.uint8)
    got = augment(x, torch.Generator().manual_seed(7), crop_padding=2, flip=True, erase=0.7)
    g = torch.Generator().manual_seed(7)
    dy = torch.randint(0, 5, (16,), generator=g)
    dx = torch.randint(0, 5, (16,), generator=g)
    flips = torch.rand(16, generator=g) < 0.5
    mask = erase_boxes(16, 10, 12, g, 0.7)
    want = torch.zeros_like(x)
    for k in range(16):
        img = x[k].clone()
        img[:, mask[k]] = 0
        padded = F.pad(img, (2, 2, 2, 2))
        crop = padded[:, int(dy[k]):int(dy[k]) + 10, int(dx[k]):int(dx[k]) + 12]
        want[k] = crop.flip(-1) if flips[k] else crop
    assert mask.any() and torch.equal(got, want)
    assert torch.equal(augment(x, torch.Generator().manual_seed(7), erase=0.0), x)  # nothing asked, nothing done


# guards against: draws for a disabled crop taken anyway, shifting every later draw
def test_augment_without_a_crop_draws_the_flips_or_boxes_first():
    """The documented draw order (crop rows, crop columns, flips, erasing boxes) skips what is off: without a
    crop the flips are the generator's first draws, without crop and flip the boxes are."""
    from nin.data.batchops import augment, erase_boxes

    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (16, 1, 6, 6), dtype=torch.uint8, generator=g)
    flips = torch.rand(16, generator=torch.Generator().manual_seed(9)) < 0.5
    want = torch.where(flips[:, None, None, None], x.flip(-1), x)
    assert 0 < int(flips.sum()) < 16
    assert torch.equal(augment(x, torch.Generator().manual_seed(9), flip=True), want)
    mask = erase_boxes(16, 6, 6, torch.Generator().manual_seed(9), 0.7)
    assert mask.any()
    assert torch.equal(augment(x, torch.Generator().manual_seed(9), erase=0.7), x.masked_fill(mask[:, None], 0))


# guards against: a loader dropping an augmentation setting or reusing draws across batches, epochs or ranks
@pytest.mark.parametrize("rank,kw", [
    (0, dict(crop_padding=2, flip=True, erase=0.6)), (1, dict(crop_padding=2, flip=True, erase=0.6)),
    (0, dict(flip=True)), (0, dict(crop_padding=1)), (0, dict(erase=0.9))])
def test_batch_loader_augments_each_batch_with_its_settings_and_its_own_draws(rank, kw):
    """Every batch is augment() of its images with the loader's crop/flip/erase settings (each alone, or
    all) and a generator seeded by (seed, epoch, batch, rank), then converted in the loader's dtype:
    exactly, batch by batch, over two epochs."""
    from nin.data.loader import BatchLoader
    from nin.data.datasets import Split
    from nin.data.batchops import seed_mix, augment, to_float_batch

    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (40, 1, 12, 12), dtype=torch.uint8, generator=g)
    split = Split(images, torch.arange(40) % 10)
    dtype = torch.bfloat16 if rank else torch.float32
    loader = BatchLoader(split, 8, shuffle=True, seed=5, rank=rank, world_size=2, dtype=dtype, **kw)
    for epoch in (0, 1):
        idx = loader.epoch_indices(epoch)
        for b, (x, y) in enumerate(loader.iterate(epoch)):
            i = idx[b * 8:(b + 1) * 8]
            want = augment(images[i], torch.Generator().manual_seed(seed_mix(5, epoch, b, rank)), **kw)
            assert x.dtype == dtype and torch.equal(x, to_float_batch(want, dtype=dtype)), (epoch, b)
            assert torch.equal(y, split.labels[i]), (epoch, b)
    # and the augmentation is really there: some pixels differ from the images as stored
    x, _ = next(loader.iterate(0))
    assert not torch.equal(x, to_float_batch(images[loader.epoch_indices(0)[:8]], dtype=dtype))
