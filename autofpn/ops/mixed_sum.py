"""Weighted sum of a mixed op's candidate outputs: ``sum_k w[k] * xs[k]``.

This is the inner loop of every DARTS-style mixed op of the supernet (K = 7 non-"none" ops on
feature maps like [2, 64, 80, 80] in the neck and [512, 512, 7, 7] RoI batches in the head).

Two interchangeable backends, same results and same autograd:

- ``"extension"``: the fused C++/CUDA operator ``torch.ops.autofpn.mixed_sum`` from ``autofpn._C``
  (built from ``cuda_ext/`` by ``make ext``). The forward reads the K inputs once and writes the
  output once; the backward reads grad_out and the K inputs once, writes the K input gradients
  and accumulates the K weight gradients (dot products) in that same pass. Autograd and the fake
  (meta) implementation are registered here, so the op works under ``torch.compile``.
- ``"reference"``: pure PyTorch, used when the extension is not importable (e.g. built with
  ``AUTOFPN_NO_EXT=1``).

Which one is active is logged once on the ``"autofpn"`` logger.
"""
from __future__ import annotations

import logging
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from autofpn.ops.layout import memory_format_of

logger = logging.getLogger("autofpn")

# Must match kMaxMixedInputs in cuda_ext/mixed_sum_math.h.
MAX_MIXED_INPUTS = 16
# xs of these dtypes may come with float32 weights: a mixed op under autocast, whose convolutions
# run in half precision while the softmax of alpha / beta stays float32
HALF_DTYPES = (torch.float16, torch.bfloat16)

__all__ = ["mixed_sum", "backend_name", "reference_mixed_sum", "MAX_MIXED_INPUTS"]


def _check_inputs(xs: Sequence[Tensor], w: Tensor, op_name: str = "mixed_sum") -> None:
    """Raises ValueError naming the offending argument (same checks as the C++ front end)."""
    if not isinstance(xs, (list, tuple)) or not all(isinstance(x, Tensor) for x in xs):
        raise TypeError(f"{op_name}: xs must be a list of tensors, got {type(xs).__name__}")
    num_inputs = len(xs)
    if not 1 <= num_inputs <= MAX_MIXED_INPUTS:
        raise ValueError(f"{op_name}: expected 1 to {MAX_MIXED_INPUTS} input tensors in xs, got {num_inputs}")
    if not isinstance(w, Tensor) or w.dim() != 1 or w.shape[0] != num_inputs:
        shape = list(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"{op_name}: w must have shape [K] = [{num_inputs}] (one weight per tensor in xs), "
                         f"got {shape}")
    x0 = xs[0]
    if not x0.is_floating_point():
        raise ValueError(f"{op_name}: xs must be floating point, got {x0.dtype}")
    for k, x in enumerate(xs):
        if x.device != x0.device:
            raise ValueError(f"{op_name}: all tensors must be on one device, xs[{k}] is on {x.device} "
                             f"but xs[0] is on {x0.device}")
        if x.dtype != x0.dtype:
            raise ValueError(f"{op_name}: all tensors must have one dtype, xs[{k}] is {x.dtype} "
                             f"but xs[0] is {x0.dtype}")
        if x.shape != x0.shape:
            raise ValueError(f"{op_name}: all tensors in xs must have one shape, xs[{k}] has shape "
                             f"{list(x.shape)} but xs[0] has shape {list(x0.shape)}")
    if w.device != x0.device:
        raise ValueError(f"{op_name}: w is on {w.device} but xs are on {x0.device}")
    if w.dtype != x0.dtype and not (w.dtype == torch.float32 and x0.dtype in HALF_DTYPES):
        raise ValueError(f"{op_name}: w has dtype {w.dtype} but xs have dtype {x0.dtype} "
                         f"(w may be float32 when xs are float16 / bfloat16)")


# ---------------------------------------------------------------------------------------------
# Pure PyTorch reference
# ---------------------------------------------------------------------------------------------
def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _ReferenceMixedSum(torch.autograd.Function):
    """Same maths as the extension, in PyTorch ops. Accumulates in place (one output buffer)
    and keeps only the inputs for the backward, like the fused op."""

    @staticmethod
    def forward(ctx, w: Tensor, *xs: Tensor) -> Tensor:
        # float16 / bfloat16 accumulate in float32 like the kernels (no-op casts otherwise).
        accumulate = _accumulation_dtype(xs[0].dtype)
        w_acc = w.to(accumulate)
        out = xs[0].to(accumulate) * w_acc[0]
        for k in range(1, len(xs)):
            out.addcmul_(xs[k].to(accumulate), w_acc[k])  # in place, no temporary per term
        ctx.save_for_backward(w, *xs)
        return out.to(xs[0].dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        w, *xs = ctx.saved_tensors
        accumulate = _accumulation_dtype(xs[0].dtype)
        grad_w = None
        if ctx.needs_input_grad[0]:
            grad_w = torch.stack([torch.sum(grad_out.to(accumulate) * x.to(accumulate)) for x in xs]).to(w.dtype)
        w_acc = w.to(accumulate)
        grad_xs = [(grad_out.to(accumulate) * w_acc[k]).to(xs[k].dtype) if ctx.needs_input_grad[k + 1] else None
                   for k in range(len(xs))]
        return (grad_w, *grad_xs)


def reference_mixed_sum(xs: Sequence[Tensor], w: Tensor) -> Tensor:
    """Pure PyTorch ``sum_k w[k] * xs[k]`` (differentiable in xs and w)."""
    _check_inputs(xs, w)
    return _ReferenceMixedSum.apply(w, *xs)


# ---------------------------------------------------------------------------------------------
# Extension: autograd and fake implementations of torch.ops.autofpn.*
# ---------------------------------------------------------------------------------------------
def _fake_mixed_sum(xs: List[Tensor], w: Tensor) -> Tensor:
    _check_inputs(xs, w)
    return torch.empty_like(xs[0], memory_format=memory_format_of(xs[0]))


def _fake_mixed_sum_backward(grad_out: Tensor, xs: List[Tensor], w: Tensor, input_grads: bool,
                             weight_grad: bool) -> Tuple[List[Tensor], Tensor]:
    _check_inputs(xs, w, "mixed_sum_backward")
    memory_format = memory_format_of(xs[0])
    grad_xs = [torch.empty_like(xs[0], memory_format=memory_format) for _ in xs] if input_grads else []
    grad_w = torch.empty(len(xs) if weight_grad else 0, dtype=w.dtype, device=w.device)
    return grad_xs, grad_w


def _setup_context(ctx, inputs, output) -> None:
    xs, w = inputs
    ctx.num_inputs = len(xs)
    ctx.save_for_backward(w, *xs)


def _backward(ctx, grad_out: Tensor):
    w, *xs = ctx.saved_tensors
    xs_need_grad, w_needs_grad = ctx.needs_input_grad
    input_grads = any(xs_need_grad)
    grad_xs, grad_w = torch.ops.autofpn.mixed_sum_backward(grad_out, xs, w, input_grads, w_needs_grad)
    grad_xs_out: List[Optional[Tensor]] = [
        grad_xs[k] if input_grads and xs_need_grad[k] else None for k in range(ctx.num_inputs)
    ]
    return grad_xs_out, (grad_w if w_needs_grad else None)


def _setup_backward_context(ctx, inputs, output) -> None:
    grad_out, xs, w, input_grads, weight_grad = inputs
    ctx.input_grads, ctx.weight_grad = input_grads, weight_grad
    ctx.save_for_backward(grad_out, w, *xs)


def _double_backward(ctx, grad_grad_xs, grad_grad_w):
    """Backward of mixed_sum_backward (second order, e.g. gradient penalties / unrolled DARTS).

    The first backward is grad_xs[k] = w[k] * g and grad_w[k] = sum(g * xs[k]); with incoming
    gradients gg_xs[k] and gg_w[k] its derivatives are
    d/dg = sum_k w[k] gg_xs[k] + sum_k gg_w[k] xs[k],  d/dxs[k] = gg_w[k] g,  d/dw[k] = sum(gg_xs[k] g),
    all written with the fused op itself (so they are differentiable again).
    """
    grad_out, w, *xs = ctx.saved_tensors
    has_gg_xs = ctx.input_grads and grad_grad_xs is not None and any(t is not None for t in grad_grad_xs)
    has_gg_w = ctx.weight_grad and grad_grad_w is not None
    gg_xs = ([t if t is not None else torch.zeros_like(grad_out) for t in grad_grad_xs] if has_gg_xs else None)

    d_grad_out = None
    if has_gg_xs:
        d_grad_out = torch.ops.autofpn.mixed_sum(gg_xs, w)
    if has_gg_w:
        term = torch.ops.autofpn.mixed_sum(xs, grad_grad_w)
        d_grad_out = term if d_grad_out is None else d_grad_out + term
    d_xs = [grad_grad_w[k] * grad_out if has_gg_w else None for k in range(len(xs))]
    d_w = torch.ops.autofpn.mixed_sum_backward(grad_out, gg_xs, w, False, True)[1] if has_gg_xs else None
    return d_grad_out, d_xs, d_w, None, None


def _load_backend() -> str:
    """Imports autofpn._C (registering torch.ops.autofpn.*) and its Python-side registrations;
    returns the active backend name and logs it. Called once, when this module is imported."""
    try:
        import autofpn._C  # noqa: F401  (loading the library registers the operators)
    except (ImportError, OSError) as error:
        logger.info("mixed_sum backend: reference (PyTorch ops; autofpn._C not importable: %s)", error)
        return "reference"
    torch.library.register_fake("autofpn::mixed_sum")(_fake_mixed_sum)
    torch.library.register_fake("autofpn::mixed_sum_backward")(_fake_mixed_sum_backward)
    torch.library.register_autograd("autofpn::mixed_sum", _backward, setup_context=_setup_context)
    torch.library.register_autograd("autofpn::mixed_sum_backward", _double_backward,
                                    setup_context=_setup_backward_context)
    logger.info("mixed_sum backend: extension (fused kernel torch.ops.autofpn.mixed_sum from autofpn._C)")
    return "extension"


# Decided once at import (a constant afterwards, so torch.compile sees a plain branch).
_BACKEND = _load_backend()


def backend_name() -> str:
    """``"extension"`` when the fused autofpn._C operator is in use, else ``"reference"``."""
    return _BACKEND


def mixed_sum(xs: Sequence[Tensor], w: Tensor) -> Tensor:
    """Weighted sum of K same-shaped tensors.

    Args:
        xs: K tensors (1 <= K <= 16) of one shape, dtype (float64/32/16, bfloat16) and device,
            e.g. the K candidate-op outputs of a mixed op, each [N, C, H, W].
        w: Tensor[K], same dtype and device (or float32 with float16 / bfloat16 xs, as under
            autocast), e.g. softmaxed architecture weights.

    Returns:
        Tensor of xs' shape: ``sum_k w[k] * xs[k]``, differentiable w.r.t. every xs[k] and w.
        Channels-last inputs give a channels-last output.
    """
    _check_inputs(xs, w)
    if _BACKEND == "extension":
        return torch.ops.autofpn.mixed_sum(list(xs), w)
    return _ReferenceMixedSum.apply(w, *xs)
