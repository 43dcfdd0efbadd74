"""Bad input, as a user or a disk gets it wrong: one line on stderr naming the file or key, exit
code 2, no traceback (AUTOFPN_DEBUG=1 brings it back); a truncated newest checkpoint is set aside
and the run resumes from the previous one to the weights of an uninterrupted run."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from autofpn.config import ConfigError, load_config
from autofpn.data import AnnotationError, CocoDataset
from autofpn.engine.checkpoint import CheckpointError, CheckpointManager, load_checkpoint

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")


def run(*cmd, env=None):
    result = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, **(env or {})})
    return result.returncode, result.stdout, result.stderr


def error_line(stderr: str) -> str:
    """The one error line; asserts there is exactly one and no traceback."""
    assert "Traceback" not in stderr, stderr[-2000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-2000:]
    return errors[0]


def coco_folder(root: Path, annotations, images=None) -> Path:
    images = images if images is not None else [{"id": 1, "file_name": "a.jpg", "height": 64, "width": 64},
                                                {"id": 2, "file_name": "b.jpg", "height": 64, "width": 64}]
    root.mkdir(parents=True, exist_ok=True)
    for img in images:
        Image.new("RGB", (img["width"], img["height"]), (90, 20, 20)).save(root / img["file_name"])
    ann = root / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": [{"id": 1, "name": "thing"}]}))
    return ann


def coco_opts(ann: Path) -> list:
    root = ann.parent
    return [f"data.train={{type: coco, root: {root}, ann_file: {ann}}}",
            f"data.val={{type: coco, root: {root}, ann_file: {ann}}}", "model.num_classes=2", "train.device=cpu"]


# ---- config values --------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("solver.lr=abc", "error: override 'solver.lr=abc': 'solver.lr' = 'abc': expected a number"),
    ("solver.epochs=2.5", "error: override 'solver.epochs=2.5': 'solver.epochs' = 2.5: expected an integer"),
    ("model.neck.norm=batch", "error: override 'model.neck.norm=batch': 'model.neck.norm' = 'batch': expected one "
                              "of none, gn, bn"),
    ("search.resource_lambda=huge", "error: override 'search.resource_lambda=huge': 'search.resource_lambda' = "
                                    "'huge': expected one of small, middle, large or a number"),
    ("model.transform.min_size=[a,b]", "error: override 'model.transform.min_size=[a,b]': "
                                       "'model.transform.min_size' = ['a', 'b']: expected a list of numbers"),
    ("train.auto_resume=maybe", "error: override 'train.auto_resume=maybe': 'train.auto_resume' = 'maybe': "
                                "expected true or false"),
])
def test_bad_config_value_is_one_line(override, message):
    code, _, stderr = run("train.py", "--cfg", DEMO, "--opts", override)
    assert code == 2 and error_line(stderr) == message


def test_bad_value_in_a_file_names_the_file(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"_base_: {DEMO}\nsolver:\n  warmup_iters: many\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: 'solver.warmup_iters' = 'many': expected an integer"):
        load_config(str(cfg))
    for path in (REPO / "configs").glob("*.yaml"):  # every shipped config passes the checks
        load_config(str(path))


def test_debug_variable_shows_the_traceback():
    code, _, stderr = run("train.py", "--cfg", DEMO, "--opts", "solver.lr=abc", env={"AUTOFPN_DEBUG": "1"})
    assert code != 0 and "Traceback" in stderr and "ConfigError" in stderr


# ---- checkpoints ----------------------------------------------------------------------------

def truncate(path: Path, size: int = 5000) -> None:
    data = path.read_bytes()
    assert len(data) > size
    path.write_bytes(data[:size])


def test_truncated_checkpoint_in_evaluate_is_one_line(tmp_path):
    ckpt = tmp_path / "model_final.pth"
    torch.save({"model": {"w": torch.zeros(4000)}}, ckpt)
    truncate(ckpt)
    code, _, stderr = run("evaluate.py", "--cfg", DEMO, "--ckpt", str(ckpt))
    line = error_line(stderr)
    assert code == 2 and line.startswith(f"error: {ckpt}: cannot read this checkpoint: the file is truncated")
    code, _, stderr = run("evaluate.py", "--cfg", DEMO, "--ckpt", str(tmp_path / "nope.pth"))
    assert code == 2 and error_line(stderr) == f"error: {tmp_path / 'nope.pth'}: checkpoint not found"


def test_decode_and_backbone_weights_name_a_damaged_file(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all")
    code, _, stderr = run("-m", "autofpn.search.decode", "--checkpoint", str(bad), "--out", str(tmp_path / "g.json"))
    assert code == 2 and "cannot read this search checkpoint: the file is truncated" in error_line(stderr)
    code, _, stderr = run("train.py", "--cfg", DEMO, "--opts", f"model.backbone.weights={bad}")
    assert code == 2 and error_line(stderr).startswith(f"error: {bad}: cannot read these backbone weights")


def test_manager_falls_back_to_the_newest_intact_checkpoint(tmp_path, capsys):
    mgr = CheckpointManager(str(tmp_path), keep=3)
    for it in (10, 20, 30):
        mgr.save({"iter": it, "w": torch.full((3000,), float(it))}, it)
    truncate(tmp_path / "ckpt_0000030.pth")
    path, state = mgr.load_latest()
    assert path.endswith("ckpt_0000020.pth") and state["iter"] == 20
    assert "ckpt_0000030.pth: cannot read this checkpoint" in capsys.readouterr().err
    assert (tmp_path / "ckpt_0000030.pth.damaged").is_file()  # kept aside, never deleted
    for name in ("ckpt_0000010.pth", "ckpt_0000020.pth"):
        truncate(tmp_path / name)
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        mgr.load_latest()


def test_resume_past_a_truncated_newest_checkpoint(tmp_path):
    """Run A trains to the end (a checkpoint every iteration). Run B is A's folder as it was
    when its newest checkpoint (iteration 6) broke off mid-copy: train.py warns, sets it aside,
    resumes from iteration 5 and ends with A's final weights."""
    synthetic = tmp_path / "synthetic"
    opts = ["train.device=cpu", "train.checkpoint_period=1", "train.keep_checkpoints=4", "train.eval_period=0",
            f"data.synthetic.root={synthetic}", "data.synthetic.num_train=8", "data.synthetic.num_val=2",
            "data.synthetic.image_size=96", "data.images_per_batch=2", "model.transform.min_size=[96]",
            "model.transform.max_size=96", "model.transform.test_min_size=96", "model.neck.channels=8",
            "model.head.mlp_dim=16", "model.rpn.pre_nms_top_n_train=50", "model.rpn.post_nms_top_n_train=20",
            "model.rpn.pre_nms_top_n_test=20", "model.rpn.post_nms_top_n_test=10",
            "model.rpn.batch_size_per_image=16", "model.roi.batch_size_per_image=8", "solver.epochs=2",
            "solver.warmup_iters=1", "solver.steps=[1]"]
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    code, _, stderr = run("train.py", "--cfg", DEMO, "--neck", "fpn", "--head", "mlp", "--opts", *opts,
                          f"train.output_dir={run_a}")
    assert code == 0, stderr[-3000:]
    shutil.copytree(run_a, run_b)
    for extra in ["model_final.pth", "eval", *[f"checkpoints/ckpt_{i:07d}.pth" for i in (7, 8)],
                  "checkpoints/best.pth"]:
        target = run_b / extra
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    truncate(run_b / "checkpoints" / "ckpt_0000006.pth")
    (run_b / "checkpoints" / "last_checkpoint").write_text("ckpt_0000006.pth")
    code, stdout, stderr = run("train.py", "--cfg", DEMO, "--neck", "fpn", "--head", "mlp", "--opts", *opts,
                               f"train.output_dir={run_b}")
    assert code == 0, stderr[-3000:]
    assert "warning: " in stderr and "ckpt_0000006.pth: cannot read this checkpoint" in stderr
    assert "resumed from" in stdout and "ckpt_0000005.pth at iteration 5" in stdout
    assert (run_b / "checkpoints" / "ckpt_0000006.pth.damaged").is_file()
    final_a = load_checkpoint(str(run_a / "model_final.pth"))["model"]
    final_b = load_checkpoint(str(run_b / "model_final.pth"))["model"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)


# ---- data -----------------------------------------------------------------------------------

def test_a_synthetic_root_under_a_dangling_link_is_one_line(tmp_path):
    """data_cache as a symbolic link to a folder that is gone (a moved checkout, a worktree)."""
    (tmp_path / "data_cache").symlink_to(tmp_path / "gone")
    code, _, stderr = run("train.py", "--cfg", DEMO, "--opts", "train.device=cpu",
                          f"data.synthetic.root={tmp_path / 'data_cache' / 'synthetic'}",
                          f"train.output_dir={tmp_path / 'run'}")
    assert code == 2
    assert error_line(stderr) == (f"error: data.synthetic.root = {tmp_path / 'data_cache' / 'synthetic'}: "
                                  f"{tmp_path / 'data_cache'} is a symbolic link to {tmp_path / 'gone'}, "
                                  "which does not exist")
    assert not (tmp_path / "gone").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_negative_box_width_is_dropped_and_reported(tmp_path, caplog):
    ann = coco_folder(tmp_path, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, -5, 20], "iscrowd": 0},
                                 {"id": 2, "image_id": 2, "category_id": 1, "bbox": [10, 10, 20, 20], "iscrowd": 0}])
    with caplog.at_level("WARNING"):
        ds = CocoDataset(str(tmp_path), str(ann), train=True)
    assert ds.num_dropped_boxes == 1 and len(ds) == 1
    assert "1 boxes dropped (non-positive size or outside the image), e.g. a.jpg box 0 [10, 10, 5, 30] " \
           "(non-positive width or height)" in caplog.text


def test_missing_image_file_stops_before_training(tmp_path):
    ann = coco_folder(tmp_path, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "iscrowd": 0}])
    (tmp_path / "b.jpg").unlink()
    code, _, stderr = run("train.py", "--cfg", DEMO, "--opts", *coco_opts(ann))
    assert code == 2
    assert error_line(stderr) == f"error: {ann}: 1 of 2 image files are missing, e.g. {tmp_path / 'b.jpg'}"


def test_truncated_image_stops_at_the_start_or_is_skipped_and_counted(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("AUTOFPN_CACHE", str(tmp_path / "cache"))
    images = [{"id": i, "file_name": f"{n}.jpg", "height": 64, "width": 64} for i, n in enumerate("abcd", 1)]
    ann = coco_folder(tmp_path / "data", [{"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 20, 20],
                                           "iscrowd": 0} for i in (1, 2, 3, 4)], images)
    broken = tmp_path / "data" / "c.jpg"
    Image.effect_noise((64, 64), 64).convert("RGB").save(broken, quality=95)  # noise: many bytes to cut
    broken.write_bytes(broken.read_bytes()[:1200])  # a truncated download: the JPEG has no end
    # an intact JPEG with bytes after its end marker (some cameras write them) still decodes
    trailing = tmp_path / "data" / "d.jpg"
    trailing.write_bytes(trailing.read_bytes() + b"\0" * 100)
    code, _, stderr = run("train.py", "--cfg", DEMO, "--opts", *coco_opts(ann), env={"AUTOFPN_CACHE": str(tmp_path / "cache")})
    assert code == 2
    line = error_line(stderr)
    assert line.startswith(f"error: {ann}: 1 of 4 images cannot be decoded: {broken} (cannot decode (OSError: ")
    assert line.endswith("; fix or remove them, or set data.bad_images=skip to leave them out")
    with caplog.at_level("INFO"):
        dataset = CocoDataset(str(ann.parent), str(ann), train=False, bad_images="skip")
    assert dataset.image_ids == [1, 2, 4] and len(dataset) == 3
    assert f"1 images left out because they cannot be decoded (data.bad_images=skip), e.g. {broken}" in caplog.text
    # the files that decoded are remembered: a second check does not open them
    from autofpn.data import image_check
    monkeypatch.setattr(image_check, "image_problem", lambda path: "opened again" if "c.jpg" not in path
                        else "cannot decode")
    assert image_check.find_bad_images([str(tmp_path / "data" / n) for n in ("a.jpg", "b.jpg", "c.jpg", "d.jpg")],
                                       str(ann)) == [(str(broken), "cannot decode")]


def test_empty_training_split_names_the_file(tmp_path):
    ann = coco_folder(tmp_path, [], images=[])
    code, _, stderr = run("train.py", "--cfg", DEMO, "--opts", *coco_opts(ann))
    assert code == 2 and error_line(stderr) == f"error: {ann}: the training split has no images"
    ann = coco_folder(tmp_path / "no_boxes", [])
    with pytest.raises(AnnotationError, match="none of the 2 images has a usable box"):
        CocoDataset(str(ann.parent), str(ann), train=True)


def test_num_classes_that_does_not_fit_the_data_is_one_line(tmp_path):
    ann = coco_folder(tmp_path, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "iscrowd": 0}])
    code, _, stderr = run("train.py", "--cfg", DEMO, "--opts", *coco_opts(ann), "model.num_classes=81")
    assert code == 2 and error_line(stderr) == (f"error: 'model.num_classes' = 81 but {ann} has 1 classes (thing) "
                                                f"+ background = 2: set model.num_classes=2")


def test_num_classes_left_null_is_taken_from_the_data_and_recorded(tmp_path):
    ann = coco_folder(tmp_path / "data", [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20],
                                           "iscrowd": 0}])
    out = tmp_path / "run"
    code, _, stderr = run("train.py", "--cfg", DEMO, "--opts", *coco_opts(ann), "model.num_classes=null",
                          "solver.epochs=1", "solver.warmup_iters=1", "data.images_per_batch=1",
                          "eval.max_images=1", f"train.output_dir={out}")
    assert code == 0, stderr[-2000:]
    assert f"model.num_classes = 2: the 1 classes of {ann} + background" in stderr
    assert load_config(str(out / "config.yaml"))["model"]["num_classes"] == 2
    assert torch.load(out / "model_final.pth", weights_only=False)["model"]["roi_heads.box_predictor.cls_score.weight"].shape[0] == 2
    with pytest.raises(ConfigError, match="'model.num_classes' = 1: expected an integer >= 2"):
        load_config(DEMO, ["model.num_classes=1"])


def test_head_cell_size_above_the_pooler_size_names_both_keys():
    from autofpn.models.detector import build_auto_head
    genotype = {"head": {"cells": [[{"node": 2, "input": 0, "op": "sep_conv_3x3"}]]}}
    cfg = load_config(DEMO, ["model.head.cells=1", "model.head.cell_size=8"])
    with pytest.raises(ConfigError, match=r"model.head.cell_size = 8: expected 0 \(no pooling\) up to "
                                          r"model.roi.pooler_size = 7"):
        build_auto_head(cfg, 32, genotype, search=False)
    with pytest.raises(ConfigError, match="'model.head.cell_size' = 'small': expected an integer"):
        load_config(DEMO, ["model.head.cell_size=small"])


def test_genotype_of_another_shape_names_the_key_and_the_fix(tmp_path):
    """A genotype searched with the paper's two head cells (or another neck) retrained under a
    config of another shape: one line naming the key and the --opts that fits, no traceback."""
    from autofpn.models.detector import build_detector
    from autofpn.models.genotype import save_genotype
    from autofpn.search.random_sample import random_genotype
    save_genotype(random_genotype(0, 0, cells=2), str(tmp_path / "geno.json"))
    code, _, stderr = run("train.py", "--cfg", DEMO, "--genotype", str(tmp_path / "geno.json"), "--opts",
                          "model.head.cells=1", f"train.output_dir={tmp_path / 'run'}")
    assert code == 2 and error_line(stderr) == (
        "error: the genotype's head has cells = 2 but model.head.cells = 1: use the config its search "
        "wrote (config.yaml beside geno.json) or --opts model.head.cells=2")
    assert not (tmp_path / "run" / "model_final.pth").exists()
    cfg = load_config(DEMO, ["model.neck.type=auto", "model.head.type=mlp", "model.neck.layers=3"])
    with pytest.raises(ConfigError, match=r"the genotype's neck has layers = 2 but model.neck.layers = 3: .* "
                                          r"--opts model.neck.layers=2$"):
        build_detector(cfg, random_genotype(0, 0, cells=2))
    cfg = load_config(DEMO, ["model.neck.type=auto", "model.head.type=mlp", "model.neck.levels=[3,4,5]"])
    with pytest.raises(ConfigError, match=r"neck has levels = \[2, 3, 4, 5\] but model.neck.levels = \[3, 4, 5\]: "
                                          r".* --opts model.neck.levels=\[2,3,4,5\]$"):
        build_detector(cfg, random_genotype(0, 0, cells=2))


# ---- output folders of another config --------------------------------------------------------

def test_folder_of_another_config_is_refused_moved_aside_with_force_and_resumed_when_equal(tmp_path):
    from autofpn.config import save_config
    from autofpn.engine.runs import FolderInUseError, claim_folder
    folder = tmp_path / "run"
    cfg = load_config(DEMO, [f"train.output_dir={folder}"])
    save_config(cfg, str(folder / "config.yaml"))
    (folder / "model_final.pth").write_bytes(b"weights of the first run")
    # keys that do not change the result may differ: same run, resumed
    same = load_config(DEMO, [f"train.output_dir={folder}", "train.log_period=1", "data.num_workers=2"])
    assert claim_folder(str(folder), same) is None and (folder / "model_final.pth").exists()
    other = load_config(DEMO, [f"train.output_dir={folder}", "model.neck.type=panet", "solver.lr=0.01"])
    with pytest.raises(FolderInUseError, match=r"run holds a run made with another config "
                                               r"\(model.neck.type, solver.lr differ\).*--force"):
        claim_folder(str(folder), other)
    assert load_config(str(folder / "config.yaml"))["model"]["neck"]["type"] == "fpn"  # untouched
    # a genotype is part of what a run computes
    genotype = json.loads((REPO / "configs" / "genotypes" / "ssd.json").read_text())
    with pytest.raises(FolderInUseError, match=r"\(genotype differ\)"):
        claim_folder(str(folder), cfg, genotype)
    aside = claim_folder(str(folder), other, force=True)
    assert aside == f"{folder}.old" and not folder.exists()
    assert (Path(aside) / "model_final.pth").read_bytes() == b"weights of the first run"  # nothing lost
    save_config(cfg, str(folder / "config.yaml"))
    assert claim_folder(str(folder), other, force=True) == f"{folder}.old2"


@pytest.mark.parametrize("script", ["train.py", "search.py"])
def test_train_and_search_refuse_a_folder_of_another_config_before_writing(tmp_path, script):
    from autofpn.config import save_config
    key = "train.output_dir" if script == "train.py" else "search.output_dir"
    folder = tmp_path / "out"
    save_config(load_config(DEMO, [f"{key}={folder}", "train.device=cpu"]), str(folder / "config.yaml"))
    before = (folder / "config.yaml").read_text()
    code, _, stderr = run(script, "--cfg", DEMO, "--opts", f"{key}={folder}", "train.device=cpu",
                          "search.resource_lambda=small", "solver.epochs=2")
    assert code == 2
    line = error_line(stderr)
    # training does not read search.*: only the search is refused for it
    differing = "solver.epochs" if script == "train.py" else "search.resource_lambda, solver.epochs"
    assert line == (f"error: {folder} holds a {'training run' if script == 'train.py' else 'search'} made with "
                    f"another config ({differing} differ); use another output folder, or --force to move that "
                    f"one aside and start anew")
    assert (folder / "config.yaml").read_text() == before and sorted(os.listdir(folder)) == ["config.yaml"]
