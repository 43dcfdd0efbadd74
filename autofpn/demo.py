"""``make demo``: the whole Auto-FPN pipeline on the embedded dataset, on a CPU, in minutes.

    python -m autofpn.demo [--out out/demo] [--cfg configs/demo.yaml] [--opts k=v ...]
    python -m autofpn.demo --cfg configs/coco128.yaml --out out/coco128   # real data, same pipeline

1. generate the embedded multi-scale shapes dataset (COCO JSON + JPEGs);
2. ``train.py``: the FPN baseline (its backbone then stands in for ImageNet weights);
3. ``search.py`` with that backbone frozen: the neck, then the head with the searched neck;
4. ``train.py``: the found Auto-FPN, with the same budget as FPN, from scratch;
5. evaluate both (``train.py`` ends with an evaluation) and print a table in the style of the
   paper's Table 2, with the time of every stage.

Each stage is the user-facing script run as a subprocess, exactly as a user would run it.
Outputs in ``--out``: ``search/`` (geno.json, diagrams, heat maps), ``fpn/`` and ``autofpn/``
(training runs), ``geno.png``, ``arch_heatmap_*.png``, ``detections_*.jpg`` and ``summary.md``.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

from autofpn.engine.runs import export_backbone, final_metrics, load_final_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_stage(name: str, cmd: List[str], times: Dict[str, float]) -> None:
    print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO)
    times[name] = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"demo stage '{name}' failed with exit code {result.returncode}")
    print(f"=== {name} took {times[name]:.0f} s", flush=True)


def search_decisiveness(search_dir: str) -> str:
    """The decisiveness line (and warning) of each search stage, from ``<stage>/decisiveness.json``."""
    from autofpn.search.decode import format_decisiveness
    lines = []
    for stage in ("neck", "head"):
        path = os.path.join(search_dir, stage, "decisiveness.json")
        if os.path.isfile(path):
            with open(path) as f:
                lines.append(format_decisiveness(stage, json.load(f)))
    return "\n".join(lines)


def draw_examples(models: Dict[str, object], cfg: Dict, out_dir: str, count: int = 3) -> List[str]:
    """A few validation images with each model's detections drawn (``detections_<run>_<i>.jpg``),
    listed image by image."""
    from autofpn.data import build_dataset
    from autofpn.viz.detections import save_dataset_detections
    dataset = build_dataset(cfg, "val")
    per_model = [save_dataset_detections(model, dataset, out_dir, count, prefix=f"detections_{method}")
                 for method, model in models.items()]
    return [path for same_image in zip(*per_model) for path in same_image]


def table(rows: List[Dict]) -> str:
    header = ("| method | params neck | params head | params total | FLOPs neck+head | FLOPs total | mAP | AP50 "
              "| AP75 | APs | APm | APl |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [header]
    for r in rows:
        p, m, f = r["params"], r["metrics"], r["flops"]
        lines.append(f"| {r['method']} | {p['neck'] / 1e6:.3f} M | {p['head'] / 1e6:.3f} M | {p['total'] / 1e6:.2f} M | "
                     f"{(f['neck'] + f['head']) / 1e9:.3f} G | {f['total'] / 1e9:.2f} G | "
                     + " | ".join(f"{m[k]:.2f}" if m.get(k) is not None else "-"
                                  for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out/demo")
    parser.add_argument("--cfg", default=os.path.join(REPO, "configs", "demo.yaml"))
    parser.add_argument("--opts", nargs="*", default=[], help="overrides for every stage")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    py = sys.executable
    times: Dict[str, float] = {}
    total_start = time.perf_counter()

    from autofpn.config import load_config
    from autofpn.data import build_dataset
    from autofpn.models.detector import count_flops
    cfg = load_config(args.cfg, args.opts)
    start = time.perf_counter()
    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    times["data"] = time.perf_counter() - start
    print(f"=== datasets ready in {times['data']:.1f} s ({len(train_set)} train / {len(val_set)} val images)",
          flush=True)

    # A config without pretrained weights (the demo) searches with the FPN baseline's backbone
    # standing in for the ImageNet backbone the paper searches with (frozen); both detectors
    # are trained from the config's starting point.
    search_dir = os.path.join(out, "search")
    fpn_dir = os.path.join(out, "fpn")
    run_stage("train FPN", [py, "train.py", "--cfg", args.cfg, "--neck", "fpn", "--head", "mlp", "--opts",
                            *args.opts, f"train.output_dir={fpn_dir}"], times)
    search_opts = [f"search.output_dir={search_dir}"]
    if cfg["model"]["backbone"]["weights"] in ("none", None):
        search_opts.append(f"model.backbone.weights={export_backbone(fpn_dir, os.path.join(fpn_dir, 'backbone.pth'))}")
    run_stage("search", [py, "search.py", "--cfg", args.cfg, "--opts", *args.opts, *search_opts], times)
    geno = os.path.join(search_dir, "geno.json")
    with open(os.path.join(search_dir, "search_times.json")) as f:
        stage_seconds = json.load(f)  # the search's own clock per stage (no start-up, no decode)
    search_split = " (" + ", ".join(f"{stage} stage {sec:.0f} s" for stage, sec in stage_seconds.items()) + ")"
    decided = search_decisiveness(search_dir)
    print("\n" + decided, flush=True)
    run_stage("train Auto-FPN", [py, "train.py", "--cfg", args.cfg, "--genotype", geno, "--opts", *args.opts,
                                 f"train.output_dir={os.path.join(out, 'autofpn')}"], times)

    rows, models = [], {}
    for method, run in (("FPN", "fpn"), ("Auto-FPN", "autofpn")):
        params, model = load_final_model(os.path.join(out, run))
        size = int(cfg["model"]["transform"]["test_min_size"])
        rows.append({"method": method, "params": params, "flops": count_flops(model, size, size),
                     "metrics": final_metrics(os.path.join(out, run))})
        models[run] = model
    for name in ("geno.png", "geno.svg", "arch_heatmap_neck.png", "arch_heatmap_head.png"):
        if os.path.isfile(os.path.join(search_dir, name)):
            shutil.copy(os.path.join(search_dir, name), os.path.join(out, name))
    pictures = draw_examples(models, cfg, out)
    times["total"] = time.perf_counter() - total_start

    text = [f"# Auto-FPN: search -> retrain -> evaluate ({os.path.relpath(args.cfg, REPO)})", "", table(rows), "",
            f"FLOPs: one forward at {cfg['model']['transform']['test_min_size']} px (a multiply-add = 2 FLOPs).", "",
            "Stage times: " + ", ".join(f"{k} {v:.0f} s" + (search_split if k == "search" else "")
                                        for k, v in times.items()), "",
            "How decided the search was:", "", "    " + decided.replace("\n", "\n    "), "",
            f"Searched architecture: `{geno}` (diagram `geno.png`, weights `arch_heatmap_*.png`); "
            f"detections: {', '.join(os.path.basename(p) for p in pictures[:2])}, ..."]
    summary = "\n".join(text)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(summary + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"rows": rows, "times": times}, f, indent=2)
    print("\n" + summary, flush=True)
    return 0


if __name__ == "__main__":
    from autofpn.cli import run_command
    sys.exit(run_command(main))
