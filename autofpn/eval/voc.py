"""Pascal VOC AP at IoU 0.5, both ways: VOC2007 11-point and area under the interpolated curve.

The computation follows the official devkit (``voc_eval.py``): per class, detections of all
images sorted by score; a detection is a true positive when its best-overlapping ground truth
of the class has IoU > 0.5, is not ``difficult`` and is not matched yet; a match to a
difficult box is neither TP nor FP; the number of positives excludes difficult boxes.

Boxes here are continuous xyxy (VOC readers store ``[xmin - 1, ymin - 1, xmax, ymax]``), so the
plain IoU equals the devkit's ``+1`` IoU on the raw XML numbers. Ground truth comes from a
pycocotools ``COCO`` object: ``difficult`` is the annotation's ``difficult`` key, or
``iscrowd`` for COCO data. A class without (non-difficult) ground truth has AP = nan and is
left out of the mean (the devkit would divide by zero).
"""
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .coco import check_results


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


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one ``box: [4]`` with ``boxes: [G, 4]``, xyxy continuous."""
    iw = np.maximum(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]), 0.0)
    ih = np.maximum(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]), 0.0)
    inter = iw * ih
    union = ((box[2] - box[0]) * (box[3] - box[1])
             + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) - inter)
    return inter / np.maximum(union, np.finfo(np.float64).eps)


def evaluate_class(gt: Dict[int, Dict[str, np.ndarray]], image_ids: np.ndarray,
                   scores: np.ndarray, boxes: np.ndarray, iou_thresh: float = 0.5):
    """AP of one class.

    Args:
        gt: image id -> {"boxes": [G, 4] xyxy, "difficult": bool[G]} for this class.
        image_ids / scores / boxes: the class's detections, ``[D]``, ``[D]``, ``[D, 4]``.
    Returns:
        (AP 11-point, AP area, number of positives).
    """
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
        overlaps = _iou(boxes[det].astype(np.float64), g["boxes"].astype(np.float64))
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
                 iou_thresh: float = 0.5) -> Dict[str, Any]:
    """VOC AP50 of COCO-format ``results`` against ``coco_gt`` (a pycocotools ``COCO``).

    Returns ``{"AP50_11pt": mean over classes, "AP50_area": mean, "per_class": {name:
    {"AP50_11pt", "AP50_area", "num_positives"}}}`` with APs in [0, 1].
    """
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
            np.array([d[2] for d in dets], np.float64).reshape(-1, 4), iou_thresh)
        name = coco_gt.cats[cat_id].get("name", str(cat_id))
        per_class[name] = {"AP50_11pt": ap07, "AP50_area": ap_area, "num_positives": npos}
    valid = [v for v in per_class.values() if v["num_positives"] > 0]
    mean = (lambda key: float(np.mean([v[key] for v in valid])) if valid else float("nan"))
    return {"AP50_11pt": mean("AP50_11pt"), "AP50_area": mean("AP50_area"),
            "per_class": per_class}
