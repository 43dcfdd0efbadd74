"""BDD100K detection labels (the JSON list of frames).

Format: ``[{"name": "b1c66a42-6f7d68ca.jpg", "labels": [{"category": "car",
"box2d": {"x1": .., "y1": .., "x2": .., "y2": ..}, ...}, ...]}, ...]``. Labels without a
``box2d`` (lanes, drivable area in the older release) are skipped; the categories in
``BDD_IGNORED`` (present in the 2020 release, not among the 10 evaluated classes) are skipped
and counted; any other unknown category is an error listing the known ones. Image sizes are
read from the file headers (BDD JSON does not store them; PIL reads the header only).
"""
import logging
import os
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from .base import DetectionDataset
from .coco import AnnotationError, load_json
from .transforms import ImageLoadError

logger = logging.getLogger(__name__)

BDD_CLASSES = ("pedestrian", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
               "traffic light", "traffic sign")
# names of the 2018 release -> the 2020 names above
BDD_ALIASES = {"person": "pedestrian", "bike": "bicycle", "motor": "motorcycle"}
BDD_IGNORED = ("other person", "other vehicle", "trailer")


def _image_size(path: str):
    try:
        with Image.open(path) as img:
            return img.size  # (w, h)
    except FileNotFoundError as e:
        raise ImageLoadError(f"image file not found: {path}") from e
    except OSError as e:
        raise ImageLoadError(f"cannot decode image {path}: {e}") from e


class BddDataset(DetectionDataset):
    """BDD100K detection.

    Args:
        image_root: folder holding the ``name`` files (e.g. ``bdd100k/images/100k/val``).
        ann_file: the labels JSON (e.g. ``det_val.json``).
        class_names: default ``BDD_CLASSES``.
        categories: a subset of the classes to keep, see ``DetectionDataset``.
    """

    def __init__(self, image_root: str, ann_file: str, train: bool,
                 class_names: Optional[Sequence[str]] = None, hflip_prob: float = 0.5,
                 keep_empty_images: bool = False, bad_images: str = "stop",
                 categories: Optional[Sequence[str]] = None):
        frames = load_json(ann_file)
        if not isinstance(frames, list):
            raise AnnotationError(f"{ann_file}: BDD labels must be a list of frames, got "
                                  f"{type(frames).__name__}")
        class_names = list(class_names or BDD_CLASSES)
        label_of = {name: i + 1 for i, name in enumerate(class_names)}
        records, num_ignored = [], 0
        for f_index, frame in enumerate(frames):
            if not isinstance(frame, dict) or "name" not in frame:
                raise AnnotationError(f"{ann_file}: frame {f_index} has no 'name'")
            boxes, labels = [], []
            for l_index, label in enumerate(frame.get("labels") or []):
                box = label.get("box2d")
                if box is None:
                    continue
                where = f"{ann_file}: frame {f_index} ({frame['name']}) label {l_index}"
                category = BDD_ALIASES.get(label.get("category"), label.get("category"))
                if category not in label_of:
                    if category in BDD_IGNORED:
                        num_ignored += 1
                        continue
                    raise AnnotationError(f"{where}: unknown category {category!r}; known "
                                          f"categories: {', '.join(class_names)}")
                try:
                    boxes.append([float(box[k]) for k in ("x1", "y1", "x2", "y2")])
                except (KeyError, TypeError, ValueError) as e:
                    raise AnnotationError(f"{where}: box2d needs numeric x1, y1, x2, y2, got "
                                          f"{box!r}") from e
                labels.append(label_of[category])
            path = os.path.join(image_root, frame["name"])
            width, height = _image_size(path)
            records.append({"image_id": f_index + 1, "path": path, "height": height,
                            "width": width, "boxes": np.array(boxes, np.float32).reshape(-1, 4),
                            "labels": np.array(labels, dtype=np.int64), "name": frame["name"]})
        if num_ignored:
            logger.info("%s: %d boxes of ignored categories (%s) skipped", ann_file, num_ignored,
                        ", ".join(BDD_IGNORED))
        super().__init__(records, class_names, list(range(1, len(class_names) + 1)), ann_file,
                         train=train, hflip_prob=hflip_prob, keep_empty_images=keep_empty_images,
                         bad_images=bad_images, categories=categories)
