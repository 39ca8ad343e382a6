"""COCO detection metrics, computed by pycocotools (the reference implementation every COCO number is quoted
from; vitkit has no mAP code of its own): AP@[.5:.95], AP50, AP75, AP small/medium/large, AR@100, per-class AP.

Ground truth is the dataset's own COCO dict (images, categories and every annotation of the file, crowd ones
included, bad ones excluded); predictions are mapped back to original image pixels and COCO category ids.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np

STATS = ("map", "map50", "map75", "map_small", "map_medium", "map_large")


def _coco():
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise ImportError("COCO mAP needs pycocotools: pip install 'vitkit[detection]'") from None
    return COCO, COCOeval


def coco_evaluate(gt: dict, detections: list[dict], classes: list[str]) -> dict:
    """``gt``: a COCO dict; ``detections``: COCO results (image_id, category_id, bbox [x, y, w, h], score).

    Returns the six AP numbers of ``STATS``, ``mar100`` and ``per_class_ap`` (None for a class with no ground
    truth), as pycocotools computes them; with no detection at all every AP is 0.
    """
    COCO, COCOeval = _coco()
    coco_gt = COCO()
    coco_gt.dataset = {k: gt[k] for k in ("images", "annotations", "categories")}
    for a in coco_gt.dataset["annotations"]:
        a.setdefault("area", a["bbox"][2] * a["bbox"][3])
        a.setdefault("iscrowd", 0)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
        if not detections:
            return {**dict.fromkeys(STATS, 0.0), "mar100": 0.0, "per_class_ap": [0.0] * len(classes)}
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out = {k: float(v) for k, v in zip(STATS, ev.stats[:6])}
    out["mar100"] = float(ev.stats[8])
    # precision: (iou thresholds, recall points, categories, area ranges, max dets); -1 where undefined
    prec = ev.eval["precision"][:, :, :, 0, -1]
    per_class = []
    for k in range(prec.shape[2]):
        p = prec[:, :, k]
        per_class.append(float(p[p > -1].mean()) if (p > -1).any() else None)
    out["per_class_ap"] = per_class
    return out


def to_coco_results(pred: dict, image_id: int, scale: float, coco_ids: list[int]) -> list[dict]:
    """One image's ``{"boxes", "scores", "labels"}`` (input pixels) as COCO results in original pixels."""
    boxes = pred["boxes"].detach().cpu().double().numpy() / scale
    scores, labels = pred["scores"].detach().cpu().tolist(), pred["labels"].detach().cpu().tolist()
    return [
        {"image_id": int(image_id), "category_id": int(coco_ids[c]), "score": float(s),
         "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])]}
        for b, s, c in zip(np.asarray(boxes).reshape(-1, 4), scores, labels)
    ]  # fmt: skip
