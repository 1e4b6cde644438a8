"""nin in Jupyter: the Python API (nin.train, nin.summary, figures), the live curves under a fake IPython
display, and notebooks/nin.ipynb, both as committed and executed by nbclient in quick mode.

Under CI=true a missing optional package (IPython, nbclient, ipykernel) or dataset fails these tests
instead of skipping them: CI installs the `notebook` extra and Fashion-MNIST (make test)."""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

import nin
from nin.errors import UsageError

from .fakedata import fake_fashion_dir, has_real_fmnist

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "nin.ipynb"


def need(module: str):
    """Import an optional module; skip without it, except in CI, where it must be installed."""
    try:
        return importlib.import_module(module)
    except ImportError:
        message = f"{module} is not installed (pip install -e '.[notebook]')"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def tiny(tmp_path: Path, **extra) -> dict:
    """The fast recipe shrunk (tests/reliability/common.py: TINY_ARGS) on fake Fashion-MNIST files."""
    data = fake_fashion_dir(tmp_path / "data", n_train=256, n_test=128)
    return {**dict(data_dir=str(data), limit_train=256, batch_size=64, eval_batch_size=256, epochs=2,
                   warmup_epochs=0, model_kwargs={"width": 8}, quiet=True), **extra}


class FakeHandle:
    def __init__(self, log: list, obj) -> None:
        self.log = log
        self.log.append(("display", obj))

    def update(self, obj) -> None:
        self.log.append(("update", obj))


@pytest.fixture
def fake_notebook(monkeypatch):
    """Make nin believe it runs in a Jupyter kernel; record what it displays.  Returns the log."""
    IPython = need("IPython")
    display_module = need("IPython.display")

    class ZMQInteractiveShell:  # the class name is what a Jupyter kernel's shell is called
        pass

    log: list = []
    monkeypatch.setattr(IPython, "get_ipython", lambda: ZMQInteractiveShell())
    monkeypatch.setattr(display_module, "display",
                        lambda obj, display_id=None, **kw: FakeHandle(log, obj) if display_id else log.append(("show", obj)))
    return log


def _is_png(obj) -> bool:
    return getattr(obj, "format", None) == "png" and bytes(obj.data[:8]) == b"\x89PNG\r\n\x1a\n"


# --- live curves ------------------------------------------------------------------------------
def test_train_in_a_notebook_updates_one_figure_once_per_epoch(fake_notebook, tmp_path):
    run = nin.train("fast", out=tmp_path / "run", **tiny(tmp_path, epochs=3))
    figures = [(kind, obj) for kind, obj in fake_notebook if _is_png(obj)]
    assert [kind for kind, _ in figures] == ["display", "update", "update", "update"], fake_notebook
    assert [kind for kind, _ in fake_notebook].count("display") == 1  # one figure (text bar: no widget)
    assert len({bytes(obj.data) for _, obj in figures}) == 4  # redrawn each time, with the new epoch
    assert isinstance(run, nin.TrainResult)
    assert [r["epoch"] for r in run.history] == [1, 2, 3]
    assert run.run_dir == tmp_path / "run" and (run.run_dir / "curves.png").exists()
    assert run.model is not None and run.model.classes[0] == "T-shirt/top" and not run.model.training
    assert run.config.epochs == 3 and run.config.model_kwargs == {"width": 8}
    assert run.test_acc == run.history[-1]["test_acc"] == run.metrics["test_acc"]


def test_an_interrupted_run_resumes_with_its_figure_at_the_saved_epoch(fake_notebook, monkeypatch, tmp_path):
    from nin.training import trainer

    step, calls = trainer.train_step, []

    def interrupted_in_epoch_2(*args, **kwargs):  # 4 steps per epoch: stop at the first of epoch 2
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", interrupted_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        nin.train("fast", out=tmp_path / "run", **tiny(tmp_path, epochs=2))
    assert [kind for kind, obj in fake_notebook if _is_png(obj)] == ["display", "update"]
    monkeypatch.setattr(trainer, "train_step", step)
    fake_notebook.clear()
    run = nin.train(resume=tmp_path / "run", quiet=True)
    assert [kind for kind, obj in fake_notebook if _is_png(obj)] == ["display", "update"]
    assert [r["epoch"] for r in run.history] == [1, 2] and run.model is not None
    fake_notebook.clear()
    assert nin.train(resume=tmp_path / "run", live=False).history == run.history  # finished: nothing to do
    assert fake_notebook == []  # live=False: nothing shown, even in a notebook


def test_train_in_a_terminal_shows_nothing(monkeypatch, tmp_path):
    from nin.training import live

    class TerminalInteractiveShell:
        pass

    IPython = need("IPython")
    monkeypatch.setattr(IPython, "get_ipython", lambda: TerminalInteractiveShell())
    monkeypatch.setattr(live, "LiveCurves", lambda *a, **k: pytest.fail("a live display outside a notebook"))
    run = nin.train("fast", out=tmp_path / "run", **tiny(tmp_path, epochs=1))
    assert len(run.history) == 1


def test_the_cli_and_import_nin_do_not_load_notebook_packages():
    import subprocess

    code = ("import sys, nin, nin.cli; nin.cli.build_parser(); "
            "print(sorted(m for m in ('IPython', 'ipywidgets', 'matplotlib', 'torch', 'nin.training.live') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(Path(nin.__file__).parents[1])})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# --- the API ----------------------------------------------------------------------------------
def test_every_public_name_resolves():
    for name in nin.__all__:
        assert getattr(nin, name) is not None, name
    assert nin.train.__module__ == "nin.api" and nin.evaluate.__module__ == "nin.evaluation"


def test_unknown_option_is_one_usage_error_listing_the_valid_ones(tmp_path):
    with pytest.raises(UsageError) as e:
        nin.train("fast", out=tmp_path / "run", epochz=3, learning_rate=0.1)
    message = str(e.value)
    assert "epochz" in message and "learning_rate" in message
    from nin.api import config_fields

    for name in config_fields():
        assert name in message
    assert not (tmp_path / "run").exists()
    with pytest.raises(UsageError, match="unknown recipe"):
        nin.train("fastest")
    with pytest.raises(UsageError, match="--lr must be > 0"):
        nin.train("fast", lr=-1)
    with pytest.raises(UsageError, match="saved config"):
        nin.train(resume=tmp_path, lr=0.3)  # epochs may be raised on resume (issue 32 item 15); lr never


def test_train_takes_a_trainconfig_with_overrides(tmp_path):
    cfg = nin.get_recipe("fast", epochs=5)
    run = nin.train(cfg, out=tmp_path / "run", **tiny(tmp_path, epochs=1))
    assert run.config.recipe == "fast" and run.config.epochs == 1 and len(run.history) == 1
    assert cfg.epochs == 5  # the caller's config is not changed
    assert "test_acc=" in repr(run) and "Sequential" not in repr(run)


@pytest.mark.parametrize("argv, kwargs", [
    (["nin_d2l"], {}),
    (["nin_fmnist", "--batch-size", "4"], {"batch_size": 4}),
    (["nin_cifar10", "--input-size", "3", "40", "40"], {"input_size": (3, 40, 40)}),
])
def test_summary_is_what_nin_summary_prints(capsys, argv, kwargs):
    from nin.cli import main

    assert main(["summary", *argv]) == 0
    printed = capsys.readouterr().out
    table = nin.summary(argv[0], **kwargs)
    assert printed == str(table) + "\n"
    assert "output shape:" in printed and "Total parameters:" in printed
    html = table._repr_html_()
    assert html.count("<tr>") == len(table.info.layers) + 1 and "Total parameters" in html


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One epoch of the shrunk fast recipe on fake Fashion-MNIST files: (TrainResult, its dataset)."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    run = nin.train("fast", out=tmp / "run", live=False, **tiny(tmp, epochs=1))
    return run, nin.load_dataset("fashion-mnist", tmp / "data")


def test_summary_of_a_model_instance(tiny_run):
    run, _ = tiny_run
    assert str(nin.summary(run.model)) == str(nin.summary("nin_fmnist", width=8))
    assert str(nin.summary(nin.load(run.run_dir), batch_size=2)) == str(nin.summary("nin_fmnist", batch_size=2, width=8))
    trained = nin.create_model("nin_fmnist").train()
    nin.summary(trained)
    assert trained.training  # its mode is kept
    with pytest.raises(UsageError):
        nin.summary(object())


def test_plot_history_and_show_cam_return_figures(tiny_run, tmp_path):
    from matplotlib.figure import Figure

    history = [dict(epoch=1, train_loss=1.0, train_acc=0.6, test_acc=0.7),
               dict(epoch=2, train_loss=0.8, train_acc=0.7, test_acc=0.75, val_acc=0.74)]
    fig = nin.plot_history(history, title="t")
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels == ["train loss", "train acc", "test acc", "val acc"]
    run, ds = tiny_run
    for source in (run, run.run_dir, str(run.run_dir)):
        fig = nin.plot_history(source)
        assert isinstance(fig, Figure) and fig.axes[0].get_title() == "fast: nin_fmnist on fashion-mnist"
    with pytest.raises(UsageError):
        nin.plot_history(tmp_path / "missing")

    one = nin.show_cam(run.model, ds.test.images[0], topk=2)
    assert isinstance(one, Figure) and len(one.axes) == 3
    grid = nin.show_cam(run.model, ds.test.images[:5], labels=ds.test.labels[:5])
    assert isinstance(grid, Figure) and len(grid.axes) == 5
    png = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(ds.test.images[0, 0].numpy()).save(png)
    assert len(nin.show_cam(run.model, png).axes) == 4  # a file, fitted to the model's input
    with pytest.raises(UsageError):
        nin.show_cam(run.model, ds.test.images[0].float())


# --- the chapter notebook ---------------------------------------------------------------------
def _outputs(nb) -> list[dict]:
    return [o for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"]]


def _text(nb) -> str:
    parts = []
    for o in _outputs(nb):
        parts.append(o.get("text", "") if isinstance(o.get("text", ""), str) else "".join(o["text"]))
        plain = o.get("data", {}).get("text/plain", "")
        parts.append(plain if isinstance(plain, str) else "".join(plain))
    return "\n".join(parts)


def _build_module():
    """notebooks/build.py: the notebook's cells and the nbclient run CI does."""
    spec = importlib.util.spec_from_file_location("nin_notebook_build", NOTEBOOK.parent / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pngs(nb) -> int:
    return sum("image/png" in o.get("data", {}) for o in _outputs(nb))


def test_the_committed_notebook_reads_without_running():
    """Committed with the outputs of a real run, small, in sync with notebooks/build.py."""
    need("nbformat")
    assert NOTEBOOK.stat().st_size < 2_000_000
    nb = json.loads(NOTEBOOK.read_text())
    assert not [o for o in _outputs(nb) if o["output_type"] == "error"]
    assert all(c["execution_count"] for c in nb["cells"] if c["cell_type"] == "code")
    text = _text(nb)
    assert "Total parameters: 1,992,166" in text and "output shape:" in text
    assert _pngs(nb) >= 5  # live curves, curves, confusion matrix, two CAM figures
    words = "".join("".join(c["source"]) for c in nb["cells"]).lower()
    assert "seed" not in words  # the book / d2l, never the project's internal name for it
    assert ["".join(c["source"]) for c in nb["cells"]] == [src for _, src in _build_module().CELLS]


@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom_in_quick_mode(tmp_path, monkeypatch):
    need("nbclient")
    need("ipykernel")
    nbformat = need("nbformat")
    if not has_real_fmnist():
        message = "real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    copy = tmp_path / "nin.ipynb"
    shutil.copy(NOTEBOOK, copy)
    nb = nbformat.read(copy, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys, nin; print(sys.executable); print(nin.__file__)"))
    monkeypatch.setenv("NIN_NOTEBOOK_QUICK", "1")
    # the kernel imports the nin under test, wherever it is (an editable install or PYTHONPATH=src)
    src = str(Path(nin.__file__).resolve().parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])]))
    build = _build_module()
    build.execute(nb, tmp_path, timeout=300)

    errors = [o for o in _outputs(nb) if o["output_type"] == "error"]
    assert not errors, errors
    text = _text(nb)
    assert "Total parameters: 1,992,166" in text
    assert "MaxPool2d output shape:\t torch.Size([1, 96, 26, 26])" in text  # the book's own loop
    assert "epoch   1/1" in text  # quick mode: one epoch
    assert _pngs(nb) >= 5
    executable, nin_file = nb.cells[-1].outputs[0]["text"].split()
    assert executable == sys.executable  # the kernel is this Python (the venv), not the system's
    assert Path(nin_file).resolve() == Path(nin.__file__).resolve()
    assert list((tmp_path / "runs").iterdir())  # the run went under the notebook's folder
