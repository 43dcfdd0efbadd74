"""The study's pictures.

``plot_pareto(study, path)``: one study, AP against neck + head parameters, one point per entry:
mean AP over seeds with the sample std as error bars; baselines labelled in black, random
architectures grey, searched ones coloured and labelled.

``plot_ap_against_flops(studies, path)``: several studies of one config in one picture, AP
against neck + head FLOPs (log scale), a colour per study folder, a marker per kind (baseline
square, random circle, searched star); the baselines named "fpn" are joined by a line, so studies
that vary FPN's head (``model.head.mlp_dim``) draw its AP-against-FLOPs curve. An entry that
several folders share (same name, parameters and AP: units copied between studies) is drawn once.

    python -m autofpn.viz.study_plot docs/study/demo_head docs/study/demo_head16 ... --out curve.png
"""
import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

SEARCHED_COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive")


def _save(fig, path: str) -> str:
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_pareto(study: Dict[str, Any], path: str) -> str:
    fig, ax = plt.subplots(figsize=(7.5, 5))
    searched, random_labelled = 0, set()
    for e in study["entries"]:
        ap, std = e["mean"].get("AP"), e["std"].get("AP")
        if ap is None or not e["params"]:
            continue
        x = (e["params"]["neck"] + e["params"]["head"]) / 1e6
        if e["kind"] in ("random", "budget_random"):
            style = dict(color="0.6" if e["kind"] == "random" else "tab:cyan", marker="o", markersize=6)
            label = None if e["kind"] in random_labelled else e["kind"].replace("_", " ")
            random_labelled.add(e["kind"])
        elif e["kind"] == "baseline":
            style = dict(color="black", marker="s", markersize=7)
            label = None
        else:
            style = dict(color=SEARCHED_COLOURS[searched % len(SEARCHED_COLOURS)], marker="*", markersize=13)
            searched += 1
            label = e["name"]
        ax.errorbar([x], [ap], yerr=[std or 0.0], capsize=3, linestyle="none", label=label, **style)
        if e["kind"] == "baseline":
            ax.annotate(e["name"], (x, ap), textcoords="offset points", xytext=(6, 4), fontsize=9)
    ax.set_xlabel("neck + head parameters (M)")
    ax.set_ylabel("AP (%), mean ± std over seeds")
    runs = [len(e["runs"]) for e in study["entries"] if e["runs"]]
    seeds = f"{min(runs)}-{max(runs)}" if runs and min(runs) != max(runs) else str(max(runs, default=0))
    ax.set_title(f"{study['config']}: {seeds} of {len(study['seeds'])} seed(s) per entry")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=9)
    return _save(fig, path)


KIND_MARKERS = {"baseline": ("s", 7), "random": ("o", 6), "budget_random": ("o", 6), "searched": ("*", 13)}


def flops_points(studies: List[Tuple[str, Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """One point per entry with an AP and its neck and head FLOPs: ``{"study", "name", "kind",
    "gflops" (neck + head), "ap", "std"}``; an entry several folders share (same name, neck + head
    parameters and mean AP) once, under the first folder."""
    points, seen = [], set()
    for label, study in studies:
        for e in study["entries"]:
            ap, parts = e["mean"].get("AP"), e.get("flops_parts") or {}
            if ap is None or "neck" not in parts or "head" not in parts:
                continue
            key = (e["name"], e["params"]["neck"] + e["params"]["head"], round(ap, 6))
            if key not in seen:
                seen.add(key)
                points.append({"study": label, "name": e["name"], "kind": e["kind"], "ap": ap,
                               "std": e["std"].get("AP") or 0.0, "gflops": (parts["neck"] + parts["head"]) / 1e9})
    return points


def plot_ap_against_flops(studies: List[Tuple[str, Dict[str, Any]]], path: str) -> str:
    """``studies``: (label, study.json's content) pairs. Returns ``path``."""
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colours = {label: plt.get_cmap("tab10")(k % 10) for k, (label, _) in enumerate(studies)}
    labelled = set()
    points = flops_points(studies)
    for p in points:
        marker, size = KIND_MARKERS.get(p["kind"], ("D", 6))
        ax.errorbar([p["gflops"]], [p["ap"]], yerr=[p["std"]], capsize=3, linestyle="none", marker=marker,
                    markersize=size, color=colours[p["study"]], label=None if p["study"] in labelled else p["study"])
        labelled.add(p["study"])
        if p["kind"] not in ("random", "budget_random"):
            ax.annotate(p["name"], (p["gflops"], p["ap"]), textcoords="offset points", xytext=(6, 3), fontsize=8)
    fpn = sorted((p["gflops"], p["ap"]) for p in points if p["kind"] == "baseline" and p["name"] == "fpn")
    if len(fpn) > 1:
        ax.plot(*zip(*fpn), color="black", linewidth=1, alpha=0.6, zorder=0, label="fpn across the studies")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("neck + head FLOPs (G, one image at the test size, log scale)")
    ax.set_ylabel("AP (%), mean ± std over seeds")
    ax.set_title(f"{studies[0][1]['config']}: {len(studies)} studies (square: baseline, circle: random, "
                 f"star: searched)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def load_studies(folders: List[str]) -> List[Tuple[str, Dict[str, Any]]]:
    """(folder name, study.json) per folder; SystemExit naming the folder without one."""
    studies = []
    for folder in folders:
        path = os.path.join(folder, "study.json")
        if not os.path.isfile(path):
            raise SystemExit(f"study_plot: {path} not found (a study's folder holds study.json once a unit finished)")
        with open(path) as f:
            studies.append((os.path.basename(os.path.normpath(folder)), json.load(f)))
    return studies


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="AP against neck + head FLOPs over several study folders")
    parser.add_argument("folders", nargs="+", help="study folders (each with its study.json)")
    parser.add_argument("--out", required=True, help="the picture (.png / .svg)")
    args = parser.parse_args(argv)
    print(plot_ap_against_flops(load_studies(args.folders), args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
