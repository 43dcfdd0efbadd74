"""Evaluation: COCO (pycocotools) and VOC AP50 (11-point and area), inference over a loader.

``evaluate_model(model, loader, dataset, out_dir, metric, device)`` and
``evaluate_results_file(results_json, ann_json, metric)`` are the entry points.
"""
from .coco import COCO_METRIC_NAMES, ResultsError, check_results, evaluate_coco
from .inference import (compute_metrics, evaluate_model, evaluate_results_file, format_tables,
                        run_inference)
from .voc import evaluate_voc, voc_ap

__all__ = ["COCO_METRIC_NAMES", "ResultsError", "check_results", "compute_metrics",
           "evaluate_coco", "evaluate_model", "evaluate_results_file", "evaluate_voc",
           "format_tables", "run_inference", "voc_ap"]
