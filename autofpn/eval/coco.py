"""COCO box evaluation through pycocotools, with checks that turn silent zeros into errors.

A results file is a list of ``{"image_id", "category_id", "bbox": [x, y, w, h], "score"}``.
An image id or category id that the ground truth does not know is an error naming the ids
(pycocotools would assert on the former and silently score the latter as 0).
"""
import contextlib
import io
from typing import Any, Dict, List, Optional, Sequence

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from autofpn.data.base import coco_from_dict

# the 12 numbers of COCOeval.summarize(), in order
COCO_METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                     "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class ResultsError(ValueError):
    """A detections file that does not match the ground truth; the message names the ids."""


def check_results(results: Any, coco_gt: COCO, source: str = "results") -> None:
    """Raise ``ResultsError`` naming unknown image / category ids or malformed entries."""
    if not isinstance(results, list):
        raise ResultsError(f"{source}: must be a JSON list of detections, got "
                           f"{type(results).__name__}")
    known_images, known_categories = set(coco_gt.getImgIds()), set(coco_gt.getCatIds())
    bad_images, bad_categories = set(), set()
    for i, det in enumerate(results):
        if not isinstance(det, dict):
            raise ResultsError(f"{source}: entry {i} is not an object")
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in det:
                raise ResultsError(f"{source}: entry {i} has no '{key}'")
        bbox = det["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4):
            raise ResultsError(f"{source}: entry {i}: bbox must be [x, y, w, h], got {bbox!r}")
        if det["image_id"] not in known_images:
            bad_images.add(det["image_id"])
        if det["category_id"] not in known_categories:
            bad_categories.add(det["category_id"])
    problems = []
    if bad_images:
        problems.append(f"{len(bad_images)} image ids not in the ground truth "
                        f"(e.g. {sorted(bad_images, key=str)[:5]})")
    if bad_categories:
        problems.append(f"category ids not in the ground truth: {sorted(bad_categories, key=str)}"
                        f" (known: {sorted(known_categories)})")
    if problems:
        raise ResultsError(f"{source}: " + "; ".join(problems))


def load_results(coco_gt: COCO, results: List[Dict[str, Any]]) -> COCO:
    """``coco_gt.loadRes`` that also accepts an empty list (pycocotools crashes on it)."""
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(results)
    return coco_from_dict({"images": coco_gt.dataset["images"],
                           "categories": coco_gt.dataset["categories"], "annotations": []})


def evaluate_coco(coco_gt: COCO, results: List[Dict[str, Any]],
                  image_ids: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """Run COCOeval (bbox) and return the 12 numbers, a per-class AP table and the printout.

    Args:
        coco_gt: the ground truth.
        results: detections in COCO results format (checked first).
        image_ids: evaluate on these images only (default: every ground-truth image).
    Returns:
        ``{"stats": {name: float} (COCO_METRIC_NAMES, in [0, 1]; -1 = no ground truth),
        "per_class": {class name: AP or nan}, "summary_text": str}``.
    """
    check_results(results, coco_gt)
    coco_dt = load_results(coco_gt, results)
    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    if image_ids is not None:
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = {name: float(v) for name, v in zip(COCO_METRIC_NAMES, evaluator.stats)}
    # precision: [T iou thresholds, R recall points, K classes, A areas, M max dets];
    # per-class AP = mean over T and R at area "all", maxDets 100, ignoring -1 (no GT)
    precision = evaluator.eval["precision"]
    per_class = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        name = coco_gt.cats[cat_id].get("name", str(cat_id))
        per_class[name] = float(values.mean()) if values.size else float("nan")
    return {"stats": stats, "per_class": per_class, "summary_text": buffer.getvalue()}
