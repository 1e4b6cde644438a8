"""Which weights a run saves and what its model.json says: the final epoch without validation, the
validation-best epoch, the closing evaluation (--final-tta); and the validation split itself."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from nin.cli import main
from nin.devices import cpu_supports_bf16
from nin.training.recipes import get_recipe
from nin.training.runfolder import METRIC_FIELDS, read_metrics

from .fakedata import fake_fashion_dir
from .tinyrun import QUIET, tiny


# guards against: model.json's classes in another order than the labels the model was trained on
def test_model_json_classes_are_the_datasets_in_order(tmp_path):
    rng = np.random.default_rng(0)
    names = ["zebra", "Apple", "mango", "10", "2"]
    for n in names:
        (tmp_path / "f" / n).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(tmp_path / "f" / n / f"{i}.png")
    from nin.data.datasets import load_dataset
    from nin.training.trainer import train

    ds = load_dataset(f"folder:{tmp_path / 'f'}")
    assert ds.classes == sorted(names)
    train(get_recipe("fast", dataset=f"folder:{tmp_path / 'f'}", epochs=1, batch_size=8, model_kwargs={"width": 4},
                     warmup_epochs=0.0), tmp_path / "run", **QUIET)
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["classes"] == ds.classes
    # and a label means the same class: the model's prediction for class k's images counts as class k
    from nin.evaluation import evaluate
    from nin.hub import load

    result = evaluate(load(tmp_path / "run"), ds.test)
    assert result.confusion.sum(1).tolist() == torch.bincount(ds.test.labels, minlength=5).tolist()


# guards against: a run without validation saving other weights than its final epoch's (choosing on the test set)
def test_without_validation_the_final_epochs_weights_are_saved(data, tmp_path):
    from nin.training.trainer import train

    train(tiny(data, epochs=2), tmp_path / "run", **QUIET)
    best = load_file(tmp_path / "run" / "best.safetensors")
    final = torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["model"]
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k].float()) for k in best)
    info = json.loads((tmp_path / "run" / "model.json").read_text())["info"]
    assert info["selected"] == "final epoch" and info["epoch"] == 2
    rows = read_metrics(tmp_path / "run")
    assert [sorted(r) for r in rows] == [sorted(METRIC_FIELDS)] * 2  # the documented columns, no more, no fewer
    assert all(r["val_acc"] is None and r["val_loss"] is None for r in rows)


# guards against: weights chosen by test accuracy, or ties going to a later epoch
def test_validation_chooses_even_when_the_test_set_peaks_elsewhere(data, tmp_path, monkeypatch):
    """Test accuracy made to peak at epoch 1, validation at epoch 2 (and tied at 3): the epoch-2 weights are saved, and
    they are exactly the weights a run that stopped after epoch 2 ends with (constant lr: same steps)."""
    import nin.training.trainer as t

    real = t.loader_eval
    fake = {"test": iter([0.9, 0.1, 0.1]), "val": iter([0.2, 0.8, 0.8])}  # a tie: the first epoch to reach it

    def rigged(model, loader, *a, **k):
        acc, loss = real(model, loader, *a, **k)
        return next(fake["val" if loader is t._current.val_loader else "test"]), loss

    orig_set_up = t.set_up

    def remember(cfg):
        s = orig_set_up(cfg)
        t._current = s
        return s

    monkeypatch.setattr(t, "loader_eval", rigged)
    monkeypatch.setattr(t, "set_up", remember)
    cfg = tiny(data, epochs=3, val_split=64, schedule="constant", warmup_epochs=0.0)
    t.train(cfg, tmp_path / "three", **QUIET)
    monkeypatch.setattr(t, "loader_eval", real)
    t.train(dataclasses.replace(cfg, epochs=2), tmp_path / "two", **QUIET)
    saved = load_file(tmp_path / "three" / "best.safetensors")
    two = torch.load(tmp_path / "two" / "last.ckpt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], two[k].float()) for k in saved)
    info = json.loads((tmp_path / "three" / "model.json").read_text())["info"]
    assert info["selected"] == "best validation accuracy" and info["epoch"] == 2
    rows = read_metrics(tmp_path / "three")
    assert [r["val_acc"] for r in rows] == [0.2, 0.8, 0.8] and all(r["val_loss"] is not None for r in rows)


# guards against: --final-tta scoring the wrong weights or TTA, or a resume redoing or skipping it
def test_closing_evaluation_scores_the_chosen_model_once_with_the_final_tta(data, tmp_path, capsys, monkeypatch):
    """--final-tta shift: the per-epoch rows keep flip TTA, the saved model (the validation-best epoch, here
    made to be epoch 2 of 3) is evaluated once with shift TTA, its model.json says so, and nin eval reproduces
    that number by default.  Checked against shift TTA computed here from the saved weights and from the last
    epoch's; a run stopped during that evaluation does it when resumed, and only it."""
    import nin
    import nin.training.trainer as t
    from nin.data.datasets import load_dataset
    from nin.inference import predict_logits
    from nin.modelfile import save_model
    from nin.training.trainer import train

    real, orig_set_up, fake_val = t.loader_eval, t.set_up, iter([0.2, 0.8, 0.1])

    def rigged(model, loader, *a, **k):  # only the validation accuracy is made up: it chooses epoch 2
        acc, loss = real(model, loader, *a, **k)
        return (next(fake_val), loss) if loader is t._current.val_loader else (acc, loss)

    def remember(cfg):
        t._current = orig_set_up(cfg)
        return t._current

    monkeypatch.setattr(t, "loader_eval", rigged)
    monkeypatch.setattr(t, "set_up", remember)
    data = fake_fashion_dir(tmp_path / "data", n_train=512, n_test=128, columns=True)
    cfg = tiny(data, epochs=3, flip=False, tta_flip=True, final_tta="shift", val_split=64, limit_train=None,
               model_kwargs={"width": 8}, batch_size=32, lr=0.05, schedule="constant")
    final = train(cfg, tmp_path / "run", **QUIET)
    monkeypatch.setattr(t, "loader_eval", real)
    best = nin.load(tmp_path / "run")
    last = nin.load(tmp_path / "run")
    last.load_state_dict(torch.load(tmp_path / "run" / "last.ckpt", weights_only=True)["model"])
    assert best.meta.info["epoch"] == 2
    ds = load_dataset("fashion-mnist", data)
    expected = "bf16" if cpu_supports_bf16() else "fp32"
    shift = predict_logits(best, ds.test.images, tta="shift", precision=expected).argmax(1)
    flip = predict_logits(best, ds.test.images, tta="flip", precision=expected).argmax(1)
    want = (shift == ds.test.labels).float().mean().item()
    # so the check can tell the two TTAs apart, and the chosen epoch from the last
    assert want != (flip == ds.test.labels).float().mean().item()
    assert want != (predict_logits(last, ds.test.images, tta="shift", precision=expected).argmax(1)
                    == ds.test.labels).float().mean().item()
    assert best.meta.tta == "shift" and final["tta"] == "shift"
    assert best.meta.info["tta_test_acc"] == pytest.approx(want, abs=1e-9) == final["tta_test_acc"]
    rows = read_metrics(tmp_path / "run")
    chosen = rows[best.meta.info["epoch"] - 1]
    assert best.meta.info["test_acc"] == chosen["test_acc"]  # the epoch's own (flip) number is kept beside it
    assert main(["eval", str(tmp_path / "run"), "--data-dir", str(data), "--json", "--precision", expected]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tta"] == "shift" and round(doc["accuracy"] * 128) == round(want * 128)
    lines = []
    train(None, resume=tmp_path / "run", log=lines.append)
    assert "nothing to do" in " ".join(lines)  # done, and the checkpoint knows it
    # killed during the closing evaluation: model.json still says flip and the last checkpoint (written after
    # the last epoch) says pending, or (a checkpoint from before that field) holds nothing on it: either way
    # the resume evaluates and stops
    ckpt_path = tmp_path / "run" / "last.ckpt"
    for pending in (True, "absent"):
        save_model(tmp_path / "run", best, dataclasses.replace(best.meta, tta="flip"))
        ckpt = torch.load(ckpt_path, weights_only=True)
        assert ckpt["closing_pending"] is False
        if pending == "absent":
            del ckpt["closing_pending"]
        else:
            ckpt["closing_pending"] = True
        torch.save(ckpt, ckpt_path)
        lines.clear()
        again = train(None, resume=tmp_path / "run", log=lines.append)
        assert again["tta_test_acc"] == pytest.approx(want, abs=1e-9) and nin.load(tmp_path / "run").meta.tta == "shift"
        assert len(read_metrics(tmp_path / "run")) == 3 and "closing evaluation" in " ".join(lines)
        lines.clear()
        train(None, resume=tmp_path / "run", log=lines.append)
        assert "nothing to do" in " ".join(lines)


# guards against: a validation split that overlaps training, is not stratified, or ignores the seed
def test_validation_split_is_stratified_disjoint_and_seeded():
    from nin.data.datasets import Split
    from nin.training.trainer import split_validation

    labels = torch.arange(10).repeat_interleave(torch.tensor([50, 50, 50, 50, 50, 30, 30, 30, 30, 30]))
    ids = torch.arange(len(labels))
    split = Split(ids[:, None, None, None].to(torch.int32), labels)  # the "image" is its index
    tr, va = split_validation(split, 40, seed=3)
    assert len(va) == 40 and len(tr) == len(labels) - 40
    got = set(va.images.flatten().tolist())
    assert got.isdisjoint(tr.images.flatten().tolist())
    counts = torch.bincount(va.labels, minlength=10).tolist()
    assert counts == [5, 5, 5, 5, 5, 3, 3, 3, 3, 3]  # 10% of each class
    assert set(split_validation(split, 40, seed=3)[1].images.flatten().tolist()) == got
    assert set(split_validation(split, 40, seed=4)[1].images.flatten().tolist()) != got


# guards against: per-class validation quotas rounded otherwise than by largest remainders
@pytest.mark.parametrize("sizes,n,quota", [
    ([50, 30, 20], 7, [4, 2, 1]),    # 3.5, 2.1, 1.4: floors 3, 2, 1; the one left goes to the largest remainder
    ([10, 45, 45], 9, [1, 4, 4]),    # 0.9, 4.05, 4.05: the small class, whose remainder is largest, gets it
])
def test_validation_quotas_are_largest_remainders(sizes, n, quota):
    from nin.data.datasets import Split
    from nin.training.trainer import split_validation

    labels = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    split = Split(torch.zeros(len(labels), 1, 1, 1, dtype=torch.uint8), labels)
    assert torch.bincount(split_validation(split, n, seed=0)[1].labels, minlength=len(sizes)).tolist() == quota


# guards against: a --val-split of 0 or of every image accepted
def test_validation_split_bounds_are_one_to_all_but_one():
    from nin.data.datasets import Split
    from nin.errors import UsageError
    from nin.training.trainer import split_validation

    split = Split(torch.zeros(20, 1, 1, 1, dtype=torch.uint8), torch.arange(2).repeat(10))
    assert len(split_validation(split, 1, seed=0)[1]) == 1 and len(split_validation(split, 19, seed=0)[1]) == 19
    for n in (0, 20):
        with pytest.raises(UsageError, match=rf"--val-split must be between 1 and 19 \(the training images\), got {n}$"):
            split_validation(split, n, seed=0)
