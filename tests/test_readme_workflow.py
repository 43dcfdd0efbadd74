"""The README's workflow ("Using it on your data", steps 1-4), run as written there on a small
generated VOC-layout dataset: training images in a VOC root with ImageSets, validation images in
a plain folder of XML files without ImageSets, one of them a truncated JPEG.

The commands are read from README.md, not copied here, so a README that drifts from the code
fails this test. Two substitutions make them fit one CPU: ``torchrun --nproc_per_node 8`` runs
one process (``python -m torch.distributed.run --standalone --nproc_per_node 1``), and
``configs/voc.yaml`` is a file in the test's folder that inherits the shipped
``configs/voc.yaml`` (so its output folders are the shipped ones) and makes it tiny: ResNet-18
without pretrained weights, 96 px images, two iterations per search stage and of training.
"""
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("search.py", "train.py", "evaluate.py")


def readme_workflow_commands() -> list:
    """The command lines of README's steps 1-4, in order (comments and blank lines left out)."""
    text = (REPO / "README.md").read_text()
    start = text.index("    # 1. plan")
    end = text.index("    # do two searches", start)
    return [line.strip() for line in text[start:end].splitlines()
            if line.strip() and not line.strip().startswith("#")]


def as_local(command: str) -> list:
    """A README command line -> argv for this machine (see the module docstring)."""
    command = command.replace("torchrun --nproc_per_node 8",
                              f"{sys.executable} -m torch.distributed.run --standalone --nproc_per_node 1")
    argv = shlex.split(command)
    if argv[0] == "python":
        argv[0] = sys.executable
    return [str(REPO / a) if a in SCRIPTS else a for a in argv]


def write_voc_image(images: Path, annotations: Path, stem: str, boxes, truncated: bool = False) -> None:
    """A 96 x 96 JPEG with a coloured square per box and its VOC XML (1-based inclusive corners)."""
    image = Image.new("RGB", (96, 96), (120, 120, 120))
    for name, (x1, y1, x2, y2) in boxes:
        image.paste((230, 30, 30) if name == "cat" else (30, 30, 230), (x1 - 1, y1 - 1, x2, y2))
    path = images / f"{stem}.jpg"
    image.save(path, quality=95)
    if truncated:  # half the file: the header decodes, the pixels do not
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    objects = "".join(
        f"<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
        f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>" for name, (x1, y1, x2, y2) in boxes)
    (annotations / f"{stem}.xml").write_text(
        f"<annotation><filename>{stem}.jpg</filename><size><width>96</width><height>96</height>"
        f"<depth>3</depth></size>{objects}</annotation>")


def make_data(root: Path) -> None:
    voc = root / "VOC"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    stems = [f"train_{i}" for i in range(8)]
    for i, stem in enumerate(stems):
        write_voc_image(voc / "JPEGImages", voc / "Annotations", stem,
                        [("cat", (8 + i, 10, 40 + i, 44)), ("dog", (50, 48 - i, 88, 86 - i))])
    (voc / "ImageSets" / "Main" / "train.txt").write_text("\n".join(stems) + "\n")
    xmls, images = root / "val_xml", root / "val_images"
    xmls.mkdir()
    images.mkdir()
    for i in range(4):
        write_voc_image(images, xmls, f"val_{i}", [("cat", (12, 12 + i, 44, 46 + i)), ("dog", (52, 50, 90, 88))],
                        truncated=i == 3)


def write_config(folder: Path, data: Path) -> None:
    (folder / "configs").mkdir()
    (folder / "configs" / "voc.yaml").write_text(f"""\
_base_: {REPO / "configs" / "voc.yaml"}
model:
  num_classes: null   # from the data
  backbone: {{name: resnet18, weights: none, frozen_stages: -1, norm: bn}}
  neck: {{channels: 16, norm: bn}}
  head: {{mlp_dim: 32, channels: 16}}
  transform: {{min_size: [96], max_size: 128, test_min_size: 96}}
  rpn: {{anchor_sizes: [16, 32, 64, 128, 256], pre_nms_top_n_train: 100, post_nms_top_n_train: 50,
        pre_nms_top_n_test: 50, post_nms_top_n_test: 30, batch_size_per_image: 32}}
  roi: {{batch_size_per_image: 32, detections_per_img: 20}}
data:
  train: {{type: voc, root: {data / "VOC"}, splits: train}}
  val: {{type: voc, annotations: {data / "val_xml"}, images: {data / "val_images"}}}
  class_names: [cat, dog]
  bad_images: skip
  images_per_batch: 2
  num_workers: 0
solver: {{epochs: 1, max_iters: 2, steps: [1], warmup_iters: 1, lr: 0.01}}
search: {{epochs: 1, max_iters: 2, min_size: null, max_size: null}}  # search at the tiny training size
train: {{device: cpu, log_period: 1, precise_bn_batches: 2}}
eval: {{metric: both}}
""")


def test_readme_workflow_runs_as_written_on_a_voc_layout_dataset(tmp_path):
    commands = readme_workflow_commands()
    assert [c.split()[0] for c in commands] == ["python", "torchrun", "torchrun", "python", "python"], commands
    make_data(tmp_path / "data")
    work = tmp_path / "work"
    work.mkdir()
    write_config(work, tmp_path / "data")
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    outputs = []
    for command in commands:
        result = subprocess.run(as_local(command), cwd=work, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        outputs.append(result.stdout + result.stderr)
    plan, search, train, evaluate, results = outputs
    assert "GFLOPs" in plan and "stage" in plan
    geno = json.loads((work / "out" / "voc_search" / "geno.json").read_text())
    assert geno["neck"]["layers"] and geno["head"]
    # the truncated validation image is left out and said so; the classes come from the config
    assert "1 images left out because they cannot be decoded" in search + train + evaluate
    assert "model.num_classes = 3: the 2 classes of" in train
    eval_dir = work / "out" / "voc" / "eval_model_final"
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["num_images"] == 3 and 0.0 <= metrics["AP"] <= 100.0 and "voc_AP50" in metrics
    truth = json.loads((eval_dir / "ground_truth.json").read_text())
    assert sorted(os.path.basename(im["file_name"]) for im in truth["images"]) == ["val_0.jpg", "val_1.jpg",
                                                                                   "val_2.jpg"]
    # results mode on the files model mode wrote gives its numbers
    ap = re.search(r"VOC AP50 \(continuous boxes, difficult ignored\): area\s+(\S+)", results)
    assert ap and abs(float(ap.group(1)) - metrics["voc_AP50"]) < 0.01, results[-1500:]
