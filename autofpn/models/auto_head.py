"""Auto-head: the searchable RCNN box head of Auto-FPN (supernet) and the head decoded from a
genotype.

Structure (paper Sec. 3.2, Fig. 3 right; DARTS cells)::

    RoI features x: Tensor[R, in_channels, 7, 7]
    cell m has 7 nodes: node 0 = output of cell m-2, node 1 = output of cell m-1 (both are the
    RoI features for cell 0, node 0 is for cell 1), each projected to `channels` by
    ReLU -> 1x1 conv -> norm ("pre0", "pre1");
    node n = sum_{k<n} op_{m,k,n}(node k)   for the 4 intermediate nodes n = 2..5;
    cell output = concat(node 2..5)   -> 4 * channels channels.
    head output = global average pool of the last cell -> Tensor[R, 4 * channels].

With ``cell_size`` S < 7 the RoI features are average-pooled to S x S before the first cell (not
in the paper): every cell op then runs on S * S positions instead of 49, which is what a head of
convolutions over every RoI needs to come near the FLOPs of FPN's 2-MLP head.

Each cell has its own architecture. Architecture weights for the supernet:
``Tensor[cells, 14, len(HEAD_OPS)]`` (softmax over the last dim), edge index in the order of
``edge_pairs`` = [(input, node) for node in 2..5 for input in 0..node-1].
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .genotype import HEAD_INPUT_NODES, HEAD_INTERMEDIATE_NODES, head_part
from .operations import HEAD_OPS, MixedOp, ReLUConvNorm

EDGE_PAIRS: List[Tuple[int, int]] = [
    (k, n) for n in range(HEAD_INPUT_NODES, HEAD_INPUT_NODES + HEAD_INTERMEDIATE_NODES)
    for k in range(n)]


def edge_name(inp: int, node: int) -> str:
    return f"n{inp}_to_n{node}"


class HeadCell(nn.Module):
    """One Auto-head cell. ``chosen`` maps (input, node) -> [op] for a fixed cell, None for the
    supernet (every edge, every op)."""

    def __init__(self, in_prev_prev: int, in_prev: int, channels: int, norm: str,
                 chosen: Optional[dict] = None, sampled: bool = False, residual: bool = False,
                 partial: int = 1):
        super().__init__()
        self.channels = channels
        pairs = EDGE_PAIRS if chosen is None else [p for p in EDGE_PAIRS if p in chosen]
        used_inputs = {k for k, _ in pairs}
        # an input node no edge reads gets no projection (no unused parameters in DDP)
        self.pre0 = ReLUConvNorm(in_prev_prev, channels, 1, norm) if 0 in used_inputs else None
        self.pre1 = ReLUConvNorm(in_prev, channels, 1, norm) if 1 in used_inputs else None
        self.edges = nn.ModuleDict({
            edge_name(k, n): MixedOp(channels, HEAD_OPS, norm, None if chosen is None else chosen[(k, n)],
                                     sampled and chosen is None, residual, partial if chosen is None else 1)
            for (k, n) in pairs})

    def forward(self, s0: Tensor, s1: Tensor, weights: Optional[Tensor] = None) -> Tensor:
        """s0, s1: outputs of cells m-2 and m-1; weights: Tensor[14, len(HEAD_OPS)] or None.
        Returns Tensor[R, 4 * channels, h, w]."""
        nodes: List[Optional[Tensor]] = [
            self.pre0(s0) if self.pre0 is not None else None,
            self.pre1(s1) if self.pre1 is not None else None]
        for n in range(HEAD_INPUT_NODES, HEAD_INPUT_NODES + HEAD_INTERMEDIATE_NODES):
            total = None
            for k in range(n):
                name = edge_name(k, n)
                if name not in self.edges:  # "none": nothing computed
                    continue
                w = weights[EDGE_PAIRS.index((k, n))] if weights is not None else None
                y = self.edges[name](nodes[k], w)
                if y is not None:  # None: a sampled "none"
                    total = y if total is None else total + y
            if total is None:  # every edge into this node sampled "none"
                ref = next(t for t in nodes if t is not None)
                total = ref.new_zeros(ref.shape[:1] + (self.channels,) + ref.shape[2:])
            nodes.append(total)
        return torch.cat(nodes[HEAD_INPUT_NODES:], dim=1)


def adaptive_pool_matrix(size: int, out_size: int, like: Optional[Tensor] = None) -> Tensor:
    """Tensor[out_size, size] (the dtype and device of ``like``): row i averages the window of
    ``adaptive_avg_pool2d`` (positions floor(i * size / out_size) up to ceil((i + 1) * size /
    out_size), exclusive)."""
    matrix = torch.zeros(out_size, size, dtype=None if like is None else like.dtype,
                         device=None if like is None else like.device)
    for i in range(out_size):
        start, end = (i * size) // out_size, -((-(i + 1) * size) // out_size)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


class AutoHead(nn.Module):
    """Auto-head box head; ``genotype=None`` builds the supernet, else the decoded fixed head.

    Args:
        in_channels: channels of the pooled RoI features (the neck width).
        pooler_size: RoI feature size (7).
        channels: cell width C (512 in the paper); the output has 4 * C features.
        cells: number of cells M (must match the genotype's when one is given).
        genotype: a genotype dict (its "head" part is used), or that head part alone
            ({"cells"}), or None for the supernet.
        norm: none | gn | bn (search: none).
        sampled: supernet only: each edge computes only the ops of non-zero weight (a sampled
            path, ``search.mode: gdas``).
        residual_ops: every convolution op of an edge is a residual branch, ``x + op(x)``,
            zero-initialised (``MixedOp``'s ``residual``); the paper's ops are plain.
        readout: how the last cell's [R, 4C, P, P] becomes one feature vector per RoI: "gap"
            (the paper's global average pooling, 4C features) or "fc" (Detectron's Xconv1fc:
            flatten, one fully connected layer of ``readout_dim`` and ReLU, keeping where in the
            RoI each feature was).
        cell_size: the side S the RoI features are average-pooled to before the first cell
            (the windows of ``adaptive_avg_pool2d``, [R, in, P, P] -> [R, in, S, S]); 0 or P: no
            pooling (the paper).
        partial_channels: supernet only: K > 1 runs each edge's ops on 1 / K of its channels
            (``MixedOp``'s ``partial``, ``search.partial_channels``); 1: all (the paper).
    Attributes: out_channels = 4 * channels ("gap") or readout_dim ("fc"); arch_shape (supernet
    only) = (cells, 14, 8).
    """

    def __init__(self, in_channels: int, pooler_size: int = 7, channels: int = 512,
                 cells: int = 2, genotype: Optional[dict] = None, norm: str = "none",
                 sampled: bool = False, readout: str = "gap", readout_dim: int = 1024,
                 residual_ops: bool = False, cell_size: int = 0, partial_channels: int = 1):
        super().__init__()
        if not 0 <= cell_size <= pooler_size:
            raise ValueError(f"AutoHead: cell_size must be in [0, pooler_size = {pooler_size}], got {cell_size}")
        self.in_channels = in_channels
        self.pooler_size = pooler_size
        self.cell_size = cell_size or pooler_size
        self.channels = channels
        self.is_supernet = genotype is None
        if genotype is None:
            chosen_per_cell: Sequence[Optional[dict]] = [None] * cells
            self.arch_shape = (cells, len(EDGE_PAIRS), len(HEAD_OPS))
        else:
            head_g = head_part(genotype)
            if len(head_g["cells"]) != cells:
                raise ValueError(f"AutoHead: genotype has {len(head_g['cells'])} cells, "
                                 f"configured cells = {cells}")
            chosen_per_cell = [{(e["input"], e["node"]): [e["op"]] for e in edges}
                               for edges in head_g["cells"]]
        self.num_cells = cells
        cell_out = HEAD_INTERMEDIATE_NODES * channels
        self.cells = nn.ModuleList()
        for m, chosen in enumerate(chosen_per_cell):
            in_prev_prev = in_channels if m < 2 else cell_out
            in_prev = in_channels if m < 1 else cell_out
            self.cells.append(HeadCell(in_prev_prev, in_prev, channels, norm, chosen, sampled, residual_ops,
                                       partial_channels))
        if readout not in ("gap", "fc"):
            raise ValueError(f"AutoHead: readout must be 'gap' or 'fc', got {readout!r}")
        self.readout_fc = nn.Linear(cell_out * self.cell_size ** 2, readout_dim) if readout == "fc" else None
        self.out_channels = cell_out if readout == "gap" else readout_dim

    def forward(self, x: Tensor, weights: Optional[Tensor] = None) -> Tensor:
        """x: Tensor[R, in_channels, P, P]; weights: Tensor[arch_shape] (softmaxed) for the
        supernet, None for a fixed head. Returns Tensor[R, out_channels]."""
        if self.is_supernet:
            if weights is None or tuple(weights.shape) != self.arch_shape:
                got = None if weights is None else tuple(weights.shape)
                raise ValueError(f"AutoHead supernet needs weights of shape {self.arch_shape}, got {got}")
        elif weights is not None:
            raise ValueError("a fixed AutoHead takes no architecture weights")
        if self.cell_size < self.pooler_size:
            # [S, P] @ [R, in, P, P] @ [P, S] -> [R, in, S, S]: adaptive_avg_pool2d as two matmuls,
            # which ONNX exports when R is dynamic (its adaptive pooling needs a static input size);
            # built in x's dtype, so a float64 head averages with float64 weights
            pool = adaptive_pool_matrix(self.pooler_size, self.cell_size, like=x)
            x = pool @ x @ pool.t()
        s0 = s1 = x
        for m, cell in enumerate(self.cells):
            s0, s1 = s1, cell(s0, s1, weights[m] if weights is not None else None)
        if self.readout_fc is None:
            return s1.mean(dim=(2, 3))  # global average pooling: [R, 4C, P, P] -> [R, 4C]
        return torch.relu(self.readout_fc(s1.flatten(1)))  # [R, 4C * P * P] -> [R, readout_dim]
