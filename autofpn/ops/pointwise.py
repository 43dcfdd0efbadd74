"""One 1x1 convolution over concatenated inputs, plus a weighted residual: the end of a fused
mixed op (autofpn/models/operations.py, ``_fused_weighted_sum``).

    out = conv1x1(concat(xs, dim=1), weight, bias) [+ extra] [+ residual_weight * residual]

In channels-last, ``concat(xs)`` is a (pixels, K*C) matrix and the convolution one matrix
product. The autograd function here keeps that matrix for the weight gradient and writes each
input's gradient with its own product (``grad_out @ weight[:, k-th block]``), each a dense
channels-last tensor, instead of one product whose column blocks the depthwise convolutions'
backward would copy again; the residual's weight gets its gradient as one dot product. In NCHW
(and on other devices) it is the same formula in PyTorch ops.
"""
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from autofpn.ops.layout import memory_format_of

__all__ = ["concat_pointwise", "add_weighted"]


def _pixels(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N*H*W, C); a view for a channels-last x."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


class _ConcatPointwise(torch.autograd.Function):
    """Channels-last xs (K tensors [N, C_k, H, W]); weight [C_out, sum C_k, 1, 1]; bias [C_out]
    or None; extra [N, C_out, H, W] or None; residual [N, C_out, H, W] with a 0-d
    residual_weight, or both None."""

    @staticmethod
    def forward(ctx, weight, bias, extra, residual, residual_weight, *xs):
        n, _, h, w = xs[0].shape
        pixels = _pixels(torch.cat(xs, 1) if len(xs) > 1 else xs[0])  # (N*H*W, sum C_k)
        matrix = weight.reshape(weight.shape[0], -1)  # (C_out, sum C_k)
        out = torch.mm(pixels, matrix.t()) if bias is None else torch.addmm(bias, pixels, matrix.t())
        out = out.view(n, h, w, -1).permute(0, 3, 1, 2)  # (N*H*W, C_out) -> (N, C_out, H, W), channels-last
        if extra is not None:
            out.add_(extra)
        if residual is not None:
            out.addcmul_(residual, residual_weight)
        ctx.save_for_backward(pixels, matrix, residual, residual_weight)
        ctx.shapes = [x.shape for x in xs]
        ctx.has = (bias is not None, extra is not None, weight.shape)
        return out

    @staticmethod
    @once_differentiable  # the concatenation is made inside forward: no second-order gradient through it
    def backward(ctx, grad_out):
        pixels, matrix, residual, residual_weight = ctx.saved_tensors
        has_bias, has_extra, weight_shape = ctx.has
        needs = ctx.needs_input_grad
        grad = _pixels(grad_out)  # (N*H*W, C_out); a copy only when grad_out is not channels-last
        grad_weight = grad_bias = grad_extra = grad_residual = grad_residual_weight = None
        if needs[0]:
            grad_weight = grad.t().mm(pixels).view(weight_shape)
        if has_bias and needs[1]:
            grad_bias = grad.sum(0)
        if has_extra and needs[2]:
            grad_extra = grad_out
        if residual is not None:
            if needs[3]:
                grad_residual = grad_out * residual_weight
            if needs[4]:
                flat = grad.reshape(-1), _pixels(residual).reshape(-1)
                if flat[0].dtype != residual_weight.dtype:  # half precision: accumulate in float32
                    flat = tuple(f.to(residual_weight.dtype) for f in flat)
                grad_residual_weight = torch.dot(*flat)
        grad_xs: List[Optional[Tensor]] = []
        start = 0
        for k, shape in enumerate(ctx.shapes):
            stop = start + shape[1]
            if needs[5 + k]:
                n, c, h, w = shape
                grad_xs.append(grad.mm(matrix[:, start:stop]).view(n, h, w, c).permute(0, 3, 1, 2))
            else:
                grad_xs.append(None)
            start = stop
        return (grad_weight, grad_bias, grad_extra, grad_residual, grad_residual_weight, *grad_xs)


def concat_pointwise(xs: Sequence[Tensor], weight: Tensor, bias: Optional[Tensor] = None,
                     extra: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                     residual_weight: Optional[Tensor] = None) -> Tensor:
    """``F.conv2d(torch.cat(xs, 1), weight, bias) + extra + residual_weight * residual``.

    Args:
        xs: K tensors [N, C_k, H, W] of one dtype and layout.
        weight: [C_out, sum C_k, 1, 1]; bias: [C_out] or None.
        extra: [N, C_out, H, W] added as it is, or None.
        residual: [N, C_out, H, W] and residual_weight, a 0-d tensor (an architecture weight),
            or both None.
    Returns [N, C_out, H, W], in the layout of xs. Under autocast: in its dtype, with the
    residual rounded to it and residual_weight's gradient accumulated in residual_weight's dtype.
    """
    device = xs[0].device.type
    autocast = torch.amp.is_autocast_available(device)  # not on "meta" (the planner's shapes-only pass)
    if autocast and torch.is_autocast_enabled(device):  # what autocast does for the convolution: all in its dtype
        dtype = torch.get_autocast_dtype(device)
        xs = [x.to(dtype) for x in xs]
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        extra = None if extra is None else extra.to(dtype)
    dtype = xs[0].dtype
    if residual is not None:
        residual = residual.to(dtype)
    if all(memory_format_of(x) == torch.channels_last for x in xs) and (
            extra is None or memory_format_of(extra) == torch.channels_last):
        if not autocast:
            return _ConcatPointwise.apply(weight, bias, extra, residual, residual_weight, *xs)
        with torch.autocast(device, enabled=False):
            return _ConcatPointwise.apply(weight, bias, extra, residual, residual_weight, *xs)
    out = F.conv2d(torch.cat(list(xs), 1) if len(xs) > 1 else xs[0], weight, bias)
    if extra is not None:
        out = out.add_(extra)
    if residual is not None:
        out = add_weighted(out, residual, residual_weight)
    return out


class _AddWeighted(torch.autograd.Function):
    """base + weight * residual with a 0-d weight whose gradient, sum(grad * residual), is
    accumulated in the weight's dtype (float32 under autocast, like ``mixed_sum``'s; a float16
    sum could overflow)."""

    @staticmethod
    def forward(ctx, base: Tensor, residual: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(residual, weight)
        return torch.addcmul(base, residual, weight)  # a 0-d weight keeps base's dtype

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        residual, weight = ctx.saved_tensors
        grad_residual = grad_out * weight if ctx.needs_input_grad[1] else None
        grad_weight = None
        if ctx.needs_input_grad[2]:
            grad_weight = (grad_out.to(weight.dtype) * residual.to(weight.dtype)).sum()
        return grad_out, grad_residual, grad_weight


def add_weighted(base: Tensor, residual: Tensor, weight: Tensor) -> Tensor:
    """``base + weight * residual`` (base, residual: one shape and dtype; weight: a 0-d tensor,
    e.g. an architecture weight in float32 under autocast), its gradient in weight's dtype."""
    return _AddWeighted.apply(base, residual.to(base.dtype), weight)
