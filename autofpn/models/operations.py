"""The op tables of Auto-FPN and the mixed op built from them.

One table builds both the supernet (a ``MixedOp`` holding every non-"none" op of a link/edge)
and the fixed modules decoded from a genotype (a ``MixedOp`` holding exactly the chosen op), so
a fixed module's parameters are a subset of the supernet's under the same state_dict keys.

Op definitions (DARTS style, every op keeps the channel count and the spatial size):

- ``identity``: x.
- ``dil_conv_KxK_rD``: ReLU -> depthwise KxK conv, dilation D -> pointwise 1x1 conv -> norm.
- ``sep_conv_KxK``: two dilation-1 blocks of the above (ReLU, depthwise, pointwise, norm).
- ``conv_KxK``: ReLU -> KxK conv -> norm.
- ``none``: the link/edge is absent. It is never instantiated and never computed: a mixed sum
  runs over the non-none ops only, with their softmax weights (the weight on "none" multiplies
  a zero tensor in DARTS, so dropping it changes nothing but the cost).

Normalization is a switch (``norm``): ``"none"`` during search (the paper searches without
BatchNorm); ``"gn"`` or ``"bn"`` when retraining a derived module. Without a norm layer the last
conv of a block carries a bias; with one it does not (the norm's affine shift replaces it).
"""
import contextlib
import functools
from math import gcd
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from autofpn.ops.depthwise import depthwise_conv2d, depthwise_same_conv
from autofpn.ops.layout import memory_format_of
from autofpn.ops.pointwise import add_weighted, concat_pointwise, depthwise_concat_pointwise
from autofpn.ops.weighted_convs import merged_kernel, weighted_convs
from autofpn.ops.mixed_sum import mixed_sum  # fused extension, or the PyTorch reference

# O_N, the neck (Auto-fusion) ops, in the paper's order. Index = position in alpha's last dim.
NECK_OPS = (
    "none",
    "identity",
    "dil_conv_3x3_r2",
    "dil_conv_3x3_r3",
    "dil_conv_5x5_r2",
    "dil_conv_5x5_r3",
    "sep_conv_3x3",
    "sep_conv_5x5",
)

# O_H, the head (Auto-head) ops, in the paper's order. Index = position in beta's last dim.
HEAD_OPS = (
    "none",
    "identity",
    "sep_conv_3x3",
    "sep_conv_5x5",
    "dil_conv_3x3_r2",
    "dil_conv_5x5_r2",
    "conv_3x3",
    "conv_5x5",
)

NORMS = ("none", "gn", "bn")


def make_norm(norm: str, channels: int) -> nn.Module:
    """``none`` -> Identity, ``gn`` -> GroupNorm (32 groups, fewer if channels are not a
    multiple of 32), ``bn`` -> BatchNorm2d."""
    if norm == "none":
        return nn.Identity()
    if norm == "gn":
        return nn.GroupNorm(gcd(32, channels), channels)
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"unknown norm '{norm}'; valid: {', '.join(NORMS)}")


def trains_faster_convs() -> bool:
    """Whether the ops' blocks run their depthwise and 1x1 convolutions through
    ``depthwise_conv2d`` and ``pointwise`` (the same values, a faster backward on the CPU:
    docs/BENCHMARKS.md) instead of their ``nn.Conv2d`` modules: with gradients on (a training
    or search step; inference runs the modules as built), outside ``ops_as_built`` (whose forward
    hooks must see each conv module run)."""
    return torch.is_grad_enabled() and not _AS_BUILT[0]


def step_conv1x1(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` for a 1x1 conv module; as ``pointwise`` when ``trains_faster_convs()``."""
    return pointwise(conv, x) if trains_faster_convs() else conv(x)


class DepthwiseConv2d(nn.Conv2d):
    """A depthwise KxK conv (dilation d, "same" padding, no bias) whose forward is
    ``depthwise_same_conv`` (on the CPU, a padding above 4 done by ``F.pad``: oneDNN's fast
    kernels do not take it). The parameters and state-dict keys of the ``nn.Conv2d``."""

    def __init__(self, channels: int, kernel: int, dilation: int):
        super().__init__(channels, channels, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation,
                         groups=channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return depthwise_same_conv(x, self.weight, self.padding[0], self.dilation[0])


class DepthwiseSeparableBlock(nn.Sequential):
    """ReLU -> depthwise KxK conv (dilation d, 'same' padding) -> pointwise 1x1 -> norm."""

    def __init__(self, channels: int, kernel: int, dilation: int, norm: str):
        super().__init__(
            nn.ReLU(inplace=False),
            DepthwiseConv2d(channels, kernel, dilation),
            nn.Conv2d(channels, channels, 1, bias=norm == "none"),
            make_norm(norm, channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        if not trains_faster_convs():
            return super().forward(x)
        relu, depthwise, conv1x1, norm = self
        return norm(pointwise(conv1x1, _depthwise(depthwise, relu(x))))


class ReLUConvNorm(nn.Sequential):
    """ReLU -> KxK conv ('same' padding) -> norm."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, norm: str):
        super().__init__(
            nn.ReLU(inplace=False),
            nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=norm == "none"),
            make_norm(norm, out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        relu, conv, norm = self
        if conv.kernel_size != (1, 1):
            return super().forward(x)
        return norm(step_conv1x1(conv, relu(x)))


def build_op(name: str, channels: int, norm: str) -> nn.Module:
    """The module of op ``name`` (any name of NECK_OPS or HEAD_OPS except "none")."""
    if name == "identity":
        return nn.Identity()
    if name.startswith("dil_conv_"):  # dil_conv_3x3_r2
        size, rate = name[len("dil_conv_"):].split("_r")
        return DepthwiseSeparableBlock(channels, int(size.split("x")[0]), int(rate), norm)
    if name.startswith("sep_conv_"):  # sep_conv_5x5
        kernel = int(name[len("sep_conv_"):].split("x")[0])
        return nn.Sequential(DepthwiseSeparableBlock(channels, kernel, 1, norm),
                             DepthwiseSeparableBlock(channels, kernel, 1, norm))
    if name.startswith("conv_"):  # conv_3x3
        return ReLUConvNorm(channels, channels, int(name[len("conv_"):].split("x")[0]), norm)
    raise ValueError(f"op '{name}' cannot be built (valid: {', '.join(sorted(set(NECK_OPS + HEAD_OPS) - {'none'}))})")


def _one_dtype(outputs: List[Tensor]) -> List[Tensor]:
    """The ops' outputs in one dtype. Under autocast the convolutions return the autocast dtype
    (float16 / bfloat16) while identity returns its input's: those go to the autocast dtype, the
    one the step computes in (``mixed_sum`` takes float32 weights with it)."""
    dtypes = {o.dtype for o in outputs}
    if len(dtypes) == 1:
        return outputs
    device = outputs[0].device.type
    dtype = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device)
             else functools.reduce(torch.promote_types, dtypes))
    return [o.to(dtype) for o in outputs]


def _weighted_sum(ops: Sequence[nn.Module], x: Tensor, w: Tensor) -> Tensor:
    """sum_k w[k] * ops[k](x) (the fused ``mixed_sum``); x: Tensor[N, C, H, W], w: Tensor[len(ops)].
    The reference (inside ``ops_as_built``: every op run as built), then the weighted sum."""
    return mixed_sum(_one_dtype([op(x) for op in ops]), w)


def _fusable_kind(op: nn.Module) -> Optional[str]:
    """How ``_fused_weighted_sum`` may run ``op``: "identity", "dil" (one ReLU -> depthwise ->
    pointwise-with-bias block), "sep" (two such blocks), "conv" (ReLU -> KxK conv with bias), or
    None when it holds a norm layer (or is anything else): then the mixed op is run unfused."""
    def block(m):
        return (isinstance(m, DepthwiseSeparableBlock) and isinstance(m[3], nn.Identity)
                and m[2].bias is not None and m[1].bias is None and m[1].groups == m[1].in_channels)
    if isinstance(op, nn.Identity):
        return "identity"
    if block(op):
        return "dil"
    if isinstance(op, nn.Sequential) and len(op) == 2 and block(op[0]) and block(op[1]):
        return "sep"
    if (isinstance(op, ReLUConvNorm) and isinstance(op[2], nn.Identity) and op[1].bias is not None
            and op[1].in_channels == op[1].out_channels and op[1].groups == 1 and op[1].stride == (1, 1)
            and op[1].dilation == (1, 1) and op[1].kernel_size[0] == op[1].kernel_size[1]
            and op[1].padding == (op[1].kernel_size[0] // 2,) * 2):
        return "conv"
    return None


def pointwise(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` for a 1x1 convolution (stride 1, no groups), a matrix product over the pixels
    when x is channels-last (``concat_pointwise``: on the CPU its backward is several times faster
    than the 1x1 convolution's). For the supernet's own 1x1 convolutions when it runs fused."""
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1 or conv.padding != (0, 0):
        return conv(x)
    return concat_pointwise([x], conv.weight, conv.bias)


def _depthwise(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` for the depthwise conv of a block, with the faster CPU backward."""
    return depthwise_conv2d(x, conv.weight, conv.padding[0], conv.dilation[0])


def _fused_weighted_sum(kinds: Sequence[str], ops: Sequence[nn.Module], x: Tensor, w: Tensor,
                        skip: Optional[Tensor] = None) -> Tensor:
    """``_weighted_sum(ops, x, w) [+ skip * x]`` rearranged into fewer, larger ops (``kinds``: the
    ``_fusable_kind`` of each op, none of them None; norm-free ops only; ``skip``: a 0-d weight
    of x besides identity's, the residual mixed op's). The same sum, up to float rounding:

    - the ops' first ReLU is computed once, ``r = relu(x)``, and shared;
    - the K weighted pointwise convolutions that end the "dil" ops and the second blocks of the
      "sep" ops, ``sum_k w_k (W_k d_k + b_k)`` with ``d_k`` the block's depthwise output, are one
      1x1 convolution over ``concat_k d_k`` with the weight ``concat_k (w_k W_k)`` (one GEMM
      instead of K GEMMs and a K-term sum);
    - the "conv" ops (conv_3x3, conv_5x5 of the head) are one convolution with the weighted sum
      of their kernels, the smaller ones zero-padded to the largest (centred: their "same"
      padding is half the kernel), ``sum_k w_k (V_k * r + c_k) = (sum_k w_k V_k) * r + sum_k w_k c_k``;
      in an architecture step (their parameters need no gradient) each is run
      on its own and its output kept, so that w gets its gradient without the merged kernel's
      weight gradient (``weighted_convs``: fewer FLOPs in all);
    - every bias enters once, ``sum_k w_k b_k``; identity is added as ``(w_id + skip) * x``, in
      the pointwise convolution's epilogue when there is one (x is read once).

    The parameters are read from the op modules, so gradients reach them (and w, through the
    scaled weights) by autograd. Under autocast the result has the convolutions' dtype, as
    ``_one_dtype`` gives the reference.
    """
    r = torch.relu(x)
    depthwise: List[Tensor] = []  # h_k, the inputs of the depthwise convs before the fused pointwise one
    depthwise_convs: List[nn.Conv2d] = []
    scaled: List[Tensor] = []  # w_k W_k
    biases: List[Tensor] = []  # w_k b_k
    convs: List[nn.Conv2d] = []  # the full convolutions
    conv_weights: List[Tensor] = []  # their w_k
    identity: Optional[Tensor] = skip
    for k, (kind, op) in enumerate(zip(kinds, ops)):
        if kind == "identity":
            identity = w[k] if identity is None else identity + w[k]
            continue
        if kind == "conv":
            convs.append(op[1])
            conv_weights.append(w[k])
            continue
        if kind == "sep":  # the first block: its ReLU is the shared r, its pointwise conv a matrix product
            first, op = op
            h = torch.relu(pointwise(first[2], _depthwise(first[1], r)))
        else:
            h = r
        depthwise.append(h)
        depthwise_convs.append(op[1])
        scaled.append(op[2].weight * w[k])
        biases.append(op[2].bias * w[k])
    # an architecture step (w needs a gradient, the convolutions' parameters do not): each
    # convolution's output is kept for w's gradient instead of the merged kernel's weight gradient
    arch_step = (bool(convs) and w.requires_grad and torch.is_grad_enabled()
                 and not any(p.requires_grad for c in convs for p in (c.weight, c.bias)))
    if not arch_step:
        biases += [c.bias * wk for c, wk in zip(convs, conv_weights)]
    bias = functools.reduce(torch.add, biases) if biases else None
    conv = None
    if arch_step:
        conv = weighted_convs(r, torch.stack(conv_weights), [c.weight for c in convs], [c.bias for c in convs])
        if bias is not None and not depthwise:
            conv = conv + bias.view(-1, 1, 1).to(conv.dtype)
    elif convs:
        kernel = merged_kernel([c.weight * wk for c, wk in zip(convs, conv_weights)])
        conv = F.conv2d(r, kernel, None if depthwise else bias, padding=kernel.shape[-1] // 2)
    if depthwise:  # the depthwise outputs d_k are computed again in the backward pass, not kept
        return depthwise_concat_pointwise(depthwise, [c.weight for c in depthwise_convs],
                                          [c.dilation[0] for c in depthwise_convs], torch.cat(scaled, 1), bias,
                                          conv, x if identity is not None else None, identity)
    return conv if identity is None else add_weighted(conv, x, identity)


# Stacked links (``stacked_weighted_sum``) multiply their pointwise convolutions in one of two
# forms: one product with a block-diagonal weight (G times the multiply-adds of the G links' own
# products, one call), or the G products at once (``torch.bmm`` over strided views: the links'
# own multiply-adds, plus a copy). Timed alone (a throwaway micro-benchmark on this project's 2-core
# CPU), the block-diagonal product was the faster at 4 links x 8 channels, the batched one at 4 x 32
# and above, either at 4 x 16;
# in a demo neck search iteration the two forms took the same time within the bench's noise
# (docs/BENCHMARKS.md, "Stacked neck links"). Up to this many stacked channels (G c): block-diagonal.
MAX_BLOCK_DIAGONAL_CHANNELS = 64

# The largest level that stacks, as pixels x (G c)^2 (the block-diagonal product's multiply-adds).
# Stacking makes G times fewer calls on G times larger tensors; on this CPU that pays only while
# they stay small: a demo neck search iteration with every level of 4 links x 32 channels
# stacked took 1.21x the time of the links one by one with block-diagonal products (the form of
# the time) and about as long as one by one with batched ones; with this limit 0.92x; at 4 x 8
# channels (partial channels, K = 4) 0.70x (``bench/bench_search.py --unstacked [--stack-limit M]``).
MAX_STACKED_MACS = 2 ** 24


def stackable(mixed: Sequence["MixedOp"], pixels: int, every_op_active: bool = False) -> bool:
    """Whether ``stacked_weighted_sum`` runs the mixed ops ``mixed`` (e.g. the links that leave
    one source level of a neck supernet) as one on inputs of ``pixels`` = N H W: fused supernet
    ops of one op table and width, of the kinds "identity", "dil" and "sep" only, at most
    ``MAX_STACKED_MACS`` in pixels x (G c)^2; sampled ones (``MixedOp.sampled``)
    only when ``every_op_active`` (no held op's weight is zero, e.g. the architecture step of
    ``search.mode: sampled_weights``: then they compute every op, as a full mixed op does)."""
    first = mixed[0]
    return (len(mixed) > 1 and pixels * (first.op_channels * len(mixed)) ** 2 <= MAX_STACKED_MACS
            and all(runs_fused(m) and (every_op_active or not m.sampled) and list(m.ops) == list(first.ops)
                    and m.kinds == first.kinds
                    and (m.op_channels, m.residual, m.recompute) == (first.op_channels, first.residual, first.recompute)
                    for m in mixed)
            and all(kind in ("identity", "dil", "sep") for kind in first.kinds)
            and any(kind != "identity" for kind in first.kinds))


def stacked_weighted_sum(mixed: Sequence["MixedOp"], x: Tensor, weights: Tensor) -> Tensor:
    """The G mixed ops' weighted sums at once (``stackable(mixed)``): x: Tensor[N, G c, H, W],
    mixed op g's input in channels g c .. (g + 1) c - 1 (c = ``op_channels``); weights:
    Tensor[G, len(op_table)], row g mixed op g's. Returns Tensor[N, G c, H, W], channels
    g c .. (g + 1) c - 1 equal (up to float rounding) to ``mixed[g]._mix(x_g, weights[g])``.

    Recomputed in the backward pass when the ops are (``MixedOp.recompute``)."""
    if mixed[0].recompute and torch.is_grad_enabled():
        return checkpoint(_stacked_sum, mixed, x, weights, use_reentrant=False)
    return _stacked_sum(mixed, x, weights)


def _stacked_sum(mixed: Sequence["MixedOp"], x: Tensor, weights: Tensor) -> Tensor:
    """``_fused_weighted_sum`` of G mixed ops stacked along the channels: one ReLU, one depthwise
    convolution per op over the G stacked kernels (G times fewer calls), and every pointwise
    convolution grouped, group g mixed op g's weight (times its architecture weight in the final
    one): G products at once, or one with a block-diagonal weight while G c is at most
    ``MAX_BLOCK_DIAGONAL_CHANNELS``. Identity (and a residual op's skip) is a weight per channel."""
    first = mixed[0]
    c = first.op_channels
    groups = len(mixed)
    batched = groups * c > MAX_BLOCK_DIAGONAL_CHANNELS  # else the block-diagonal form
    w = weights.index_select(1, first.op_index.to(weights.device))  # [G, ops held]
    identity = None  # [G]
    if first.residual:  # sum_k w_k (x + op_k(x)) over the convolutions adds their weights' sum times x
        identity = w.masked_fill(~first.conv_mask.to(w.device), 0).sum(1)
    r = torch.relu(x)
    hs: List[Tensor] = []  # the inputs of the final depthwise convs, stacked
    kernels: List[Tensor] = []
    dilations: List[int] = []
    blocks: List[Tensor] = []  # per op: w_gk W_gk stacked [G, c, c], or block-diag(w_gk W_gk) [G c, G c]
    biases: List[Tensor] = []  # concat_g(w_gk b_gk) per op
    for k, (name, kind) in enumerate(zip(first.ops, first.kinds)):
        if kind == "identity":
            identity = w[:, k] if identity is None else identity + w[:, k]
            continue
        ops = [m.ops[name] for m in mixed]
        if kind == "sep":  # the first block: depthwise, grouped pointwise, ReLU
            firsts = [op[0] for op in ops]
            d = depthwise_conv2d(r, torch.cat([b[1].weight for b in firsts]), firsts[0][1].padding[0],
                                 firsts[0][1].dilation[0])
            first_bias = torch.cat([b[2].bias for b in firsts])
            if batched:
                h = concat_pointwise([d], torch.cat([b[2].weight for b in firsts]), first_bias, groups=groups)
            else:
                block = torch.block_diag(*[b[2].weight.flatten(1) for b in firsts])
                h = concat_pointwise([d], block[:, :, None, None], first_bias)
            h = torch.relu(h)
            ops = [op[1] for op in ops]
        else:
            h = r
        hs.append(h)
        kernels.append(torch.cat([op[1].weight for op in ops]))
        dilations.append(ops[0][1].dilation[0])
        wk = w[:, k]
        scaled = torch.stack([op[2].weight.flatten(1) for op in ops]) * wk.view(-1, 1, 1)  # [G, c, c]
        blocks.append(scaled if batched else torch.block_diag(*scaled.unbind()))
        biases.append((torch.stack([op[2].bias for op in ops]) * wk.view(-1, 1)).flatten())
    residual_weight = None if identity is None else identity.repeat_interleave(c).view(-1, 1, 1)
    # [G c, K c] (group g's rows: its K ops' blocks side by side) or [G c, K G c]
    weight = torch.cat(blocks, -1).flatten(0, 1 if batched else 0)[:, :, None, None]
    return depthwise_concat_pointwise(hs, kernels, dilations, weight, functools.reduce(torch.add, biases), None,
                                      x if identity is not None else None, residual_weight,
                                      groups if batched else 1)


def _zero_last_layer(op: nn.Module) -> None:
    """Zero the scale of ``op``'s last norm layer (its last conv's weight and bias when it has no
    norm), so that ``x + op(x)`` starts as the identity (the zero-initialised residual branch of
    Goyal et al., 2017). Identity has nothing to zero."""
    norms = [m for m in op.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm))]
    if norms:
        nn.init.zeros_(norms[-1].weight)
        return
    convs = [m for m in op.modules() if isinstance(m, nn.Conv2d)]
    if convs:
        nn.init.zeros_(convs[-1].weight)
        if convs[-1].bias is not None:
            nn.init.zeros_(convs[-1].bias)


def set_recompute(model: nn.Module, enabled: bool = True) -> int:
    """Turn recomputation (``MixedOp.recompute``) on or off in every mixed op of ``model`` holding
    more than one op (a supernet's); returns how many. ValueError when such an op holds a
    BatchNorm (recomputing would update its running statistics twice)."""
    mixed = [m for m in model.modules() if isinstance(m, MixedOp) and len(m.ops) > 1]
    if enabled and any(isinstance(b, nn.modules.batchnorm._BatchNorm) for m in mixed for b in m.modules()):
        raise ValueError("recomputing the supernet's ops needs search.searched_norm none or gn: a BatchNorm "
                         "would update its running statistics in both forward passes")
    for m in mixed:
        m.recompute = enabled
    return len(mixed)


_AS_BUILT = [0]  # > 0 inside ``ops_as_built``


@contextlib.contextmanager
def ops_as_built():
    """Within it every mixed op runs its ops as built (not fused), so that forward hooks on the op
    modules see each one: how ``autofpn.search.cost.count_cost`` counts FLOPs (the cost tables,
    the planner). Outside it a supernet runs fused on every device, "meta" included, so that the
    planner's saved-activation count is the fused run's (autofpn/search/plan.py)."""
    _AS_BUILT[0] += 1
    try:
        yield
    finally:
        _AS_BUILT[0] -= 1


def runs_fused(mixed: "MixedOp") -> bool:
    """Whether ``mixed`` runs fused: a supernet's mixed op with ``fused`` on, outside
    ``ops_as_built``."""
    return mixed.fused and len(mixed.ops) > 1 and not _AS_BUILT[0]


def set_fused(model: nn.Module, enabled: bool = True) -> int:
    """Turn the fused computation (``MixedOp.fused``, on by default) on or off in every mixed op
    of ``model`` holding more than one op; returns how many. Off: every op runs on its own and
    ``mixed_sum`` weights their outputs (same values up to float rounding; the reference with
    every conv module as built is that inside ``ops_as_built``)."""
    mixed = [m for m in model.modules() if isinstance(m, MixedOp) and len(m.ops) > 1]
    for m in mixed:
        m.fused = enabled
    return len(mixed)


def shuffle_partial(y: Tensor, rest: Tensor, groups: int,
                    memory_format: Optional[torch.memory_format] = None) -> Tensor:
    """PC-DARTS's ``channel_shuffle(cat([y, rest], 1), groups)`` in one pass: y: Tensor[N, c, H, W]
    (the ops' output), rest: Tensor[N, (groups - 1) c, H, W] (the channels that passed by).
    Output channel j * groups + g is channel g * c + j of the concatenation: y's channels land at
    0, groups, 2 groups, ..., the g-th part of ``rest`` at g, g + groups, ... The result keeps
    y's memory format (channels-last stays channels-last; or ``memory_format`` when given) and,
    under autocast, its dtype; two copies whatever ``groups`` (y's and rest's, each into a view
    of the output)."""
    c = y.shape[1]
    out = torch.empty((y.shape[0], c * groups) + tuple(y.shape[2:]), dtype=y.dtype, device=y.device,
                      memory_format=memory_format or memory_format_of(y))
    parts = out.unflatten(1, (c, groups))  # [N, c, groups, H, W]: channel j * groups + g
    parts[:, :, 0] = y
    parts[:, :, 1:] = rest.unflatten(1, (groups - 1, c)).transpose(1, 2)
    return out


class MixedOp(nn.Module):
    """The ops of one link/edge.

    Supernet: built with every op of ``op_table``; ``forward(x, w)`` with ``w: Tensor[len(op_table)]``
    (softmax over the whole table, "none" included) returns ``sum_k w[k] * op_k(x)`` over the
    non-none ops. Fixed module: built with ``chosen=[name]``; ``forward(x)`` applies that op.
    Ops live in ``self.ops[name]`` so the fixed module's keys are a subset of the supernet's.

    ``sampled=True`` (a supernet searched with sampled paths, ``search.mode: gdas``): the ops
    whose weight is exactly 0 are not computed (their term of the sum is 0), so a one-hot sample
    costs one op; ``forward`` returns None when no op is active (the sampled op is "none").
    Their weights get no gradient, the straight-through estimate of GDAS.

    ``recompute`` (a supernet searched with ``search.recompute``, set by ``set_recompute``): the
    weighted sum is run under ``torch.utils.checkpoint``, so autograd keeps only the link's input
    and weights instead of every op's intermediate activations, and the ops run a second time in
    the backward pass: the same values and gradients, less memory, about one more forward of the
    ops in time. Not with BatchNorm inside the ops: the second forward would update its running
    statistics twice (``set_recompute`` refuses it).

    ``fused`` (on by default, ``set_fused``): a supernet's norm-free ops (``search.searched_norm:
    none``, the paper's search) run as ``_fused_weighted_sum``: one shared ReLU, the weighted
    pointwise convolutions as one 1x1 convolution, the weighted full convolutions as one; the same
    sum up to float rounding, with the parameters read from ``self.ops`` (same state_dict keys).
    With a norm inside the ops, or one active op of a sampled path, the ops run as built.

    ``partial`` = K > 1 (a supernet searched with ``search.partial_channels``; PC-DARTS, Xu et al.
    2020): the ops are built ``channels // K`` wide and run on the first ``channels // K`` channels
    of x only; the other channels pass by unchanged, "none" included, and the two parts are
    interleaved by PC-DARTS's channel shuffle (``shuffle_partial``), so that the next mixed op
    works on other channels. The ops' compute and saved activations are about 1 / K of the full
    mixed op's. A decoded module is always built at full width.

    ``residual`` (``model.neck.residual_ops``): every convolution op is a residual branch,
    ``x + op(x)``, its last norm (or, without one, its last conv) initialised to zero so that it
    starts as the identity; the supernet's sum is ``sum_k w_k op_k(x) + (sum of the convolutions'
    w_k) x``, so a decoded op at one-hot weights is the supernet's. Identity stays ``x``.
    """

    def __init__(self, channels: int, op_table: Sequence[str], norm: str = "none",
                 chosen: Sequence[str] = None, sampled: bool = False, residual: bool = False,
                 partial: int = 1):
        super().__init__()
        if partial < 1 or channels % partial:
            raise ValueError(f"partial channels: {channels} channels do not split into {partial} equal parts")
        if partial > 1 and chosen is not None:
            raise ValueError("partial channels are a supernet's: a decoded op is built at full width")
        self.sampled = sampled
        self.residual = residual
        self.recompute = False
        self.partial, self.channels, self.norm = partial, channels, norm
        self.op_channels = channels // partial  # the width the ops are built and run at
        names = [n for n in (op_table if chosen is None else chosen) if n != "none"]
        for n in names:
            if n not in op_table:
                raise ValueError(f"op '{n}' is not in this op table ({', '.join(op_table)})")
        self.op_table = tuple(op_table)
        self.ops = nn.ModuleDict({n: build_op(n, self.op_channels, norm) for n in names})
        # positions in the weight vector of the ops held here ("none" is skipped)
        self.register_buffer("op_index", torch.tensor([self.op_table.index(n) for n in names]),
                             persistent=False)
        # how _fused_weighted_sum runs each op (None: not norm-free, the mixed op runs unfused)
        self.kinds = [_fusable_kind(op) for op in self.ops.values()]
        self.fused = True
        if residual:
            for op in self.ops.values():
                _zero_last_layer(op)
        # which held ops are convolutions (they carry the skip of a residual mixed op); a fixed
        # module's as a Python bool, so that its forward reads no device tensor
        self.register_buffer("conv_mask", torch.tensor([n != "identity" for n in names]), persistent=False)
        self.residual_branch = residual and len(names) == 1 and names[0] != "identity"

    def forward(self, x: Tensor, weights: Tensor = None, active: Optional[List[int]] = None) -> Tensor:
        """x: Tensor[N, C, H, W]; weights: Tensor[len(op_table)] or None (fixed, single op);
        ``active``: ``self.active(weights)`` when the caller already has it (sampled only).
        None when a sampled path chose "none" (with partial channels: the passed-by channels)."""
        if weights is None:
            if len(self.ops) != 1:
                raise ValueError(f"a MixedOp with {len(self.ops)} ops needs architecture weights")
            y = next(iter(self.ops.values()))(x)
            return x + y if self.residual_branch else y
        if weights.shape != (len(self.op_table),):
            raise ValueError(f"weights of shape {tuple(weights.shape)}, expected ({len(self.op_table)},)")
        if self.partial == 1:
            return self._mix(x, weights, active)
        part = x[:, :self.op_channels].contiguous(memory_format=memory_format_of(x))
        y = self._mix(part, weights, active)
        return shuffle_partial(torch.zeros_like(part) if y is None else y, x[:, self.op_channels:], self.partial)

    def _mix(self, x: Tensor, weights: Tensor, active: Optional[List[int]]) -> Optional[Tensor]:
        """The weighted sum of the ops on x (Tensor[N, op_channels, H, W])."""
        w = weights.index_select(0, self.op_index.to(weights.device))
        ops = list(self.ops.values())
        conv_mask = self.conv_mask
        if self.sampled:
            active = self.active(weights) if active is None else active
            if not active:
                return None
            ops, w, conv_mask = [ops[i] for i in active], w[active], conv_mask[active]
        # residual: sum_k w_k (x + op_k(x)) over the convolutions adds their weights' sum times x
        skip = w.masked_fill(~conv_mask.to(w.device), 0).sum() if self.residual else None
        fn, args = _weighted_sum, (ops, x, w)
        if len(ops) > 1 and runs_fused(self):
            kinds = self.kinds if not self.sampled else [self.kinds[i] for i in active]
            if None not in kinds:
                fn, args, skip = _fused_weighted_sum, (kinds, ops, x, w, skip), None  # skip added inside
        if self.recompute and torch.is_grad_enabled():
            y = checkpoint(fn, *args, use_reentrant=False)
        else:
            y = fn(*args)
        return y if skip is None else add_weighted(y, x, skip)

    def at_full_width_(self) -> "MixedOp":
        """In place: a partial-channel mixed op's ops rebuilt at full width (new parameters, on
        the device of the old ones) and ``partial`` 1; for counting what the decoded op costs
        (the resource penalty's tables, ``autofpn.search.cost``). Returns self."""
        if self.partial > 1:
            device = next(self.parameters()).device
            with torch.device(device):
                self.ops = nn.ModuleDict({n: build_op(n, self.channels, self.norm) for n in self.ops})
            self.kinds = [_fusable_kind(op) for op in self.ops.values()]
            self.partial, self.op_channels = 1, self.channels
        return self

    def active(self, weights: Tensor) -> List[int]:
        """Positions (in ``self.ops``) of the ops with a non-zero weight (one host sync)."""
        held = weights.detach().index_select(0, self.op_index.to(weights.device))
        return held.ne(0).nonzero().flatten().tolist()
