"""COCO instances JSON (and any custom dataset converted to it, see docs/DATA.md).

Category ids (COCO: 1..90 with gaps) map to contiguous labels 1..K in sorted id order and back
through ``dataset.label_to_category_id``. ``iscrowd`` boxes are kept for evaluation and left out
of training targets. The annotation file is parsed by us (so a truncated file is reported with
its position) and handed to pycocotools as a ``COCO`` object, which the COCO evaluator reuses.
"""
import json
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .base import AnnotationError, DetectionDataset, coco_from_dict


def load_json(path: str) -> Any:
    """``json.load`` with errors that name the file and the line / column / character."""
    if not os.path.isfile(path):
        raise AnnotationError(f"annotation file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise AnnotationError(f"{path}: not UTF-8 text (byte {e.start})") from e
    except json.JSONDecodeError as e:
        # a string running to the end of the file, or an error at the very end = truncation
        at_end = e.pos >= len(raw.rstrip()) or e.msg.startswith("Unterminated string")
        truncated = " (file looks truncated)" if at_end else ""
        raise AnnotationError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} "
                              f"(char {e.pos}){truncated}: {e.msg}") from e


def check_coco_dict(data: Any, path: str) -> None:
    """Structure checks pycocotools does not do; errors name the file and the entry."""
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: top level must be an object with images / annotations "
                              f"/ categories, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise AnnotationError(f"{path}: missing key '{key}'")
        if not isinstance(data[key], list):
            raise AnnotationError(f"{path}: '{key}' must be a list")
    image_ids = set()
    for i, img in enumerate(data["images"]):
        for key in ("id", "file_name", "height", "width"):
            if key not in img:
                raise AnnotationError(f"{path}: images[{i}] has no '{key}'")
        image_ids.add(img["id"])
    category_ids = set()
    for i, cat in enumerate(data["categories"]):
        if "id" not in cat or "name" not in cat:
            raise AnnotationError(f"{path}: categories[{i}] needs 'id' and 'name'")
        category_ids.add(cat["id"])
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}] (id {ann.get('id')})"
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4
                and all(isinstance(v, (int, float)) for v in bbox)):
            raise AnnotationError(f"{where}: 'bbox' must be [x, y, w, h], got {bbox!r}")
        if ann.get("image_id") not in image_ids:
            raise AnnotationError(f"{where}: unknown image_id {ann.get('image_id')!r}")
        if ann.get("category_id") not in category_ids:
            raise AnnotationError(f"{where}: unknown category_id {ann.get('category_id')!r}")


def load_coco_gt(path: str):
    """Read and check a COCO instances file -> pycocotools ``COCO`` object."""
    data = load_json(path)
    check_coco_dict(data, path)
    for ann in data["annotations"]:  # optional in converted files, but COCOeval reads it
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
    return coco_from_dict(data)


class CocoDataset(DetectionDataset):
    """COCO-format detection dataset.

    Args:
        image_root: folder the ``file_name`` entries are relative to.
        ann_file: instances JSON.
        train / hflip_prob / keep_empty_images / bad_images / categories: see
            ``DetectionDataset`` (``categories`` are names from the file's ``categories``).
    """

    def __init__(self, image_root: str, ann_file: str, train: bool, hflip_prob: float = 0.5,
                 keep_empty_images: bool = False, bad_images: str = "stop",
                 categories: Optional[Sequence[str]] = None):
        coco = load_coco_gt(ann_file)
        file_categories = sorted(coco.dataset["categories"], key=lambda c: c["id"])
        category_ids = [c["id"] for c in file_categories]
        label_of = {c: i + 1 for i, c in enumerate(category_ids)}
        records: List[Dict[str, Any]] = []
        for image_id in sorted(coco.imgs):
            img = coco.imgs[image_id]
            anns = coco.imgToAnns.get(image_id, [])
            boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
            boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
            records.append({
                "image_id": image_id, "path": os.path.join(image_root, img["file_name"]),
                "height": int(img["height"]), "width": int(img["width"]), "boxes": boxes,
                "labels": np.array([label_of[a["category_id"]] for a in anns], dtype=np.int64),
                "iscrowd": np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool),
                "difficult": np.zeros(len(anns), dtype=bool)})
        super().__init__(records, [c["name"] for c in file_categories], category_ids, ann_file,
                         train=train, hflip_prob=hflip_prob, keep_empty_images=keep_empty_images,
                         bad_images=bad_images, categories=categories)
        if categories is not None:  # the removed classes are not ground truth either
            kept = set(self.label_to_category_id[1:])
            data = dict(coco.dataset)
            data["annotations"] = [a for a in data["annotations"] if a["category_id"] in kept]
            data["categories"] = [c for c in data["categories"] if c["id"] in kept]
            coco = coco_from_dict(data)
        # evaluate against the file as pycocotools reads it (unclipped boxes, the file's areas)
        self._coco_gt = coco
