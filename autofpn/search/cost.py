"""Resource cost of the Auto-fusion neck and Auto-head: per-op tables and the penalty C(alpha, beta).

What is counted (per op, at the configured input size):

- params: number of parameters of the op's modules.
- FLOPs: of the convolutions (and linears), a multiply-add counting 2 FLOPs, as
  ``torch.utils.flop_counter`` (and ``models.detector.count_flops``, the study, the demo and
  evaluate.py) count them; element-wise ops (ReLU, norm, sums, resampling) are not counted.
  (Many detection/NAS papers count a multiply-add as 1 FLOP: divide by 2 to compare.)
- MAC (memory access cost, ShuffleNetV2): elements read + written by every layer of the op,
  i.e. sum over its layers of input + output elements, plus the layer's weights (read once).
  Resampling and summation between levels are not counted (no params, no FLOPs, and the same
  for every op of a link).

The sizes are exact: the modules are run on the "meta" device (shapes only, no compute) with the
real feature sizes: level l of an image H x W padded to a multiple of 32 is ceil(H/2^l) x
ceil(W/2^l); the head runs on ``num_rois`` RoIs of pooler_size x pooler_size.

Neck link (j -> i) op o costs cost(1x1 conv of the link) + cost(o) at level j's size; "none"
costs 0 (the decoded neck drops the link and its 1x1 conv). Head edge op o costs cost(o); the
cell's input projections and the neck's input projections are constants.

Penalty: for each part (neck, head) and each metric m in (params, FLOPs, MAC),
``C_m = sum_{link, op} w[link, op] * cost_m[link, op] / norm_m`` with ``norm_m`` = the same
metric of the most expensive decodable module (sum over links of the largest op cost), so each
normalized metric is in [0, 1] and ``C = sum over parts and metrics`` is in [0, 6]; it is linear
in the softmax weights and differentiable. Constants are left out of the penalty (no gradient).
"""
import copy
import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from autofpn.models.auto_head import EDGE_PAIRS, AutoHead, edge_name
from autofpn.models.auto_fusion import AutoFusionNeck, link_name
from autofpn.models.operations import HEAD_OPS, NECK_OPS, MixedOp, ops_as_built

METRICS = ("params", "flops", "mac")


@dataclass(frozen=True)
class Cost:
    params: float = 0.0
    flops: float = 0.0  # 2 per multiply-add
    mac: float = 0.0  # memory access, elements

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.params + other.params, self.flops + other.flops, self.mac + other.mac)

    def as_list(self):
        return [self.params, self.flops, self.mac]


def count_cost(module: nn.Module, *inputs: Tensor) -> Cost:
    """Params, FLOPs and MAC of ``module(*inputs)``; module and inputs on the "meta" device
    (shapes only). Every leaf module is counted once per call (no weight sharing assumed)."""
    flops, mac = [0.0], [0.0]

    def hook(mod, args, out):
        if isinstance(mod, nn.Identity):
            return
        in_elems = sum(a.numel() for a in args if isinstance(a, Tensor))
        weights = sum(p.numel() for p in mod.parameters(recurse=False))
        mac[0] += in_elems + out.numel() + weights
        if isinstance(mod, nn.Conv2d):
            kh, kw = mod.kernel_size
            flops[0] += 2 * out.numel() * (mod.in_channels // mod.groups) * kh * kw
        elif isinstance(mod, nn.Linear):
            flops[0] += 2 * out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        with torch.no_grad(), ops_as_built():  # a fused mixed op would hide its ops from the hooks
            module(*inputs)
    finally:
        for h in handles:
            h.remove()
    return Cost(float(sum(p.numel() for p in module.parameters())), flops[0], mac[0])


def level_sizes(image_size: Tuple[int, int], levels: Sequence[int],
                size_divisible: int = 32) -> Dict[int, Tuple[int, int]]:
    """Feature size of each level for an image H x W padded to a multiple of size_divisible."""
    h, w = (int(math.ceil(s / size_divisible) * size_divisible) for s in image_size)
    return {lv: (int(math.ceil(h / 2 ** lv)), int(math.ceil(w / 2 ** lv))) for lv in levels}


def _meta(x: Sequence[int]) -> Tensor:
    return torch.empty(*x, device="meta")


def _at_full_width(module: nn.Module) -> nn.Module:
    """A copy of ``module`` on the "meta" device whose partial-channel mixed ops
    (``search.partial_channels``) hold their ops at full width: the penalty counts what the
    decoded module will cost, not the 1 / K of the channels the supernet computes."""
    meta = copy.deepcopy(module).to("meta")
    for m in meta.modules():
        if isinstance(m, MixedOp):
            m.at_full_width_()
    return meta


class ResourceCost:
    """Cost tables of a neck and/or head (supernet or decoded) at one input size.

    Args:
        neck: an AutoFusionNeck (supernet or fixed) or None.
        head: an AutoHead (supernet or fixed) or None.
        image_size: (H, W) of the (resized) input image, e.g. (800, 1333).
        num_rois: RoIs per image the head sees (the head's costs scale with it).
        size_divisible: the padding of the image batch.
    Attributes:
        neck_table: Tensor[layers, links, len(NECK_OPS), 3] (params, FLOPs, MAC); 0 for "none"
        and for ops a fixed neck does not hold. head_table: Tensor[cells, 14, len(HEAD_OPS), 3].
        neck_const: Cost of the input projections. head_pre: per cell, Cost of (pre0, pre1).
        head_const: Cost of the head's fc readout (none for the paper's average pool), which no
        architecture weight changes.
        neck_norm / head_norm: Tensor[3], the normalizers of the penalty.
    """

    def __init__(self, neck: Optional[AutoFusionNeck] = None, head: Optional[AutoHead] = None,
                 image_size: Tuple[int, int] = (800, 1333), num_rois: int = 512,
                 size_divisible: int = 32):
        self.image_size, self.num_rois = tuple(image_size), num_rois
        self.neck_table = self.head_table = self.neck_norm = self.head_norm = None
        self.neck_const, self.head_pre, self.head_const = Cost(), [], Cost()
        if neck is not None:
            self._build_neck(neck, size_divisible)
        if head is not None:
            self._build_head(head)

    # ----- tables
    def _build_neck(self, neck: AutoFusionNeck, size_divisible: int) -> None:
        meta = _at_full_width(neck)
        self.neck_levels, self.neck_pairs = list(neck.levels), list(neck.link_pairs)
        sizes = level_sizes(self.image_size, neck.levels, size_divisible)
        c = neck.out_channels
        for lv in neck.levels:
            proj = meta.input_proj[f"c{lv}"]
            self.neck_const = self.neck_const + count_cost(proj, _meta((1, proj[0].in_channels) + sizes[lv]))
        table = torch.zeros(len(meta.layers), len(self.neck_pairs), len(NECK_OPS), 3, dtype=torch.float64)
        # the 1x1 conv of each link (in every op's entry of ``table``) and how many ops share it
        self.neck_link_conv = torch.zeros(len(meta.layers), len(self.neck_pairs), 3, dtype=torch.float64)
        self.neck_ops_per_link = torch.zeros(len(meta.layers), len(self.neck_pairs), dtype=torch.float64)
        for k, layer in enumerate(meta.layers):
            for idx, (s, t) in enumerate(self.neck_pairs):
                name = link_name(s, t)
                if name not in layer:
                    continue
                link, x = layer[name], _meta((1, c) + sizes[s])
                conv = count_cost(nn.Sequential(link.conv, link.norm), x)
                self.neck_link_conv[k, idx] = torch.tensor(conv.as_list(), dtype=torch.float64)
                self.neck_ops_per_link[k, idx] = len(link.mixed.ops)
                for op_name, op in link.mixed.ops.items():
                    table[k, idx, NECK_OPS.index(op_name)] = torch.tensor((conv + count_cost(op, x)).as_list(),
                                                                           dtype=torch.float64)
        self.neck_table = table
        self.neck_norm = table.max(dim=2).values.sum(dim=(0, 1))  # most expensive decodable neck

    def _build_head(self, head: AutoHead) -> None:
        meta = _at_full_width(head)
        r, p, c = self.num_rois, head.cell_size, head.channels  # the cells run at cell_size
        table = torch.zeros(len(meta.cells), len(EDGE_PAIRS), len(HEAD_OPS), 3, dtype=torch.float64)
        for m, cell in enumerate(meta.cells):
            pre = [count_cost(mod, _meta((r, mod[1].in_channels, p, p))) if mod is not None else None
                   for mod in (cell.pre0, cell.pre1)]
            self.head_pre.append(pre)
            x = _meta((r, c, p, p))
            for idx, (k, n) in enumerate(EDGE_PAIRS):
                name = edge_name(k, n)
                if name not in cell.edges:
                    continue
                for op_name, op in cell.edges[name].ops.items():
                    table[m, idx, HEAD_OPS.index(op_name)] = torch.tensor(count_cost(op, x).as_list(),
                                                                           dtype=torch.float64)
        if meta.readout_fc is not None:
            self.head_const = count_cost(meta.readout_fc, _meta((r, meta.readout_fc.in_features)))
        self.head_table = table
        self.head_norm = table.max(dim=2).values.sum(dim=(0, 1))

    # ----- penalty
    def expected_cost(self, neck_weights: Optional[Tensor] = None,
                      head_weights: Optional[Tensor] = None) -> Tensor:
        """C(alpha, beta): scalar, linear in the softmaxed weights (shapes of the tables without
        the last dim); a part whose weights are None contributes 0."""
        total = None
        for w, table, norm in ((neck_weights, self.neck_table, self.neck_norm),
                               (head_weights, self.head_table, self.head_norm)):
            if w is None:
                continue
            if table is None or tuple(w.shape) != tuple(table.shape[:-1]):
                raise ValueError(f"weights of shape {tuple(w.shape)} do not match the cost table "
                                 f"{None if table is None else tuple(table.shape[:-1])}")
            per_op = (table / norm.clamp(min=1e-12)).sum(-1).to(w)  # Tensor[..., ops]
            c = (w * per_op).sum()
            total = c if total is None else total + c
        if total is None:
            raise ValueError("expected_cost needs neck and/or head weights")
        return total

    def expected_raw(self, neck_weights: Optional[Tensor] = None,
                     head_weights: Optional[Tensor] = None) -> Dict[str, Cost]:
        """Expected params / FLOPs / MAC (un-normalized, constants included) per part."""
        out = {}
        if neck_weights is not None:
            v = (neck_weights.detach().double()[..., None] * self.neck_table).sum(dim=(0, 1, 2))
            out["neck"] = self.neck_const + Cost(*v.tolist())
        if head_weights is not None:
            v = (head_weights.detach().double()[..., None] * self.head_table).sum(dim=(0, 1, 2))
            pre = sum((c for cell in self.head_pre for c in cell if c is not None), Cost())
            out["head"] = self.head_const + pre + Cost(*v.tolist())
        return out

    def genotype_weights(self, genotype: dict) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """One-hot architecture weights ``(neck Tensor[layers, links, ops] or None, head
        Tensor[cells, edges, ops] or None)`` (float64) of a decoded ``genotype``: 1 at each
        link's / edge's op, 1 at "none" where the genotype has no link / edge. A part is None
        when the genotype or the tables lack it."""
        neck_w = head_w = None
        if genotype.get("neck") is not None and self.neck_table is not None:
            g = genotype["neck"]
            if g["levels"] != self.neck_levels or len(g["layers"]) != self.neck_table.shape[0]:
                raise ValueError("genotype neck does not match the neck the cost tables were built from")
            neck_w = torch.zeros(self.neck_table.shape[:-1], dtype=torch.float64)
            neck_w[..., NECK_OPS.index("none")] = 1.0
            for k, links in enumerate(g["layers"]):
                for l in links:
                    idx = self.neck_pairs.index((l["from"], l["to"]))
                    neck_w[k, idx] = 0.0
                    neck_w[k, idx, NECK_OPS.index(l["op"])] = 1.0
        if genotype.get("head") is not None and self.head_table is not None:
            cells = genotype["head"]["cells"]
            if len(cells) != self.head_table.shape[0]:
                raise ValueError("genotype head does not match the head the cost tables were built from")
            head_w = torch.zeros(self.head_table.shape[:-1], dtype=torch.float64)
            head_w[..., HEAD_OPS.index("none")] = 1.0
            for m, edges in enumerate(cells):
                for e in edges:
                    idx = EDGE_PAIRS.index((e["input"], e["node"]))
                    head_w[m, idx] = 0.0
                    head_w[m, idx, HEAD_OPS.index(e["op"])] = 1.0
        return neck_w, head_w

    def normalized_cost(self, genotype: dict) -> float:
        """The penalty C of a decoded ``genotype``: ``expected_cost`` at its one-hot weights,
        i.e. what the gradient search's penalty is worth once every link / edge has picked its
        op (the sum over the parts held by both the genotype and the tables, each metric
        normalised by the most expensive decodable module, constants left out: in [0, 3] per
        part)."""
        neck_w, head_w = self.genotype_weights(genotype)
        if neck_w is None and head_w is None:
            raise ValueError("normalized_cost: the genotype has no part these cost tables cover")
        return float(self.expected_cost(neck_w, head_w))

    # ----- exact costs
    def total(self) -> Dict[str, Cost]:
        """Exact cost of the modules the tables were built from: a decoded module, or a supernet
        with all its ops (each link's 1x1 conv counted once, not once per op)."""
        out = {}
        if self.neck_table is not None:
            shared = ((self.neck_ops_per_link - 1).clamp(min=0)[..., None] * self.neck_link_conv).sum(dim=(0, 1))
            out["neck"] = self.neck_const + Cost(*(self.neck_table.sum(dim=(0, 1, 2)) - shared).tolist())
        if self.head_table is not None:
            pre = sum((c for cell in self.head_pre for c in cell if c is not None), Cost())
            out["head"] = self.head_const + pre + Cost(*self.head_table.sum(dim=(0, 1, 2)).tolist())
        return out

    def decoded_cost(self, genotype: dict) -> Dict[str, Cost]:
        """Exact cost of the modules decoded from ``genotype``, read from the supernet tables."""
        out = {}
        if genotype.get("neck") is not None and self.neck_table is not None:
            g = genotype["neck"]
            if g["levels"] != self.neck_levels or len(g["layers"]) != self.neck_table.shape[0]:
                raise ValueError("genotype neck does not match the neck the cost tables were built from")
            cost, table = self.neck_const, self.neck_table.tolist()  # lists: indexing a tensor per link is slow
            for k, links in enumerate(g["layers"]):
                for l in links:
                    idx = self.neck_pairs.index((l["from"], l["to"]))
                    cost = cost + Cost(*table[k][idx][NECK_OPS.index(l["op"])])
            out["neck"] = cost
        if genotype.get("head") is not None and self.head_table is not None:
            cells = genotype["head"]["cells"]
            if len(cells) != self.head_table.shape[0]:
                raise ValueError("genotype head does not match the head the cost tables were built from")
            cost, table = self.head_const, self.head_table.tolist()
            for m, edges in enumerate(cells):
                used_inputs = {e["input"] for e in edges}
                cost = cost + sum((self.head_pre[m][k] for k in (0, 1) if k in used_inputs), Cost())
                for e in edges:
                    idx = EDGE_PAIRS.index((e["input"], e["node"]))
                    cost = cost + Cost(*table[m][idx][HEAD_OPS.index(e["op"])])
            out["head"] = cost
        return out


# ----- the docs table: python -m autofpn.search.cost
SETTINGS = {
    # name: (backbone channels C2..C5, neck width, Auto-head width, 2-MLP width, image (H, W),
    #        RoIs per image = roi.batch_size_per_image in training)
    "paper (ResNet-50, 800x1333)": ((256, 512, 1024, 2048), 256, 512, 1024, (800, 1333), 512),
    "demo (ResNet-18, 256x256, configs/demo.yaml)": ((64, 128, 256, 512), 32, 32, 128, (256, 256), 64),
}


def _fmt(c: Cost) -> str:
    return f"{c.params / 1e6:.2f} | {c.flops / 1e9:.2f}"


def cost_table(genotype_dir: str = "configs/genotypes") -> str:
    """Markdown table of params / FLOPs of necks and heads at the SETTINGS sizes."""
    import os

    from autofpn.models.heads import TwoMLPHead
    from autofpn.models.necks import FPN, PANet

    from autofpn.models.genotype import load_genotype

    strides = {f"c{lv}": 2 ** lv for lv in (2, 3, 4, 5)}
    lines = []
    for setting, (backbone_ch, neck_ch, head_ch, mlp_dim, image, rois) in SETTINGS.items():
        in_ch = {f"c{lv}": c for lv, c in zip((2, 3, 4, 5), backbone_ch)}
        sizes = level_sizes(image, (2, 3, 4, 5))
        feats = {f"c{lv}": _meta((1, in_ch[f"c{lv}"]) + sizes[lv]) for lv in (2, 3, 4, 5)}
        lines += [f"### {setting}", "",
                  f"Neck: one image padded to {sizes[2][0] * 4}x{sizes[2][1] * 4}, {neck_ch} channels. "
                  f"Head: {rois} RoIs of {neck_ch}x7x7 (head width {head_ch} for Auto-head).", "",
                  "| module | params (M) | GFLOPs (a multiply-add = 2) |", "|---|---:|---:|"]
        for name, cls in (("FPN (models/necks.py)", FPN), ("PANet (models/necks.py)", PANet)):
            lines.append(f"| {name} | {_fmt(count_cost(cls(in_ch, strides, neck_ch).to('meta'), feats))} |")
        for g in ("fpn", "panet", "ssd"):
            genotype = load_genotype(os.path.join(genotype_dir, f"{g}.json"))
            neck = AutoFusionNeck(in_ch, strides, neck_ch, genotype=genotype)
            lines.append(f"| Auto-fusion genotype `{g}.json` | {_fmt(ResourceCost(neck, image_size=image).total()['neck'])} |")
        supernet = AutoFusionNeck(in_ch, strides, neck_ch)
        rc = ResourceCost(supernet, image_size=image)
        uniform = torch.softmax(torch.zeros(supernet.arch_shape), -1)
        lines.append(f"| Auto-fusion supernet, all ops | {_fmt(rc.total()['neck'])} |")
        lines.append(f"| Auto-fusion supernet, expected at uniform alpha | {_fmt(rc.expected_raw(uniform)['neck'])} |")
        mlp = TwoMLPHead(neck_ch, 7, mlp_dim).to("meta")
        lines.append(f"| 2-MLP head (mlp_dim {mlp.out_channels}) | {_fmt(count_cost(mlp, _meta((rois, neck_ch, 7, 7))))} |")
        head = AutoHead(neck_ch, 7, head_ch, cells=2)
        rc = ResourceCost(head=head, num_rois=rois)
        uniform = torch.softmax(torch.zeros(head.arch_shape), -1)
        lines.append(f"| Auto-head supernet, all ops | {_fmt(rc.total()['head'])} |")
        lines.append(f"| Auto-head supernet, expected at uniform beta | {_fmt(rc.expected_raw(head_weights=uniform)['head'])} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    print(cost_table())


if __name__ == "__main__":
    main()
