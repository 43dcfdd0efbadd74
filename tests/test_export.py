"""ONNX export (``python -m autofpn.export``): the file, run by onnxruntime on images of other
sizes than the traced one, gives the PyTorch model's detections (boxes within 1e-3 px after
matching, same labels, scores within 1e-4), for the FPN baseline of a training run (through the
command line) and for a searched neck + head."""
import json
import os

import pytest
import torch

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from autofpn import export  # noqa: E402
from autofpn.config import load_config  # noqa: E402
from autofpn.data import SHAPE_CLASSES  # noqa: E402
from autofpn.models.detector import build_detector, use_genotype  # noqa: E402
from autofpn.models.genotype import load_genotype  # noqa: E402
from test_predict import trained_run  # noqa: E402,F401  (the fixture: a 2-iteration FPN run)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = [(120, 170), (171, 97), (64, 64)]  # landscape, portrait, small square; traced at 128 x 160


def _assert_same_detections(records):
    for r in records:
        assert r["reference"] > 0, r  # a comparison of nothing would prove nothing
        assert r["reference"] == r["other"] == r["matched"], r
        assert r["box_error"] <= export.BOX_TOLERANCE and r["score_error"] <= export.SCORE_TOLERANCE, r
        assert r["ok"]


def test_export_command_on_a_trained_fpn_run(trained_run, tmp_path, capsys):  # noqa: F811
    _, run = trained_run
    path = str(tmp_path / "fpn.onnx")
    assert export.main(["--ckpt", str(run), "--out", path, "--size", "128", "160", "--check", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.count(" ok") == 2 and "DIFFERENT" not in printed
    proto = onnx.load(path)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["neck"] == "fpn" and meta["head"] == "mlp"
    assert json.loads(meta["classes"])["names"] == list(SHAPE_CLASSES)
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["boxes", "labels", "scores"]
    assert not os.path.exists(path + ".tmp")

    from autofpn.engine.runs import load_trained_model
    _, _, model = load_trained_model(str(run))
    _assert_same_detections(export.check_with_onnxruntime(model, path, export.random_images(SIZES)))


def _searched_detector(**opts):
    cfg = load_config(os.path.join(REPO, "configs", "demo.yaml"),
                      ["model.num_classes=11", "model.neck.channels=16", "model.head.channels=8",
                       "model.transform.test_min_size=128", "model.transform.max_size=192",
                       *[f"{k}={v}" for k, v in opts.items()]])
    # a genotype the demo config's search found (neck and head: one cell on 3 x 3-pooled RoIs, fc
    # readout), as users get them
    genotype = load_genotype(os.path.join(REPO, "docs", "study", "demo_head_cs3_fc", "searches", "middle",
                                          "geno.json"))
    use_genotype(cfg, genotype)
    torch.manual_seed(0)
    return build_detector(cfg, genotype).eval()


def test_searched_neck_and_head_export_with_dynamic_sizes(tmp_path):
    model = _searched_detector()
    path = str(tmp_path / "searched.onnx")
    export.export_onnx(model, path, example_size=(128, 160))
    _assert_same_detections(export.check_with_onnxruntime(model, path, export.random_images(SIZES)))


def test_an_image_without_detections_runs(tmp_path):
    """No class score passes the threshold: the exported NMS gets no box and returns none."""
    model = _searched_detector(**{"model.roi.score_thresh": 0.999})
    path = str(tmp_path / "empty.onnx")
    export.export_onnx(model, path, example_size=(128, 160))
    for r in export.check_with_onnxruntime(model, path, export.random_images(SIZES[:2])):
        assert r["reference"] == r["other"] == 0 and r["ok"], r


def test_a_supernet_is_refused(tmp_path):
    cfg = load_config(os.path.join(REPO, "configs", "demo.yaml"), ["model.num_classes=11"])
    with pytest.raises(ValueError, match="supernet"):
        export.export_onnx(build_detector(cfg, search=True), str(tmp_path / "x.onnx"))
    assert not os.listdir(tmp_path)


def test_check_images_that_do_not_open_stop_before_writing(trained_run, tmp_path):  # noqa: F811
    from autofpn.data.transforms import ImageLoadError
    _, run = trained_run
    path = tmp_path / "fpn.onnx"
    with pytest.raises(ImageLoadError, match="missing.jpg"):
        export.main(["--ckpt", str(run), "--out", str(path), "--images", str(tmp_path / "missing.jpg")])
    assert not path.exists()
