"""Data-parallel training with torchrun: two gloo ranks on CPU, on made-up Fashion-MNIST files.

Each torchrun here takes seconds (width-8 network, 1,024 training images).  One uninterrupted
two-rank run (a module fixture) is the reference that the other tests compare against.
"""
import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from nin.cli import main
from nin.errors import UsageError
from nin.training.trainer import train

from .fakedata import fake_fashion_dir
from .tinyrun import tiny

pytestmark = [
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks' processes in /proc"),
]

WORLD = 2
N_TRAIN, BATCH, EPOCHS = 1024, 32, 4
# fp32 for exact comparisons; no crop: a 2-pixel shift would move fakedata's class band into the next class's
FLAGS = ["--model-kwargs", '{"width": 8}', "--limit-train", str(N_TRAIN), "--epochs", str(EPOCHS),
         "--warmup-epochs", "0", "--precision", "fp32", "--crop-padding", "0", "--eval-batch-size", "500"]
METRICS = ("train_loss", "train_acc", "test_acc")


def torchrun_cmd(*args: str) -> list[str]:
    # --standalone: a local rendezvous on a free port, so parallel test runs never collide
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={WORLD}",
            "-m", "nin", "train", *args]


def job_env(tmp: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    # the tag finds this job's ranks among other processes on the machine
    return {**env, "NIN_TEST_TAG": str(tmp), "NIN_DIST_TIMEOUT": "30", **extra}


def run_job(args: list[str], tmp: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    r = subprocess.run(torchrun_cmd(*args), cwd=tmp, env=job_env(tmp, **env), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def metrics(run: Path) -> list[dict]:
    return list(csv.DictReader(open(run / "metrics.csv")))


def weights(run: Path) -> dict:
    return torch.load(run / "last.ckpt", weights_only=True)["model"]


@contextmanager
def one_thread():
    """Run as a torchrun rank runs (OMP_NUM_THREADS=1): the same sums, and no oversubscribed cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """One uninterrupted two-rank run; every rank dumps its final weights and epoch indices."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = fake_fashion_dir(tmp / "data", n_train=N_TRAIN, n_test=1000)
    r = run_job(["--data-dir", str(data), "--out", "run", "--batch-size", str(BATCH), "--quiet", *FLAGS], tmp,
                NIN_DEBUG_DUMP_DIR=str(tmp / "dump"))
    dumps = [torch.load(tmp / "dump" / f"rank{k}.pt", weights_only=True) for k in range(WORLD)]
    return {"tmp": tmp, "data": data, "run": tmp / "run", "out": r.stdout, "dumps": dumps}


def test_shards_are_disjoint_cover_the_epoch_and_reshuffle(ref):
    d0, d1 = ref["dumps"]
    assert (d0["rank"], d1["rank"], d0["world_size"]) == (0, 1, WORLD)
    assert sorted(d0["indices"]) == list(range(EPOCHS))
    orders = []
    for e in range(EPOCHS):
        a, b = d0["indices"][e].tolist(), d1["indices"][e].tolist()
        assert len(a) == len(b) == N_TRAIN // WORLD
        assert not set(a) & set(b)
        assert sorted(a + b) == list(range(N_TRAIN))  # 1,024 = 2 ranks x 16 batches x 32: nothing dropped
        orders.append(a)
    assert all(orders[e] != orders[e + 1] for e in range(EPOCHS - 1))  # a new shuffle every epoch


def test_ranks_end_with_identical_weights_and_only_rank0_writes(ref):
    d0, d1 = ref["dumps"]
    assert d0["model"].keys() == d1["model"].keys()
    for k in d0["model"]:
        assert torch.equal(d0["model"][k], d1["model"][k]), k  # parameters and BN buffers alike
    saved = weights(ref["run"])
    assert all(torch.equal(saved[k], d0["model"][k]) for k in saved)
    rows = metrics(ref["run"])
    assert [int(r["epoch"]) for r in rows] == list(range(1, EPOCHS + 1))
    assert ref["out"].count("test acc") == 1  # the closing line, printed by rank 0 alone
    assert '"world_size": 2' in (ref["run"] / "config.json").read_text()


def test_accuracy_matches_one_process_with_the_same_global_batch(ref, tmp_path):
    from nin.training.recipes import get_recipe

    cfg = get_recipe("fast", data_dir=str(ref["data"]), model_kwargs={"width": 8}, limit_train=N_TRAIN,
                     epochs=EPOCHS, warmup_epochs=0.0, precision="fp32", crop_padding=0, eval_batch_size=500,
                     batch_size=BATCH * WORLD)
    with one_thread():
        one = train(cfg, tmp_path / "one", quiet=True, log=lambda *a, **k: None)
    two = {k: float(v) for k, v in metrics(ref["run"])[-1].items() if v != ""}  # no validation split: blank
    # same batches (rank r takes every WORLD-th sample of one shuffled order), but per-rank BN statistics
    # and per-rank augmentation draws: the runs agree within noise, not bit for bit
    assert abs(two["test_acc"] - one["test_acc"]) <= 0.05, (two, one)
    assert abs(two["train_loss"] - one["train_loss"]) <= 0.1 * one["train_loss"], (two, one)


def _ranks_of(tag: str) -> dict[int, int]:
    """{rank: pid} of the live worker processes whose environment carries NIN_TEST_TAG=tag."""
    found = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (p / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in kv)
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if env.get("NIN_TEST_TAG") == tag and "RANK" in env and state != "Z":
            found[int(env["RANK"])] = int(p.name)
    return found


def _saved_epoch(run: Path) -> int:
    try:  # last.ckpt is replaced atomically: a read sees a whole file or none
        return torch.load(run / "last.ckpt", weights_only=True)["epoch"]
    except FileNotFoundError:
        return -1


def _single_process_accuracy(state: dict, data: Path) -> float:
    """Test accuracy of ``state`` evaluated in this one process, as the run's recipe evaluates."""
    from nin.data.loader import BatchLoader
    from nin.data.datasets import load_dataset
    from nin.hub import create_model
    from nin.training.trainer import loader_accuracy

    ds = load_dataset("fashion-mnist", str(data))
    model = create_model("nin_fmnist", num_classes=10, in_chans=1, width=8)
    model.load_state_dict(state)
    model.to(memory_format=torch.channels_last)
    loader = BatchLoader(ds.test, 500, mean=ds.mean, std=ds.std, channels_last=True)
    with one_thread():
        return loader_accuracy(model, loader, None, tta_flip=True)


def test_killed_rank_fails_the_job_and_resume_continues_it(ref, tmp_path):
    args = ["--data-dir", str(ref["data"]), "--out", "run", "--batch-size", str(BATCH), "--quiet", *FLAGS]
    tag = str(tmp_path)
    with open(tmp_path / "log", "w") as log:
        job = subprocess.Popen(torchrun_cmd(*args), cwd=tmp_path, env=job_env(tmp_path), stdout=log, stderr=log,
                               start_new_session=True)
        try:
            deadline = time.monotonic() + 90
            while _saved_epoch(tmp_path / "run") < 1:  # wait for the checkpoint after epoch 1
                assert job.poll() is None, (tmp_path / "log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint after 90 s"
                time.sleep(0.02)
            ranks = _ranks_of(tag)
            assert set(ranks) == {0, 1}, ranks
            os.kill(ranks[1], signal.SIGKILL)
            killed = time.monotonic()
            rc = job.wait(timeout=60)  # torchrun's agent sees the dead rank and stops the other one
            took = time.monotonic() - killed
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
    assert rc != 0, (tmp_path / "log").read_text()[-3000:]
    assert took < 30, f"the job took {took:.1f} s to fail after a rank died"
    assert _ranks_of(tag) == {}, "a rank outlived the job"

    # the checkpoint the job left is consistent: the accuracy rank 0 reported for its epoch is what one
    # process measures on those weights (a non-trivial number: the run stopped early)
    state = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    stopped = state["epoch"]
    assert 1 <= stopped < EPOCHS, "the job finished before the rank was killed"
    reported = float(metrics(tmp_path / "run")[stopped - 1]["test_acc"])
    assert _single_process_accuracy(state["model"], ref["data"]) == reported

    # resuming with the same world size finishes the run as if it had never stopped
    run_job(["--resume", "run", "--quiet"], tmp_path)
    got, want = metrics(tmp_path / "run"), metrics(ref["run"])
    assert [[r[k] for k in METRICS] for r in got] == [[r[k] for k in METRICS] for r in want]
    for k, v in weights(ref["run"]).items():
        assert torch.equal(weights(tmp_path / "run")[k], v), k


def test_resume_with_another_world_size_is_a_clear_error(ref, capsys):
    with pytest.raises(UsageError, match="world size 2.*same number of processes"):
        train(None, resume=ref["run"], quiet=True, log=lambda *a, **k: None)
    assert main(["train", "--resume", str(ref["run"])]) == 2
    assert "trained with world size 2" in capsys.readouterr().err


def test_sync_bn_on_cpu_is_a_usage_error(tmp_path, capsys):
    data = fake_fashion_dir(tmp_path / "data", n_train=64, n_test=32)
    rc = main(["train", "--data-dir", str(data), "--device", "cpu", "--sync-bn", "--dry-run",
               "--model-kwargs", '{"width": 8}'])
    assert rc == 2
    assert "--sync-bn needs CUDA" in capsys.readouterr().err


def test_help_states_batch_size_semantics(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "batch size PER PROCESS" in text and "global batch is this x world size" in text
    assert "--lr-scale" in text and "--sync-bn" in text and "torchrun" in text


def test_sync_bn_conversion_keeps_the_weight_names():
    # what --sync-bn does on CUDA under DDP; the module swap itself needs no GPU
    from nin.hub import create_model

    model = create_model("nin_fmnist", width=8)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(create_model("nin_fmnist", width=8))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    assert list(synced.state_dict()) == list(model.state_dict())  # checkpoints and .safetensors unchanged


def test_reported_train_metrics_are_the_sum_of_the_ranks_tallies_exactly(ref):
    """train loss/acc = (rank 0's sums + rank 1's sums) / (images of both), to the last bit, and the images
    counted are the epoch's images (2 ranks x 16 batches x 32)."""
    d0, d1 = ref["dumps"]
    rows = [json.loads(x) for x in (ref["run"] / "metrics.jsonl").read_text().splitlines()]
    for e, row in enumerate(rows):
        a, b = d0["tallies"][e], d1["tallies"][e]
        seen = a[2] + b[2]
        assert seen == row["images"] == N_TRAIN
        assert row["train_loss"] == (a[0] + b[0]) / seen
        assert row["train_acc"] == (a[1] + b[1]) / seen
        assert a[2] == b[2] == len(d0["indices"][e])


def test_lr_scale_linear_multiplies_the_lr_by_the_world_size(monkeypatch, tmp_path):
    import nin.training.trainer as t
    from nin.training.engine import Dist
    from nin.training.recipes import get_recipe

    data = fake_fashion_dir(tmp_path / "data", n_train=64, n_test=32)
    monkeypatch.setattr(t, "setup_distributed", lambda device: (Dist(0, 4, 0), torch.device("cpu")))
    monkeypatch.setattr(t.nn.parallel, "DistributedDataParallel", lambda model, **k: model)
    for scale, want in (("linear", 0.8), ("none", 0.2)):
        s = t.set_up(get_recipe("fast", data_dir=str(data), lr=0.2, lr_scale=scale, limit_train=64))
        assert s.base_lr == pytest.approx(want)
        assert max(group["lr"] for group in s.opt.param_groups) == pytest.approx(want)


def test_mid_epoch_resume_under_torchrun_ends_with_the_uninterrupted_weights(ref, tmp_path):
    args = ["--data-dir", str(ref["data"]), "--out", "run", "--batch-size", str(BATCH), "--quiet", *FLAGS]
    run_job([*args, "--max-steps", "20"], tmp_path)  # epoch 2, batch 4 of 16
    state = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)
    assert (state["epoch"], state["batch"], state["step"]) == (1, 4, 20)
    run_job(["--resume", "run", "--quiet"], tmp_path)
    for k, v in weights(ref["run"]).items():
        assert torch.equal(weights(tmp_path / "run")[k], v), k
    got, want = metrics(tmp_path / "run"), metrics(ref["run"])
    assert [r["test_acc"] for r in got] == [r["test_acc"] for r in want]


# guards against: ranks evaluating with their own BN statistics instead of rank 0's
def test_under_ddp_every_rank_takes_rank_0s_bn_statistics_before_evaluating(data, monkeypatch):
    """epoch_metrics with several processes broadcasts every buffer of the evaluated model from rank 0, before
    any evaluation reads it (the ranks' own BN running statistics differ: their batches differ).  Here the
    broadcast is a stand-in that writes "rank 0's" values into the buffer, so the evaluation must see them."""
    import torch.distributed as dist

    import nin.training.trainer as t
    from nin.training.engine import Dist

    s = t.set_up(tiny(data, epochs=1))
    s = dataclasses.replace(s, dist=Dist(rank=1, world_size=2))
    buffers = {id(b): b for b in s.eval_model.buffers()}
    got, evaluated = [], []

    def broadcast(tensor, src, *a, **k):
        assert id(tensor) in buffers and src == 0, (type(tensor), src)
        assert not evaluated  # before the evaluation reads the model
        got.append(id(tensor))
        tensor.copy_(torch.full_like(tensor, 7))  # rank 0's values arrive

    real = t.loader_eval

    def spy(model, *a, **k):
        evaluated.append(all(bool((b == 7).all()) for b in model.buffers()))
        return real(model, *a, **k)

    monkeypatch.setattr(dist, "broadcast", broadcast)
    monkeypatch.setattr(t, "all_reduce_sum", lambda x, d: x)
    monkeypatch.setattr(t, "loader_eval", spy)
    st = t.TrainState(sums=torch.tensor([2.0, 1.0, 4.0], dtype=torch.float64))
    row = t.epoch_metrics(s, st)
    assert sorted(got) == sorted(buffers) and len(got) == len(buffers) > 0
    assert evaluated == [True] and row["train_loss"] == 0.5 and row["train_acc"] == 0.25
