"""A newcomer's own dataset: a folder of VOC XML files without ImageSets, and data.categories."""
import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from autofpn.config import load_config
from autofpn.data import AnnotationError, CocoDataset, VocDataset, build_dataset
from autofpn.data.voc import VocFolderDataset

XML = """<annotation><filename>{filename}</filename>
<size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objects}</annotation>"""
OBJECT = """<object><name>{cls}</name><difficult>0</difficult>
<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"""


def _image(path: Path, size=(24, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (30, 120, 200)).save(path)


def _xml(ann_dir: Path, stem: str, objects, filename: str = "", size=(24, 16)) -> None:
    """objects: [(cls, x1, y1, x2, y2)] (VOC 1-based inclusive pixels)."""
    ann_dir.mkdir(parents=True, exist_ok=True)
    objs = "".join(OBJECT.format(cls=c, x1=x1, y1=y1, x2=x2, y2=y2) for c, x1, y1, x2, y2 in objects)
    (ann_dir / f"{stem}.xml").write_text(XML.format(filename=filename or f"{stem}.jpg", w=size[0],
                                                    h=size[1], objects=objs))


def _folder(tmp_path: Path, n: int = 10):
    """n images img00..: every one has a 'dog', img03 also a 'zebra', img07 also an 'ant'."""
    ann, img = tmp_path / "xml", tmp_path / "img"
    for i in range(n):
        stem = f"img{i:02d}"
        objects = [("dog", 2, 2, 10, 10)] + [("zebra", 5, 5, 20, 14)] * (i == 3) + [("ant", 1, 1, 4, 4)] * (i == 7)
        _xml(ann, stem, objects)
        _image(img / f"{stem}.jpg")
    return ann, img


def _cfg(train: dict, val: dict, *opts: str):
    cfg = load_config(None, list(opts))
    cfg["data"]["train"], cfg["data"]["val"] = train, val
    return cfg


def _stems(ds) -> list:
    return [r["voc_id"] for r in ds.all_records]


# ---- VOC XML folder ------------------------------------------------------------------------------
def test_xml_folder_split_classes_and_determinism(tmp_path, caplog):
    ann, img = _folder(tmp_path)
    spec = {"type": "voc", "annotations": str(ann), "images": str(img)}
    cfg = _cfg(spec, dict(spec))
    with caplog.at_level(logging.INFO):
        train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    # the sorted union over the whole folder, the same for both halves: with seed 0 the only
    # 'ant' (img07) is in val, yet train has the class too
    assert "img07" in _stems(val) and "img07" not in _stems(train)
    assert train.class_names == val.class_names == ["__background__", "ant", "dog", "zebra"]
    assert caplog.text.count("3 classes read from the 10 annotation files") == 1  # logged once
    t, v = _stems(train), _stems(val)
    assert len(v) == 2 and len(t) == 8  # val_fraction 0.2 of 10
    assert sorted(t + v) == [f"img{i:02d}" for i in range(10)] and not set(t) & set(v)
    assert not {r["image_id"] for r in train.all_records} & {r["image_id"] for r in val.all_records}
    # deterministic: building again gives the same split; another seed another one
    assert _stems(build_dataset(cfg, "val")) == v
    other = _cfg(spec, dict(spec), "data.split.seed=5")
    assert _stems(build_dataset(other, "val")) != v
    # labels follow the read class list; boxes shifted to continuous coordinates
    _, target = val[0]
    assert target["labels"].tolist()[0] == 2 and target["boxes"].tolist()[0] == [1.0, 1.0, 10.0, 10.0]
    # the val part is never empty, even for a tiny fraction
    tiny = _cfg(spec, dict(spec), "data.split.val_fraction=0.01")
    assert len(build_dataset(tiny, "val")) == 1 and len(build_dataset(tiny, "train")) == 9


def test_xml_folder_separate_folders_used_whole_and_class_names_given(tmp_path):
    ann, img = _folder(tmp_path, 4)
    val_ann = tmp_path / "val_xml"
    _xml(val_ann, "v0", [("cat", 1, 1, 5, 5)])
    _image(img / "v0.jpg")
    cfg = _cfg({"type": "voc", "annotations": str(ann), "images": str(img)},
               {"type": "voc", "annotations": str(val_ann), "images": str(img)})
    train, val = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    assert len(train.all_records) == 4 and _stems(val) == ["v0"]
    assert train.class_names == val.class_names == ["__background__", "cat", "dog", "zebra"]
    cfg["data"]["class_names"] = ["zebra", "dog", "cat"]
    assert build_dataset(cfg, "train").class_names == ["__background__", "zebra", "dog", "cat"]


def test_xml_folder_image_lookup(tmp_path):
    ann, img = tmp_path / "xml", tmp_path / "img"
    _xml(ann, "a", [("dog", 1, 1, 5, 5)], filename="photo_of_a.jpg")  # <filename> differs from the stem
    _image(img / "photo_of_a.jpg")
    _image(img / "a.jpg")  # the stem's file exists too: <filename> wins
    _xml(ann, "b", [("dog", 1, 1, 5, 5)], filename="b.jpg")  # <filename> stale: the file is a .png
    _image(img / "b.png")
    _xml(ann, "c", [("dog", 1, 1, 5, 5)], filename="nothing.jpg")
    _image(img / "c.JPEG")  # extension in upper case
    ds = VocFolderDataset(str(ann), str(img), train=False)
    assert [Path(r["path"]).name for r in ds.all_records] == ["photo_of_a.jpg", "b.png", "c.JPEG"]
    assert _stems(ds) == ["a", "b", "c"]
    assert ds[1][0].shape == (3, 16, 24)
    _xml(ann, "d", [("dog", 1, 1, 5, 5)])
    with pytest.raises(AnnotationError, match=r"1 of 4 image files are missing, e\.g\. .*d\.jpg"):
        VocFolderDataset(str(ann), str(img), train=False)


def test_xml_folder_malformed_file_is_named(tmp_path):
    ann, img = _folder(tmp_path, 3)
    (ann / "img01.xml").write_text("<annotation><size>")
    spec = {"type": "voc", "annotations": str(ann), "images": str(img)}
    with pytest.raises(AnnotationError, match=r"img01\.xml: malformed XML at line \d+ column \d+"):
        build_dataset(_cfg(spec, dict(spec)), "train")


def test_voc_root_without_class_names_keeps_the_standard_classes(tmp_path):
    root = tmp_path / "VOC"
    _xml(root / "Annotations", "x", [("dog", 1, 1, 5, 5)])
    _image(root / "JPEGImages" / "x.jpg")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "val.txt").write_text("x\n")
    ds = build_dataset(_cfg({"type": "voc", "root": str(root), "splits": "train"},
                            {"type": "voc", "root": str(root), "splits": "val"}), "val")
    assert ds.num_classes == 21 and ds[0][1]["labels"].tolist() == [12]  # dog


# ---- data.categories -----------------------------------------------------------------------------
def _coco(tmp_path: Path) -> Path:
    images = [{"id": 1, "file_name": "a.jpg", "height": 16, "width": 24},
              {"id": 2, "file_name": "b.jpg", "height": 16, "width": 24}]
    for im in images:
        _image(tmp_path / im["file_name"])
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 0},   # cat
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [2, 2, 6, 6], "iscrowd": 0},   # dog
            {"id": 3, "image_id": 1, "category_id": 9, "bbox": [3, 3, 7, 7], "iscrowd": 0},   # car
            {"id": 4, "image_id": 2, "category_id": 3, "bbox": [4, 4, 8, 8], "iscrowd": 0}]   # cat
    cats = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 9, "name": "car"}]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def test_coco_categories_subset(tmp_path, caplog):
    ann = _coco(tmp_path)
    with caplog.at_level(logging.INFO):
        train = CocoDataset(str(tmp_path), str(ann), train=True, hflip_prob=0.0, categories=["car", "dog"])
    assert "kept car, dog; 2 boxes of other classes removed" in caplog.text
    assert train.class_names == ["__background__", "car", "dog"] and train.num_classes == 3
    assert train.label_to_category_id == [0, 9, 7]  # the file's own ids, in the given order
    assert len(train) == 1  # image 2 only had a cat: no box left, dropped from training
    _, target = train[0]
    assert target["labels"].tolist() == [2, 1]  # dog, car (file order)
    assert target["boxes"].tolist() == [[2.0, 2.0, 8.0, 8.0], [3.0, 3.0, 10.0, 10.0]]
    val = CocoDataset(str(tmp_path), str(ann), train=False, categories=["car", "dog"])
    assert len(val) == 2 and len(val[1][1]["boxes"]) == 0  # kept as a negative
    gt = val.coco_gt()
    assert sorted(a["category_id"] for a in gt.dataset["annotations"]) == [7, 9]
    assert sorted(gt.getCatIds()) == [7, 9] and sorted(gt.getImgIds()) == [1, 2]
    # build_dataset passes data.categories; model.num_classes = len + 1 then matches
    cfg = load_config(None, [f"data.val={{type: coco, root: {tmp_path}, ann_file: {ann}}}",
                             "data.categories=[dog]", "model.num_classes=2"])
    ds = build_dataset(cfg, "val")
    from autofpn.data import check_num_classes
    check_num_classes(cfg, ds)
    assert ds.label_to_category_id == [0, 7] and ds[0][1]["labels"].tolist() == [1]


def test_voc_categories_subset_both_forms(tmp_path):
    ann, img = _folder(tmp_path, 10)
    spec = {"type": "voc", "annotations": str(ann), "images": str(img)}
    cfg = _cfg(spec, {"type": "voc", "annotations": str(ann), "images": str(img)},
               "data.categories=[zebra]")
    train = build_dataset(cfg, "train")
    everything = VocFolderDataset(str(ann), str(img), train=False, categories=["zebra"])
    assert everything.class_names == ["__background__", "zebra"]
    assert [r["voc_id"] for r in everything.all_records if len(r["labels"])] == ["img03"]
    assert sum(len(r["boxes"]) for r in everything.all_records) == 1
    assert len(everything.coco_gt().getAnnIds()) == 1
    # training half (seed 0 puts img03 there): only the image with a zebra is left
    assert len(train.all_records) == 8 and len(train) == 1
    assert train[0][1]["labels"].tolist() == [1] and train[0][1]["image_id"] == 4
    root = tmp_path / "VOC"
    _xml(root / "Annotations", "x", [("dog", 1, 1, 5, 5), ("person", 2, 2, 9, 9), ("cat", 3, 3, 6, 6)])
    _image(root / "JPEGImages" / "x.jpg")
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "ImageSets" / "Main" / "val.txt").write_text("x\n")
    voc = VocDataset(str(root), "val", train=False, categories=["person", "dog"])
    assert voc.class_names == ["__background__", "person", "dog"]
    assert voc.label_to_category_id == [0, 15, 12]
    assert voc[0][1]["labels"].tolist() == [2, 1]
    assert [a["category_id"] for a in voc.coco_gt().dataset["annotations"]] == [12, 15]


def test_unknown_category_names_the_known_classes(tmp_path):
    ann = _coco(tmp_path)
    with pytest.raises(AnnotationError, match=r"ann\.json: data\.categories: unknown class 'person'; "
                                              r"the dataset's classes: cat, dog, car"):
        CocoDataset(str(tmp_path), str(ann), train=False, categories=["dog", "person"])
