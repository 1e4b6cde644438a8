"""Smoke tests of benchmarks/: the GPU script's CPU mode and the two pipelines' step functions (a few seconds)."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nin.data import BatchLoader, Split, to_float_batch
from nin.models import create_model
from nin.recipes import get_recipe
from nin.train import input_dtype, make_optimizer, train_step

from .fakedata import fake_fashion_dir

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

needs_d2l = pytest.mark.skipif(importlib.util.find_spec("d2l") is None,
                               reason="the seed pipeline needs d2l: pip install --no-deps d2l==1.0.3 "
                                      "pandas requests ipython matplotlib-inline")


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    return fake_fashion_dir(tmp_path_factory.mktemp("fmnist"), n_train=64, n_test=32)


def test_nin_pipeline_steps(fake_root):
    from bench_train import NinPipeline

    pipe = NinPipeline("d2l", "cpu", str(fake_root), batch_size=4)
    n, seconds = pipe.step()
    assert n == 4 and seconds > 0 and pipe.sums[2].item() == 4
    assert pipe.loader.dtype == input_dtype(pipe.amp_dtype)


@needs_d2l
def test_seed_pipeline_steps(fake_root):
    from bench_train import SeedPipeline

    pipe = SeedPipeline(fake_root / "FashionMNIST" / "raw", batch_size=4, workers=0)
    try:
        n, seconds = pipe.step()
        assert n == 4 and seconds > 0 and pipe.metric[2] == 4
    finally:
        pipe.close()


@needs_d2l
def test_gpu_script_cpu_smoke_mode(fake_root, tmp_path):
    import gpu

    out = tmp_path / "gpu.json"
    res = gpu.main(["--device", "cpu", "--steps", "1", "--batch-size", "4", "--data-dir", str(fake_root),
                    "--raw-dir", str(fake_root / "FashionMNIST" / "raw"), "--json", str(out)])
    assert res["smoke"] and json.loads(out.read_text())["nin_step"]["images"] == 4
    assert res["seed_step"]["images_per_sec"] > 0 and 0 <= res["nin_full"]["test_acc"] <= 1
    assert "SMOKE MODE" in res["markdown"]


def test_gpu_script_refuses_cpu_without_steps():
    import gpu

    with pytest.raises(SystemExit):
        gpu.main(["--device", "cpu"])


def test_bf16_loader_and_step_match_fp32_within_bf16_tolerance():
    """The speed changes (bf16 loader output, fused SGD, train_step) keep the seed's numerics within bf16."""
    g = torch.Generator().manual_seed(0)
    x8 = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8, generator=g)
    a = to_float_batch(x8, resize=224)
    b = to_float_batch(x8, resize=224, dtype=torch.bfloat16).float()
    assert (a - b).abs().max() <= 2 ** -7  # two bf16 steps at 1: rounding of the two GEMMs (one bf16 cast: 2 ** -8)
    loader = BatchLoader(Split(x8, torch.arange(4) % 10), 4, resize=224, channels_last=True,
                         dtype=input_dtype(torch.bfloat16))
    x, y = next(iter(loader))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)

    cfg = get_recipe("d2l", device="cpu")
    torch.manual_seed(0)
    fast = create_model("nin_d2l").to(memory_format=torch.channels_last)
    plain = create_model("nin_d2l")
    plain.load_state_dict(fast.state_dict())
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in plain.named_parameters()]
    opt = make_optimizer(fast, cfg, cfg.lr, torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    sums = torch.zeros(3, dtype=torch.float64)
    torch.manual_seed(1)
    loss, logits = train_step(fast, opt, scaler, x, y, lr=cfg.lr, amp_dtype=torch.bfloat16, label_smoothing=0.0,
                              sums=sums)
    torch.manual_seed(1)  # the same dropout mask
    ref_logits = plain(a)
    ref = F.cross_entropy(ref_logits, y)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 0.02 * max(1.0, ref.item())
    assert torch.allclose(logits.float(), ref_logits, atol=0.05 * max(1.0, ref_logits.abs().max().item()))
    # one fused SGD step moved the weights by -lr * the (bf16-autocast) gradient: as close to fp32's update
    # as the original path (fp32 loader output, autocast, plain SGD) gets
    torch.manual_seed(0)
    orig = create_model("nin_d2l")
    orig.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        orig_logits = orig(a)
    F.cross_entropy(orig_logits.float(), y).backward()
    want = torch.cat([(-cfg.lr * p.grad).flatten() for p in plain.parameters()])
    got = torch.cat([(p_fast.detach() - p_plain.detach()).flatten() for p_fast, p_plain
                     in zip(fast.parameters(), plain.parameters())])
    base = torch.cat([(-cfg.lr * p.grad).flatten() for p in orig.parameters()])
    assert (got - want).norm() <= max(0.1 * want.norm(), 2 * (base - want).norm())
