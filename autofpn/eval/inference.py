"""Inference over a loader, result gathering across ranks, metrics, tables and JSON files.

Entry points:

- ``evaluate_model(model, loader, dataset, out_dir, metric, device)``: the training engine's
  and ``evaluate.py``'s path;
- ``evaluate_results_file(results_json, ann_json, metric)``: a saved detections file, no model.

Both return a summary dict with values in PERCENT: "AP", "AP50", "AP75", "APs", "APm", "APl",
"AR1", "AR10", "AR100", "ARs", "ARm", "ARl" (COCO), "voc_AP50" (area under the interpolated
curve, VOC2010+) and "voc_AP50_07" (11-point, VOC2007) with "voc_pixel_convention" (the box
convention they were computed in, see ``eval/voc.py``), plus "per_class" tables,
"num_images" and "num_detections".

Files written to ``out_dir``: ``detections.json`` (COCO results), ``metrics.json`` and, by
``evaluate_model``, ``ground_truth.json``: the COCO instances dict the detections were scored
against (the evaluated images only, original file names, ``info.box_convention =
"continuous"``), so ``evaluate.py --results detections.json --ann ground_truth.json`` gives the
same numbers.
"""
import json
import math
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Subset

from ..data.coco import load_coco_gt, load_json
from .coco import COCO_METRIC_NAMES, check_results, evaluate_coco
from .voc import evaluate_voc, resolve_pixel_convention

METRICS = ("coco", "voc", "both")


def _base_dataset(dataset):
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def json_safe(obj: Any) -> Any:
    """NaN / inf -> None, recursively (JSON has no NaN; a class without ground truth has AP nan)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_json(obj: Any, path: str) -> None:
    """Write ``obj`` as strict JSON atomically (temp file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(json_safe(obj), f, indent=None, allow_nan=False)
    os.replace(tmp, path)


def write_metrics(summary: Dict[str, Any], path: str) -> None:
    """``metrics.json``: the summary without the raw pycocotools printout."""
    write_json({k: v for k, v in summary.items() if k != "coco_summary_text"}, path)


@torch.no_grad()
def run_inference(model: torch.nn.Module, loader, label_to_category_id: Sequence[int],
                  device: torch.device, max_images: int = 0) -> Tuple[List[Dict], List[int]]:
    """Detections of ``model`` on every batch of ``loader`` in COCO results format.

    Args:
        model: in eval mode returns ``List[{"boxes": [N, 4] xyxy, "labels": [N], "scores":
            [N]}]`` in original image coordinates.
        label_to_category_id: contiguous label -> the dataset's category id.
        max_images: stop after this many images (0 = all).
    Returns:
        (results ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``,
        ids of the images that were run).
    """
    results: List[Dict[str, Any]] = []
    image_ids: List[int] = []
    for images, targets in loader:
        if max_images and len(image_ids) >= max_images:
            break
        outputs = model([image.to(device) for image in images])
        for output, target in zip(outputs, targets):
            image_id = int(target["image_id"])
            image_ids.append(image_id)
            results.extend(coco_results(output, image_id, label_to_category_id))
    return results, image_ids


def coco_results(output: Dict[str, torch.Tensor], image_id: int,
                 label_to_category_id: Sequence[int]) -> List[Dict[str, Any]]:
    """One image's detections ``{"boxes": [N, 4] xyxy, "labels": [N], "scores": [N]}`` as COCO
    results ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``."""
    boxes = output["boxes"].detach().float().cpu().clone()
    boxes[:, 2:] -= boxes[:, :2]  # xyxy -> xywh
    return [{"image_id": int(image_id), "category_id": int(label_to_category_id[int(label)]),
             "bbox": [round(v, 3) for v in box], "score": round(score, 5)}
            for box, label, score in zip(boxes.tolist(), output["labels"].tolist(),
                                         output["scores"].detach().float().cpu().tolist())]


def _gather(results: List[Dict], image_ids: List[int]) -> Tuple[List[Dict], List[int]]:
    """Concatenate the lists of every rank (identity when not distributed)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return results, image_ids
    world_size = torch.distributed.get_world_size()
    if world_size == 1:
        return results, image_ids
    gathered: List[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, (results, image_ids))
    all_results = [r for part, _ in gathered for r in part]
    all_ids = [i for _, part in gathered for i in part]
    return all_results, all_ids


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or \
        torch.distributed.get_rank() == 0


def compute_metrics(coco_gt, results: List[Dict], image_ids: Optional[Sequence[int]] = None,
                    metric: str = "coco", voc_pixel_convention: Optional[str] = None) -> Dict[str, Any]:
    """The summary dict (percent) for ``results`` against ``coco_gt`` on ``image_ids``.

    ``voc_pixel_convention``: "devkit" / "continuous" / None (the ground truth's
    ``info.box_convention``, else "devkit"), see ``evaluate_voc``; COCO numbers ignore it.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if metric in ("voc", "both"):  # a bad value fails before the (slow) COCO evaluation
        voc_pixel_convention = resolve_pixel_convention(coco_gt, voc_pixel_convention)
    check_results(results, coco_gt)
    ids = sorted(set(image_ids)) if image_ids is not None else sorted(coco_gt.getImgIds())
    summary: Dict[str, Any] = {"num_images": len(ids), "num_detections": len(results),
                               "per_class": {}}
    if metric in ("coco", "both"):
        coco = evaluate_coco(coco_gt, results, ids)
        summary.update({k: 100.0 * v if v >= 0 else v for k, v in coco["stats"].items()})
        summary["per_class"]["coco_AP"] = {k: 100.0 * v for k, v in coco["per_class"].items()}
        summary["coco_summary_text"] = coco["summary_text"]
    if metric in ("voc", "both"):
        voc = evaluate_voc(coco_gt, results, ids, pixel_convention=voc_pixel_convention)
        summary["voc_pixel_convention"] = voc["pixel_convention"]
        summary["voc_AP50"] = 100.0 * voc["AP50_area"]
        summary["voc_AP50_07"] = 100.0 * voc["AP50_11pt"]
        summary["per_class"]["voc_AP50"] = {k: 100.0 * v["AP50_area"]
                                            for k, v in voc["per_class"].items()}
        summary["per_class"]["voc_AP50_07"] = {k: 100.0 * v["AP50_11pt"]
                                               for k, v in voc["per_class"].items()}
        summary["per_class"]["num_positives"] = {k: v["num_positives"]
                                                 for k, v in voc["per_class"].items()}
    return summary


VOC_CONVENTION_TEXT = {"devkit": "devkit +1 pixels, ", "continuous": "continuous boxes, "}


def _fmt(value: float) -> str:
    return "   nan" if value is None or math.isnan(value) else f"{value:6.2f}"


def format_tables(summary: Dict[str, Any]) -> str:
    """The COCO block (12 numbers), the VOC AP50 line and the per-class table, as text."""
    lines = [f"images: {summary['num_images']}   detections: {summary['num_detections']}"]
    if "AP" in summary:
        lines.append("COCO bbox (pycocotools, percent):")
        lines.append("  " + " ".join(f"{name:>6}" for name in COCO_METRIC_NAMES))
        lines.append("  " + " ".join(_fmt(summary[name]) for name in COCO_METRIC_NAMES))
        if any(summary[name] < 0 for name in COCO_METRIC_NAMES):
            lines.append("  (-1.00: no ground-truth object of that size in these images, pycocotools' marker)")
    if "voc_AP50" in summary:
        convention = VOC_CONVENTION_TEXT.get(summary.get("voc_pixel_convention"), "")
        lines.append(f"VOC AP50 ({convention}difficult ignored): area {_fmt(summary['voc_AP50'])}   "
                     f"11-point (VOC2007) {_fmt(summary['voc_AP50_07'])}")
    columns = [c for c in ("coco_AP", "voc_AP50", "voc_AP50_07", "num_positives")
               if c in summary["per_class"]]
    if columns:
        names = list(summary["per_class"][columns[0]])
        width = max([len(n) for n in names] + [5])
        lines.append("per-class AP (percent):")
        lines.append(f"  {'class':<{width}} " + " ".join(f"{c:>13}" for c in columns))
        for name in names:
            cells = []
            for c in columns:
                v = summary["per_class"][c][name]
                cells.append(f"{v:>13d}" if c == "num_positives" else f"{_fmt(v):>13}")
            lines.append(f"  {name:<{width}} " + " ".join(cells))
    return "\n".join(lines)


def ground_truth_dict(coco_gt, image_ids: Sequence[int]) -> Dict[str, Any]:
    """The COCO instances dict of ``coco_gt`` restricted to ``image_ids`` (the evaluated
    images, so a results-mode evaluation over all its images gives the pipeline's numbers),
    with ``info.box_convention = "continuous"`` (the dataset's boxes and the detector's are
    continuous: no devkit +1 on re-evaluation), without segmentation polygons. A copy: the live
    ``coco_gt`` is not changed."""
    data = coco_gt.dataset
    keep = set(int(i) for i in image_ids)
    out = {k: v for k, v in data.items() if k not in ("images", "annotations", "info")}
    info = data.get("info")
    out["info"] = {**(info if isinstance(info, dict) else {}), "box_convention": "continuous"}
    out["images"] = [img for img in data["images"] if int(img["id"]) in keep]
    # box evaluation only: COCO's polygons would make the file tens of MB per evaluation
    out["annotations"] = [{k: v for k, v in a.items() if k != "segmentation"}
                          for a in data["annotations"] if int(a["image_id"]) in keep]
    out["categories"] = data["categories"]
    return out


def _write_outputs(summary: Dict[str, Any], results: List[Dict], out_dir: Optional[str],
                   coco_gt=None, image_ids: Optional[Sequence[int]] = None) -> None:
    if not out_dir:
        return
    write_json(results, os.path.join(out_dir, "detections.json"))
    if coco_gt is not None:
        ids = image_ids if image_ids is not None else coco_gt.getImgIds()
        write_json(ground_truth_dict(coco_gt, ids), os.path.join(out_dir, "ground_truth.json"))
    write_metrics(summary, os.path.join(out_dir, "metrics.json"))


def evaluate_model(model: torch.nn.Module, loader, dataset, out_dir: Optional[str],
                   metric: str = "coco", device="cpu", max_images: int = 0,
                   verbose: bool = True) -> Dict[str, Any]:
    """Run ``model`` over ``loader`` and evaluate against ``dataset``'s ground truth.

    Under torch.distributed every rank runs its shard (``build_loader(..., train=False)``),
    results are all-gathered, rank 0 computes the metrics, writes ``out_dir/detections.json``
    (COCO results), ``out_dir/ground_truth.json`` (what they were scored against, see the
    module docstring) and ``out_dir/metrics.json`` and prints the tables; every rank returns the
    same summary (see the module docstring). The model's train/eval mode is restored.
    ``max_images`` caps the images run PER RANK; to evaluate the first n images of the set
    whatever the world size, build the loader over ``Subset(dataset, range(n))`` instead
    (as evaluate.py does) and pass the full ``dataset`` here for the ground truth.
    """
    base = _base_dataset(dataset)
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        results, image_ids = run_inference(model, loader, base.label_to_category_id,
                                           torch.device(device), max_images)
    finally:
        model.train(was_training)
    elapsed = time.perf_counter() - start
    results, image_ids = _gather(results, image_ids)
    summary: Optional[Dict[str, Any]] = None
    if _is_main_process():
        coco_gt = base.coco_gt()
        # both sides continuous: the dataset's boxes (VOC corners already shifted by the
        # reader; a COCO file's bbox is continuous by definition) and the detector's
        summary = compute_metrics(coco_gt, results, image_ids, metric,
                                  voc_pixel_convention="continuous")
        summary["inference_seconds"] = elapsed
        _write_outputs(summary, results, out_dir, coco_gt, image_ids)
        if verbose:
            print(format_tables(summary), flush=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        holder = [summary]
        torch.distributed.broadcast_object_list(holder, src=0)
        summary = holder[0]
    return summary


def evaluate_results_file(results_json: str, ann_json: str, metric: str = "both",
                          out_dir: Optional[str] = None, verbose: bool = True,
                          voc_pixel_convention: Optional[str] = None) -> Dict[str, Any]:
    """Evaluate a saved COCO results file against a COCO instances file (no model).

    The file is a JSON list of detections (the COCO results format), or a COCO dataset dict
    with the detections under "annotations" (as some tools write them). Unknown image or
    category ids in the results are an error (``ResultsError``). Boxes are taken as they are;
    ``voc_pixel_convention`` (None: the file's ``info.box_convention``, else "devkit") says
    how VOC AP50 reads them.
    """
    coco_gt = load_coco_gt(ann_json)
    results = load_json(results_json)
    if isinstance(results, dict) and isinstance(results.get("annotations"), list):
        results = results["annotations"]
    check_results(results, coco_gt, source=results_json)
    summary = compute_metrics(coco_gt, results, None, metric, voc_pixel_convention)
    if out_dir:
        write_metrics(summary, os.path.join(out_dir, "metrics.json"))
    if verbose:
        print(format_tables(summary), flush=True)
    return summary
