"""The model side of ``vitkit serve``: one model (a run's or a registered one), the images it has been shown, and
what the page asks about them.

Every number comes from code the CLI already runs: images are decoded by :func:`vitkit.data.images.load_image`
(the guarded decoder the loaders use), prepared by the task's eval transform, predicted by the task's
``predict_batch``, and explained by :mod:`vitkit.interpret` (``attention_to_image`` for a query pixel in each
family's geometry, ``rollout_map``, ``cam_map``, ``gradcat``, ``attention_distances``). This module only turns
their tensors into what a browser draws: 8-bit PNG maps with the values their ends stand for sent beside them
(attention from 0, scores from their minimum), boxes in the model input's pixels, and a colour mask.

Nothing here is thread-safe: the web layer (:mod:`vitkit.serve.app`) calls one method at a time.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import os
import secrets
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from vitkit.data.images import ImageDecodeError, load_image
from vitkit.interpret import attention_to_image, capture_attention, gradcat
from vitkit.interpret.explain import attention_distances, cam_map, rollout_map

METHODS = ("attention", "rollout", "cam", "gradcat", "distance")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one server accepts and keeps.

    Attributes:
        max_bytes: largest upload in bytes (413 above it).
        max_pixels: largest decoded image, width x height (413 above it, checked from the header before decoding).
        max_waiting: requests admitted to wait while one computes; the next ones get 503 with ``Retry-After``.
        retry_after_s: the ``Retry-After`` seconds sent with a 503.
        cache_images: images (with their captured attention) kept for follow-up questions, least recent dropped.
    """

    max_bytes: int = 10 * 2**20
    max_pixels: int | None = 4096 * 4096
    max_waiting: int = 4
    retry_after_s: int = 1
    cache_images: int = 8


class RequestError(Exception):
    """A request the explorer refuses: ``status`` (4xx/5xx) and a message the page shows as it is."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


@dataclasses.dataclass
class _Entry:
    x: torch.Tensor  # (1, C, H, W): the model's input
    meta: object  # the eval transform's second output (detection: the resize scale)
    records: list | None = None  # captured attention, filled on the first question that needs it


def _png(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _heat(m: torch.Tensor, relative: bool = False) -> dict:
    """A map ``(H, W)`` as an 8-bit grey PNG, with the values its ends stand for (``min``, ``max``).

    Attention (``relative=False``): 0 to the maximum, and 0 only where the map is 0, so the page leaves exactly
    the unattended pixels clear. Scores such as CAM (``relative=True``): the minimum to the maximum, as
    ``vitkit explain`` draws them.
    """
    m = m.detach().float().cpu()
    low = float(m.min()) if relative else 0.0
    m = (m - low).clamp_min(0)
    top = float(m.max())
    grey = torch.where(m > 0, (m / top * 255).round().clamp_min(1), 0) if top > 0 else torch.zeros_like(m)
    return {"png": _png(Image.fromarray(grey.to(torch.uint8).numpy(), mode="L")), "min": low, "max": low + top}


def _finite(values) -> list:
    return [[None if math.isnan(v) else round(v, 3) for v in row] for row in values]


class Explorer:
    """One model with its task, eval transform and (for a run) held-out images, answering the page's questions.

    Args:
        model: the model (put in eval mode).
        task: the :class:`vitkit.tasks.Task` that predicts with it.
        data_config: the model's data config as the task reads it (input size, mean, std, ...).
        name: the model's registered name, shown on the page.
        held_out: the run's held-out dataset (``(PIL image, target)`` items) offered by index, or None.
        source: where the weights came from, shown on the page.
        limits: upload and cache limits.
    """

    def __init__(self, model: nn.Module, task, data_config: dict, name: str, held_out=None, source: str = "",
                 limits: Limits | None = None):  # fmt: skip
        self.model, self.task, self.dc, self.name = model.eval(), task, data_config, name
        self.held_out, self.source, self.limits = held_out, source, limits or Limits()
        self.transform = task.eval_transform(data_config)
        self.images: OrderedDict[str, _Entry] = OrderedDict()
        self._info = self._describe()

    @classmethod
    def load(
        cls,
        target: str,
        checkpoint: str | None = None,
        which: str = "best",
        ema: bool = False,
        img_size: int | None = None,
        num_classes: int | None = None,
        limits: Limits | None = None,
    ) -> Explorer:
        """A run folder (its best/last checkpoint, task and held-out split) or a registered model name (random
        weights, or ``checkpoint``; predicted by the task the model is registered for)."""
        if Path(target).is_dir():
            from vitkit.train import load_run

            if checkpoint or img_size or num_classes is not None:
                raise ValueError(
                    f"serve: {target!r} is a run folder, which brings its own weights and sizes; "
                    "--checkpoint, --img-size and --num-classes are for a registered model name"
                )
            run = load_run(target, which, ema=ema)
            try:
                held_out = run.task.dataset(run.cfg.data.val_split) if run.cfg.data.val_split else None
            except (OSError, ValueError, RuntimeError):  # the dataset is not on this machine: uploads only
                held_out = None
            return cls(run.model, run.task, run.data_config, run.cfg.model.name, held_out, str(run.checkpoint), limits)
        import vitkit
        from vitkit.config import TrainConfig
        from vitkit.tasks import model_task, task_class

        kwargs = {"img_size": img_size} if img_size else {}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        model = vitkit.create_model(target, checkpoint_path=checkpoint, **kwargs)
        kind = model_task(target)
        cfg = TrainConfig.from_dict({"task": {"name": kind}, "model": {"name": target}})
        cfg.data.classes = [str(i) for i in range(getattr(model, "num_classes", 0) or 0)]
        task = task_class(kind)(cfg)
        dc = dict(vitkit.resolve_data_config(model), eval_canvas=False)
        return cls(model, task, dc, target, None, checkpoint or "random weights", limits)

    # ---- what the page asks -------------------------------------------------------------------------

    def info(self) -> dict:
        """The model, its task and classes, input size, attention layers (name, heads), the methods that run on it
        (and why the others do not) and how many held-out images can be picked."""
        return dict(self._info, held_out=len(self.held_out) if self.held_out is not None else 0)

    def add_upload(self, data: bytes) -> dict:
        """Decode uploaded bytes (guarded: empty, not an image, truncated, too many pixels), predict, keep."""
        if not data:
            raise RequestError(400, "the upload is empty: choose an image file")
        if len(data) > self.limits.max_bytes:
            raise RequestError(
                413, f"the upload is {len(data)} bytes; this server takes at most {self.limits.max_bytes}"
            )
        fd, path = tempfile.mkstemp(prefix="vitkit-serve-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            img = load_image(path, max_pixels=self.limits.max_pixels)
        except ImageDecodeError as e:
            reason = e.reason.replace(path, "the upload")  # the temporary file's name means nothing to the user
            if "pixel" in reason or "DecompressionBomb" in reason:
                raise RequestError(413, f"the image is too large to decode: {reason}") from None
            raise RequestError(400, f"the upload is not an image this server can read ({reason})") from None
        finally:
            os.unlink(path)
        return self._add(img)

    def add_held_out(self, index: int) -> dict:
        """Image ``index`` of the run's held-out split (the only files the page can name), predicted and kept."""
        n = len(self.held_out) if self.held_out is not None else 0
        if not 0 <= index < n:
            raise RequestError(404, f"held-out image {index} does not exist (this server has {n}: 0 to {n - 1})")
        img, target = self.held_out[index]
        res = self._add(img)
        if isinstance(target, int) and 0 <= target < len(self.task.classes):
            res["label"] = self.task.classes[target]
        return dict(res, index=index)

    def attention(self, image_id: str, layer: int, y: int, x: int) -> dict:
        """Where pixel ``(y, x)`` of the model's input attends in attention layer ``layer``, per head, painted on
        the input with the family's geometry (:func:`vitkit.interpret.attention_to_image`)."""
        e = self._entry(image_id)
        records = self._records(e)
        if not 0 <= layer < len(records):
            raise RequestError(400, f"layer {layer} does not exist: this model has attention layers 0 to "
                                    f"{len(records) - 1}")  # fmt: skip
        size = tuple(e.x.shape[-2:])
        if not (0 <= y < size[0] and 0 <= x < size[1]):
            raise RequestError(400, f"pixel ({y}, {x}) is outside the {size[0]}x{size[1]} input")
        heat = attention_to_image(self.model, records[layer], size, (y, x))[0]  # (heads, H, W)
        return {"layer": layer, "name": records[layer].layer, "query": [y, x], "heads": [_heat(h) for h in heat],
                "mean": _heat(heat.mean(0))}  # fmt: skip

    def rollout(self, image_id: str) -> dict:
        """Attention rollout of the class token (ViT), upsampled to the input."""
        e = self._entry(image_id)
        heat = rollout_map(self.model, e.x, self._records(e))
        return {
            "map": _heat(
                F.interpolate(heat[None, None].float(), size=tuple(e.x.shape[-2:]), mode="bilinear")[0, 0],
                relative=True,
            )
        }

    def cam(self, image_id: str, target: int | None = None) -> dict:
        """CAM (global-average-pool + linear heads) or Grad-CAM of class ``target`` (default: the prediction)."""
        e = self._entry(image_id)
        res, kind = cam_map(self.model, e.x, self._target(target))
        t = int(res.target[0])
        return {"kind": kind, "target": t, "class": self._class(t), "map": _heat(res.maps[0], relative=True),
                "peak": res.peaks[0].tolist()}  # fmt: skip

    def gradcat(self, image_id: str, target: int | None = None) -> dict:
        """NesT's GradCAT: the block chosen at each level (top first, ``y0, x0, y1, x1`` input pixels), the leaf's
        peak and the finest level's scores."""
        e = self._entry(image_id)
        res = gradcat(self.model, e.x, self._target(target))
        t = int(res.target[0])
        fine = F.interpolate(res.scores[0][:1, None].float(), size=tuple(e.x.shape[-2:]), mode="nearest")[0, 0]
        return {"target": t, "class": self._class(t), "boxes": [list(b) for b in res.boxes[0]],
                "peak": res.peaks[0].tolist(), "map": _heat(fine, relative=True)}  # fmt: skip

    def distance(self, image_id: str) -> dict:
        """Mean attention distance in pixels per layer and head (null where a layer has fewer heads)."""
        e = self._entry(image_id)
        records = self._records(e)
        dist = attention_distances(self.model, e.x, records)
        return {"layers": [r.layer for r in records], "pixels": _finite(dist.tolist())}

    # ---- internals ----------------------------------------------------------------------------------

    def _add(self, img: Image.Image) -> dict:
        try:
            x, meta = self.transform(img, None, None, None)  # (image, target, rng, size)
        except (ValueError, OSError) as e:
            raise RequestError(400, f"the image could not be prepared for the model: {e}") from None
        x = x[None]
        with torch.no_grad():
            out = self.task.predict_batch(self.model, x, [meta], **self._predict_options())[0]
        image_id = secrets.token_hex(8)
        self.images[image_id] = _Entry(x, meta)
        while len(self.images) > self.limits.cache_images:
            self.images.popitem(last=False)
        res = {"id": image_id, "size": list(x.shape[-2:]), "input": _png(self._display(x[0])),
               "prediction": {k: v for k, v in out.items() if not k.startswith("_") and k != "detections"}}  # fmt: skip
        if "detections" in out:  # boxes in the model input's pixels (the task maps them to the original image's)
            s = float(meta["scale"])
            res["boxes"] = [dict(d, box=[round(v * s, 1) for v in d["box"]]) for d in out["detections"]]
        if "_labels" in out:
            res["mask"] = _png(self._mask(out["_labels"]))
        return res

    def _predict_options(self) -> dict:
        return {"classification": {"topk": min(5, max(1, len(self.task.classes)))}, "detection": {"score": 0.05}}.get(
            self.task.name, {}
        )

    def _entry(self, image_id: str) -> _Entry:
        e = self.images.get(image_id)
        if e is None:
            raise RequestError(404, "this image is no longer held by the server: upload or pick it again")
        self.images.move_to_end(image_id)
        return e

    def _records(self, e: _Entry) -> list:
        if e.records is None:
            with torch.no_grad(), capture_attention(self.model) as records:
                self.model(e.x)
            e.records = list(records)
        return e.records

    def _target(self, target: int | None):
        n = len(self.task.classes)
        if target is not None and not 0 <= target < n:
            raise RequestError(400, f"class {target} does not exist: this model has classes 0 to {n - 1}")
        return target

    def _class(self, t: int) -> str:
        return self.task.classes[t] if 0 <= t < len(self.task.classes) else str(t)

    def _display(self, x: torch.Tensor) -> Image.Image:
        """The model's input as the model sees it (normalisation undone), 8-bit."""
        c = x.shape[0]
        mean = torch.tensor((list(self.dc["mean"]) * c)[:c])[:, None, None]
        std = torch.tensor((list(self.dc["std"]) * c)[:c])[:, None, None]
        arr = ((x.float() * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
        return Image.fromarray(arr[0].numpy(), "L") if c == 1 else Image.fromarray(arr.permute(1, 2, 0).numpy(), "RGB")

    def _mask(self, labels: np.ndarray) -> Image.Image:
        """A label map as RGBA: each class its VOC colour, class 0 (background) clear."""
        from vitkit.tasks.segmentation.data import voc_palette

        pal = np.asarray(voc_palette(), dtype=np.uint8).reshape(-1, 3)
        rgba = np.concatenate([pal[labels], np.where(labels > 0, 255, 0).astype(np.uint8)[..., None]], -1)
        return Image.fromarray(rgba, "RGBA")

    def _describe(self) -> dict:
        """Which methods run on this model, found by running each once on a blank input."""
        c, h, w = self.dc["input_size"]
        x = torch.zeros(1, c, h, w)
        probe = _Entry(x, None)
        layers, unavailable = [], {}
        try:
            records = self._records(probe)
            for r in records:
                layers.append(
                    {"name": r.layer, "heads": int(attention_to_image(self.model, r, (h, w), (0, 0)).shape[1])}
                )
        except (ValueError, RuntimeError, AttributeError, TypeError) as e:
            unavailable["attention"] = unavailable["distance"] = str(e)
        checks = {"rollout": lambda: rollout_map(self.model, x, self._records(probe)),
                  "cam": lambda: cam_map(self.model, x), "gradcat": lambda: gradcat(self.model, x)}  # fmt: skip
        for method, check in checks.items():
            if method == "rollout" and "attention" in unavailable:
                unavailable[method] = unavailable["attention"]
                continue
            if method in ("cam", "gradcat") and self.task.name != "classification":
                unavailable[method] = f"it explains one class score, and this is a {self.task.name} model"
                continue
            try:
                check()
            except (ValueError, RuntimeError, AttributeError, TypeError) as e:
                unavailable[method] = str(e)
        self.model.zero_grad(set_to_none=True)
        return {
            "model": self.name,
            "source": self.source,
            "task": self.task.name,
            "classes": self.task.classes,
            "input_size": [c, h, w],
            "layers": layers,
            "methods": [m for m in METHODS if m not in unavailable],
            "unavailable": unavailable,
            "limits": dataclasses.asdict(self.limits),
        }
