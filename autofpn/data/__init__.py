"""Datasets (COCO, VOC, BDD100K, the embedded synthetic shapes) and loaders.

``build_dataset(cfg, split)`` and ``build_loader(cfg, dataset, train)`` are the entry points;
see ``autofpn/data/loader.py``.
"""
from .base import DetectionDataset
from .bdd import BddDataset
from .coco import AnnotationError, CocoDataset
from .loader import (build_dataset, build_loader, check_num_classes, collate_detection,
                     resolve_num_classes)
from .samplers import GroupedBatchSampler, InferenceSampler
from .synthetic import SHAPE_CLASSES, ensure_synthetic
from .transforms import ImageLoadError, load_image
from .voc import VOC_CLASSES, VocDataset

__all__ = ["AnnotationError", "BddDataset", "CocoDataset", "DetectionDataset",
           "GroupedBatchSampler", "ImageLoadError", "InferenceSampler", "SHAPE_CLASSES",
           "VOC_CLASSES", "VocDataset", "build_dataset", "build_loader", "check_num_classes", "collate_detection",
           "resolve_num_classes",
           "ensure_synthetic", "load_image"]
