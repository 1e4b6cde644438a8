import subprocess
import sys

import pytest
import torch
from torch import nn

from nin.cli import main
from nin.models import InputTooSmallError, check_input_size, list_models, model_info
from nin.hub import create_model

# Parameter counts published for each network (d2l.ai, the NiN paper, the Caffe zoo); nin_fmnist is ours.
EXPECTED_PARAMS = {"nin_d2l": 1_992_166, "nin_cifar10": 966_986, "nin_imagenet": 7_595_176, "nin_fmnist": 95_412}


def test_every_model_has_an_expected_count():
    assert sorted(EXPECTED_PARAMS) == list_models()


@pytest.mark.parametrize("name", list_models())
def test_model_contract(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    n_classes = model.num_classes
    assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name]
    x = torch.randn(2, *model.default_input_size)
    with torch.no_grad():
        logits = model(x)
        maps = model.forward_features(x)
        again = model.forward_head(maps)
    assert logits.shape == (2, n_classes)
    assert torch.isfinite(logits).all()
    assert maps.dim() == 4 and maps.shape[:2] == (2, n_classes)
    torch.testing.assert_close(again, logits, rtol=0, atol=0)
    # the head is global average pooling: logits are the maps' spatial means
    torch.testing.assert_close(maps.mean(dim=(2, 3)), logits)


@pytest.mark.parametrize("name", list_models())
def test_num_classes_and_in_chans(name):
    model = create_model(name, num_classes=7, in_chans=2).eval()
    _, h, w = model.default_input_size
    with torch.no_grad():
        assert model(torch.randn(1, 2, h, w)).shape == (1, 7)


def seed_net():
    """The book's network, written out from the d2l.ai chapter's code."""
    def nin_block(in_channels, out_channels, kernel_size, strides, padding):
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size, strides, padding), nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU())

    return nn.Sequential(
        nin_block(1, 96, kernel_size=11, strides=4, padding=0), nn.MaxPool2d(3, stride=2),
        nin_block(96, 256, kernel_size=5, strides=1, padding=2), nn.MaxPool2d(3, stride=2),
        nin_block(256, 384, kernel_size=3, strides=1, padding=1), nn.MaxPool2d(3, stride=2),
        nn.Dropout(0.5),
        nin_block(384, 10, kernel_size=3, strides=1, padding=1),
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten())


def test_nin_d2l_equals_the_seed_by_position():
    torch.manual_seed(1)
    seed = seed_net().eval()
    ours = create_model("nin_d2l").eval()
    seed_params, our_params = list(seed.parameters()), list(ours.parameters())
    assert [p.shape for p in seed_params] == [p.shape for p in our_params]
    with torch.no_grad():
        for s, o in zip(seed_params, our_params):
            o.copy_(s)
        x = torch.randn(3, 1, 224, 224)
        torch.testing.assert_close(ours(x), seed(x), rtol=0, atol=1e-6)


def test_nin_cifar10_pool_variants():
    x = torch.randn(1, 3, 32, 32)
    for pool2, cls in (("max", nn.MaxPool2d), ("avg", nn.AvgPool2d)):
        m = create_model("nin_cifar10", pool2=pool2).eval()
        assert isinstance(m.features[4], cls)
        assert m.forward_features(x).shape == (1, 10, 8, 8)  # the paper's 8x8 global pool
    with pytest.raises(ValueError, match="pool2"):
        create_model("nin_cifar10", pool2="min")


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'resnet'.*nin_d2l"):
        create_model("resnet")


SEED_SHAPES = [(96, 54, 54), (96, 26, 26), (256, 26, 26), (256, 12, 12), (384, 12, 12), (384, 5, 5),
               (384, 5, 5), (10, 5, 5), (10, 1, 1), (10,)]


def test_model_info_matches_anchors():
    info = model_info("nin_d2l")
    assert [shape for _, shape in info.layers] == SEED_SHAPES
    assert info.params == 1_992_166
    assert round(info.flops / 2 / 1e6, 1) == 762.3  # ANCHORS: 762.3 M multiply-adds per image


def test_summary_cli_prints_seed_shapes(capsys):
    assert main(["summary", "nin_d2l"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "output shape" in line]
    assert len(lines) == len(SEED_SHAPES)
    for line, shape in zip(lines, SEED_SHAPES):
        assert line.split("\t")[-1] == " x ".join(map(str, (1, *shape)))
    assert "1,992,166" in out


def test_too_small_input_is_one_clear_error(capsys):
    assert main(["summary", "nin_d2l", "--input-size", "1", "32", "32"]) == 2
    err = capsys.readouterr().err
    assert "smallest input it accepts is 1x67x67" in err
    assert "Traceback" not in err
    # 67 is really the smallest: it fits, 66 does not
    model = create_model("nin_d2l")
    check_input_size(model, (1, 67, 67))
    with pytest.raises(InputTooSmallError):
        check_input_size(model, (1, 66, 66))


def test_help_is_fast_and_does_not_import_torch():
    code = "import sys; from nin.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize("relus, n_relu, negative_logits", [("all", 3, False), ("hidden", 2, True), ("none", 0, True)])
def test_nin_d2l_class_block_relus(relus, n_relu, negative_logits):
    """The d2l-stable options: removing ReLUs from the 10-channel block lets logits go below 0, keeps
    the weight names (weights load across variants) and the parameter count."""
    torch.manual_seed(0)
    seed_model = create_model("nin_d2l").eval()
    model = create_model("nin_d2l", class_block_relus=relus).eval()
    last_block = model.features[-1]
    assert sum(isinstance(m, nn.ReLU) for m in last_block) == n_relu
    assert sum(isinstance(m, nn.ReLU) for m in model.features[0]) == 3  # earlier blocks untouched
    assert list(model.state_dict()) == list(seed_model.state_dict())
    model.load_state_dict(seed_model.state_dict())
    with torch.no_grad():
        x = torch.rand(8, 1, 224, 224)
        maps = model.forward_features(x)
        assert bool((maps < 0).any()) == negative_logits
        if relus == "none":  # the block is linear: the three convs applied in a row, no clamping
            h = seed_model.features[:-1](x)
            ref = last_block[4](last_block[2](last_block[0](h)))
            torch.testing.assert_close(maps, ref)


def test_nin_d2l_class_block_relus_rejects_unknown():
    with pytest.raises(ValueError, match="'all', 'hidden' or 'none'"):
        create_model("nin_d2l", class_block_relus="some")


def _conv_params(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k


def _bn_block_params(cin: int, mid: int, cout: int, k: int) -> int:
    """An mlpconv block with batch norm: three bias-free convs, each followed by BN (weight + bias)."""
    return _conv_params(cin, mid, k) + 2 * mid + _conv_params(mid, mid, 1) + 2 * mid + _conv_params(mid, cout, 1) + 2 * cout


@pytest.mark.parametrize("kwargs, widths, kernel", [
    ({}, (32, 64, 96), 3),
    ({"widths": [16, 64, 96]}, (16, 64, 96), 3),   # a list, as model.json gives it back
    ({"stem": "stride", "widths": (32, 48, 96)}, (32, 48, 96), 4),
])
def test_nin_fmnist_widths_and_stem(kwargs, widths, kernel):
    """Per-block widths and the strided stem: parameters counted by hand, the class maps 7 x 7, and with
    stem="stride" no layer at 28 x 28 (a wrong stride or a left-over pool would change both)."""
    from nin.models import build_model, describe

    w1, w2, w3 = widths
    expected = _bn_block_params(1, w1, w1, kernel) + _bn_block_params(w1, w2, w2, 3) + _bn_block_params(w2, w3, 10, 3)
    model = build_model("nin_fmnist", **kwargs)
    assert sum(p.numel() for p in model.parameters()) == expected
    info = describe(model)
    assert info.layers[-1] == ("Flatten", (10,))
    assert model.forward_features(torch.zeros(2, 1, 28, 28)).shape == (2, 10, 7, 7)
    sides = [shape[-1] for _, shape in info.layers if len(shape) == 3]
    assert (28 in sides) == (kwargs.get("stem", "pool") == "pool")


@pytest.mark.parametrize("kwargs", [{"widths": (16, 64)}, {"widths": (16, 0, 96)}, {"stem": "conv"}])
def test_nin_fmnist_rejects_bad_widths_and_stems(kwargs):
    from nin.models import build_model

    with pytest.raises(ValueError, match="widths|stem"):
        build_model("nin_fmnist", **kwargs)
