"""Pascal VOC XML in the standard layout, several roots / splits joined (07+12 trainval).

Layout of each root: ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg``,
``ImageSets/Main/<split>.txt``. VOC boxes are 1-based inclusive pixel indices; like detectron2
we store ``[xmin - 1, ymin - 1, xmax, ymax]`` in continuous coordinates, so a continuous IoU
here equals the devkit's ``+1`` IoU on the raw numbers. ``difficult`` is kept for evaluation
and left out of training targets unless ``use_difficult``.
"""
import os
import xml.etree.ElementTree as ET
from typing import List, Optional, Sequence, Union

import numpy as np

from .base import DetectionDataset
from .coco import AnnotationError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")


def _as_list(value: Union[str, Sequence[str]]) -> List[str]:
    return [value] if isinstance(value, str) else list(value)


def _text(node: ET.Element, tag: str, where: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None:
        raise AnnotationError(f"{where}: missing <{tag}>")
    return child.text.strip()


def parse_voc_xml(xml_path: str, class_names: Sequence[str]) -> dict:
    """One VOC annotation file -> record fields (boxes xyxy continuous, labels 1..K, flags)."""
    try:
        root = ET.parse(xml_path).getroot()
    except FileNotFoundError as e:
        raise AnnotationError(f"annotation file not found: {xml_path}") from e
    except ET.ParseError as e:
        line, column = e.position
        raise AnnotationError(f"{xml_path}: malformed XML at line {line} column {column}: "
                              f"{e}") from e
    size = root.find("size")
    if size is None:
        raise AnnotationError(f"{xml_path}: missing <size>")
    height = int(_text(size, "height", xml_path))
    width = int(_text(size, "width", xml_path))
    label_of = {name: i + 1 for i, name in enumerate(class_names)}
    boxes, labels, difficult = [], [], []
    for k, obj in enumerate(root.findall("object")):
        where = f"{xml_path}: object {k}"
        name = _text(obj, "name", where)
        if name not in label_of:
            raise AnnotationError(f"{where}: unknown class '{name}'; known classes: "
                                  f"{', '.join(class_names)}")
        bndbox = obj.find("bndbox")
        if bndbox is None:
            raise AnnotationError(f"{where}: missing <bndbox>")
        try:
            x1, y1, x2, y2 = (float(_text(bndbox, t, where))
                              for t in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as e:
            raise AnnotationError(f"{where}: non-numeric box coordinate: {e}") from e
        boxes.append([x1 - 1.0, y1 - 1.0, x2, y2])
        labels.append(label_of[name])
        flag = obj.find("difficult")
        difficult.append(flag is not None and flag.text is not None and int(flag.text) == 1)
    return {"height": height, "width": width,
            "boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
            "labels": np.array(labels, dtype=np.int64),
            "difficult": np.array(difficult, dtype=bool),
            "iscrowd": np.zeros(len(labels), dtype=bool)}


class VocDataset(DetectionDataset):
    """Pascal VOC detection dataset over one or more (root, split) pairs.

    Args:
        roots: a VOC root (``.../VOC2012``) or a list of them.
        splits: an ImageSets/Main split name, or one per root (``["trainval", "trainval"]``
            for 07+12); a single name applies to every root.
        class_names: the class list (default: the 20 VOC classes); an object of another class
            is an error listing these.
        use_difficult: train on difficult boxes too.
    Image ids are 1..N in the order read; ``record["voc_id"]`` keeps "2007_000027".
    """

    def __init__(self, roots: Union[str, Sequence[str]], splits: Union[str, Sequence[str]],
                 train: bool, class_names: Optional[Sequence[str]] = None,
                 hflip_prob: float = 0.5, use_difficult: bool = False,
                 keep_empty_images: bool = False, bad_images: str = "stop"):
        roots, splits = _as_list(roots), _as_list(splits)
        if len(splits) == 1:
            splits = splits * len(roots)
        if len(splits) != len(roots):
            raise ValueError(f"VOC: {len(roots)} roots but {len(splits)} splits; give one split "
                             f"or one per root")
        class_names = list(class_names or VOC_CLASSES)
        records = []
        for root, split in zip(roots, splits):
            list_file = os.path.join(root, "ImageSets", "Main", f"{split}.txt")
            if not os.path.isfile(list_file):
                raise AnnotationError(f"VOC split file not found: {list_file}")
            with open(list_file) as f:
                voc_ids = [line.split()[0] for line in f if line.strip()]
            for voc_id in voc_ids:
                record = parse_voc_xml(os.path.join(root, "Annotations", f"{voc_id}.xml"),
                                       class_names)
                record.update(image_id=len(records) + 1, voc_id=voc_id,
                              path=os.path.join(root, "JPEGImages", f"{voc_id}.jpg"))
                records.append(record)
        name = " + ".join(f"{root}:{split}" for root, split in zip(roots, splits))
        super().__init__(records, class_names, list(range(1, len(class_names) + 1)), name,
                         train=train, hflip_prob=hflip_prob, use_difficult=use_difficult,
                         keep_empty_images=keep_empty_images, bad_images=bad_images)
