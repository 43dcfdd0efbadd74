"""VOC AP against a devkit reimplementation, COCO numbers against pycocotools, results checks,
evaluate_model on a tiny oracle model, and the evaluate.py --results command."""
import contextlib
import io
import json
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from autofpn.config import load_config
from autofpn.data import CocoDataset, VocDataset, build_loader
from autofpn.data.base import coco_from_dict
from autofpn.eval import (COCO_METRIC_NAMES, ResultsError, compute_metrics, evaluate_model,
                          evaluate_results_file, evaluate_voc)

from test_data import write_voc

REPO = Path(__file__).resolve().parents[1]
COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"


# ---- the official devkit's voc_eval.py, transcribed (raw 1-based VOC coordinates, +1 areas) --
# (py-faster-rcnn lib/datasets/voc_eval.py; only the file reading around it is left out)
def devkit_parse_rec(filename):
    """The devkit's ``parse_rec`` (pose / truncated left out: our XML has none)."""
    tree = ET.parse(filename)
    objects = []
    for obj in tree.findall("object"):
        obj_struct = {"name": obj.find("name").text,
                      "difficult": int(obj.find("difficult").text)}
        bbox = obj.find("bndbox")
        obj_struct["bbox"] = [int(bbox.find("xmin").text), int(bbox.find("ymin").text),
                              int(bbox.find("xmax").text), int(bbox.find("ymax").text)]
        objects.append(obj_struct)
    return objects


def devkit_voc_ap(rec, prec, use_07_metric=False):
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            if np.sum(rec >= t) == 0:
                p = 0
            else:
                p = np.max(prec[rec >= t])
            ap = ap + p / 11.0
    else:
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        for i in range(mpre.size - 1, 0, -1):
            mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
        i = np.where(mrec[1:] != mrec[:-1])[0]
        ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
    return ap


def devkit_voc_eval(recs, detections, classname, ovthresh=0.5, use_07_metric=False):
    """recs: {image: devkit_parse_rec(xml)}; detections: [(image, score, bbox)] of the class
    (the devkit reads them from its det file: image id, confidence, x1 y1 x2 y2)."""
    class_recs = {}
    npos = 0
    for imagename in recs:
        R = [obj for obj in recs[imagename] if obj["name"] == classname]
        bbox = np.array([x["bbox"] for x in R]).reshape(-1, 4)
        difficult = np.array([x["difficult"] for x in R]).astype(bool)
        det = [False] * len(R)
        npos = npos + sum(~difficult)
        class_recs[imagename] = {"bbox": bbox, "difficult": difficult, "det": det}
    image_ids = [x[0] for x in detections]
    confidence = np.array([x[1] for x in detections])
    BB = np.array([x[2] for x in detections]).reshape(-1, 4)
    sorted_ind = np.argsort(-confidence)
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]
    nd = len(image_ids)
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
            ih = np.maximum(iymax - iymin + 1.0, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                   + (BBGT[:, 2] - BBGT[:, 0] + 1.0) * (BBGT[:, 3] - BBGT[:, 1] + 1.0) - inters)
            overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0
    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    rec = tp / float(npos)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return devkit_voc_ap(rec, prec, use_07_metric)


def _voc_results(dataset, detections):
    """Raw-VOC-coordinate detections -> COCO results in the reader's frame (x1-1, y1-1)."""
    image_id = {r["voc_id"]: r["image_id"] for r in dataset.all_records}
    label = {n: i for i, n in enumerate(dataset.class_names)}
    return [{"image_id": image_id[img], "category_id": dataset.label_to_category_id[label[cls]],
             "bbox": [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1], "score": score}
            for img, cls, score, (x1, y1, x2, y2) in detections]


HAND_IMAGES = {
    "img1": (100, 100, [("dog", 10, 10, 50, 50, 0), ("cat", 60, 60, 90, 90, 0),
                        ("dog", 5, 60, 30, 95, 1), ("person", 50, 5, 95, 45, 0)]),
    "img2": (100, 100, [("dog", 20, 20, 70, 70, 0), ("person", 1, 1, 40, 40, 0)]),
}
HAND_DETECTIONS = [  # (image, class, score, raw VOC box) -- expected outcome
    ("img1", "dog", 0.9, (10, 10, 50, 50)),  # TP
    ("img2", "dog", 0.8, (22, 22, 70, 70)),  # TP
    ("img1", "dog", 0.7, (5, 60, 30, 95)),  # hits the difficult dog: ignored
    ("img2", "dog", 0.6, (60, 1, 99, 30)),  # FP (background)
    ("img1", "dog", 0.5, (11, 11, 50, 50)),  # FP (duplicate)
    ("img2", "cat", 0.95, (10, 10, 30, 30)),  # FP
    ("img1", "cat", 0.3, (60, 60, 90, 90)),  # TP
    ("img2", "person", 0.5, (1, 1, 40, 40)),  # TP; the img1 person is missed
]


def test_voc_ap_hand_fixture(tmp_path):
    root = write_voc(tmp_path / "VOC", "test", HAND_IMAGES)
    ds = VocDataset(str(root), "test", train=False, class_names=["bird", "cat", "dog", "person"])
    out = evaluate_voc(ds.coco_gt(), _voc_results(ds, HAND_DETECTIONS))
    per = out["per_class"]
    # dog: precision 1 at recall 0.5 and 1 -> AP 1 both ways
    assert per["dog"]["AP50_area"] == pytest.approx(1.0)
    assert per["dog"]["AP50_11pt"] == pytest.approx(1.0)
    assert per["dog"]["num_positives"] == 2  # the difficult dog does not count
    # cat: FP then TP -> precision 0.5 at recall 1
    assert per["cat"]["AP50_area"] == pytest.approx(0.5)
    assert per["cat"]["AP50_11pt"] == pytest.approx(0.5)
    # person: recall 0.5 at precision 1 -> area 0.5, 11-point 6/11 (t = 0, .1, ..., .5)
    assert per["person"]["AP50_area"] == pytest.approx(0.5)
    assert per["person"]["AP50_11pt"] == pytest.approx(6 / 11)
    # bird has no ground truth: nan, left out of the mean
    assert np.isnan(per["bird"]["AP50_area"]) and per["bird"]["num_positives"] == 0
    assert out["AP50_area"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert out["AP50_11pt"] == pytest.approx((1 + 0.5 + 6 / 11) / 3)


def _random_voc_fixture(rng, classes, num_images=14, width=120, height=100):
    """VOC objects (raw 1-based inclusive XML corners; many small: 1..6 pixels wide, where
    the +1 matters most; some difficult) and detections in the same pixel numbers."""
    images, detections = {}, []
    for k in range(num_images):
        objects = []
        for _ in range(int(rng.integers(0, 7))):
            small = rng.random() < 0.5
            w, h = rng.integers(0, 6, 2) if small else rng.integers(8, 60, 2)
            x1, y1 = int(rng.integers(1, width - w)), int(rng.integers(1, height - h))
            objects.append((classes[rng.integers(len(classes))], x1, y1, x1 + int(w),
                            y1 + int(h), int(rng.random() < 0.2)))
        images[f"im{k}"] = (width, height, objects)
        for cls, x1, y1, x2, y2, _ in objects:  # noisy copies, some with the wrong class
            scale = 0.7 if x2 - x1 < 6 else 5.0
            for _ in range(int(rng.integers(0, 3))):
                box = np.array([x1, y1, x2, y2], float) + rng.uniform(-scale, scale, 4)
                if rng.random() < 0.5:  # integer pixel indices, as VOC results often are
                    box = np.round(box)
                box[2:] = np.maximum(box[2:], box[:2])  # the devkit's width + 1 stays positive
                name = cls if rng.random() < 0.8 else classes[rng.integers(len(classes))]
                detections.append((f"im{k}", name, float(rng.random()),
                                   tuple(float(v) for v in box)))
        for _ in range(int(rng.integers(0, 3))):  # background false positives
            x1, y1 = rng.uniform(1, 80, 2)
            detections.append((f"im{k}", classes[rng.integers(len(classes))], float(rng.random()),
                               (x1, y1, x1 + rng.uniform(2, 30), y1 + rng.uniform(2, 30))))
    return images, detections


def _raw_voc_gt(recs, classes):
    """A COCO ground truth holding the XML's numbers as they are: bbox [x1, y1, x2 - x1,
    y2 - y1] (corners x1 .. x2 = inclusive pixels), no info key -> read the devkit way."""
    names = sorted(recs)
    images = [{"id": i + 1, "file_name": f"{n}.jpg", "height": 100, "width": 120}
              for i, n in enumerate(names)]
    anns = []
    for i, name in enumerate(names):
        for o in recs[name]:
            x1, y1, x2, y2 = o["bbox"]
            anns.append({"id": len(anns) + 1, "image_id": i + 1,
                         "category_id": classes.index(o["name"]) + 1,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1 + 1) * (y2 - y1 + 1),
                         "iscrowd": o["difficult"], "difficult": o["difficult"]})
    gt = coco_from_dict({"images": images, "annotations": anns,
                         "categories": [{"id": i + 1, "name": c} for i, c in enumerate(classes)]})
    return gt, {n: i + 1 for i, n in enumerate(names)}


def test_voc_ap_equals_devkit_on_random_xml_fixture(tmp_path):
    """The devkit's voc_eval on XML files is the oracle. Our pipeline's path (VocDataset ground
    truth, shifted to continuous by the reader, with detections made continuous the same way)
    and evaluate_voc on the raw XML numbers under "devkit" both equal it; "continuous" on the
    raw numbers (the +1 forgotten) does not."""
    rng = np.random.default_rng(0)
    classes = ["cat", "dog", "person"]
    images, detections = _random_voc_fixture(rng, classes)
    root = write_voc(tmp_path / "VOC", "test", images)
    recs = {n: devkit_parse_rec(str(root / "Annotations" / f"{n}.xml")) for n in images}
    assert sum(o["bbox"][2] - o["bbox"][0] < 6 for r in recs.values() for o in r) >= 10  # small ones
    expected = {(cls, use_07): devkit_voc_eval(
        recs, [(img, score, box) for img, c, score, box in detections if c == cls], cls,
        use_07_metric=use_07) for cls in classes for use_07 in (True, False)}

    ds = VocDataset(str(root), "test", train=False, class_names=classes)
    pipeline = evaluate_voc(ds.coco_gt(), _voc_results(ds, detections))  # info -> continuous
    assert pipeline["pixel_convention"] == "continuous"
    raw_gt, image_id = _raw_voc_gt(recs, classes)
    raw_dets = [{"image_id": image_id[img], "category_id": classes.index(cls) + 1,
                 "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
                for img, cls, score, (x1, y1, x2, y2) in detections]
    raw = evaluate_voc(raw_gt, raw_dets)  # no info key -> devkit
    assert raw["pixel_convention"] == "devkit"
    naive = evaluate_voc(raw_gt, raw_dets, pixel_convention="continuous")
    worst_naive = 0.0
    for (cls, use_07), value in expected.items():
        key = "AP50_11pt" if use_07 else "AP50_area"
        assert pipeline["per_class"][cls][key] == pytest.approx(value, abs=1e-10), (cls, key)
        assert raw["per_class"][cls][key] == pytest.approx(value, abs=1e-10), (cls, key)
        worst_naive = max(worst_naive, abs(naive["per_class"][cls][key] - value))
    assert worst_naive > 0.02  # the fixture tells the conventions apart
    assert 0.15 < pipeline["AP50_area"] < 0.95  # a fixture that exercises TP, FP and misses


def test_voc_pixel_convention_hand_case():
    """One ground truth box, one detection; COCO bbox [x, y, w, h] read as corners x .. x + w.

    GT [0, 0, 4, 4] -> corners (0, 0)-(4, 4); detection [0, 0, 2, 5] -> (0, 0)-(2, 5).
    continuous: inter 2 * 4 = 8, areas 4 * 4 = 16 and 2 * 5 = 10, union 18, IoU 8/18 = 0.444
        -> not > 0.5: a false positive, AP 0.
    devkit (+1): inter (2-0+1) * (4-0+1) = 15, areas 5 * 5 = 25 and 3 * 6 = 18, union 28,
        IoU 15/28 = 0.536 -> a true positive, AP 1.
    """
    data = {"images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 10}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4],
                             "area": 16, "iscrowd": 0}],
            "categories": [{"id": 1, "name": "cat"}]}
    dets = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 5], "score": 0.9}]
    gt = coco_from_dict(data)
    devkit = evaluate_voc(gt, dets, pixel_convention="devkit")
    continuous = evaluate_voc(gt, dets, pixel_convention="continuous")
    assert devkit["AP50_area"] == 1.0 and devkit["AP50_11pt"] == pytest.approx(1.0)
    assert continuous["AP50_area"] == 0.0 and continuous["AP50_11pt"] == 0.0
    # None: a ground truth without info.box_convention is read the devkit way; ours says continuous
    assert evaluate_voc(gt, dets)["AP50_area"] == 1.0
    tagged = coco_from_dict({**data, "info": {"box_convention": "continuous"}})
    assert evaluate_voc(tagged, dets)["AP50_area"] == 0.0
    assert compute_metrics(tagged, dets, metric="voc")["voc_pixel_convention"] == "continuous"
    assert compute_metrics(tagged, dets, metric="voc", voc_pixel_convention="devkit")["voc_AP50"] == 100.0
    with pytest.raises(ValueError, match="devkit, continuous"):
        evaluate_voc(gt, dets, pixel_convention="pixels")


# ---- COCO --------------------------------------------------------------------------------------
def _fixed_detections(ann_path: Path, seed: int = 0):
    """Deterministic detections: jittered ground truth (some dropped, some relabelled) + FPs."""
    data = json.loads(ann_path.read_text())
    rng = np.random.default_rng(seed)
    cat_ids = [c["id"] for c in data["categories"]]
    sizes = {i["id"]: (i["width"], i["height"]) for i in data["images"]}
    dets = []
    for ann in data["annotations"]:
        if rng.random() < 0.2:
            continue
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
        cat = ann["category_id"] if rng.random() < 0.85 else int(rng.choice(cat_ids))
        dets.append({"image_id": ann["image_id"], "category_id": cat,
                     "bbox": [float(x + jitter[0]), float(y + jitter[1]),
                              float(max(w + jitter[2], 1)), float(max(h + jitter[3], 1))],
                     "score": round(float(rng.random()), 4)})
    for image_id, (w, h) in sizes.items():
        for _ in range(2):
            x, y = rng.uniform(0, w * 0.7), rng.uniform(0, h * 0.7)
            dets.append({"image_id": image_id, "category_id": int(rng.choice(cat_ids)),
                         "bbox": [x, y, rng.uniform(10, w * 0.3), rng.uniform(10, h * 0.3)],
                         "score": round(float(rng.random()) * 0.5, 4)})
    return dets


def _pycocotools_stats(ann_file, results_file):
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(ann_file))
        dt = gt.loadRes(str(results_file))
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_coco_numbers_equal_pycocotools_on_coco128(tmp_path):
    if not COCO128.is_dir():
        pytest.skip("coco128 not available")
    ann = COCO128 / "annotations" / "instances_val2017.json"
    dets_file = tmp_path / "dets.json"
    dets_file.write_text(json.dumps(_fixed_detections(ann)))
    summary = evaluate_results_file(str(dets_file), str(ann), metric="both",
                                    out_dir=str(tmp_path), verbose=False)
    expected = _pycocotools_stats(ann, dets_file)
    for name, value in zip(COCO_METRIC_NAMES, expected):
        assert summary[name] == pytest.approx(100 * value, abs=1e-9), name
    assert 20 < summary["AP"] < 90 and 0 < summary["voc_AP50"] <= 100
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["AP"] == pytest.approx(summary["AP"]) and "per_class" in saved
    assert len(saved["per_class"]["coco_AP"]) == 80


def test_evaluate_py_results_mode_prints_tables(tmp_path):
    if not COCO128.is_dir():
        pytest.skip("coco128 not available")
    ann = COCO128 / "annotations" / "instances_val2017.json"
    dets_file = tmp_path / "dets.json"
    dets_file.write_text(json.dumps(_fixed_detections(ann)))
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--results", str(dets_file),
                           "--ann", str(ann), "--out", str(tmp_path / "ev")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for token in ("AP50", "AR100", "ARl", "VOC AP50", "11-point", "per-class AP", "toothbrush"):
        assert token in out, token
    assert (tmp_path / "ev" / "metrics.json").is_file()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 123456789, "category_id": 1, "bbox": [1, 1, 2, 2],
                                "score": 0.5}]))
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--results", str(bad),
                           "--ann", str(ann)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "123456789" in proc.stderr


def _small_coco(tmp_path: Path):
    from test_data import _coco_fixture
    images = [{"id": 10, "file_name": "a.jpg", "height": 30, "width": 40},
              {"id": 20, "file_name": "b.jpg", "height": 30, "width": 50}]
    anns = [{"id": 1, "image_id": 10, "category_id": 7, "bbox": [2, 3, 10, 10], "iscrowd": 0,
             "area": 100},
            {"id": 2, "image_id": 20, "category_id": 3, "bbox": [5, 5, 20, 15], "iscrowd": 0,
             "area": 300}]
    return _coco_fixture(tmp_path, anns, images)


def test_unknown_ids_in_results_are_errors(tmp_path):
    ann = _small_coco(tmp_path)
    gt = CocoDataset(str(tmp_path), str(ann), train=False).coco_gt()
    good = {"image_id": 10, "category_id": 7, "bbox": [2, 3, 10, 10], "score": 0.9}
    assert compute_metrics(gt, [good])["AP"] > 0
    with pytest.raises(ResultsError, match=r"image ids not in the ground truth \(e.g. \[99\]\)"):
        compute_metrics(gt, [good, dict(good, image_id=99)])
    with pytest.raises(ResultsError, match=r"category ids not in the ground truth: \[5\] "
                                           r"\(known: \[3, 7\]\)"):
        compute_metrics(gt, [dict(good, category_id=5)], metric="voc")
    with pytest.raises(ResultsError, match="entry 0 has no 'score'"):
        compute_metrics(gt, [{"image_id": 10, "category_id": 7, "bbox": [1, 1, 1, 1]}])
    empty = compute_metrics(gt, [], metric="both")  # no detections: zeros, not a crash
    assert empty["AP"] == 0.0 and empty["voc_AP50"] == 0.0


class _OracleDetector(torch.nn.Module):
    """Returns the ground truth of each image (recognised by its width) as label 1..K output."""

    def __init__(self, by_width):
        super().__init__()
        self.by_width = by_width
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images, targets=None):
        assert not self.training
        outs = []
        for image in images:
            boxes, labels = self.by_width[image.shape[-1]]
            outs.append({"boxes": boxes.clone(), "labels": labels.clone(),
                         "scores": torch.full((len(labels),), 0.9)})
        return outs


def test_evaluate_model_maps_labels_and_writes_files(tmp_path):
    ann = _small_coco(tmp_path)
    ds = CocoDataset(str(tmp_path), str(ann), train=False)
    by_width = {}
    for i in range(len(ds)):
        image, target = ds[i]
        by_width[image.shape[-1]] = (target["boxes"], target["labels"])
    model = _OracleDetector(by_width).train()
    cfg = load_config(None, ["data.num_workers=0"])
    loader = build_loader(cfg, ds, train=False)
    summary = evaluate_model(model, loader, ds, str(tmp_path / "eval"), metric="both",
                             device="cpu", verbose=False)
    assert model.training  # mode restored
    assert summary["AP"] == pytest.approx(100.0) and summary["voc_AP50"] == pytest.approx(100.0)
    dets = json.loads((tmp_path / "eval" / "detections.json").read_text())
    assert sorted((d["image_id"], d["category_id"]) for d in dets) == [(10, 7), (20, 3)]
    assert dets[0]["bbox"] == [2.0, 3.0, 10.0, 10.0]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 2 and metrics["AP50"] == pytest.approx(100.0)
    assert metrics["voc_pixel_convention"] == "continuous"  # COCO file, continuous detector
    gt = json.loads((tmp_path / "eval" / "ground_truth.json").read_text())
    assert gt["info"] == {"box_convention": "continuous"}
    assert [i["file_name"] for i in gt["images"]] == ["a.jpg", "b.jpg"]  # as in the file
    assert "info" not in ds.coco_gt().dataset  # written from a copy


class _FixedDetector(torch.nn.Module):
    """Returns fixed continuous xyxy boxes for each image, recognised by its width."""

    def __init__(self, by_width):
        super().__init__()
        self.by_width = by_width

    def forward(self, images, targets=None):
        outs = []
        for image in images:
            boxes, labels, scores = self.by_width[image.shape[-1]]
            outs.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                         "labels": torch.tensor(labels), "scores": torch.tensor(scores)})
        return outs


def test_ground_truth_json_reproduces_the_pipeline_metrics(tmp_path):
    images = {  # XML numbers (1-based inclusive); the reader stores [x1 - 1, y1 - 1, x2, y2]
        "a": (40, 30, [("cat", 3, 4, 8, 9, 0), ("dog", 10, 10, 30, 25, 0), ("dog", 20, 2, 23, 5, 1)]),
        "b": (50, 30, [("cat", 1, 1, 4, 4, 0), ("dog", 5, 5, 40, 28, 0)]),
        "c": (60, 30, [("cat", 2, 2, 12, 12, 0)]),  # not evaluated: left out of the file
    }
    ds = VocDataset(str(write_voc(tmp_path / "VOC", "test", images)), "test", train=False,
                    class_names=["cat", "dog"])
    model = _FixedDetector({  # continuous xyxy, label 1 = cat, 2 = dog
        # cat vs GT [2, 3, 8, 9]: continuous IoU 18/39 = 0.46 (FP), with +1 28/53 = 0.53 (TP)
        40: ([[2, 3, 5, 10], [10, 10, 30, 26], [19, 1, 23, 5]], [1, 2, 2], [0.9, 0.8, 0.7]),
        # cat vs GT [0, 0, 4, 4]: the hand case (continuous 0.44, +1 0.54)
        50: ([[0, 0, 2, 5], [30, 5, 45, 20], [4, 4, 40, 28]], [1, 2, 2], [0.6, 0.85, 0.5]),
    })
    cfg = load_config(None, ["data.num_workers=0"])
    loader = build_loader(cfg, torch.utils.data.Subset(ds, [0, 1]), train=False)
    out = tmp_path / "eval"
    summary = evaluate_model(model, loader, ds, str(out), metric="both", verbose=False)
    assert summary["num_images"] == 2 and summary["voc_pixel_convention"] == "continuous"
    gt = json.loads((out / "ground_truth.json").read_text())
    assert gt["info"]["box_convention"] == "continuous"
    assert [i["file_name"] for i in gt["images"]] == [r["path"] for r in ds.all_records[:2]]
    assert {a["image_id"] for a in gt["annotations"]} == {1, 2} and len(gt["annotations"]) == 5
    again = evaluate_results_file(str(out / "detections.json"), str(out / "ground_truth.json"),
                                  metric="both", verbose=False)
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731 (nan == nan)
    differing = [k for k in again if not same(again[k], summary[k])]
    assert differing in ([], ["coco_summary_text"]), differing  # the text holds timings
    assert 0 < summary["voc_AP50"] < 100
    # without the file's info key the devkit's +1 would be counted twice: the cat turns TP
    devkit = evaluate_results_file(str(out / "detections.json"), str(out / "ground_truth.json"),
                                   metric="voc", verbose=False, voc_pixel_convention="devkit")
    assert devkit["per_class"]["voc_AP50"]["cat"] == 100.0
    assert summary["per_class"]["voc_AP50"]["cat"] == 0.0


DIST_SCRIPT = r'''
import json, sys, torch
import torch.distributed as dist
from autofpn.config import load_config
from autofpn.data import CocoDataset, build_loader
from autofpn.eval import evaluate_model

root, ann, out = sys.argv[1:4]
dist.init_process_group("gloo")
ds = CocoDataset(root, ann, train=False)
truth = {}
for i in range(len(ds)):
    image, target = ds[i]
    truth[image.shape[-1]] = (target["boxes"], target["labels"])

class Oracle(torch.nn.Module):
    def forward(self, images):
        return [{"boxes": truth[im.shape[-1]][0], "labels": truth[im.shape[-1]][1],
                 "scores": torch.full((len(truth[im.shape[-1]][1]),), 0.9)} for im in images]

loader = build_loader(load_config(None, ["data.num_workers=0"]), ds, train=False)
summary = evaluate_model(Oracle(), loader, ds, out, metric="both", verbose=False)
# one write per line: the ranks share the pipe, and print's separate writes interleaved under load
line = " ".join(["RANK", str(dist.get_rank()), str(len(loader)),
                 json.dumps({"AP": round(summary["AP"], 6), "n": summary["num_images"]})])
sys.stdout.write(line + "\n")
sys.stdout.flush()
dist.destroy_process_group()
'''


def test_evaluate_model_gathers_across_ranks(tmp_path):
    ann = _small_coco(tmp_path)
    script = tmp_path / "dist_eval.py"
    script.write_text(DIST_SCRIPT)
    with socket.socket() as s:  # a free port: other tests may run torchrun concurrently
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(port), str(script), str(tmp_path), str(ann),
                           str(tmp_path / "ev")], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = sorted(l for l in proc.stdout.splitlines() if l.startswith("RANK"))
    # each rank ran one of the two images; both return the summary of all images
    assert lines == ['RANK 0 1 {"AP": 100.0, "n": 2}', 'RANK 1 1 {"AP": 100.0, "n": 2}']
    dets = json.loads((tmp_path / "ev" / "detections.json").read_text())
    assert sorted(d["image_id"] for d in dets) == [10, 20]


def test_results_file_written_as_a_coco_dataset_dict_is_accepted(tmp_path):
    from autofpn.eval.inference import evaluate_results_file
    ann = _small_coco(tmp_path)
    detections = [{"image_id": 10, "category_id": 7, "bbox": [2, 3, 10, 10], "score": 0.9},
                  {"image_id": 20, "category_id": 3, "bbox": [30, 5, 10, 15], "score": 0.8}]
    as_list, as_dict = tmp_path / "list.json", tmp_path / "dict.json"
    as_list.write_text(json.dumps(detections))
    as_dict.write_text(json.dumps({"images": [], "categories": [], "annotations": detections}))
    from_list = evaluate_results_file(str(as_list), str(ann), verbose=False)
    from_dict = evaluate_results_file(str(as_dict), str(ann), verbose=False)
    same = lambda a, b: json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # noqa: E731 (nan == nan)
    differing = [k for k in from_list if not same(from_list[k], from_dict[k])]
    assert differing in ([], ["coco_summary_text"]) and 0 < from_list["AP"] < 100  # the text holds timings
    as_dict.write_text(json.dumps({"detections": detections}))
    with pytest.raises(ResultsError, match="must be a JSON list of detections, got dict"):
        evaluate_results_file(str(as_dict), str(ann), verbose=False)


def test_tables_explain_minus_one():
    from autofpn.eval.inference import format_tables
    summary = {"num_images": 2, "num_detections": 3, "per_class": {},
               **{name: 50.0 for name in COCO_METRIC_NAMES}}
    assert "-1.00" not in format_tables(summary)
    summary["APs"] = summary["ARs"] = -1.0  # pycocotools' marker, kept as -1 (not scaled to percent)
    text = format_tables(summary)
    assert "-1.00: no ground-truth object of that size in these images" in text
