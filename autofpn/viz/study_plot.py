"""The study's picture: AP against neck + head parameters, one point per entry.

``plot_pareto(study, path)``: mean AP over seeds with the sample std as error bars; baselines
labelled in black, random architectures grey, searched ones coloured and labelled.
"""
import os
from typing import Any, Dict

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

SEARCHED_COLOURS = ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange")


def plot_pareto(study: Dict[str, Any], path: str) -> str:
    fig, ax = plt.subplots(figsize=(7.5, 5))
    searched, random_labelled = 0, False
    for e in study["entries"]:
        ap, std = e["mean"].get("AP"), e["std"].get("AP")
        if ap is None or not e["params"]:
            continue
        x = (e["params"]["neck"] + e["params"]["head"]) / 1e6
        if e["kind"] == "random":
            style = dict(color="0.6", marker="o", markersize=6)
            label = None if random_labelled else "random"
            random_labelled = True
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
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
