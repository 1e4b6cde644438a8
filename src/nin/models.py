"""The NiN networks, written out like the tables of the papers and the d2l.ai chapter, and a small registry.

Every network is ``features`` (mlpconv blocks, pools, dropout; it ends in one map per class)
followed by ``head`` (global average pooling + flatten).  There is no fully connected layer.
``forward_features`` returns the class maps, ``forward_head`` turns them into logits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from .errors import InputTooSmallError, UnknownModelError

__all__ = [
    "NiN", "ModelInfo", "nin_block", "nin_block_bn", "register_model", "list_models",
    "build_model", "model_info", "describe", "min_input_size", "InputTooSmallError",
]


def nin_block(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0,
              mid_channels: int | tuple[int, int] | None = None,
              relus: Literal["all", "hidden", "none"] = "all") -> nn.Sequential:
    """The mlpconv block: a k x k conv, then two 1x1 convs ("the MLP"), ReLU after each.

    ``mid_channels`` are the widths inside the block: the k x k conv gives ``mid[0]`` channels, the first
    1x1 ``mid[1]``, the last 1x1 ``out_channels`` (an int is both; None: ``out_channels`` throughout,
    as the d2l.ai chapter's block).  ``relus`` is for the class-map block: "hidden" leaves the class maps
    linear (no ReLU after the last conv), "none" the whole block, so no 10-channel ReLU layer is left
    that could die (the book recipe's "stuck at ln 10" failure).  A removed ReLU is an ``nn.Identity``:
    the weight names stay."""
    if relus not in ("all", "hidden", "none"):
        raise ValueError(f"relus must be 'all', 'hidden' or 'none', got {relus!r}")
    m1, m2 = (out_channels, out_channels) if mid_channels is None else \
        (mid_channels, mid_channels) if isinstance(mid_channels, int) else mid_channels

    def act(on: bool) -> nn.Module:
        return nn.ReLU(inplace=True) if on else nn.Identity()

    return nn.Sequential(
        nn.Conv2d(in_channels, m1, kernel_size, stride, padding), act(relus != "none"),
        nn.Conv2d(m1, m2, kernel_size=1), act(relus != "none"),
        nn.Conv2d(m2, out_channels, kernel_size=1), act(relus == "all"),
    )


def nin_block_bn(in_channels: int, mid_channels: int, out_channels: int, kernel_size: int, padding: int,
                 last_relu: bool = True, stride: int = 1) -> nn.Sequential:
    """mlpconv with batch norm after every conv (the convs then need no bias).

    ``last_relu=False`` on the class-map block lets the maps be negative, so the logits are
    never all clamped at 0 (the book recipe's "stuck at ln 10" failure).
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, mid_channels, kernel_size, stride, padding, bias=False),
        nn.BatchNorm2d(mid_channels), nn.ReLU(inplace=True),
        nn.Conv2d(mid_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels), nn.ReLU(inplace=True),
        nn.Conv2d(mid_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
    ]
    if last_relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class NiN(nn.Module):
    """features -> class maps (N x num_classes x H x W) -> global average pool -> logits."""

    def __init__(self, features: nn.Sequential, num_classes: int, in_chans: int,
                 default_input_size: tuple[int, int, int]) -> None:
        super().__init__()
        self.features = features
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten())
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.default_input_size = default_input_size

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)  # N x num_classes x H x W: one map per class

    def forward_head(self, maps: torch.Tensor) -> torch.Tensor:
        return self.head(maps)  # N x num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def layers(self) -> list[nn.Module]:
        """Top-level layers in order, as the book's printout lists them."""
        return [*self.features, *self.head]


# --- registry (as torchvision's models/_api.py) -------------------------------------------
_MODELS: dict[str, Callable[..., NiN]] = {}


def register_model(fn: Callable[..., NiN]) -> Callable[..., NiN]:
    if fn.__name__ in _MODELS:
        raise ValueError(f"a model named {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_MODELS)


def build_model(name: str, **kwargs) -> NiN:
    """A registered network with random weights (``hub.create_model`` is the factory that also loads
    shipped weights: ``nin.create_model``)."""
    if name not in _MODELS:
        raise UnknownModelError(f"unknown model {name!r}; choose one of: {', '.join(list_models())}")
    return _MODELS[name](**kwargs)


# --- the networks -------------------------------------------------------------------------
@register_model
def nin_d2l(*, num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.5,
            class_block_relus: Literal["all", "hidden", "none"] = "all") -> NiN:
    """The d2l.ai chapter's network: 4 mlpconv blocks on 224 x 224 Fashion-MNIST; 1,992,166 parameters.

    ``class_block_relus`` ("all": as the book) removes ReLUs from the 10-channel class-map block:
    "hidden" only the one on the class maps, "none" all three (see nin_block; d2l-stable uses it)."""
    features = nn.Sequential(
        nin_block(in_chans, 96, kernel_size=11, stride=4, padding=0),  # 96 x 54 x 54
        nn.MaxPool2d(3, stride=2),                                     # 96 x 26 x 26
        nin_block(96, 256, kernel_size=5, stride=1, padding=2),        # 256 x 26 x 26
        nn.MaxPool2d(3, stride=2),                                     # 256 x 12 x 12
        nin_block(256, 384, kernel_size=3, stride=1, padding=1),       # 384 x 12 x 12
        nn.MaxPool2d(3, stride=2),                                     # 384 x 5 x 5
        nn.Dropout(drop_rate),
        nin_block(384, num_classes, kernel_size=3, stride=1, padding=1,
                  relus=class_block_relus),                            # 10 x 5 x 5
    )
    return NiN(features, num_classes, in_chans, (in_chans, 224, 224))


@register_model
def nin_cifar10(*, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.5,
                pool2: Literal["max", "avg"] = "max") -> NiN:
    """The paper's CIFAR-10 network (cuda-convnet config); 966,986 parameters.

    Pools round up like Caffe/cuda-convnet (ceil_mode) so 32 -> 16 -> 8 and the last pool is 8 x 8.
    ``pool2="avg"`` gives the Caffe model zoo's variant.
    """
    if pool2 not in ("max", "avg"):
        raise ValueError(f"pool2 must be 'max' or 'avg', got {pool2!r}")
    second_pool = (nn.MaxPool2d(3, stride=2, ceil_mode=True) if pool2 == "max"
                   else nn.AvgPool2d(3, stride=2, ceil_mode=True))
    features = nn.Sequential(
        nin_block(in_chans, 96, kernel_size=5, padding=2, mid_channels=(192, 160)),  # 96 x 32 x 32
        nn.MaxPool2d(3, stride=2, ceil_mode=True),                                   # 96 x 16 x 16
        nn.Dropout(drop_rate),
        nin_block(96, 192, kernel_size=5, padding=2),                                # 192 x 16 x 16
        second_pool,                                                                 # 192 x 8 x 8
        nn.Dropout(drop_rate),
        nin_block(192, num_classes, kernel_size=3, padding=1, mid_channels=192),     # 10 x 8 x 8
    )
    return NiN(features, num_classes, in_chans, (in_chans, 32, 32))


@register_model
def nin_imagenet(*, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.5) -> NiN:
    """The Caffe model zoo's 4-layer ImageNet NiN; 7,595,176 parameters; pools round up as in Caffe."""
    features = nn.Sequential(
        nin_block(in_chans, 96, kernel_size=11, stride=4, padding=0),  # 96 x 54 x 54
        nn.MaxPool2d(3, stride=2, ceil_mode=True),                     # 96 x 27 x 27
        nin_block(96, 256, kernel_size=5, stride=1, padding=2),        # 256 x 27 x 27
        nn.MaxPool2d(3, stride=2, ceil_mode=True),                     # 256 x 13 x 13
        nin_block(256, 384, kernel_size=3, stride=1, padding=1),       # 384 x 13 x 13
        nn.MaxPool2d(3, stride=2, ceil_mode=True),                     # 384 x 6 x 6
        nn.Dropout(drop_rate),
        nin_block(384, num_classes, kernel_size=3, padding=1, mid_channels=1024),  # 1000 x 6 x 6
    )
    return NiN(features, num_classes, in_chans, (in_chans, 224, 224))


@register_model
def nin_fmnist(*, num_classes: int = 10, in_chans: int = 1, drop_rate: float = 0.0, width: int = 32,
               widths: tuple[int, int, int] | None = None, stem: Literal["pool", "stride"] = "pool") -> NiN:
    """Native-resolution NiN for 28 x 28 inputs: three BN mlpconv blocks, GAP, no FC layer.

    Sized for 2 CPU cores (one Fashion-MNIST epoch well under a minute).  ``width`` scales
    every block (32 -> 32/64/96 channels); the ``best`` recipe uses a wider one.  ``widths`` gives the
    three blocks' widths one by one instead.  ``stem="stride"`` halves the resolution in the first
    block's own conv (4 x 4, stride 2, as the ImageNet network's stride-4 first conv does) instead of a
    max-pool after the block, so no layer runs at 28 x 28: there, on a CPU, every layer's cost is memory
    traffic, not arithmetic.
    """
    if widths is None:
        if not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a whole number >= 1, got {width!r}")
        widths = (width, 2 * width, 3 * width)
    if not isinstance(widths, (tuple, list)) or len(widths) != 3 or \
            not all(isinstance(w, int) and w >= 1 for w in widths):  # a list when read from model.json
        raise ValueError(f"widths must be three whole numbers >= 1, got {widths!r}")
    if stem not in ("pool", "stride"):
        raise ValueError(f"stem must be 'pool' or 'stride', got {stem!r}")
    w1, w2, w3 = widths
    if stem == "stride":
        first = [nin_block_bn(in_chans, w1, w1, kernel_size=4, padding=1, stride=2)]  # w1 x 14 x 14
    else:
        first = [nin_block_bn(in_chans, w1, w1, kernel_size=3, padding=1),          # w1 x 28 x 28
                 nn.MaxPool2d(2)]                                                   # w1 x 14 x 14
    features = nn.Sequential(
        *first,
        nn.Dropout(drop_rate),
        nin_block_bn(w1, w2, w2, kernel_size=3, padding=1),         # w2 x 14 x 14
        nn.MaxPool2d(2),                                            # w2 x 7 x 7
        nn.Dropout(drop_rate),
        nin_block_bn(w2, w3, num_classes, kernel_size=3, padding=1, last_relu=False),  # 10 x 7 x 7
    )
    return NiN(features, num_classes, in_chans, (in_chans, 28, 28))


# --- inspection ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    name: str
    input_size: tuple[int, int, int]
    params: int
    flops: int  # forward FLOPs per image (2 per multiply-add), torch.utils.flop_counter
    layers: list[tuple[str, tuple[int, ...]]]  # (layer class name, output shape without batch)
    activation_bytes: int = 0  # fp32 bytes of the input and every layer's output, one image (inference)


def _on_meta(model: NiN) -> NiN:
    """A weightless copy on the meta device: shapes and FLOPs of any input size cost no memory."""
    import copy

    return copy.deepcopy(model).to("meta").eval()


def _fits(model: NiN, c: int, h: int, w: int) -> bool:
    try:
        with torch.no_grad():
            model.forward_features(torch.zeros(1, c, h, w, device="meta"))
        return True
    except RuntimeError:
        return False


def min_input_size(model: NiN) -> int:
    """The smallest square input side the network accepts (binary search on a shape-only forward)."""
    probe = _on_meta(model)
    lo, hi = 1, max(model.default_input_size[1:])
    while lo < hi:
        mid = (lo + hi) // 2
        if _fits(probe, model.in_chans, mid, mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def check_input_size(model: NiN, input_size: tuple[int, int, int], name: str = "model") -> None:
    """Raise InputTooSmallError (a user mistake, not a traceback) if ``model`` cannot take ``input_size``."""
    c, h, w = input_size
    if c != model.in_chans:
        raise InputTooSmallError(f"{name} takes {model.in_chans} input channel(s), got an input of {c}")
    if not _fits(_on_meta(model), c, h, w):
        m = min_input_size(model)
        raise InputTooSmallError(
            f"{name} cannot take a {c}x{h}x{w} input: the smallest input it accepts is {c}x{m}x{m}")


def model_info(name: str, input_size: tuple[int, int, int] | None = None, **kwargs) -> ModelInfo:
    """Per-layer output shapes, parameter count and forward FLOPs of a registered model."""
    return describe(build_model(name, **kwargs), input_size, name=name)


def describe(model: NiN, input_size: tuple[int, int, int] | None = None, *, name: str | None = None) -> ModelInfo:
    """``model_info`` of a model instance (a loaded or trained one: its own input size by default).

    Runs one zero image through a weightless copy of ``model.layers()`` on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = getattr(model, "meta", None)
    name = name or getattr(meta, "model", None) or model.__class__.__name__
    if input_size is None:
        input_size = getattr(meta, "input_size", None) or model.default_input_size
    size = tuple(int(v) for v in input_size)
    check_input_size(model, size, name)
    # on the meta device: no weights, no activations, so a huge input is measured, not allocated
    probe = _on_meta(model)
    x = torch.zeros(1, *size, device="meta")
    shapes, elements = [], x.numel()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        for layer in probe.layers():
            x = layer(x)
            shapes.append((layer.__class__.__name__, tuple(x.shape[1:])))
            elements += x.numel()
    params = sum(p.numel() for p in model.parameters())
    return ModelInfo(name, size, params, counter.get_total_flops(), shapes, 4 * elements)
