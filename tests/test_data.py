"""Dataset readers (COCO, VOC, BDD), image decoding and bad inputs."""
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autofpn.config import load_config
from autofpn.data import (AnnotationError, BddDataset, CocoDataset, ImageLoadError, VocDataset,
                          build_dataset, load_image)
from autofpn.data.transforms import hflip

SHARED = Path(__file__).resolve().parents[2] / "shared"
COCO128 = SHARED / "data" / "coco128"
VOC_MINI = SHARED / "data" / "voc_mini" / "VOC2012"


def _save(path: Path, size=(40, 30), color=(200, 10, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _coco_fixture(tmp_path: Path, annotations, images=None, categories=None) -> Path:
    images = images or [{"id": 1, "file_name": "a.jpg", "height": 30, "width": 40},
                        {"id": 2, "file_name": "b.jpg", "height": 30, "width": 40}]
    for img in images:
        _save(tmp_path / img["file_name"], (img["width"], img["height"]))
    data = {"images": images, "annotations": annotations,
            "categories": categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]}
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return ann


# ---- COCO ------------------------------------------------------------------------------------
def test_coco_crowd_empty_and_category_mapping(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 2, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [5, 5, 20, 20], "iscrowd": 1}]
    ann = _coco_fixture(tmp_path, anns)
    train = CocoDataset(str(tmp_path), str(ann), train=True, hflip_prob=0.0)
    # image 2 has no annotations: dropped from training unless asked
    assert len(train) == 1 and train.class_names == ["__background__", "cat", "dog"]
    assert train.label_to_category_id == [0, 3, 7] and train.category_id_to_label == {3: 1, 7: 2}
    image, target = train[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert target["boxes"].tolist() == [[1.0, 2.0, 11.0, 7.0]]  # crowd box left out
    assert target["labels"].tolist() == [2] and target["labels"].dtype == torch.int64
    assert target["orig_size"].tolist() == [30, 40] and target["image_id"] == 1
    with_empty = CocoDataset(str(tmp_path), str(ann), train=True, keep_empty_images=True)
    assert len(with_empty) == 2
    val = CocoDataset(str(tmp_path), str(ann), train=False)
    assert len(val) == 2
    _, target = val[0]  # evaluation keeps crowd boxes with their flag
    assert target["labels"].tolist() == [2, 1] and target["iscrowd"].tolist() == [False, True]


def test_coco128_reader():
    if not COCO128.is_dir():
        pytest.skip("coco128 not available")
    ann = COCO128 / "annotations" / "instances_val2017.json"
    ds = CocoDataset(str(COCO128 / "val2017"), str(ann), train=False)
    raw = json.loads(ann.read_text())
    assert len(ds) == len(raw["images"]) and ds.num_classes == 81
    assert sorted(ds.label_to_category_id[1:]) == sorted(c["id"] for c in raw["categories"])
    image, target = ds[3]
    info = next(i for i in raw["images"] if i["id"] == target["image_id"])
    assert tuple(image.shape[1:]) == (info["height"], info["width"])
    gt = [a for a in raw["annotations"] if a["image_id"] == target["image_id"]]
    cats = sorted(ds.label_to_category_id[int(l)] for l in target["labels"])
    assert cats == sorted(a["category_id"] for a in gt)
    boxes = target["boxes"]
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 2] <= info["width"]).all()


def test_truncated_json_names_file_and_position(tmp_path):
    ann = _coco_fixture(tmp_path, [])
    text = ann.read_text()
    ann.write_text(text[: len(text) // 2])
    with pytest.raises(AnnotationError, match=r"ann\.json: invalid JSON at line 1 column \d+ "
                                              r"\(char \d+\) \(file looks truncated\)"):
        CocoDataset(str(tmp_path), str(ann), train=True)


def test_malformed_coco_entries_are_named(tmp_path):
    ann = _coco_fixture(tmp_path, [{"id": 9, "image_id": 1, "category_id": 3, "bbox": [1, 2]}])
    with pytest.raises(AnnotationError, match=r"annotations\[0\] \(id 9\): 'bbox' must be"):
        CocoDataset(str(tmp_path), str(ann), train=True)
    ann = _coco_fixture(tmp_path, [{"id": 9, "image_id": 5, "category_id": 3, "bbox": [1, 2, 3, 4]}])
    with pytest.raises(AnnotationError, match="unknown image_id 5"):
        CocoDataset(str(tmp_path), str(ann), train=True)
    (tmp_path / "ann.json").write_text(json.dumps({"images": []}))
    with pytest.raises(AnnotationError, match="missing key 'annotations'"):
        CocoDataset(str(tmp_path), str(ann), train=True)


def test_boxes_clipped_and_zero_area_dropped_with_log(tmp_path, caplog):
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [-5, 10, 20, 10], "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [30, 20, 30, 30], "iscrowd": 0},
            {"id": 3, "image_id": 1, "category_id": 7, "bbox": [10, 10, 0, 5], "iscrowd": 0},
            {"id": 4, "image_id": 1, "category_id": 7, "bbox": [50, 5, 10, 5], "iscrowd": 0}]
    ann = _coco_fixture(tmp_path, anns)
    with caplog.at_level(logging.WARNING):
        ds = CocoDataset(str(tmp_path), str(ann), train=True, hflip_prob=0.0)
    # box 1 and 2 clipped; box 3 zero width, box 4 entirely right of the 40 px image: dropped
    assert ds.num_clipped_boxes == 3 and ds.num_dropped_boxes == 2
    assert ("ann.json: 2 images, 4 boxes; 2 boxes dropped (non-positive size or outside the image), e.g. "
            "a.jpg box 2 [10, 10, 10, 15] (non-positive width or height); a.jpg box 3 [50, 5, 60, 10] "
            "(outside the image); 3 boxes clipped to the image; 1 training images (1 without usable boxes "
            "left out)") in caplog.text
    _, target = ds[0]
    assert target["boxes"].tolist() == [[0.0, 10.0, 15.0, 20.0], [30.0, 20.0, 40.0, 30.0]]


def test_missing_and_corrupt_images_name_the_file(tmp_path):
    ann = _coco_fixture(tmp_path, [{"id": 1, "image_id": 1, "category_id": 3,
                                    "bbox": [1, 1, 5, 5], "iscrowd": 0}])
    ds = CocoDataset(str(tmp_path), str(ann), train=False)
    os.remove(tmp_path / "a.jpg")
    with pytest.raises(ImageLoadError, match=r"image file not found: .*a\.jpg"):
        ds[0]
    (tmp_path / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(ImageLoadError, match=r"cannot decode image .*b\.jpg"):
        ds[1]
    good = tmp_path / "c.jpg"
    _save(good, (64, 64))
    good.write_bytes(good.read_bytes()[:200])  # truncated JPEG
    with pytest.raises(ImageLoadError, match=r"c\.jpg"):
        load_image(str(good))


# ---- image modes -----------------------------------------------------------------------------
def test_grayscale_rgba_palette_load_as_rgb(tmp_path):
    Image.new("L", (8, 6), 100).save(tmp_path / "gray.png")
    Image.new("RGBA", (8, 6), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    pal = Image.new("P", (8, 6), 1)
    pal.putpalette([0, 0, 0, 250, 120, 5] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    Image.fromarray(np.full((6, 8), 65535, np.uint16)).save(tmp_path / "gray16.png")
    expected = {"gray.png": (100, 100, 100), "rgba.png": (10, 20, 30),
                "pal.png": (250, 120, 5), "gray16.png": (255, 255, 255)}
    for name, rgb in expected.items():
        img = load_image(str(tmp_path / name))
        assert img.mode == "RGB" and img.size == (8, 6), name
        assert img.getpixel((3, 3)) == rgb, name


def test_exif_rotated_image_is_upright(tmp_path):
    raw = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide x 20 high
    raw[:, :20] = (255, 0, 0)  # left half red, right half blue
    raw[:, 20:] = (0, 0, 255)
    img = Image.fromarray(raw)
    exif = img.getexif()
    exif[0x0112] = 6  # orientation: display rotated 90 degrees clockwise
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    upright = load_image(str(tmp_path / "rot.jpg"))
    assert upright.size == (20, 40)  # now 20 wide x 40 high
    top, bottom = np.asarray(upright)[5, 10], np.asarray(upright)[35, 10]
    assert top[0] > 200 and top[2] < 60  # the stored left (red) half is on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_hflip_moves_boxes_with_pixels():
    image = torch.zeros(3, 10, 20)
    image[:, 2:5, 3:7] = 1.0
    target = {"boxes": torch.tensor([[3.0, 2.0, 7.0, 5.0]]), "labels": torch.tensor([1])}
    flipped, t = hflip(image, target)
    assert t["boxes"].tolist() == [[13.0, 2.0, 17.0, 5.0]]
    ys, xs = torch.nonzero(flipped[0], as_tuple=True)
    assert (xs.min().item(), xs.max().item() + 1) == (13, 17)
    assert target["boxes"].tolist() == [[3.0, 2.0, 7.0, 5.0]]  # input untouched


# ---- VOC -------------------------------------------------------------------------------------
VOC_XML = """<annotation><filename>{name}.jpg</filename>
<size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objects}</annotation>"""
VOC_OBJECT = """<object><name>{cls}</name><difficult>{difficult}</difficult>
<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"""


def write_voc(root: Path, split: str, images) -> Path:
    """images: {name: (w, h, [(cls, x1, y1, x2, y2, difficult)])} -> a VOC root."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, (w, h, objects) in images.items():
        objs = "".join(VOC_OBJECT.format(cls=c, x1=x1, y1=y1, x2=x2, y2=y2, difficult=int(d))
                       for c, x1, y1, x2, y2, d in objects)
        (root / "Annotations" / f"{name}.xml").write_text(
            VOC_XML.format(name=name, w=w, h=h, objects=objs))
        _save(root / "JPEGImages" / f"{name}.jpg", (w, h))
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(images) + "\n")
    return root


def test_voc_difficult_and_joined_roots(tmp_path):
    r07 = write_voc(tmp_path / "VOC2007", "trainval",
                    {"000001": (50, 40, [("dog", 1, 1, 20, 20, 0), ("cat", 5, 5, 30, 30, 1)]),
                     "000002": (50, 40, [("cat", 10, 10, 40, 35, 1)])})
    r12 = write_voc(tmp_path / "VOC2012", "trainval",
                    {"2012_000001": (60, 45, [("person", 2, 3, 50, 40, 0)])})
    train = VocDataset([str(r07), str(r12)], "trainval", train=True, hflip_prob=0.0)
    # image 000002 has only a difficult box: no training target, dropped
    assert len(train) == 2 and train.class_names[15] == "person"
    _, target = train[0]
    assert target["boxes"].tolist() == [[0.0, 0.0, 20.0, 20.0]]  # xmin-1, ymin-1, xmax, ymax
    assert target["labels"].tolist() == [12]  # dog
    _, target = train[1]
    assert target["labels"].tolist() == [15] and target["image_id"] == 3
    with_difficult = VocDataset([str(r07)], ["trainval"], train=True, use_difficult=True)
    assert len(with_difficult) == 2
    val = VocDataset(str(r07), "trainval", train=False)
    _, target = val[0]
    assert target["difficult"].tolist() == [False, True]
    gt = val.coco_gt()
    anns = gt.imgToAnns[1]
    assert [a["difficult"] for a in anns] == [0, 1] and anns[1]["iscrowd"] == 1


def test_voc_config_with_more_splits_than_roots_names_the_key(tmp_path):
    # configs/voc.yaml joins 07 + 12 (two roots, two splits); a user who points data.train.root at
    # one folder and keeps both splits gets one line naming the key (it was a bare ValueError)
    from autofpn.config import ConfigError
    root = write_voc(tmp_path / "VOC", "train", {"x": (20, 20, [("dog", 1, 1, 5, 5, 0)])})
    voc_yaml = str(Path(__file__).resolve().parents[1] / "configs" / "voc.yaml")
    cfg = load_config(voc_yaml, [f"data.train.root={root}"])
    with pytest.raises(ConfigError, match=r"^data\.train\.splits: 2 splits for 1 data\.train\.root folders"):
        build_dataset(cfg, "train")
    assert len(build_dataset(load_config(voc_yaml, [f"data.train.root={root}", "data.train.splits=train"]),
                             "train")) == 1


def test_voc_unknown_class_lists_known_ones(tmp_path):
    root = write_voc(tmp_path / "VOC", "val", {"x": (20, 20, [("unicorn", 1, 1, 5, 5, 0)])})
    with pytest.raises(AnnotationError, match=r"x\.xml: object 0: unknown class 'unicorn'; "
                                              r"known classes: aeroplane, bicycle, .*tvmonitor"):
        VocDataset(str(root), "val", train=False)


def test_voc_malformed_xml_names_file_and_line(tmp_path):
    root = write_voc(tmp_path / "VOC", "val", {"x": (20, 20, [("dog", 1, 1, 5, 5, 0)])})
    xml = root / "Annotations" / "x.xml"
    xml.write_text(xml.read_text()[:-30])
    with pytest.raises(AnnotationError, match=r"x\.xml: malformed XML at line \d+ column \d+"):
        VocDataset(str(root), "val", train=False)


def test_voc_mini_real_layout():
    if not VOC_MINI.is_dir():
        pytest.skip("voc_mini not available")
    train = VocDataset(str(VOC_MINI), "train", train=True)
    val = VocDataset(str(VOC_MINI), "val", train=False)
    both = VocDataset([str(VOC_MINI), str(VOC_MINI)], ["train", "val"], train=False)
    assert len(both) == len(val) + len(VocDataset(str(VOC_MINI), "train", train=False))
    num_difficult = sum(int(r["difficult"].sum()) for r in val.all_records)
    image, target = val[0]
    assert image.shape[0] == 3 and target["labels"].min() >= 1 and target["labels"].max() <= 20
    if num_difficult:
        assert len(val.coco_gt().getAnnIds()) == sum(len(r["boxes"]) for r in val.all_records)
    for i in range(min(len(train), 10)):
        assert not train[i][1]["difficult"].any()


# ---- BDD -------------------------------------------------------------------------------------
def test_bdd_reader(tmp_path, caplog):
    _save(tmp_path / "img" / "f1.jpg", (64, 36))
    _save(tmp_path / "img" / "f2.jpg", (64, 36))
    frames = [
        {"name": "f1.jpg", "attributes": {"weather": "clear"}, "labels": [
            {"category": "car", "box2d": {"x1": 1.5, "y1": 2, "x2": 30, "y2": 20}},
            {"category": "traffic sign", "box2d": {"x1": 40, "y1": 1, "x2": 50, "y2": 9}},
            {"category": "lane", "poly2d": [[0, 0], [10, 10]]},
            {"category": "other vehicle", "box2d": {"x1": 0, "y1": 0, "x2": 5, "y2": 5}}]},
        {"name": "f2.jpg", "labels": None}]
    ann = tmp_path / "det_val.json"
    ann.write_text(json.dumps(frames))
    with caplog.at_level(logging.INFO):
        ds = BddDataset(str(tmp_path / "img"), str(ann), train=False)
    assert "1 boxes of ignored categories" in caplog.text
    assert len(ds) == 2 and ds.num_classes == 11
    image, target = ds[0]
    assert image.shape == (3, 36, 64)
    assert target["boxes"].tolist() == [[1.5, 2.0, 30.0, 20.0], [40.0, 1.0, 50.0, 9.0]]
    assert [ds.class_names[l] for l in target["labels"]] == ["car", "traffic sign"]
    assert len(ds[1][1]["boxes"]) == 0
    frames[0]["labels"][0]["category"] = "spaceship"
    ann.write_text(json.dumps(frames))
    with pytest.raises(AnnotationError, match=r"frame 0 \(f1\.jpg\) label 0: unknown category "
                                              r"'spaceship'; known categories: pedestrian"):
        BddDataset(str(tmp_path / "img"), str(ann), train=False)


# ---- build_dataset ---------------------------------------------------------------------------
def test_build_dataset_from_config(tmp_path):
    ann = _coco_fixture(tmp_path, [{"id": 1, "image_id": 1, "category_id": 3,
                                    "bbox": [1, 1, 5, 5], "iscrowd": 0}])
    cfg = load_config(None, [f"data.val={{type: coco, root: {tmp_path}, ann_file: {ann}}}", "model.num_classes=3"])
    assert len(build_dataset(cfg, "val")) == 2
    cfg["data"]["val"]["type"] = "kitti"
    with pytest.raises(ValueError, match="data.val.type must be one of coco, voc, bdd, synthetic"):
        build_dataset(cfg, "val")
    cfg["data"]["val"] = {"type": "coco", "root": str(tmp_path), "ann_file": None}
    with pytest.raises(ValueError, match="data.val.ann_file must be set"):
        build_dataset(cfg, "val")
