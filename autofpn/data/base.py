"""The dataset class every reader (COCO, VOC, BDD, synthetic) fills with image records.

A reader parses its annotation format into a list of records, one per image::

    {"image_id": int, "path": str, "height": int, "width": int,
     "boxes": float32[N, 4] xyxy (pixels, continuous coordinates),
     "labels": int64[N] in 1..K, "iscrowd": bool[N], "difficult": bool[N]}

and ``DetectionDataset`` does the rest the same way for all formats: box cleaning (clip to
the image, drop zero-area boxes, one log line with the counts), the training filter (no crowd
boxes, no difficult boxes unless asked, images without boxes dropped unless asked), decoding,
the horizontal flip, and a COCO-format ground truth for the evaluators.

``dataset[key]`` returns ``(image: Tensor[3, H, W] float in [0, 1] at the original size,
target)`` with ``target = {"boxes": float32[N, 4] xyxy, "labels": int64[N], "image_id": int,
"orig_size": int64[2] (h, w), "iscrowd": bool[N], "difficult": bool[N]}``. ``key`` is an index,
or ``(index, aug_seed)`` as produced by the training batch sampler: the flip is then drawn
from ``aug_seed`` so augmentation depends only on (seed, epoch, index), not on worker
processes or on where a resumed run started.
"""
import contextlib
import io
import logging
import os
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .transforms import (clip_boxes_to_image, hflip_boxes, load_image, nondegenerate_mask,
                         pil_to_tensor)

class AnnotationError(ValueError):
    """A malformed annotation file or dataset; the message names the file and the entry."""


logger = logging.getLogger(__name__)

Record = Dict[str, Any]


class DetectionDataset(Dataset):
    """Image records + the shared loading logic (see the module docstring).

    Args:
        records: one dict per image (format in the module docstring).
        class_names: names of labels 1..K (index 0 of ``self.class_names`` is "__background__").
        category_ids: the dataset's own category id of each label 1..K (COCO ids are not
            contiguous: 1..90 for 80 classes); results files use these ids.
        name: shown in log lines and errors (e.g. the annotation file).
        train: training targets (no crowd / difficult boxes, random flip, images without boxes
            dropped unless ``keep_empty_images``); otherwise every image and every box with its
            flags, no augmentation.
        bad_images: an image file that is missing or does not decode (checked up front, see
            ``image_check``) "stop"s the run with the list of such files, or is "skip"ped
            (left out of training and evaluation, counted in the summary line).
        categories: a subset of ``class_names`` to keep (``data.categories``; None = all): boxes
            of the other classes are removed (not ignored) from training targets and from the
            evaluation ground truth, labels become 1..len(categories) in the given order and
            ``label_to_category_id`` keeps the dataset's own ids of the kept classes.
    """

    def __init__(self, records: List[Record], class_names: Sequence[str],
                 category_ids: Sequence[int], name: str, train: bool, hflip_prob: float = 0.5,
                 use_difficult: bool = False, keep_empty_images: bool = False, bad_images: str = "stop",
                 categories: Optional[Sequence[str]] = None):
        if len(category_ids) != len(class_names):
            raise ValueError(f"{name}: {len(class_names)} class names but "
                             f"{len(category_ids)} category ids")
        self.name = name
        self._kept_categories: Optional[List[str]] = None
        self._num_other_removed = 0  # boxes of classes outside ``categories``
        if categories is not None:  # before cleaning, so the counts are over the kept classes
            records, class_names, category_ids = self._select_categories(
                records, class_names, category_ids, categories)
        self.train = train
        self.hflip_prob = hflip_prob if train else 0.0
        self.use_difficult = use_difficult
        self.class_names: List[str] = ["__background__"] + list(class_names)
        self.label_to_category_id: List[int] = [0] + [int(c) for c in category_ids]
        self.category_id_to_label: Dict[int, int] = {
            c: i for i, c in enumerate(self.label_to_category_id) if i > 0}
        # cleaning counts for the summary line (per dataset, filled by _check_image_files / _clean)
        self._num_boxes = 0  # as annotated, before cleaning
        self._num_clipped = 0
        self._num_dropped = 0  # non-positive width or height, or entirely outside the image
        self._skipped_images: List[str] = []  # undecodable files left out (bad_images="skip")
        self._dropped_examples: List[str] = []
        self.all_records = [self._clean(r) for r in self._check_image_files(records, bad_images)]
        if train and not keep_empty_images:
            self.records = [r for r in self.all_records if self._train_mask(r).any()]
        else:
            self.records = list(self.all_records)
        # a warning when the annotations needed fixing, so it shows even when info lines do not
        logger.log(logging.WARNING if self._num_dropped or self._num_clipped or self._skipped_images else logging.INFO,
                   self.summary())
        if not self.all_records:
            raise AnnotationError(f"{name}: the {'training' if train else 'validation'} split has no images")
        if not self.records:
            raise AnnotationError(f"{name}: no training image is left: none of the {len(self.all_records)} images "
                                  f"has a usable box (set data.keep_empty_images=true to train on them anyway)")
        self._coco_gt = None

    # ---- category subset -------------------------------------------------------------------------
    def _select_categories(self, records: List[Record], class_names: Sequence[str],
                           category_ids: Sequence[int], categories: Sequence[str]
                           ) -> Tuple[List[Record], List[str], List[int]]:
        """Keep only the boxes of ``categories`` and relabel them 1..len(categories) in that order.

        Returns ``(records, class_names, category_ids)`` of the subset: each record's boxes,
        labels and flags restricted to the kept classes (an image may be left with none);
        ``category_ids`` are the dataset's own ids of the kept classes.
        """
        categories = [categories] if isinstance(categories, str) else [str(c) for c in categories]
        if not categories:
            raise AnnotationError(f"{self.name}: data.categories is empty; give class names or null for all")
        index_of = {n: i for i, n in reversed(list(enumerate(class_names)))}  # first wins on duplicates
        unknown = [c for c in categories if c not in index_of]
        if unknown:
            raise AnnotationError(f"{self.name}: data.categories: unknown class {', '.join(map(repr, unknown))}; "
                                  f"the dataset's classes: {', '.join(class_names)}")
        repeated = sorted({c for c in categories if categories.count(c) > 1})
        if repeated:
            raise AnnotationError(f"{self.name}: data.categories lists {', '.join(map(repr, repeated))} "
                                  f"more than once")
        new_label = np.zeros(len(class_names) + 1, dtype=np.int64)  # old label -> new (0: removed)
        for new, c in enumerate(categories, start=1):
            new_label[index_of[c] + 1] = new
        out = []
        for record in records:
            labels = np.asarray(record["labels"], dtype=np.int64).reshape(-1)
            n = len(labels)
            keep = new_label[labels] > 0
            self._num_other_removed += int((~keep).sum())
            subset = dict(record)
            subset["boxes"] = np.asarray(record["boxes"], dtype=np.float32).reshape(-1, 4)[keep]
            subset["labels"] = new_label[labels][keep]
            for flag in ("iscrowd", "difficult"):
                if record.get(flag) is not None:
                    subset[flag] = np.asarray(record[flag], dtype=bool).reshape(n)[keep]
            out.append(subset)
        self._kept_categories = categories
        return out, categories, [int(category_ids[index_of[c]]) for c in categories]

    # ---- annotation cleaning -----------------------------------------------------------------
    MAX_NAMED = 3  # entries named in the summary line

    def _clean(self, record: Record) -> Record:
        """Clip boxes to the image and drop zero-area ones (counted and the first few named for
        the summary line): a box with non-positive width or height, or one outside the image."""
        raw = np.asarray(record["boxes"], dtype=np.float32).reshape(-1, 4)
        boxes, num_clipped = clip_boxes_to_image(raw, record["height"], record["width"])
        keep = nondegenerate_mask(boxes)
        self._num_boxes += len(raw)
        self._num_clipped += num_clipped
        self._num_dropped += int((~keep).sum())
        for i in np.flatnonzero(~keep)[:max(0, self.MAX_NAMED - len(self._dropped_examples))]:
            x1, y1, x2, y2 = (float(v) for v in raw[i])
            why = "non-positive width or height" if x2 <= x1 or y2 <= y1 else "outside the image"
            self._dropped_examples.append(f"{os.path.basename(record['path'])} box {int(i)} "
                                          f"[{x1:g}, {y1:g}, {x2:g}, {y2:g}] ({why})")
        n = len(keep)
        out = dict(record)
        out["boxes"] = boxes[keep]
        out["labels"] = np.asarray(record["labels"], dtype=np.int64).reshape(n)[keep]
        for flag in ("iscrowd", "difficult"):
            values = record.get(flag)
            values = np.zeros(n, dtype=bool) if values is None else np.asarray(values, bool)
            out[flag] = values.reshape(n)[keep]
        return out

    def _check_image_files(self, records: List[Record], bad_images: str) -> List[Record]:
        """The records whose image file exists and decodes (``image_check``: cached, so a later
        run only stats the files); a missing or undecodable one stops the run before the first
        iteration, rather than at the final evaluation, or is left out with ``bad_images="skip"``."""
        if bad_images not in ("stop", "skip"):
            raise ValueError(f"bad_images must be 'stop' or 'skip', got {bad_images!r}")
        missing = [r["path"] for r in records if not os.path.isfile(r["path"])]
        if missing and bad_images == "stop":  # a wrong root: say so without decoding anything
            raise AnnotationError(f"{self.name}: {len(missing)} of {len(records)} image files are missing, "
                                  f"e.g. {', '.join(missing[:self.MAX_NAMED])}")
        from .image_check import find_bad_images
        bad = dict(find_bad_images([r["path"] for r in records], self.name))
        if bad and bad_images == "stop":
            named = "; ".join(f"{p} ({why})" for p, why in list(bad.items())[:self.MAX_NAMED])
            raise AnnotationError(f"{self.name}: {len(bad)} of {len(records)} images cannot be decoded: {named}"
                                  f"{' ...' if len(bad) > self.MAX_NAMED else ''}; fix or remove them, or set "
                                  f"data.bad_images=skip to leave them out")
        self._skipped_images = [p for p in bad]
        return [r for r in records if r["path"] not in bad]

    def summary(self) -> str:
        """One line: images, boxes, what the cleaning dropped or clipped (first entries named)."""
        text = f"{self.name}: {len(self.all_records)} images, {self._num_boxes} boxes"
        if self._kept_categories is not None:
            text += (f" (data.categories: kept {', '.join(self._kept_categories)}; "
                     f"{self._num_other_removed} boxes of other classes removed)")
        if self._skipped_images:
            text += (f"; {len(self._skipped_images)} images left out because they cannot be decoded "
                     f"(data.bad_images=skip), e.g. {', '.join(self._skipped_images[:self.MAX_NAMED])}")
        if self._num_dropped:
            text += (f"; {self._num_dropped} boxes dropped (non-positive size or outside the image), e.g. "
                     + "; ".join(self._dropped_examples))
        if self._num_clipped:
            text += f"; {self._num_clipped} boxes clipped to the image"
        if self.train:
            text += (f"; {len(self.records)} training images ({len(self.all_records) - len(self.records)} "
                     f"without usable boxes left out)")
        return text

    @property
    def num_clipped_boxes(self) -> int:
        return self._num_clipped

    @property
    def num_dropped_boxes(self) -> int:
        return self._num_dropped

    def _train_mask(self, record: Record) -> np.ndarray:
        """bool[N]: boxes used as training targets."""
        mask = ~record["iscrowd"]
        if not self.use_difficult:
            mask &= ~record["difficult"]
        return mask

    # ---- Dataset protocol -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: Union[int, Tuple[int, int]]):
        index, aug_seed = (key if isinstance(key, tuple) else (key, None))
        record = self.records[index]
        image = load_image(record["path"])
        width, height = image.size
        mask = self._train_mask(record) if self.train else np.ones(len(record["boxes"]), bool)
        boxes = record["boxes"][mask]
        if (height, width) != (record["height"], record["width"]):
            # the annotation's size disagrees with the file (e.g. an EXIF rotation the
            # annotation tool ignored): keep boxes inside the decoded image
            boxes, _ = clip_boxes_to_image(boxes, height, width)
        if self.hflip_prob > 0:
            rng = random.Random(aug_seed) if aug_seed is not None else random
            if rng.random() < self.hflip_prob:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
                boxes = hflip_boxes(boxes, width)
        target = {
            "boxes": torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
            "labels": torch.from_numpy(record["labels"][mask].copy()),
            "image_id": int(record["image_id"]),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "iscrowd": torch.from_numpy(record["iscrowd"][mask].copy()),
            "difficult": torch.from_numpy(record["difficult"][mask].copy()),
        }
        return pil_to_tensor(image), target

    # ---- helpers for samplers and evaluators ----------------------------------------------------
    def aspect_ratios(self) -> List[float]:
        """width / height of every image, from the annotations (no decoding)."""
        return [r["width"] / r["height"] for r in self.records]

    @property
    def image_ids(self) -> List[int]:
        return [int(r["image_id"]) for r in self.records]

    @property
    def num_classes(self) -> int:
        """K + 1 (background included), as ``model.num_classes`` counts."""
        return len(self.class_names)

    def coco_gt_dict(self) -> Dict[str, Any]:
        """All images and boxes as a COCO instances dict (bbox = [x, y, w, h]).

        Crowd and difficult boxes become ``iscrowd=1`` (COCOeval ignores them); the VOC
        evaluator reads the extra ``difficult`` key.
        """
        images, annotations = [], []
        for r in self.all_records:
            images.append({"id": int(r["image_id"]), "file_name": r["path"],
                           "height": int(r["height"]), "width": int(r["width"])})
            for box, label, crowd, difficult in zip(r["boxes"], r["labels"], r["iscrowd"],
                                                    r["difficult"]):
                x1, y1, x2, y2 = (float(v) for v in box)
                annotations.append({
                    "id": len(annotations) + 1, "image_id": int(r["image_id"]),
                    "category_id": self.label_to_category_id[int(label)],
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": int(bool(crowd) or bool(difficult)),
                    "difficult": int(bool(difficult))})
        categories = [{"id": c, "name": n} for c, n in
                      zip(self.label_to_category_id[1:], self.class_names[1:])]
        # continuous coordinates (the VOC reader shifted the XML's inclusive pixel corners), so
        # the VOC evaluator must not add the devkit's +1 again
        return {"info": {"box_convention": "continuous"}, "images": images, "annotations": annotations,
                "categories": categories}

    def coco_gt(self):
        """A pycocotools ``COCO`` ground truth for this dataset (built once)."""
        if self._coco_gt is None:
            self._coco_gt = coco_from_dict(self.coco_gt_dict())
        return self._coco_gt


def coco_from_dict(data: Dict[str, Any]):
    """A pycocotools ``COCO`` from an in-memory instances dict (without its index printout)."""
    from pycocotools.coco import COCO
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def parse_names(value: Optional[Union[str, Sequence[str]]], default: Sequence[str]) -> List[str]:
    """A class list from the config: None -> ``default``; a list as is."""
    if value is None:
        return list(default)
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]
