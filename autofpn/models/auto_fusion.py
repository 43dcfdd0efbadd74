"""Auto-fusion: the searchable neck of Auto-FPN (supernet) and the neck decoded from a genotype.

Structure (paper Sec. 3.1, Fig. 3 left)::

    C_l --1x1 conv--> X^0_l                                  (input projection to `channels`)
    X^{k+1}_i = sum_j  resample_{j->i}( op_{k,j,i}( conv1x1_{k,j,i}( X^k_j ) ) )   k = 0..L-1
    P_l = X^L_l ;  P_{top+1} = max_pool2d(P_top, kernel 1, stride 2)   (for the RPN)

Every (source j, target i) pair of a layer is a *link*. Its op runs at the source resolution;
``resample`` is max pooling (kernel = stride = 2^(i-j)) when going to a coarser level and
bilinear upsampling when going to a finer one. In the supernet every link is a mixed op over
O_N (``NECK_OPS``); a decoded neck keeps only the links of its genotype, each with one op.

Architecture weights for the supernet: ``Tensor[layers, len(levels)**2, len(NECK_OPS)]``
(softmax over the last dim), link index ``t * len(levels) + s`` for target level
``levels[t]`` and source level ``levels[s]`` (see ``link_pairs``).
"""
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from autofpn.ops.layout import memory_format_of
from autofpn.ops.pointwise import concat_pointwise

from .genotype import neck_part
from .operations import NECK_OPS, MixedOp, make_norm, shuffle_partial, stackable, stacked_weighted_sum, step_conv1x1


def resample(x: Tensor, src_level: int, dst_level: int, size: Tuple[int, int]) -> Tensor:
    """Move ``x`` (at level ``src_level``) to level ``dst_level`` of spatial ``size``.

    Coarser target: max pool, kernel = stride = 2^(dst-src), ceil mode (the backbone's strided
    convs round up too); finer target: bilinear upsampling to ``size``."""
    if dst_level == src_level:
        return x
    if dst_level > src_level:
        factor = 2 ** (dst_level - src_level)
        out = F.max_pool2d(x, kernel_size=factor, stride=factor, ceil_mode=True)
        # odd input sizes not produced by a backbone (never when traced for ONNX export: the
        # padded batch divides by every stride, and the comparison would freeze into the graph)
        if not torch.jit.is_tracing() and tuple(out.shape[-2:]) != tuple(size):
            out = F.adaptive_max_pool2d(x, size)
        return out
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ConvNorm(nn.Sequential):
    """1x1 conv -> norm (a level's input projection); in a training or search step the conv as
    ``pointwise`` (the same values, a faster backward on the CPU: ``trains_faster_convs``)."""

    def forward(self, x: Tensor) -> Tensor:
        conv, norm = self
        return norm(step_conv1x1(conv, x))


class FusionLink(nn.Module):
    """One link of a layer: 1x1 conv -> (mixed) op at the source resolution.

    The resampling to the target level is done by the layer (it needs the target size)."""

    def __init__(self, channels: int, norm: str, chosen: Optional[Sequence[str]] = None,
                 sampled: bool = False, residual: bool = False, partial: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=norm == "none")
        self.norm = make_norm(norm, channels)
        self.mixed = MixedOp(channels, NECK_OPS, norm, chosen, sampled, residual, partial)

    def project(self, x: Tensor) -> Tensor:
        """norm(conv1x1(x)); in a training or search step the 1x1 conv as ``pointwise`` (the same
        values, a faster backward on the CPU: ``trains_faster_convs``)."""
        return self.norm(step_conv1x1(self.conv, x))

    def forward(self, x: Tensor, weights: Optional[Tensor] = None) -> Optional[Tensor]:
        """None when a sampled path chose "none" for this link (nothing computed; with partial
        channels the link still passes its other channels on)."""
        if self.mixed.sampled and weights is not None and self.mixed.partial == 1:
            active = self.mixed.active(weights)  # one host sync per link, shared with the mixed op
            return self.mixed(self.project(x), weights, active) if active else None
        return self.mixed(self.project(x), weights)


def stacked_links(links: Sequence[FusionLink], x: Tensor, weights: Tensor) -> List[Tensor]:
    """``[link(x, w) for link, w in zip(links, weights)]`` for the supernet links that leave one
    source level, computed as one (``stacks(links, x, weights)``): one 1x1 projection with the
    links' weights stacked, then ``stacked_weighted_sum`` (one call per op for all links instead
    of one per link and op: at the demo's widths a neck search iteration is mostly fixed cost per
    call). With partial channels the projection's op channels and passed-by channels are two
    products, so neither is sliced from the other. x: Tensor[N, C, H, W]; weights: Tensor[G,
    len(NECK_OPS)]. Returns G tensors [N, C, H, W] in x's layout."""
    mixed = [link.mixed for link in links]
    c, parts = mixed[0].op_channels, mixed[0].partial
    weight = torch.stack([link.conv.weight for link in links])  # [G, C, C, 1, 1]
    bias = torch.stack([link.conv.bias for link in links])  # [G, C]
    ops_in = concat_pointwise([x], weight[:, :c].flatten(0, 1), bias[:, :c].flatten())  # [N, G c, H, W]
    y = stacked_weighted_sum(mixed, ops_in, weights)
    layout = memory_format_of(x)
    if parts == 1:
        return [part.contiguous(memory_format=layout) for part in y.chunk(len(links), 1)]
    rest = concat_pointwise([x], weight[:, c:].flatten(0, 1), bias[:, c:].flatten())  # [N, G (C - c), H, W]
    return [shuffle_partial(y_g, rest_g, parts, layout)
            for y_g, rest_g in zip(y.chunk(len(links), 1), rest.chunk(len(links), 1))]


def stacks(links: Sequence[FusionLink], x: Tensor, weights: Tensor) -> bool:
    """Whether ``stacked_links`` runs ``links`` on x (Tensor[N, C, H, W]) with ``weights``
    (Tensor[G, len(NECK_OPS)]): norm-free links (the paper's search) whose mixed ops are
    ``stackable`` at x's N H W pixels (sampled links: when every op of every link is active; one
    host sync for the group)."""
    if not all(isinstance(link.norm, nn.Identity) and link.conv.bias is not None for link in links):
        return False
    mixed = [link.mixed for link in links]
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    if not any(m.sampled for m in mixed):
        return stackable(mixed, pixels)
    if not stackable(mixed, pixels, every_op_active=True):  # decided before the host sync
        return False
    held = weights.detach().index_select(1, mixed[0].op_index.to(weights.device))
    return bool(held.ne(0).all())


def link_name(src: int, dst: int) -> str:
    return f"p{src}_to_p{dst}"


class AutoFusionNeck(nn.Module):
    """Auto-fusion neck; ``genotype=None`` builds the supernet, else the decoded fixed neck.

    Args:
        in_channels: backbone channels per level, ``{"c2": 256, ..., "c5": 2048}``.
        in_strides: backbone strides per level, ``{"c2": 4, ..., "c5": 32}``.
        channels: neck width (256 in the paper).
        levels: fused levels (P2..P5 by default; P3..P7 for a one-stage detector).
        layers: number of Auto-fusion layers L (must match the genotype's when one is given).
        genotype: a genotype dict (its "neck" part is used), or that neck part alone
            ({"levels", "layers"}), or None for the supernet.
        norm: none | gn | bn after every conv (search: none, as in the paper).
        sampled: supernet only: the links compute only the ops of non-zero weight (a sampled
            path, ``search.mode: gdas``); a level no link reaches is zeros.
        extra_pool_level: add P_{top+1} = max_pool2d(P_top, 1, stride 2) for the RPN.
        residual_ops: every convolution op of a link is a residual branch, ``x + op(x)``,
            zero-initialised (``MixedOp``'s ``residual``); the paper's ops are plain.
        partial_channels: supernet only: K > 1 runs each link's ops on 1 / K of its channels
            (``MixedOp``'s ``partial``, ``search.partial_channels``); 1: all (the paper).
    Attributes:
        out_channels: int; strides: {"p2": 4, ..., "p6": 64}; arch_shape (supernet only):
        (layers, len(levels)**2, len(NECK_OPS)); link_pairs: [(src, dst), ...] in weight order.
    """

    def __init__(self, in_channels: Dict[str, int], in_strides: Dict[str, int], channels: int,
                 levels: Sequence[int] = (2, 3, 4, 5), layers: int = 2,
                 genotype: Optional[dict] = None, norm: str = "none",
                 extra_pool_level: bool = True, sampled: bool = False, residual_ops: bool = False,
                 partial_channels: int = 1):
        super().__init__()
        self.levels = [int(lv) for lv in levels]
        self.out_channels = channels
        self.extra_pool_level = extra_pool_level
        self.is_supernet = genotype is None
        for lv in self.levels:
            if f"c{lv}" not in in_channels or f"c{lv}" not in in_strides:
                raise ValueError(f"AutoFusionNeck: backbone gives no level 'c{lv}' "
                                 f"(has {sorted(in_channels)})")
        self.strides = {f"p{lv}": int(in_strides[f"c{lv}"]) for lv in self.levels}
        top = self.levels[-1]
        if extra_pool_level:
            self.strides[f"p{top + 1}"] = 2 * self.strides[f"p{top}"]
        self.link_pairs: List[Tuple[int, int]] = [(s, t) for t in self.levels for s in self.levels]

        # which links (and ops) exist in each layer
        if genotype is None:
            chosen_per_layer = [{pair: None for pair in self.link_pairs} for _ in range(layers)]
            self.arch_shape = (layers, len(self.link_pairs), len(NECK_OPS))
        else:
            neck_g = neck_part(genotype)
            if neck_g["levels"] != self.levels:
                raise ValueError(f"AutoFusionNeck: genotype levels {neck_g['levels']} != "
                                 f"configured levels {self.levels}")
            if len(neck_g["layers"]) != layers:
                raise ValueError(f"AutoFusionNeck: genotype has {len(neck_g['layers'])} layers, "
                                 f"configured layers = {layers}")
            chosen_per_layer = [{(l["from"], l["to"]): [l["op"]] for l in links}
                                for links in neck_g["layers"]]
        self.num_layers = layers

        self.input_proj = nn.ModuleDict({
            f"c{lv}": ConvNorm(nn.Conv2d(in_channels[f"c{lv}"], channels, 1, bias=norm == "none"),
                               make_norm(norm, channels))
            for lv in self.levels})
        self.layers = nn.ModuleList()
        for chosen in chosen_per_layer:
            # keep link_pairs order so the module order is the same in supernet and fixed neck
            self.layers.append(nn.ModuleDict({
                link_name(s, t): FusionLink(channels, norm, chosen[(s, t)], sampled and genotype is None,
                                            residual_ops, partial_channels if genotype is None else 1)
                for (s, t) in self.link_pairs if (s, t) in chosen}))

    def _layer_links(self, layer: nn.ModuleDict, x: Dict[int, Tensor],
                     weights: Optional[Tensor]) -> Iterator[Tuple[int, int, Optional[Tensor]]]:
        """(source, target, the link's output before resampling, None for a sampled "none") for
        each link of ``layer`` (weights: Tensor[len(link_pairs), len(NECK_OPS)] or None), source by
        source; the links of a source that ``stacks`` are computed at once (``stacked_links``)."""
        for s in self.levels:
            pairs = [(idx, t) for idx, (src, t) in enumerate(self.link_pairs)
                     if src == s and link_name(s, t) in layer]  # "none" in a decoded neck: no link
            links = [layer[link_name(s, t)] for _, t in pairs]
            rows = None if weights is None else weights[[idx for idx, _ in pairs]]
            if rows is not None and stacks(links, x[s], rows):
                yield from ((s, t, y) for (_, t), y in zip(pairs, stacked_links(links, x[s], rows)))
                continue
            for (idx, t), link in zip(pairs, links):
                yield s, t, link(x[s], None if weights is None else weights[idx])

    def forward(self, feats: Dict[str, Tensor], weights: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """feats: {"c2": Tensor[N, C2, H/4, W/4], ...}; weights: Tensor[arch_shape] (softmaxed)
        for the supernet, None for a fixed neck. Returns {"p2": Tensor[N, channels, H/4, W/4],
        ..., "p6"}."""
        if self.is_supernet:
            if weights is None or tuple(weights.shape) != self.arch_shape:
                got = None if weights is None else tuple(weights.shape)
                raise ValueError(f"AutoFusionNeck supernet needs weights of shape {self.arch_shape}, got {got}")
        elif weights is not None:
            raise ValueError("a fixed AutoFusionNeck takes no architecture weights")
        x = {lv: self.input_proj[f"c{lv}"](feats[f"c{lv}"]) for lv in self.levels}
        sizes = {lv: tuple(x[lv].shape[-2:]) for lv in self.levels}
        for k, layer in enumerate(self.layers):
            out: Dict[int, Tensor] = {}
            for s, t, y in self._layer_links(layer, x, None if weights is None else weights[k]):
                if y is None:  # a sampled "none"
                    continue
                y = resample(y, s, t, sizes[t])
                out[t] = y if t not in out else out[t] + y
            x = {lv: out[lv] if lv in out else x[lv].new_zeros(x[lv].shape[:2] + sizes[lv])
                 for lv in self.levels}
        result = {f"p{lv}": x[lv] for lv in self.levels}
        if self.extra_pool_level:
            top = self.levels[-1]
            result[f"p{top + 1}"] = F.max_pool2d(result[f"p{top}"], kernel_size=1, stride=2)
        return result
