"""Draw a genotype: the Auto-fusion neck as levels x layers (paper Fig. 4 left) and each Auto-head
cell as a small graph (Fig. 4 right). Every kept link/edge is an arrow labelled with its op.

    python -m autofpn.viz.genotype_diagram configs/genotypes/fpn.json --out docs/img/genotype_fpn
    # writes docs/img/genotype_fpn.png and .svg
"""
import argparse
import os
from typing import Dict, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from autofpn.models.genotype import load_genotype, validate_genotype  # noqa: E402

# short labels and one colour per op (same colour for an op in the neck and the head)
OP_LABEL = {
    "identity": "identity", "sep_conv_3x3": "sep 3x3", "sep_conv_5x5": "sep 5x5",
    "dil_conv_3x3_r2": "dil 3x3 r2", "dil_conv_3x3_r3": "dil 3x3 r3",
    "dil_conv_5x5_r2": "dil 5x5 r2", "dil_conv_5x5_r3": "dil 5x5 r3",
    "conv_3x3": "conv 3x3", "conv_5x5": "conv 5x5",
}
OP_COLOR = {
    "identity": "#7f7f7f", "sep_conv_3x3": "#1f77b4", "sep_conv_5x5": "#17becf",
    "dil_conv_3x3_r2": "#d62728", "dil_conv_3x3_r3": "#ff7f0e",
    "dil_conv_5x5_r2": "#9467bd", "dil_conv_5x5_r3": "#e377c2",
    "conv_3x3": "#2ca02c", "conv_5x5": "#8c564b",
}


def _node(ax, x, y, text, color="#f4f4f4", radius=0.28):
    ax.add_patch(plt.Circle((x, y), radius, facecolor=color, edgecolor="black", lw=1.2, zorder=3))
    ax.text(x, y, text, ha="center", va="center", fontsize=10, zorder=4, fontweight="bold")


def _arrow(ax, p0, p1, op, rad=0.0, label_at=0.5, shrink=17):
    """Arrow p0 -> p1 (arc3 curve of curvature rad) with the op label on the curve."""
    color = OP_COLOR[op]
    ax.annotate("", xy=p1, xytext=p0, zorder=2,
                arrowprops=dict(arrowstyle="-|>", color=color, lw=1.6, shrinkA=shrink, shrinkB=shrink,
                                connectionstyle=f"arc3,rad={rad}", mutation_scale=12))
    # point at parameter t on the quadratic Bezier matplotlib draws for arc3
    (x0, y0), (x2, y2) = p0, p1
    cx, cy = (x0 + x2) / 2 + rad * (y2 - y0), (y0 + y2) / 2 - rad * (x2 - x0)
    t = label_at
    lx = (1 - t) ** 2 * x0 + 2 * (1 - t) * t * cx + t ** 2 * x2
    ly = (1 - t) ** 2 * y0 + 2 * (1 - t) * t * cy + t ** 2 * y2
    ax.text(lx, ly, OP_LABEL[op], fontsize=7.5, color=color, ha="center", va="center", zorder=5,
            bbox=dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor=color, lw=0.6))


def draw_neck(ax, neck: Dict) -> None:
    """Columns: input (projected C_l) and the output of each layer; rows: levels (coarse on top)."""
    levels, layers = neck["levels"], neck["layers"]
    xs = [5.0 * k for k in range(len(layers) + 1)]
    y_of = {lv: 2.0 * (lv - levels[0]) for lv in levels}
    for k, x in enumerate(xs):
        for lv in levels:
            _node(ax, x, y_of[lv], f"C{lv}" if k == 0 else f"P{lv}",
                  color="#fde9c9" if k == 0 else ("#cfe8cf" if k == len(layers) else "#f4f4f4"))
        ax.text(x, y_of[levels[-1]] + 0.75, "input" if k == 0 else f"layer {k}",
                ha="center", fontsize=10)
    for k, links in enumerate(layers):
        for link in links:
            s, t = link["from"], link["to"]
            # labels of links into one target sit at a different distance per source level, and
            # links from one source fan out, so no two labels share a spot
            label_at = 0.5 if s == t else 0.24 + 0.16 * abs(s - t) + (0.08 if s > t else 0.0)
            _arrow(ax, (xs[k], y_of[s]), (xs[k + 1], y_of[t]), link["op"], rad=0.0,
                   label_at=min(label_at, 0.78))
    ax.set_xlim(-0.6, xs[-1] + 0.6)
    ax.set_ylim(-0.6, y_of[levels[-1]] + 1.1)


def draw_cell(ax, edges: Sequence[Dict], index: int, roi_size: Optional[int] = None) -> None:
    """Nodes 0 (cell m-2) and 1 (cell m-1) on the left, intermediate nodes 2..5 in a row,
    the concatenated output on the right. ``roi_size``: the side of the RoI feature maps the cells
    see (``model.head.cell_size``, or the pooler's 7), written on the inputs when known."""
    pos = {0: (0.0, 1.8), 1: (0.0, -1.8), 2: (1.8, 0.0), 3: (3.6, 0.0), 4: (5.4, 0.0), 5: (7.2, 0.0)}
    out = (9.0, 0.0)
    rois = "RoI feats" if roi_size is None else f"RoI feats {roi_size}x{roi_size}"
    prev = rois if index < 2 else f"cell {index - 2}"
    names = {0: "$c_{k-2}$", 1: "$c_{k-1}$"}
    for n, (x, y) in pos.items():
        _node(ax, x, y, names.get(n, str(n)), color="#fde9c9" if n < 2 else "#f4f4f4")
    ax.text(0, 2.35, f"in: {prev}", ha="center", fontsize=8)
    ax.text(0, -2.5, f"in: {rois}" if index == 0 else f"in: cell {index - 1}", ha="center", fontsize=8)
    ax.add_patch(plt.Rectangle((out[0] - 0.45, -0.3), 0.9, 0.6, facecolor="#cfe8cf", edgecolor="black", zorder=3))
    ax.text(*out, "concat", ha="center", va="center", fontsize=9, zorder=4, fontweight="bold")
    for n in range(2, 6):
        ax.annotate("", xy=(out[0] - 0.45, 0.0), xytext=pos[n], zorder=1,
                    arrowprops=dict(arrowstyle="-|>", color="#bbbbbb", lw=1, ls="--", shrinkA=15,
                                    connectionstyle=f"arc3,rad={-0.06 * (6 - n)}"))
    for e in edges:
        k, n = e["input"], e["node"]
        if k < 2:  # from an input node: label near the target, where the edges have spread out
            _arrow(ax, pos[k], pos[n], e["op"], rad=-0.1 if k == 0 else 0.1, label_at=0.62 + 0.04 * (n - 2))
        else:  # along the row: an arc below the row, deeper for longer jumps
            _arrow(ax, pos[k], pos[n], e["op"], rad=0.25 + 0.1 * (n - k - 1), label_at=0.5)
    ax.set_xlim(-0.8, 9.7)
    ax.set_ylim(-2.7, 2.8)
    ax.set_title(f"Auto-head cell {index}", fontsize=11)


def head_roi_size(cfg: Dict) -> int:
    """The side of the RoI feature maps an Auto-head's cells see under config ``cfg``."""
    return cfg["model"]["head"]["cell_size"] or cfg["model"]["roi"]["pooler_size"]


def draw_genotype(genotype: Dict, path: str, title: Optional[str] = None, roi_size: Optional[int] = None) -> None:
    """Render ``genotype`` to ``path`` (format from the extension: .png, .svg, .pdf);
    ``roi_size``: as in ``draw_cell`` (the genotype alone does not say it)."""
    validate_genotype(genotype)
    neck, head = genotype["neck"], genotype["head"]
    cells = head["cells"] if head else []
    panels = (1 if neck else 0) + len(cells)
    if panels == 0:
        raise ValueError("genotype has neither a neck nor a head part to draw")
    widths = ([1.0 + 1.6 * len(neck["layers"])] if neck else []) + [3.4] * len(cells)
    fig, axes = plt.subplots(1, panels, figsize=(sum(widths) * 2.2, 6.0),
                             gridspec_kw={"width_ratios": widths}, squeeze=False)
    axes = list(axes[0])
    if neck:
        draw_neck(axes[0], neck)
        axes[0].set_title("Auto-fusion neck", fontsize=11)
    for m, edges in enumerate(cells):
        draw_cell(axes[(1 if neck else 0) + m], edges, m, roi_size)
    for ax in axes:
        ax.set_aspect("equal")
        ax.axis("off")
    fig.suptitle(title or genotype.get("name") or "genotype", fontsize=13)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Draw a genotype JSON as PNG and SVG.")
    parser.add_argument("genotype", help="genotype JSON file")
    parser.add_argument("--out", required=True, help="output path without extension")
    parser.add_argument("--title", default=None)
    parser.add_argument("--cfg", default=None,
                        help="the config the genotype runs under: labels the head's input with its RoI size")
    args = parser.parse_args(argv)
    genotype = load_genotype(args.genotype)
    roi_size = None
    if args.cfg:
        from autofpn.config import load_config
        roi_size = head_roi_size(load_config(args.cfg))
    for ext in (".png", ".svg"):
        draw_genotype(genotype, args.out + ext, args.title, roi_size)
        print(f"wrote {args.out + ext}")


if __name__ == "__main__":
    main()
