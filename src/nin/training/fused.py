"""Conv + ReLU as one oneDNN call for CPU training, and the stride-4 stem as a dense convolution.

A NiN block is conv, ReLU, conv, ReLU, ...  On a CPU every ReLU is a pass over memory: for the
book's network at 224 x 224 the separate ReLUs were about a sixth of a bf16 training step (their
in-place form on bf16 runs at half the speed of the out-of-place one), while oneDNN applies a ReLU to
a convolution's output before writing it, for free.  ``fuse_conv_relu`` swaps every (Conv2d, ReLU)
pair of a model's Sequentials for (FusedConvReLU, Identity), as ``torch.ao.quantization.fuse_modules``
does: the convolution keeps its parameters and their names (checkpoints and weights files are
unchanged) and computes what the pair computed: bit for bit in channels_last, as nin trains (ReLU
commutes with rounding to bf16; the backward pass is the same two kernels, ReLU's mask then the
convolution's); in NCHW oneDNN may pick another fp32 kernel for the fused call (1 ulp apart).

The book's first layer is an 11 x 11 convolution with stride 4 over one channel: a matrix product
with K = 121 that oneDNN runs at a fraction of its speed elsewhere (its weight gradient alone took
as long as the forward and backward of the 5 x 5 layer).  Rearranged, the same layer is a 3 x 3
convolution with stride 1 over 16 channels (each 4 x 4 block of pixels becomes one position, the
kernel is padded to 12 x 12 and cut the same way): the same sums in another order (fp32 rounding
apart), 2.5x faster forward and backward together.  Used where the shapes allow it, else the plain
convolution.  Only on CPU: CUDA has its own fusions (cuDNN), and ``--compile`` its own (inductor).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn


class _ConvReLU(torch.autograd.Function):
    """relu(conv2d(x, w, b)) in one oneDNN call; backward: ReLU's mask, then the convolution's backward."""

    @staticmethod
    def forward(ctx, x, w, b, stride: list[int], padding: list[int]):
        y = torch.ops.mkldnn._convolution_pointwise(x, w, b, padding, stride, [1, 1], 1, "relu", [], "")
        if x.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous(memory_format=torch.channels_last):
            y = y.contiguous(memory_format=torch.channels_last)  # one-channel inputs leave oneDNN free to pick NCHW
        ctx.save_for_backward(x, w, y)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, b is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w, y = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad, y, 0)  # what nn.ReLU's backward computes
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, w, [w.shape[0]] if ctx.has_bias else None, ctx.stride, ctx.padding, [1, 1], False, [0, 0], 1,
            [need_x, need_w, ctx.has_bias and need_b])
        return gx, gw, gb, None, None


def space_to_depth(x: torch.Tensor, s: int) -> torch.Tensor:
    """N x C x H x W -> N x C*s*s x H/s x W/s: each s x s block of pixels becomes one position's channels."""
    n, c, h, w = x.shape
    return x.reshape(n, c, h // s, s, w // s, s).permute(0, 1, 3, 5, 2, 4).reshape(n, c * s * s, h // s, w // s)


def space_to_depth_kernel(w: torch.Tensor, s: int) -> torch.Tensor:
    """The kernel that computes the same convolution on ``space_to_depth(x, s)`` with stride 1:
    O x C x k x k -> O x C*s*s x ceil(k/s) x ceil(k/s), zero-padded to a multiple of s first."""
    o, c, k, _ = w.shape
    q = math.ceil(k / s)
    w = F.pad(w, (0, q * s - k, 0, q * s - k))
    return w.reshape(o, c, q, s, q, s).permute(0, 1, 3, 5, 2, 4).reshape(o, c * s * s, q, q)


def _stem_fits(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether the space-to-depth form applies: a few input channels, stride s > 1 in both directions,
    no padding, and an input whose side is a multiple of s giving the same output size."""
    s, k = conv.stride[0], conv.kernel_size[0]
    if conv.in_channels > 4 or s < 2 or conv.stride != (s, s) or conv.kernel_size != (k, k) or conv.padding != (0, 0):
        return False
    h, w = x.shape[-2:]
    return h % s == 0 and w % s == 0 and (h - k) // s == h // s - math.ceil(k / s) and (w - k) // s == w // s - math.ceil(k / s)


@functools.lru_cache(maxsize=1)
def _mkldnn_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions on this CPU (AVX-512 at least); where not, the fused call would fail."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class FusedConvReLU(nn.Conv2d):
    """An nn.Conv2d whose output has already been through a ReLU (see the module's docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if torch.is_autocast_enabled("cpu"):  # the casts autocast would make, outside the fused op
            dtype = torch.get_autocast_dtype("cpu")
            x, w, b = x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)
        if x.dtype not in (torch.float32, torch.bfloat16) or x.dtype != w.dtype or x.device.type != "cpu" \
                or (x.dtype == torch.bfloat16 and not _mkldnn_bf16()):  # PyTorch's own conv has a non-oneDNN path
            return F.relu(super().forward(x))
        stride, padding = list(self.stride), list(self.padding)
        if _stem_fits(self, x):
            s = stride[0]
            memory_format = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
            x = space_to_depth(x, s).contiguous(memory_format=memory_format)
            w, stride = space_to_depth_kernel(w, s), [1, 1]
        with torch.autocast("cpu", enabled=False):
            return _ConvReLU.apply(x, w, b, stride, padding)


def fuse_conv_relu(model: nn.Module) -> int:
    """Swap every (Conv2d, ReLU) pair in ``model``'s Sequentials for (FusedConvReLU, Identity), in place;
    returns how many.  Plain convolutions only (groups 1, dilation 1, zero padding)."""
    if not torch.backends.mkldnn.is_available():
        return 0
    fused = 0
    for seq in model.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        for i in range(len(seq) - 1):
            conv, relu = seq[i], seq[i + 1]
            if type(conv) is nn.Conv2d and type(relu) is nn.ReLU and conv.groups == 1 and conv.dilation == (1, 1) \
                    and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple):
                conv.__class__ = FusedConvReLU  # same parameters, same names: the state dict is unchanged
                seq[i + 1] = nn.Identity()
                fused += 1
    return fused
