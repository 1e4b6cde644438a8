"""A tiny run of the fast recipe on made-up data (the ``data`` fixture of tests/conftest.py), for tests that
train: width 4, 256 images in batches of 64 (4 steps an epoch), two epochs, no warm-up, nothing printed; every
epoch evaluated on the whole test set with flip TTA and no closing evaluation (the tests that want the recipe's
cheaper curve and closing evaluation say so)."""
from __future__ import annotations

from nin.training.recipes import get_recipe

QUIET = dict(quiet=True, log=lambda *a, **k: None)


def tiny(data, **kw):
    base = dict(model_kwargs={"width": 4}, epochs=2, batch_size=64, limit_train=256, eval_batch_size=256,
                warmup_epochs=0.0, data_dir=str(data),
                tta_flip=True, final_tta="same", curve_test_images=None)
    return get_recipe("fast", **{**base, **kw})
