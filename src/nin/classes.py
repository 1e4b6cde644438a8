"""Classes are identities: matching a dataset's class names to a model's, by name, never by position.

A folder of images names its classes by its subfolders (sorted), a model by the names it was trained
with.  ``match_classes`` maps each dataset class to the model's class of the same name, after
``normalize``: case, spaces and punctuation do not count, so the folder ``t-shirt_top`` (a folder
cannot hold ``/``) is the model's "T-shirt/top" and ``ankle boot`` is "Ankle boot".  Names that match
no class are an error listing them; a class map (a JSON object ``{"dataset name": "model class"}``,
``--class-map FILE``) names the others explicitly.

Imports nothing of nin but its errors.
"""
from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

from .errors import UsageError

__all__ = ["normalize", "read_class_map", "match_classes", "label_map", "ClassMismatch"]


class ClassMismatch(UsageError):
    """A dataset's class names that are not the model's (exit code 2)."""


def normalize(name: str) -> str:
    """The form two class names are compared in: Unicode NFKC, case-folded, letters and digits only
    ("T-shirt/top", "t-shirt_top", "T shirt top" -> "tshirttop")."""
    text = unicodedata.normalize("NFKC", str(name)).casefold()
    return "".join(ch for ch in text if ch.isalnum())


def read_class_map(path: str | os.PathLike | dict | None) -> dict[str, str]:
    """A class map from a JSON file (or an already parsed dict): ``{"dataset class": "model class"}``."""
    if path is None:
        return {}
    if isinstance(path, dict):
        data, where = path, "class map"
    else:
        where = f"--class-map {path}"
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"{where}: no such file") from None
        except (OSError, ValueError) as e:
            raise UsageError(f"{where}: not a JSON file ({e.__class__.__name__}: {e})") from None
    if not (isinstance(data, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in data.items())):
        raise UsageError(f"{where}: expected a JSON object of names, {{\"dataset class\": \"model class\", ...}}")
    return dict(data)


def _lookup(names: list[str], what: str) -> dict[str, int]:
    """normalised name -> index; two names that normalise alike cannot be told apart."""
    out: dict[str, int] = {}
    for i, n in enumerate(names):
        key = normalize(n)
        if key in out:
            raise UsageError(f"the {what} classes {names[out[key]]!r} and {n!r} differ only in case, spaces or "
                             "punctuation, so they cannot be matched by name; rename one")
        out[key] = i
    return out


def match_classes(data_classes: list[str], model_classes: list[str], class_map=None, *,
                  where: str = "the dataset") -> list[int]:
    """For each dataset class, the index of the model class of the same name (after ``normalize``, or as
    ``class_map`` says).  ClassMismatch lists every dataset class that matches none."""
    mapping = {normalize(k): v for k, v in read_class_map(class_map).items()}
    model_index = _lookup(list(model_classes), "model's")
    _lookup(list(data_classes), "dataset's")
    out, missing, bad_targets = [], [], []
    for name in data_classes:
        mapped = normalize(name) in mapping
        target = mapping.get(normalize(name), name)
        i = model_index.get(normalize(target))
        if i is None and mapped:
            bad_targets.append(f"{name!r} to {target!r}")
        elif i is None:
            missing.append(name)
        out.append(i)
    if bad_targets:
        raise ClassMismatch(f"the class map sends {', '.join(bad_targets)}: not a class of the model "
                            f"({', '.join(model_classes)})")
    if missing:
        raise ClassMismatch(
            f"{where}'s class(es) {', '.join(repr(m) for m in missing)} are not among the model's classes "
            f"({', '.join(model_classes)}); names are compared ignoring case, spaces and punctuation. Name the "
            "folders as the model's classes, or map them with --class-map FILE (JSON: {\"folder\": \"model class\"})")
    used: dict[int, str] = {}
    for name, i in zip(data_classes, out):
        if i in used:
            raise ClassMismatch(f"{where}'s classes {used[i]!r} and {name!r} both map to the model's class "
                                f"{model_classes[i]!r}")
        used[i] = name
    return out


def label_map(data_classes: list[str], model_classes: list[str], class_map=None, *, where: str = "the dataset"):
    """``match_classes`` as an int64 tensor (dataset label -> model label), or None when they are the same
    classes in the same order (nothing to remap)."""
    import torch

    index = match_classes(data_classes, model_classes, class_map, where=where)
    if index == list(range(len(model_classes))) and len(data_classes) == len(model_classes):
        return None
    return torch.tensor(index, dtype=torch.int64)
