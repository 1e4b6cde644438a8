"""Shared fixtures for the reliability tests: made-up data, one small finished run, folder snapshots."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ..fakedata import fake_fashion_dir
from .common import TINY_ARGS


@pytest.fixture(autouse=True)
def _isolated(isolated):
    """Every reliability test: no user's $NIN_DATA or ~/.cache/nin (tests/conftest.py's ``isolated``)."""


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return fake_fashion_dir(tmp_path_factory.mktemp("data"), n_train=256, n_test=100)


@pytest.fixture(scope="session")
def finished_run_template(tmp_path_factory, data_dir) -> Path:
    """A finished one-epoch run folder; tests copy it (see ``finished_run``) and never change it."""
    from nin.cli import main

    out = tmp_path_factory.mktemp("template") / "run"
    assert main(["train", "--data-dir", str(data_dir), "--out", str(out), *TINY_ARGS]) == 0
    return out


@pytest.fixture
def finished_run(tmp_path, finished_run_template) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished_run_template, run)
    return run

