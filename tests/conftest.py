"""Fixtures shared by the test files: real Fashion-MNIST (loaded once), made-up data, a small trained run folder.

Under CI=true no test may skip: a skip there (missing data, extra, browser, tmpfs) is turned into a
failure that states its reason, so a green CI run means every test ran.
"""
import os

import pytest
import torch

from .fakedata import fake_fashion_dir, has_real_fmnist


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No test sees the user's $NIN_DATA or ~/.cache/nin (files using it: pytestmark usefixtures)."""
    monkeypatch.delenv("NIN_DATA", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture(scope="session")
def fmnist():
    if not has_real_fmnist():
        pytest.skip("real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    from nin.data.datasets import load_dataset

    return load_dataset("fashion-mnist")


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """Made-up Fashion-MNIST IDX files, 512 training and 128 test images (tests/tinyrun.py trains on them).

    Shared by the files that test training by subject; tests may write beside it (``data.parent``), never in it."""
    return fake_fashion_dir(tmp_path_factory.mktemp("data"), n_train=512, n_test=128)


@pytest.fixture(scope="session")
def small_run(fmnist, tmp_path_factory):
    """A nin_fmnist (width 8) trained for 30 SGD steps on real Fashion-MNIST, saved as a run folder.

    Returns (run folder, the trained model in eval mode, its ModelMeta).  Tests must not modify the folder.
    """
    from nin.data.batchops import to_float_batch
    from nin.modelfile import ModelMeta, save_model
    from nin.hub import create_model

    ds = fmnist
    mean, std = [float(m) for m in ds.mean], [float(s) for s in ds.std]
    torch.manual_seed(0)
    model = create_model("nin_fmnist", width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for i in range(30):
        x = to_float_batch(ds.train.images[i * 64:(i + 1) * 64], mean=mean, std=std)
        loss = torch.nn.functional.cross_entropy(model(x), ds.train.labels[i * 64:(i + 1) * 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    meta = ModelMeta("nin_fmnist", {"width": 8}, list(ds.classes), [1, 28, 28], "fashion-mnist",
                     {"resize": None, "mean": mean, "std": std})
    path = tmp_path_factory.mktemp("small_run")
    save_model(path, model.eval(), meta)
    return path, model, meta


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where every test must run: {reason}"
