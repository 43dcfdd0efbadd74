"""Pascal VOC AP at IoU 0.5, both ways: VOC2007 11-point and area under the interpolated curve.

The computation follows the official devkit (``voc_eval.py``): per class, detections of all
images sorted by score; a detection is a true positive when its best-overlapping ground truth
of the class has IoU > 0.5, is not ``difficult`` and is not matched yet; a match to a
difficult box is neither TP nor FP; the number of positives excludes difficult boxes.

Pixel convention (``pixel_convention``), for ground truth and detections alike, COCO
``[x, y, w, h]`` read as corners ``x .. x + w``:

- ``"devkit"``: corners are inclusive pixel indices as in VOC XML, so widths, heights and
  intersections get ``+1`` exactly as in the devkit; AP on the XML's own numbers (and
  detections in them) equals the devkit's and every published VOC number.
- ``"continuous"``: plain IoU of continuous boxes.

The ``+1`` must be counted once. The VOC reader already stores ``[xmin - 1, ymin - 1, xmax,
ymax]`` (continuous), and the detector predicts continuous boxes, so the pipeline evaluates
with ``"continuous"``, which equals the devkit on the raw XML numbers. The project's own
ground truth says so in ``info.box_convention``; ``None`` reads that key, and a ground truth
without it (a file from elsewhere, e.g. VOC numbers converted to COCO as they are) is taken
the devkit way.

Ground truth comes from a pycocotools ``COCO`` object: ``difficult`` is the annotation's
``difficult`` key, or ``iscrowd`` for COCO data. A class without (non-difficult) ground truth
has AP = nan and is left out of the mean (the devkit would divide by zero).
"""
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .coco import check_results

PIXEL_CONVENTIONS = ("devkit", "continuous")


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """AP from a recall / precision curve (the devkit's ``voc_ap``)."""
    if use_07_metric:  # 11 recall points 0, 0.1, ..., 1
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = np.max(precision[recall >= t]) if np.sum(recall >= t) > 0 else 0.0
            ap += p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    for i in range(mpre.size - 1, 0, -1):  # precision envelope (monotone decreasing)
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    change = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[change + 1] - mrec[change]) * mpre[change + 1]))


def resolve_pixel_convention(coco_gt, pixel_convention: Optional[str] = None) -> str:
    """``pixel_convention`` checked, or (None) the ground truth's ``info.box_convention``,
    else "devkit" (a ground truth from elsewhere is read as VOC pixel indices)."""
    if pixel_convention is None:
        info = getattr(coco_gt, "dataset", {}).get("info")
        declared = info.get("box_convention") if isinstance(info, dict) else None
        pixel_convention = declared if declared in PIXEL_CONVENTIONS else "devkit"
    if pixel_convention not in PIXEL_CONVENTIONS:
        raise ValueError(f"pixel_convention must be one of {', '.join(PIXEL_CONVENTIONS)} "
                         f"(or None: from the ground truth), got {pixel_convention!r}")
    return pixel_convention


def _iou(box: np.ndarray, boxes: np.ndarray, offset: float = 0.0) -> np.ndarray:
    """IoU of one ``box: [4]`` with ``boxes: [G, 4]``, xyxy; ``offset`` 1 = the devkit's
    inclusive pixels (``+1`` on intersection and box widths / heights), 0 = continuous."""
    iw = np.maximum(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]) + offset, 0.0)
    ih = np.maximum(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]) + offset, 0.0)
    inter = iw * ih
    union = ((box[2] - box[0] + offset) * (box[3] - box[1] + offset)
             + (boxes[:, 2] - boxes[:, 0] + offset) * (boxes[:, 3] - boxes[:, 1] + offset) - inter)
    return inter / np.maximum(union, np.finfo(np.float64).eps)


def evaluate_class(gt: Dict[int, Dict[str, np.ndarray]], image_ids: np.ndarray,
                   scores: np.ndarray, boxes: np.ndarray, iou_thresh: float = 0.5,
                   pixel_convention: str = "continuous"):
    """AP of one class.

    Args:
        gt: image id -> {"boxes": [G, 4] xyxy, "difficult": bool[G]} for this class.
        image_ids / scores / boxes: the class's detections, ``[D]``, ``[D]``, ``[D, 4]``.
        pixel_convention: "devkit" (+1 pixels) or "continuous", see the module docstring.
    Returns:
        (AP 11-point, AP area, number of positives).
    """
    if pixel_convention not in PIXEL_CONVENTIONS:
        raise ValueError(f"pixel_convention must be one of {', '.join(PIXEL_CONVENTIONS)}, "
                         f"got {pixel_convention!r}")
    offset = 1.0 if pixel_convention == "devkit" else 0.0
    num_positives = int(sum((~g["difficult"]).sum() for g in gt.values()))
    if num_positives == 0:
        return float("nan"), float("nan"), 0
    order = np.argsort(-scores, kind="stable")
    matched = {i: np.zeros(len(g["boxes"]), bool) for i, g in gt.items()}
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    for d, det in enumerate(order):
        g = gt.get(int(image_ids[det]))
        if g is None or len(g["boxes"]) == 0:
            fp[d] = 1
            continue
        overlaps = _iou(boxes[det].astype(np.float64), g["boxes"].astype(np.float64),
                        offset)
        best = int(np.argmax(overlaps))
        if overlaps[best] > iou_thresh:
            if not g["difficult"][best]:
                if not matched[int(image_ids[det])][best]:
                    tp[d] = 1
                    matched[int(image_ids[det])][best] = True
                else:
                    fp[d] = 1
        else:
            fp[d] = 1
    fp, tp = np.cumsum(fp), np.cumsum(tp)
    recall = tp / float(num_positives)
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return voc_ap(recall, precision, True), voc_ap(recall, precision, False), num_positives


def evaluate_voc(coco_gt, results: List[Dict[str, Any]],
                 image_ids: Optional[Sequence[int]] = None,
                 iou_thresh: float = 0.5,
                 pixel_convention: Optional[str] = None) -> Dict[str, Any]:
    """VOC AP50 of COCO-format ``results`` against ``coco_gt`` (a pycocotools ``COCO``).

    ``pixel_convention``: "devkit" (boxes are inclusive pixel indices, +1 as in the devkit),
    "continuous", or None = the ground truth's ``info.box_convention``, else "devkit".
    Returns ``{"AP50_11pt": mean over classes, "AP50_area": mean, "per_class": {name:
    {"AP50_11pt", "AP50_area", "num_positives"}}, "pixel_convention": the one used}`` with
    APs in [0, 1].
    """
    pixel_convention = resolve_pixel_convention(coco_gt, pixel_convention)
    check_results(results, coco_gt)
    if image_ids is None:
        image_ids = coco_gt.getImgIds()
    evaluated = set(int(i) for i in image_ids)
    gt_by_class: Dict[int, Dict[int, Dict[str, List]]] = defaultdict(dict)
    for image_id in evaluated:
        for ann in coco_gt.imgToAnns.get(image_id, []):
            x, y, w, h = ann["bbox"]
            entry = gt_by_class[ann["category_id"]].setdefault(
                image_id, {"boxes": [], "difficult": []})
            entry["boxes"].append([x, y, x + w, y + h])
            entry["difficult"].append(bool(ann.get("difficult", 0) or ann.get("iscrowd", 0)))
    dets_by_class: Dict[int, List] = defaultdict(list)
    for det in results:
        if int(det["image_id"]) in evaluated:
            x, y, w, h = det["bbox"]
            dets_by_class[det["category_id"]].append(
                (int(det["image_id"]), float(det["score"]), [x, y, x + w, y + h]))
    per_class = {}
    for cat_id in sorted(coco_gt.getCatIds()):
        gt = {i: {"boxes": np.array(g["boxes"], np.float64).reshape(-1, 4),
                  "difficult": np.array(g["difficult"], bool)}
              for i, g in gt_by_class[cat_id].items()}
        dets = dets_by_class[cat_id]
        ap07, ap_area, npos = evaluate_class(
            gt, np.array([d[0] for d in dets], np.int64), np.array([d[1] for d in dets]),
            np.array([d[2] for d in dets], np.float64).reshape(-1, 4), iou_thresh,
            pixel_convention)
        name = coco_gt.cats[cat_id].get("name", str(cat_id))
        per_class[name] = {"AP50_11pt": ap07, "AP50_area": ap_area, "num_positives": npos}
    valid = [v for v in per_class.values() if v["num_positives"] > 0]
    mean = (lambda key: float(np.mean([v[key] for v in valid])) if valid else float("nan"))
    return {"AP50_11pt": mean("AP50_11pt"), "AP50_area": mean("AP50_area"),
            "per_class": per_class, "pixel_convention": pixel_convention}
