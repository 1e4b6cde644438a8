"""The installed package (issue 20): public names survive their submodules' imports; the typing marker."""
from __future__ import annotations

import subprocess
import sys


# issue 20 item 2, guards against: a public name shadowed by its submodule once that is imported
def test_public_names_survive_submodule_imports():
    code = """
import nin, importlib
from nin import *
for name in nin.__all__:
    assert getattr(nin, name) is not None, name
for mod in ("nin.training.trainer", "nin.evaluation", "nin.modelfile", "nin.training.recipes", "nin.data", "nin.models", "nin.prediction"):
    importlib.import_module(mod)
for name in nin.__all__:
    obj = getattr(nin, name)
    assert not isinstance(obj, type(nin)), (name, obj)   # never a module
assert callable(nin.train) and callable(nin.evaluate) and callable(nin.get_recipe) and callable(nin.load)
cfg = nin.get_recipe("fast"); cfg2 = nin.TrainConfig(); m = nin.create_model("nin_fmnist", width=4)
assert callable(nin.train) and callable(nin.evaluate)
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr


# issue 20 item 20, guards against: type checkers told the package is untyped (no py.typed)
def test_the_package_is_marked_typed():
    import importlib.resources

    assert importlib.resources.files("nin").joinpath("py.typed").is_file()
