"""Heat map of the softmaxed architecture weights: one row per link (neck) or edge (head), one
column per candidate op, the chosen op of every row outlined."""
from typing import List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from torch import Tensor  # noqa: E402


def row_labels(stage: str, link_names: Optional[Sequence[Tuple[int, int]]] = None) -> List[str]:
    """One label per row of the weights: "P3 -> P4" (neck link), "node 2 <- 0" (head edge)."""
    from autofpn.models.auto_head import EDGE_PAIRS
    if stage == "neck":
        return [f"P{s} -> P{t}" for s, t in link_names]
    return [f"node {n} <- {k}" for k, n in EDGE_PAIRS]


def plot_arch_heatmap(weights: Tensor, stage: str, path: str,
                      link_names: Optional[Sequence[Tuple[int, int]]] = None, note: str = "") -> None:
    """weights: softmaxed Tensor[groups, rows, ops] (neck: [layers, links, 8] with ``link_names``
    the (source, target) level of each link; head: [cells, 14, 8]); ``note``: a second title
    line (search.py puts how decided the weights are there)."""
    fig = arch_heatmap_figure(weights, stage, link_names, note)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def arch_heatmap_figure(weights: Tensor, stage: str, link_names: Optional[Sequence[Tuple[int, int]]] = None,
                        note: str = "", title: str = ""):
    """The heat map of ``plot_arch_heatmap`` as a matplotlib figure (the caller closes it)."""
    from autofpn.models.operations import HEAD_OPS, NECK_OPS

    w = weights.detach().float().cpu()
    ops = NECK_OPS if stage == "neck" else HEAD_OPS
    groups, rows, _ = w.shape
    labels = row_labels(stage, link_names)
    group_name = "layer" if stage == "neck" else "cell"
    fig, axes = plt.subplots(1, groups, figsize=(3.2 + 2.6 * groups, 0.9 + 0.28 * rows), squeeze=False)
    for g, ax in enumerate(axes[0]):
        image = ax.imshow(w[g].numpy(), cmap="viridis", vmin=0.0, vmax=float(w.max()), aspect="auto")
        ax.set_xticks(range(len(ops)))
        ax.set_xticklabels(ops, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(rows))
        ax.set_yticklabels(labels if g == 0 else [], fontsize=7)
        # numbered as in the genotype diagram: layers from 1 (0 is the input), cells from 0
        ax.set_title(f"{group_name} {g + 1 if stage == 'neck' else g}", fontsize=9)
        best = w[g].argmax(dim=1)
        for r in range(rows):
            ax.add_patch(plt.Rectangle((int(best[r]) - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.2))
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03, pad=0.02, label="softmax weight")
    title = title or f"Auto-FPN {stage} search: final architecture weights (red: argmax)"
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=10)
    return fig
