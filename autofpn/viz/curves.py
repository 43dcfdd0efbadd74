"""PNG plots of the training curves, drawn from the JSON-lines metrics log.

``plot_curves(records, out_dir)`` writes ``loss_curve.png`` (every ``loss*`` term of the
``"type": "train"`` records against the iteration) and, when evaluations were logged,
``map_curve.png`` (AP / AP50 of the ``"type": "eval"`` records against the iteration; after a
single evaluation, its AP numbers as bars).
"""
import math
import os
from typing import Any, Dict, List

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def plot_curves(records: List[Dict[str, Any]], out_dir: str) -> List[str]:
    """Write the loss (and mAP) curve PNGs into ``out_dir``; returns the files written."""
    os.makedirs(out_dir, exist_ok=True)
    written = []
    train = [r for r in records if r.get("type") == "train"]
    if train:
        terms = sorted({k for r in train for k in r if k.startswith("loss")})
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for term in terms:
            points = [(r["iter"], r[term]) for r in train if _finite(r.get(term))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, label=term, linewidth=2.0 if term == "loss" else 1.0)
        ax.set_xlabel("iteration")
        ax.set_ylabel("loss")
        ax.set_title("training loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = os.path.join(out_dir, "loss_curve.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    evals = [r for r in records if r.get("type") == "eval"]
    if len(evals) == 1:  # one evaluation is no curve: its numbers as bars
        names = [k for k in ("AP", "AP50", "AP75", "APs", "APm", "APl") if _finite(evals[0].get(k))]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        bars = ax.bar(names, [max(float(evals[0][k]), 0.0) for k in names], color="#4c72b0")
        for bar, k in zip(bars, names):
            value = float(evals[0][k])
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), "n/a" if value < 0 else f"{value:.1f}",
                    ha="center", va="bottom", fontsize=8)
        ax.set_ylabel("mAP")
        ax.set_title(f"validation mAP at iteration {evals[0]['iter']} (one evaluation: "
                     f"train.eval_period draws a curve)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        path = os.path.join(out_dir, "map_curve.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    elif evals:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for key in ("AP", "AP50", "AP75"):
            points = [(r["iter"], r[key]) for r in evals if _finite(r.get(key))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", label=key)
        ax.set_xlabel("iteration")
        ax.set_ylabel("mAP")
        ax.set_title("validation mAP")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        path = os.path.join(out_dir, "map_curve.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
