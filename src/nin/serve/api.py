"""What the server does with one model, as LitServe's LitAPI: decode -> predict (a batch) -> encode.

``ImageAPI`` knows nothing of HTTP: ``decode`` turns uploaded bytes into the model's uint8 C x H x W
(the same reader as ``nin predict``), ``predict`` turns a stacked batch into probabilities (the same
computation as ``nin predict``, with the model's own TTA unless the request names one), ``encode`` turns
one row into the JSON answer.  The routes (app.py) read the request, call these, and batch ``predict``.
"""
from __future__ import annotations

import base64
import io

import numpy as np

from ..errors import ImageError
from ..data.images import MAX_PIXELS, read_input
from .model import ServedModel, reported_accuracy
from .upload import image_error


class ImageAPI:
    """decode / predict / encode for one served model; ``name`` is its name in /v1/models."""

    def __init__(self, served: ServedModel, *, name: str | None = None, max_pixels: int = MAX_PIXELS,
                 max_batch: int = 16) -> None:
        self.served, self.meta = served, served.meta
        self.name = name or self.meta.model
        self.max_pixels, self.max_batch = max_pixels, max_batch

    def decode(self, body: bytes, name: str, *, invert: bool = False) -> np.ndarray:
        """Image bytes -> uint8 C x H x W fitted to the model, or ApiError (413/415/400)."""
        try:
            return read_input(self.meta, body, invert=invert, max_pixels=self.max_pixels, name=name)
        except ImageError as e:
            raise image_error(e) from None

    def predict(self, images: np.ndarray, tta: str | None = None) -> np.ndarray:
        """uint8 N x C x H x W -> N x K probabilities (``tta`` None: the model's own)."""
        return self.served.probabilities(images, tta=tta)

    def encode(self, probs: np.ndarray, name: str, *, topk: int, image: np.ndarray | None = None,
               tta: str) -> dict:
        """One image's probabilities -> ``{"file", "top": [{"class", "prob"}], "tta"}`` (``tta``: the one
        used, vocab.resolve_tta's) (+ ``input`` when
        ``image`` is given: a PNG data URL of what the network saw)."""
        out = {"file": name, "top": top_classes(probs, self.served.classes, topk), "tta": tta}
        if image is not None:
            out["input"] = png_data_url(image)
        return out

    def describe(self, *, topk: int, max_upload_bytes: int) -> dict:
        """/v1/model: model.json, the weights, the accuracy it records with its own TTA, backend, limits."""
        served = self.served
        acc = reported_accuracy(self.meta)  # fp32, with the model's own TTA; null when not recorded
        return {**self.meta.to_json(), "name": self.name, "weights": served.source,
                "accuracy": acc and acc["value"], "accuracy_tta": acc and acc["tta"],
                "accuracy_precision": acc and acc["precision"], "backend": served.backend,
                "cam": served.cam_model is not None, "topk": topk, "max_batch": self.max_batch,
                "max_upload_bytes": max_upload_bytes, "max_pixels": self.max_pixels}

    # --- class maps (PyTorch; run in the inference thread) ---
    def cam_png(self, image: np.ndarray, probs: np.ndarray, topk: int, title: str) -> bytes:
        """The figure ``nin cam`` draws for this image."""
        import torch

        from ..figures import CAM_DPI, cam_figure

        fig, _ = cam_figure(self.served.cam_model, torch.from_numpy(image.copy()), topk=topk, title=title,
                            probs=torch.from_numpy(probs))
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=CAM_DPI)
        return buf.getvalue()

    def cam_json(self, image: np.ndarray, probs: np.ndarray, topk: int, name: str) -> dict:
        """The class maps of the top-k classes as arrays, at the network's own map resolution."""
        maps = self.cam_arrays(image)
        top = top_classes(probs, self.served.classes, topk)
        index = {c: i for i, c in enumerate(self.served.classes)}
        for t in top:
            t["map"] = np.round(maps[index[t["class"]]], 4).tolist()
        return {"file": name, "input": png_data_url(image), "map_size": list(maps.shape[1:]), "top": top}

    def cam_arrays(self, image: np.ndarray) -> np.ndarray:
        """K x h x w class maps of one image (one plain forward pass)."""
        import torch

        from ..inference import class_activation_maps, preprocess

        model = self.served.cam_model
        dev = next(model.parameters()).device
        maps, _ = class_activation_maps(model, preprocess(model, torch.from_numpy(image.copy())[None].to(dev)))
        return maps[0].float().cpu().numpy()


def top_classes(probs: np.ndarray, classes: list[str], k: int) -> list[dict]:
    """The ``k`` most probable classes (ties in class order), as ``[{"class", "prob"}]``."""
    k = max(1, min(k, len(classes)))
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"class": classes[i], "prob": float(probs[i])} for i in order]


def png_data_url(image: np.ndarray) -> str:
    """uint8 C x H x W -> a data: URL of a PNG (the page shows what the network sees)."""
    from PIL import Image

    arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
