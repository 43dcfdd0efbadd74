"""evaluate.py in model mode: a real (untrained, tiny) detector from the demo config."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_evaluate_py_model_mode(tmp_path):
    detector = pytest.importorskip("autofpn.models.detector")
    from autofpn.config import load_config

    opts = [f"data.synthetic.root={tmp_path / 'shapes'}", "data.synthetic.num_train=2",
            "data.synthetic.num_val=3", "data.synthetic.image_size=64",
            "model.transform.test_min_size=64", "model.transform.max_size=96",
            "model.transform.min_size=[64]", f"train.output_dir={tmp_path / 'run'}",
            "eval.max_images=2"]
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), opts)
    torch.manual_seed(0)
    model = detector.build_detector(cfg)
    ckpt = tmp_path / "model.pth"
    torch.save({"model": model.state_dict(), "cfg": cfg, "genotype": None}, ckpt)
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--cfg",
                           str(REPO / "configs" / "demo.yaml"), "--ckpt", str(ckpt),
                           "--metric", "both", "--opts", *opts],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for token in ("AR100", "VOC AP50", "per-class AP", "hexagon", "parameters: backbone",
                  "FLOPs at 64x64"):
        assert token in out, (token, out)
    # written next to the checkpoint, never into the run folder the config names
    assert not (tmp_path / "run" / "eval").exists()
    assert f"wrote {tmp_path / 'eval_model' / 'detections.json'}" in out
    metrics = json.loads((tmp_path / "eval_model" / "metrics.json").read_text())
    assert metrics["num_images"] == 2
    assert metrics["params"]["total"] == sum(p.numel() for p in model.parameters())
    flops = metrics["flops"]
    assert flops["total"] > 0 and flops["backbone"] > flops["neck"] > 0 and flops["head"] > 0
    assert flops["backbone"] + flops["neck"] + flops["rpn"] + flops["head"] <= flops["total"]
    dets = json.loads((tmp_path / "eval_model" / "detections.json").read_text())
    assert {d["image_id"] for d in dets} <= {1, 2}
    gt = json.loads((tmp_path / "eval_model" / "ground_truth.json").read_text())
    assert [i["id"] for i in gt["images"]] == [1, 2]  # the evaluated images (eval.max_images=2)
    assert gt["info"]["box_convention"] == "continuous"


def test_evaluate_a_searched_model_with_cfg_and_genotype_without_imagenet_file(tmp_path):
    """README step 4: --cfg with --genotype builds the searched neck and head (the genotype
    implies them), and a checkpoint that holds its backbone loads with no ImageNet weights file
    (TORCH_HOME is an empty folder here)."""
    from autofpn.config import load_config
    from autofpn.models import detector
    from autofpn.models.genotype import save_genotype
    from autofpn.search.random_sample import random_genotype

    opts = [f"data.synthetic.root={tmp_path / 'shapes'}", "data.synthetic.num_train=2",
            "data.synthetic.num_val=2", "data.synthetic.image_size=64", "model.transform.test_min_size=64",
            "model.transform.max_size=96", "model.transform.min_size=[64]", "model.neck.channels=8",
            "model.head.channels=8", "eval.max_images=1", "model.backbone.weights=imagenet"]
    cfg = load_config(str(REPO / "configs" / "demo.yaml"),
                      [*opts, "model.backbone.weights=none", "model.neck.type=auto", "model.head.type=auto"])
    genotype = random_genotype(0, 3, cells=cfg["model"]["head"]["cells"])
    save_genotype(genotype, str(tmp_path / "geno.json"))
    torch.manual_seed(0)
    model = detector.build_detector(cfg, genotype)
    ckpt = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict()}, ckpt)  # no config, no genotype inside
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--cfg", str(REPO / "configs" / "demo.yaml"),
                           "--ckpt", str(ckpt), "--genotype", str(tmp_path / "geno.json"), "--opts", *opts],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "TORCH_HOME": str(tmp_path / "empty_torch_home")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval_model_final" / "metrics.json").read_text())
    assert metrics["params"]["total"] == sum(p.numel() for p in model.parameters())


def test_evaluate_py_results_mode_voc_boxes_flag(tmp_path):
    """--voc-boxes decides how VOC AP50 reads the boxes (the hand case of test_eval.py: GT
    corners (0, 0)-(4, 4), detection (0, 0)-(2, 5): IoU 0.444 continuous, 0.536 with the
    devkit's +1), default from the GT's info.box_convention, else devkit."""
    gt = {"images": [{"id": 1, "file_name": "a.jpg", "height": 10, "width": 10}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4],
                           "area": 16, "iscrowd": 0}],
          "categories": [{"id": 1, "name": "cat"}]}
    ann, dets = tmp_path / "gt.json", tmp_path / "dets.json"
    ann.write_text(json.dumps(gt))
    dets.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [0, 0, 2, 5],
                                 "score": 0.9}]))

    def voc_line(*extra):
        proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "--results", str(dets),
                               "--ann", str(ann), "--metric", "voc", *extra],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return next(line for line in proc.stdout.splitlines() if line.startswith("VOC AP50"))

    assert voc_line().startswith("VOC AP50 (devkit +1 pixels, difficult ignored): area 100.00")
    line = voc_line("--voc-boxes", "continuous", "--out", str(tmp_path / "ev"))
    assert line.startswith("VOC AP50 (continuous boxes, difficult ignored): area   0.00")
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["voc_pixel_convention"] == "continuous" and metrics["voc_AP50"] == 0.0
    ann.write_text(json.dumps({**gt, "info": {"box_convention": "continuous"}}))  # as we write it
    assert "continuous boxes" in voc_line() and "devkit +1" in voc_line("--voc-boxes", "devkit")
