"""CPU training's fused layers (nin.training.fused): conv + ReLU in one oneDNN call, and the stride-4 stem
as a space-to-depth convolution, against the plain nn.Conv2d + nn.ReLU they replace."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nin.training.fused import FusedConvReLU, fuse_conv_relu, space_to_depth, space_to_depth_kernel

from .tinyrun import QUIET, tiny

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this torch build")


def pair_and_fused(conv: nn.Conv2d):
    plain = nn.Sequential(conv, nn.ReLU(inplace=True))
    fused = copy.deepcopy(plain)
    assert fuse_conv_relu(fused) == 1
    assert type(fused[0]) is FusedConvReLU and type(fused[1]) is nn.Identity
    return plain, fused


def forward_backward(model, x, amp):
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        y = model(x)
    g = torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype)
    y.backward(g)
    return y.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
@pytest.mark.parametrize("shape", [(8, 16, 1, 1, 0), (8, 16, 3, 1, 1), (3, 8, 5, 1, 2), (8, 8, 3, 2, 1)],
                         ids=["1x1", "3x3", "5x5", "3x3-stride2"])
def test_the_fused_pair_computes_exactly_what_conv_then_relu_computed(shape, channels_last, amp):
    c_in, c_out, k, s, p = shape
    torch.manual_seed(0)
    plain, fused = pair_and_fused(nn.Conv2d(c_in, c_out, k, stride=s, padding=p))
    x = torch.randn(4, c_in, 12, 12)
    if channels_last:
        plain, fused = (m.to(memory_format=torch.channels_last) for m in (plain, fused))
        x = x.contiguous(memory_format=torch.channels_last)
    y0, gx0, gp0 = forward_backward(plain, x, amp)
    y1, gx1, gp1 = forward_backward(fused, x, amp)
    assert y1.dtype == y0.dtype and y1.shape == y0.shape and (y0 > 0).any() and (y0 == 0).any()
    assert y1.is_contiguous(memory_format=torch.channels_last) == y0.is_contiguous(memory_format=torch.channels_last)
    if channels_last:  # as nin trains: ReLU commutes with rounding, the same kernel's numbers
        same = torch.equal
    else:  # in NCHW oneDNN may pick another fp32 kernel for the fused call (seen with one thread): 1 ulp
        def same(a, b):
            return torch.allclose(a, b, rtol=1e-6, atol=1e-6) and (amp is False or torch.equal(a, b))
    assert same(y0, y1) and same(gx0, gx1)
    for a, b in zip(gp0, gp1):
        assert a.dtype == b.dtype == torch.float32 and (torch.equal(a, b) if channels_last else torch.allclose(a, b, rtol=1e-5, atol=1e-6))


@pytest.mark.parametrize("c_in", [1, 3])
def test_space_to_depth_turns_the_stride_4_stem_into_the_same_stride_1_convolution(c_in):
    torch.manual_seed(0)
    x = torch.randn(2, c_in, 64, 64, dtype=torch.float64)
    w = torch.randn(5, c_in, 11, 11, dtype=torch.float64)
    want = F.conv2d(x, w, stride=4)  # 2 x 5 x 14 x 14
    got = F.conv2d(space_to_depth(x, 4), space_to_depth_kernel(w, 4))
    assert got.shape == want.shape and torch.allclose(got, want, rtol=0, atol=1e-10)
    blocks = space_to_depth(x, 4)  # channel (c, dy, dx) of position (i, j) is pixel (4i + dy, 4j + dx)
    assert blocks[1, c_in * 16 - 1, 2, 3] == x[1, c_in - 1, 11, 15]


@pytest.mark.parametrize("size", [64, 66, 224])  # 66: no whole 4 x 4 blocks, the plain convolution runs
def test_the_fused_stem_matches_the_plain_stem_in_value_and_gradient(size):
    torch.manual_seed(0)
    plain, fused = pair_and_fused(nn.Conv2d(1, 16, 11, stride=4))
    x = torch.rand(3, 1, size, size).contiguous(memory_format=torch.channels_last)
    y0, gx0, gp0 = forward_backward(plain, x, amp=False)
    y1, gx1, gp1 = forward_backward(fused, x, amp=False)
    assert y1.shape == y0.shape and torch.allclose(y1, y0, rtol=1e-5, atol=1e-5)
    assert gx1.shape == x.shape and torch.allclose(gx1, gx0, rtol=1e-4, atol=1e-5)  # through the rearrangement too
    for a, b in zip(gp0, gp1):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * a.abs().max().item())
    yb0, _, _ = forward_backward(plain, x, amp=True)
    yb1, _, _ = forward_backward(fused, x, amp=True)
    assert yb1.dtype == torch.bfloat16 and torch.allclose(yb1.float(), yb0.float(), rtol=2 ** -7, atol=1e-2)


def test_fusing_the_book_network_keeps_its_parameters_and_outputs():
    from nin.hub import create_model

    torch.manual_seed(0)
    model = create_model("nin_d2l").eval()
    before, params = model.state_dict(), list(model.parameters())
    ref = copy.deepcopy(model)
    assert fuse_conv_relu(model) == 12  # every conv of the four blocks is followed by a ReLU
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(a is b for a, b in zip(model.parameters(), params))  # the optimizer's parameters, untouched
    x = torch.rand(2, 1, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), rtol=1e-4, atol=1e-5)
    assert fuse_conv_relu(create_model("nin_fmnist")) == 0  # conv, batch norm, ReLU: nothing to fuse
    assert fuse_conv_relu(model) == 0  # already fused


def test_cpu_training_fuses_and_trains_as_the_plain_layers_do(data, tmp_path, monkeypatch):
    from nin.hub import load
    from nin.training import trainer

    cfg = tiny(data, model="nin_d2l", model_kwargs={}, resize=96, epochs=1, batch_size=32, limit_train=64,
               precision="fp32", normalize=False, crop_padding=0, lr=0.05)
    setup = trainer.set_up(cfg)
    assert sum(isinstance(m, FusedConvReLU) for m in setup.net.modules()) == 12
    trainer.train(cfg, tmp_path / "fused", **QUIET)
    monkeypatch.setattr(trainer, "fuse_conv_relu", lambda model: 0)
    trainer.train(cfg, tmp_path / "plain", **QUIET)
    a = torch.load(tmp_path / "fused" / "last.ckpt", weights_only=True)["model"]
    b = torch.load(tmp_path / "plain" / "last.ckpt", weights_only=True)["model"]
    assert list(a) == list(b)
    first = "features.0.0.weight"
    assert not torch.equal(a[first], trainer.set_up(cfg).model.state_dict()[first])  # it trained
    for k in a:  # two steps apart only by the stem's order of summation (and a kernel choice: 1e-4 is loose)
        assert torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-4), (k, (a[k] - b[k]).abs().max().item())
    assert type(load(tmp_path / "fused").features[0][0]) is nn.Conv2d  # the saved model is the plain network


def test_where_onednn_has_no_bf16_the_fused_layer_runs_the_plain_pair(monkeypatch):
    """On CPUs without AVX-512 oneDNN refuses bf16 convolutions; PyTorch's own conv does not."""
    import nin.training.fused as fused_module

    calls = []
    real = fused_module._ConvReLU.apply
    monkeypatch.setattr(fused_module, "_mkldnn_bf16", lambda: False)
    monkeypatch.setattr(fused_module._ConvReLU, "apply", lambda *a: calls.append(a) or real(*a))
    torch.manual_seed(0)
    plain, fused = pair_and_fused(nn.Conv2d(4, 8, 3, padding=1))
    x = torch.randn(2, 4, 10, 10)
    y0, _, _ = forward_backward(plain, x, amp=True)
    y1, _, _ = forward_backward(fused, x, amp=True)
    assert not calls and y1.dtype == torch.bfloat16 and torch.equal(y0, y1)
    forward_backward(fused, x, amp=False)  # fp32 still takes the fused call
    assert len(calls) == 1
