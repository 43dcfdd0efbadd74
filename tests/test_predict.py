"""``python -m autofpn.predict`` on a folder of generated images (one of them truncated) with the
detector of a 2-iteration training run, whose final evaluation also draws validation pictures;
``evaluate.py --results`` scores what predict wrote."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from autofpn import predict
from autofpn.data import SHAPE_CLASSES
from test_train_run import _cli, tiny_opts, train_script

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """(synthetic data root, run folder) of a tiny FPN run: 2 iterations, 4 val images, 2 drawn;
    every detection kept (score_thresh 0) so the results file is not empty after 2 iterations."""
    root = tmp_path_factory.mktemp("predict")
    shapes, run = str(root / "shapes"), str(root / "run")
    opts = tiny_opts(shapes, run, **{"solver.max_iters": 2, "train.precise_bn_batches": 1,
                                     "eval.draw_images": 2, "model.roi.score_thresh": 0.0})
    assert train_script.main(_cli(opts)) == 0
    return Path(shapes), Path(run)


def test_training_draws_validation_images_and_records_its_classes(trained_run):
    shapes, run = trained_run
    assert sorted(os.listdir(run / "detections")) == ["val_0.jpg", "val_1.jpg"]
    gt = json.loads((shapes / "annotations" / "val.json").read_text())
    for i in range(2):  # the first validation images, at their own size
        entry = gt["images"][i]
        assert Image.open(run / "detections" / f"val_{i}.jpg").size == (entry["width"], entry["height"])
    final = torch.load(run / "model_final.pth", weights_only=True)
    assert final["classes"] == {"names": list(SHAPE_CLASSES), "category_ids": list(range(1, 11))}


def test_predict_a_folder_writes_pictures_and_results_that_evaluate_py_scores(trained_run, tmp_path):
    shapes, run = trained_run
    images = tmp_path / "images"
    shutil.copytree(shapes / "val", images)
    names = sorted(os.listdir(images))
    data = (images / names[0]).read_bytes()
    (images / "broken.jpg").write_bytes(data[: len(data) // 2])  # the header decodes, the pixels do not
    out, ann = tmp_path / "out", shapes / "annotations" / "val.json"
    proc = subprocess.run([sys.executable, "-m", "autofpn.predict", "--ckpt", str(run / "model_final.pth"),
                           "--dir", str(images), "--out", str(out), "--ann", str(ann), "--batch-size", "3"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    skip_lines = [line for line in proc.stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(skip_lines) == 1 and str(images / "broken.jpg") in skip_lines[0], proc.stderr
    assert "1 of 5 images skipped" in proc.stdout
    for name in names:  # every picture under its own name, at the input's size
        assert Image.open(out / name).size == Image.open(images / name).size
    assert not (out / "broken.jpg").exists()

    gt = json.loads(ann.read_text())
    gt_ids = {os.path.basename(e["file_name"]): e["id"] for e in gt["images"]}
    assert json.loads((out / "images.json").read_text()) == {n: gt_ids[n] for n in names}
    results = json.loads((out / "detections.json").read_text())
    assert results, "score_thresh 0: every image has detections"
    sizes = {gt_ids[n]: Image.open(images / n).size for n in names}
    for det in results:
        assert set(det) == {"image_id", "category_id", "bbox", "score"}
        assert det["category_id"] in range(1, 11) and 0.0 <= det["score"] <= 1.0
        x, y, w, h = det["bbox"]
        width, height = sizes[det["image_id"]]
        assert 0 <= x and 0 <= y and w >= 0 and h >= 0 and x + w <= width + 0.01 and y + h <= height + 0.01

    scored = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--results", str(out / "detections.json"),
                             "--ann", str(ann), "--metric", "coco"], capture_output=True, text=True, timeout=120)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert "AP50" in scored.stdout and f"images: {len(names)}" in scored.stdout, scored.stdout


def test_predict_image_paths_without_annotations(trained_run, tmp_path, capsys):
    """Images given one by one keep that order for their ids 1..N; a file that is not an image is
    skipped with one line; a training checkpoint works as model_final.pth does; a name given
    twice, or --out being the images' folder, is refused before anything runs."""
    shapes, run = trained_run
    second, first = shapes / "val" / "000002.jpg", shapes / "val" / "000001.jpg"
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    out = tmp_path / "out"
    assert predict.main(["--ckpt", str(run), str(second), str(text), str(first), "--out", str(out),
                         "--score", "0"]) == 0
    assert json.loads((out / "images.json").read_text()) == {"000002.jpg": 1, "000001.jpg": 2}
    captured = capsys.readouterr()
    assert f"warning: skipped {text}: cannot decode" in captured.err
    assert "1 of 3 images skipped" in captured.out
    # the run's last training checkpoint holds the same weights as its model_final.pth
    checkpoint = sorted((run / "checkpoints").glob("ckpt_*.pth"))[-1]
    assert predict.main(["--ckpt", str(checkpoint), str(second), str(first), "--out",
                         str(tmp_path / "from_checkpoint")]) == 0  # the same batch: padding moves boxes a little
    assert (tmp_path / "from_checkpoint" / "detections.json").read_text() == (out / "detections.json").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        predict.main(["--ckpt", str(run), str(first), str(tmp_path / "000001.jpg"), "--out", str(out)])
    assert "same file name" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the pictures keep the images' names: never written over them
        predict.main(["--ckpt", str(run), "--dir", str(shapes / "val"), "--out", str(shapes / "val")])
    assert "would overwrite them" in capsys.readouterr().err


def test_classes_of_a_checkpoint_without_a_record():
    """Older checkpoints: the categories of --ann in id order when they fit, else "class k"."""
    recorded = {"classes": {"names": ["cat", "dog"], "category_ids": [17, 3]}}
    assert predict.class_table(recorded, 3, None) == (["__background__", "cat", "dog"], [0, 17, 3])
    categories = [{"id": 9, "name": "dog"}, {"id": 4, "name": "cat"}]
    assert predict.class_table({}, 3, categories) == (["__background__", "cat", "dog"], [0, 4, 9])
    assert predict.class_table({}, 4, categories) == (["__background__", "class 1", "class 2", "class 3"],
                                                      [0, 1, 2, 3])
