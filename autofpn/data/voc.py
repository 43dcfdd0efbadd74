"""Pascal VOC XML: the standard layout, several roots / splits joined (07+12 trainval), or a
plain folder of XML files beside an images folder (the common export of annotation tools).

Layout of each root: ``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg``,
``ImageSets/Main/<split>.txt``. A plain folder (``VocFolderDataset``) has no split files: the
folder is used whole, or split into train / val with a seed (``split_voc_folder``), and the
class list is read from the files when not given (``voc_folder_class_names``). VOC boxes are 1-based inclusive pixel indices; like detectron2
we store ``[xmin - 1, ymin - 1, xmax, ymax]`` in continuous coordinates, so a continuous IoU
here equals the devkit's ``+1`` IoU on the raw numbers. ``difficult`` is kept for evaluation
and left out of training targets unless ``use_difficult``.
"""
import logging
import os
import random
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .base import DetectionDataset
from .coco import AnnotationError

logger = logging.getLogger(__name__)

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


def _read_xml(xml_path: str) -> ET.Element:
    """The root element of an annotation file; errors name the file (and line / column)."""
    try:
        return ET.parse(xml_path).getroot()
    except FileNotFoundError as e:
        raise AnnotationError(f"annotation file not found: {xml_path}") from e
    except ET.ParseError as e:
        line, column = e.position
        raise AnnotationError(f"{xml_path}: malformed XML at line {line} column {column}: "
                              f"{e}") from e


def parse_voc_xml(xml_path: str, class_names: Sequence[str]) -> dict:
    """One VOC annotation file -> record fields (boxes xyxy continuous, labels 1..K, flags;
    ``filename``: the XML's ``<filename>`` or None)."""
    root = _read_xml(xml_path)
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
    filename = root.find("filename")
    return {"height": height, "width": width,
            "filename": filename.text.strip() if filename is not None and filename.text else None,
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
        categories: a subset of the classes to keep, see ``DetectionDataset``.
    Image ids are 1..N in the order read; ``record["voc_id"]`` keeps "2007_000027".
    """

    def __init__(self, roots: Union[str, Sequence[str]], splits: Union[str, Sequence[str]],
                 train: bool, class_names: Optional[Sequence[str]] = None,
                 hflip_prob: float = 0.5, use_difficult: bool = False,
                 keep_empty_images: bool = False, bad_images: str = "stop",
                 categories: Optional[Sequence[str]] = None):
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
                         keep_empty_images=keep_empty_images, bad_images=bad_images,
                         categories=categories)


# ---- a plain folder of XML files (no ImageSets) ---------------------------------------------------
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp")  # tried, in this order, for <stem>.<ext>


def voc_folder_files(ann_dir: str) -> List[str]:
    """The ``*.xml`` file names of an annotation folder, sorted (an error when there are none)."""
    if not os.path.isdir(ann_dir):
        raise AnnotationError(f"VOC annotation folder not found: {ann_dir}")
    names = sorted(n for n in os.listdir(ann_dir) if n.lower().endswith(".xml"))
    if not names:
        raise AnnotationError(f"{ann_dir}: no .xml annotation files in this folder")
    return names


def split_voc_folder(names: Sequence[str], val_fraction: float, seed: int,
                     where: str = "data.split") -> Tuple[List[str], List[str]]:
    """A seeded train / val split of a folder's files -> ``(train, val)``, both sorted.

    The sorted names are shuffled with ``random.Random(seed)`` (the same on every platform and
    Python version) and the first ``round(len * val_fraction)`` go to val, at least 1 and at
    most ``len - 1``: every file is in exactly one half and neither half is empty.
    """
    if not 0.0 < val_fraction < 1.0:
        raise AnnotationError(f"{where}.val_fraction = {val_fraction!r}: expected a number "
                              f"between 0 and 1 (exclusive)")
    if len(names) < 2:
        raise AnnotationError(f"{where}: {len(names)} annotation file(s) cannot be split into a "
                              f"train and a val part; give val its own folder")
    order = sorted(names)
    random.Random(seed).shuffle(order)
    num_val = min(max(1, round(len(order) * val_fraction)), len(order) - 1)
    return sorted(order[num_val:]), sorted(order[:num_val])


_FOLDER_CLASSES: Dict[tuple, List[str]] = {}  # (folder, files, mtimes) -> class list, so it is logged once


def voc_folder_class_names(ann_dirs: Union[str, Sequence[str]]) -> List[str]:
    """The sorted set of object ``<name>``s over all the XML files of the folder(s): the whole
    folder, not a split half, so train and val get the same list. Logged once per folder set
    (and cached while the files are unchanged)."""
    ann_dirs = sorted({os.path.abspath(d) for d in _as_list(ann_dirs)})
    paths = [os.path.join(d, n) for d in ann_dirs for n in voc_folder_files(d)]
    key = tuple((p, os.stat(p).st_mtime_ns) for p in paths)
    if key not in _FOLDER_CLASSES:
        names = set()
        for path in paths:
            for k, obj in enumerate(_read_xml(path).findall("object")):
                names.add(_text(obj, "name", f"{path}: object {k}"))
        if not names:
            raise AnnotationError(f"{', '.join(ann_dirs)}: no <object> in any annotation file, so no "
                                  f"class list; set data.class_names")
        _FOLDER_CLASSES[key] = sorted(names)
        logger.info("%s: %d classes read from the %d annotation files (set data.class_names to "
                    "fix the list): %s", ", ".join(ann_dirs), len(names), len(paths),
                    ", ".join(_FOLDER_CLASSES[key]))
    return list(_FOLDER_CLASSES[key])


def image_listing(image_dir: str) -> Dict[str, str]:
    """File name -> itself and lower-cased file name -> actual name, for the files of
    ``image_dir`` (one ``listdir`` for the whole dataset; an exact name wins over a case match)."""
    names = sorted(os.listdir(image_dir))
    listing = {n.lower(): n for n in reversed(names)}
    listing.update((n, n) for n in names)
    return listing


def find_image(image_dir: str, stem: str, filename: Optional[str], listing: Dict[str, str]) -> str:
    """The image file of annotation ``<stem>.xml``: the XML's ``<filename>`` when that file is in
    ``image_dir``, else ``<stem>.<ext>`` for ``IMAGE_EXTENSIONS`` (case-insensitive); when none
    exists, ``<stem>.jpg`` (reported by the missing-image check). ``listing``: ``image_listing``."""
    candidates = [os.path.basename(filename)] if filename else []
    candidates += [f"{stem}.{ext}" for ext in IMAGE_EXTENSIONS]
    for name in candidates:
        actual = listing.get(name, listing.get(name.lower()))
        if actual is not None:
            return os.path.join(image_dir, actual)
    return os.path.join(image_dir, f"{stem}.jpg")


class VocFolderDataset(DetectionDataset):
    """VOC XML files in one folder beside an images folder, without ImageSets.

    Args:
        annotations: the folder of ``<stem>.xml`` files.
        images: the image folder (file lookup: ``find_image``).
        part: "train" or "val": that half of the seeded split (``split_voc_folder``) of the
            folder; None: the whole folder.
        val_fraction / split_seed: the split (``data.split``).
        class_names: the class list; None: read from all the folder's files
            (``voc_folder_class_names``).
        use_difficult / categories / ...: see ``VocDataset``.
    Image ids are the 1-based positions of the files in the sorted folder (the same for an image
    in whichever half it falls); ``record["voc_id"]`` is the file stem.
    """

    def __init__(self, annotations: str, images: str, train: bool, part: Optional[str] = None,
                 val_fraction: float = 0.2, split_seed: int = 0,
                 class_names: Optional[Sequence[str]] = None, hflip_prob: float = 0.5,
                 use_difficult: bool = False, keep_empty_images: bool = False,
                 bad_images: str = "stop", categories: Optional[Sequence[str]] = None):
        files = voc_folder_files(annotations)
        if part is None:
            selected = files
        elif part in ("train", "val"):
            selected = split_voc_folder(files, val_fraction, split_seed)[part == "val"]
        else:
            raise ValueError(f"part must be 'train', 'val' or None, got {part!r}")
        if not os.path.isdir(images):
            raise AnnotationError(f"VOC image folder not found: {images}")
        class_names = list(class_names) if class_names else voc_folder_class_names(annotations)
        listing = image_listing(images)
        image_id_of = {n: i + 1 for i, n in enumerate(files)}
        records = []
        for xml_name in selected:
            stem = os.path.splitext(xml_name)[0]
            record = parse_voc_xml(os.path.join(annotations, xml_name), class_names)
            record.update(image_id=image_id_of[xml_name], voc_id=stem,
                          path=find_image(images, stem, record["filename"], listing))
            records.append(record)
        name = annotations if part is None else f"{annotations} ({part} part)"
        super().__init__(records, class_names, list(range(1, len(class_names) + 1)), name,
                         train=train, hflip_prob=hflip_prob, use_difficult=use_difficult,
                         keep_empty_images=keep_empty_images, bad_images=bad_images,
                         categories=categories)
