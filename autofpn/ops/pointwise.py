"""One 1x1 convolution over concatenated inputs, plus a weighted residual: the end of a fused
mixed op (autofpn/models/operations.py, ``_fused_weighted_sum``).

    out = conv1x1(concat(xs, dim=1), weight, bias) [+ extra] [+ residual_weight * residual]

In channels-last, ``concat(xs)`` is a (pixels, K*C) matrix and the convolution one matrix
product. The autograd function here keeps that matrix for the weight gradient and writes each
input's gradient with its own product (``grad_out @ weight[:, k-th block]``), each a dense
channels-last tensor, instead of one product whose column blocks the depthwise convolutions'
backward would copy again; the residual's weight gets its gradient as one dot product. In NCHW
(and on other devices) it is the same formula in PyTorch ops.

With ``groups`` G > 1 the convolution is grouped (the stacked links of a neck supernet,
autofpn/models/operations.py, ``stacked_weighted_sum``): output group g reads channel group g of
every input, and the products run as G matrix products at once (``torch.bmm`` over strided
views of the pixel matrices; a copy back to the pixel layout after each).

When the inputs are depthwise convolutions' outputs (a mixed op's), ``depthwise_concat_pointwise``
takes the convolutions' inputs instead and computes the depthwise outputs again in the backward
pass: no concatenation is kept (or made), for the cost of K depthwise forwards (in either
layout); a demo search iteration's peak memory and time: docs/BENCHMARKS.md, "Fused mixed ops".
"""
import contextlib
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from autofpn.ops.depthwise import depthwise_conv2d_backward, depthwise_same_conv
from autofpn.ops.layout import memory_format_of

__all__ = ["concat_pointwise", "depthwise_concat_pointwise", "add_weighted", "in_autocast_dtype", "autocast_off"]


def _pixels(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N*H*W, C); a view for a channels-last x."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _grouped(pixels: Tensor, groups: int) -> Tensor:
    """(P, G*C) -> (G, P, C): group g's columns as the g-th matrix of a batch (a strided view)."""
    return pixels.view(pixels.shape[0], groups, -1).transpose(0, 1)


def _ungrouped(batch: Tensor) -> Tensor:
    """(G, P, C) -> (P, G*C), the inverse of ``_grouped`` (a copy)."""
    return batch.transpose(0, 1).reshape(batch.shape[1], -1)


def _weight_grad(grad: Tensor, pixels: Tensor, groups: int) -> Tensor:
    """The gradient of a 1x1 convolution's weight from grad (P, C_out) and its input pixels
    (P, C_in): (C_out, C_in), grouped (G, C_out / G, C_in / G)."""
    if groups == 1:
        return grad.t().mm(pixels)
    return torch.bmm(_grouped(grad, groups).transpose(1, 2), _grouped(pixels, groups))


def _grouped_matrix(weight: Tensor, groups: int) -> Tensor:
    """A 1x1 convolution's weight [C_out, C_in / G, 1, 1] -> (G, C_out / G, C_in / G)."""
    return weight.reshape(groups, weight.shape[0] // groups, -1)


class _ConcatPointwise(torch.autograd.Function):
    """Channels-last xs (K tensors [N, C_k, H, W]; one when groups > 1); weight [C_out,
    sum C_k / groups, 1, 1]; bias [C_out] or None; extra [N, C_out, H, W] or None; residual
    [N, C_out, H, W] with a 0-d residual_weight, or both None."""

    @staticmethod
    def forward(ctx, weight, bias, extra, residual, residual_weight, groups, *xs):
        n, _, h, w = xs[0].shape
        pixels = _pixels(torch.cat(xs, 1) if len(xs) > 1 else xs[0])  # (N*H*W, sum C_k)
        if groups == 1:
            matrix = weight.reshape(weight.shape[0], -1)  # (C_out, sum C_k)
            out = torch.mm(pixels, matrix.t()) if bias is None else torch.addmm(bias, pixels, matrix.t())
        else:
            matrix = _grouped_matrix(weight, groups)  # (G, C_out / G, C_in / G)
            out = _ungrouped(torch.bmm(_grouped(pixels, groups), matrix.transpose(1, 2)))
            out = out if bias is None else out.add_(bias)
        out = _finish(out.view(n, h, w, -1).permute(0, 3, 1, 2), extra, residual, residual_weight)
        ctx.save_for_backward(pixels, matrix, residual, residual_weight)
        ctx.shapes = [x.shape for x in xs]
        ctx.groups = groups
        ctx.has = (bias is not None, extra is not None, weight.shape)
        return out

    @staticmethod
    @once_differentiable  # the concatenation is made inside forward: no second-order gradient through it
    def backward(ctx, grad_out):
        pixels, matrix, residual, residual_weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        groups = ctx.groups
        grad = _pixels(grad_out)  # (N*H*W, C_out); a copy only when grad_out is not channels-last
        grad_weight = _weight_grad(grad, pixels, groups).view(ctx.has[2]) if needs[0] else None
        grad_xs: List[Optional[Tensor]] = []
        start = 0
        for shape, needed in zip(ctx.shapes, needs[6:]):
            stop = start + shape[1] // groups
            grad_xs.append(_block_input_grad(grad, matrix[..., start:stop], shape, groups) if needed else None)
            start = stop
        return (grad_weight, *_epilogue_grads(ctx, grad_out, grad, residual, residual_weight), None, *grad_xs)


class _DepthwiseConcatPointwise(torch.autograd.Function):
    """``_ConcatPointwise`` over the depthwise convolutions of its inputs, d_k = dwconv(h_k, V_k),
    that keeps the inputs h_k for the backward and computes the d_k again there instead of
    keeping their concatenation (a mixed op's h_k are its shared ReLU output and the sep-convs'
    inner ReLU outputs, kept by those ReLUs anyway: this saves K maps of the op's C channels for K
    depthwise forwards). hs: K tensors [N, C_k, H, W] of one layout (one may repeat), kernels
    (K tensors [C_k, 1, k, k]), dilations (K ints); the rest as ``_ConcatPointwise`` (groups:
    each d_k's channels in G groups, output group g reads group g of every d_k). Any layout:
    the output and the inputs' gradients in the layout of hs."""

    @staticmethod
    def forward(ctx, weight, bias, extra, residual, residual_weight, groups, dilations, *hs_and_kernels):
        hs, kernels = hs_and_kernels[:len(dilations)], hs_and_kernels[len(dilations):]
        n, _, height, width = hs[0].shape
        matrix = weight.reshape(weight.shape[0], -1) if groups == 1 else _grouped_matrix(weight, groups)
        out = None
        start = 0
        for h, v, d in zip(hs, kernels, dilations):  # sum_k d_k W_k^T, no concatenation of the d_k
            stop = start + h.shape[1] // groups
            d_pixels = _pixels(_depthwise_forward(h, v, d))
            if groups == 1:
                block = matrix[:, start:stop].t()
                if out is None:
                    out = torch.mm(d_pixels, block) if bias is None else torch.addmm(bias, d_pixels, block)
                else:
                    out.addmm_(d_pixels, block)
            else:  # out: (G, N*H*W, C_out / G) until the last block
                block = matrix[:, :, start:stop].transpose(1, 2)
                if out is None:
                    out = torch.bmm(_grouped(d_pixels, groups), block)
                else:
                    out.baddbmm_(_grouped(d_pixels, groups), block)
            start = stop
        if groups > 1:
            out = _ungrouped(out)
            out = out if bias is None else out.add_(bias)
        layout = memory_format_of(hs[0])  # the matrix products give channels-last: back to the inputs' layout
        out = out.view(n, height, width, -1).permute(0, 3, 1, 2).contiguous(memory_format=layout)
        out = _finish(out, extra, residual, residual_weight)
        ctx.save_for_backward(matrix, residual, residual_weight, *hs, *kernels)
        ctx.dilations = dilations
        ctx.groups = groups
        ctx.shapes = [h.shape for h in hs]
        ctx.has = (bias is not None, extra is not None, weight.shape)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        matrix, residual, residual_weight, *saved = ctx.saved_tensors
        k, groups = len(ctx.dilations), ctx.groups
        hs, kernels = saved[:k], saved[k:]
        needs = ctx.needs_input_grad
        grad = _pixels(grad_out)
        weight_blocks: List[Tensor] = []  # the weight gradient, block by block
        grad_hs: List[Optional[Tensor]] = [None] * k
        grad_kernels: List[Optional[Tensor]] = [None] * k
        start = 0
        for i, (h, v, d, shape) in enumerate(zip(hs, kernels, ctx.dilations, ctx.shapes)):
            stop = start + shape[1] // groups
            if needs[0]:  # d_k computed again, and dropped before the next block's
                weight_blocks.append(_weight_grad(grad, _pixels(_depthwise_forward(h, v, d)), groups))
            if needs[7 + i] or needs[7 + k + i]:
                grad_d = _block_input_grad(grad, matrix[..., start:stop], shape, groups)
                grad_hs[i], grad_kernels[i] = depthwise_conv2d_backward(
                    grad_d.contiguous(memory_format=memory_format_of(h)), h, v, d * (v.shape[-1] - 1) // 2, d,
                    needs[7 + i], needs[7 + k + i])
            start = stop
        grad_weight = torch.cat(weight_blocks, -1).view(ctx.has[2]) if needs[0] else None
        return (grad_weight, *_epilogue_grads(ctx, grad_out, grad, residual, residual_weight), None, None,
                *grad_hs, *grad_kernels)


def _depthwise_forward(h: Tensor, kernel: Tensor, dilation: int) -> Tensor:
    return depthwise_same_conv(h, kernel, dilation * (kernel.shape[-1] - 1) // 2, dilation)


def _finish(out: Tensor, extra: Optional[Tensor], residual: Optional[Tensor],
            residual_weight: Optional[Tensor]) -> Tensor:
    """out [+ extra] [+ residual_weight * residual], in place (out is made by the caller)."""
    if extra is not None:
        out.add_(extra)
    if residual is not None:
        out.addcmul_(residual, residual_weight)
    return out


def _block_input_grad(grad: Tensor, block: Tensor, shape, groups: int = 1) -> Tensor:
    """The gradient of one input [N, C_k, H, W] of the product, channels-last, from grad
    (N*H*W, C_out) and its weight block (C_out, C_k); grouped: (G, C_out / G, C_k / G)."""
    n, c, h, w = shape
    pixels = grad.mm(block) if groups == 1 else _ungrouped(torch.bmm(_grouped(grad, groups), block))
    return pixels.view(n, h, w, c).permute(0, 3, 1, 2)


def _epilogue_grads(ctx, grad_out: Tensor, grad: Tensor, residual: Optional[Tensor],
                    residual_weight: Optional[Tensor]) -> tuple:
    """The gradients of bias, extra, residual and residual_weight, both functions (None where
    not given or not needed); grad is grad_out as (N*H*W, C_out)."""
    has_bias, has_extra, _ = ctx.has
    needs = ctx.needs_input_grad
    grad_bias = grad.sum(0) if has_bias and needs[1] else None
    grad_extra = grad_out if has_extra and needs[2] else None
    grad_residual = grad_residual_weight = None
    if residual is not None:
        if needs[3]:
            grad_residual = grad_out * (residual_weight if residual_weight.dim() == 0
                                        else residual_weight.to(grad_out.dtype))
        if needs[4]:
            pixels = grad, _pixels(residual)
            if pixels[0].dtype != residual_weight.dtype:  # half precision: accumulate in float32
                pixels = tuple(p.to(residual_weight.dtype) for p in pixels)
            if residual_weight.dim() == 0:
                grad_residual_weight = torch.dot(pixels[0].reshape(-1), pixels[1].reshape(-1))
            else:  # one weight per channel
                grad_residual_weight = (pixels[0] * pixels[1]).sum(0).view_as(residual_weight)
    return grad_bias, grad_extra, grad_residual, grad_residual_weight


def concat_pointwise(xs: Sequence[Tensor], weight: Tensor, bias: Optional[Tensor] = None,
                     extra: Optional[Tensor] = None, residual: Optional[Tensor] = None,
                     residual_weight: Optional[Tensor] = None, groups: int = 1) -> Tensor:
    """``F.conv2d(torch.cat(xs, 1), weight, bias, groups=groups) + extra + residual_weight * residual``.

    Args:
        xs: K tensors [N, C_k, H, W] of one dtype and layout (one when groups > 1).
        weight: [C_out, sum C_k / groups, 1, 1]; bias: [C_out] or None.
        groups: as ``F.conv2d``'s: output channel group g reads input channel group g only.
        extra: [N, C_out, H, W] added as it is, or None.
        residual: [N, C_out, H, W] and residual_weight, a 0-d tensor (an architecture weight)
            or, in ``depthwise_concat_pointwise``, one per channel ([C_out, 1, 1]); or both None.
    Returns [N, C_out, H, W], in the layout of xs. Under autocast: in its dtype, with the
    residual rounded to it and residual_weight's gradient accumulated in residual_weight's dtype.
    """
    if groups > 1 and len(xs) > 1:
        raise ValueError(f"concat_pointwise: groups > 1 takes one input, got {len(xs)}")
    (*xs, weight, bias, extra), autocast = in_autocast_dtype([*xs, weight, bias, extra])
    residual = None if residual is None else residual.to(xs[0].dtype)
    if all(memory_format_of(x) == torch.channels_last for x in xs) and (
            extra is None or memory_format_of(extra) == torch.channels_last):
        with autocast_off(xs[0].device.type, autocast):
            return _ConcatPointwise.apply(weight, bias, extra, residual, residual_weight, groups, *xs)
    out = F.conv2d(torch.cat(xs, 1) if len(xs) > 1 else xs[0], weight, bias, groups=groups)
    if extra is not None:
        out = out.add_(extra)
    if residual is not None:
        out = add_weighted(out, residual, residual_weight)
    return out


def depthwise_concat_pointwise(hs: Sequence[Tensor], kernels: Sequence[Tensor], dilations: Sequence[int],
                               weight: Tensor, bias: Optional[Tensor] = None, extra: Optional[Tensor] = None,
                               residual: Optional[Tensor] = None, residual_weight: Optional[Tensor] = None,
                               groups: int = 1) -> Tensor:
    """``concat_pointwise([dwconv(h_k, V_k, d_k) for each k], weight, bias, extra, residual,
    residual_weight)`` where dwconv is the depthwise convolution with dilation d_k and "same"
    padding (``depthwise_conv2d``). The same values and gradients; the depthwise outputs are
    computed again in the backward pass instead of kept (less memory for K depthwise forwards).
    In either layout, on any device: the 1x1 convolution as matrix products over the pixels
    (copies to and from channels-last in NCHW).

    Args:
        hs: K tensors [N, C_k, H, W] (the same tensor may come more than once).
        kernels: K tensors [C_k, 1, k_k, k_k], k_k odd; dilations: K ints.
        weight: [C_out, sum C_k / groups, 1, 1].
        groups: G; every d_k's channels in G equal groups, and output channel group g reads
            group g of every d_k: ``F.conv2d(x, weight, bias, groups=G)`` with x the
            concatenation over g of (the concatenation over k of d_k's group g).
        the rest: as ``concat_pointwise``.
    """
    k = len(hs)
    cast, autocast = in_autocast_dtype([*hs, *kernels, weight, bias, extra])
    hs, kernels, (weight, bias, extra) = cast[:k], cast[k:2 * k], cast[2 * k:]
    residual = None if residual is None else residual.to(hs[0].dtype)
    with autocast_off(hs[0].device.type, autocast):
        return _DepthwiseConcatPointwise.apply(weight, bias, extra, residual, residual_weight, groups, tuple(dilations),
                                               *hs, *kernels)


def in_autocast_dtype(tensors: List[Optional[Tensor]]) -> Tuple[List[Optional[Tensor]], bool]:
    """(the tensors in autocast's dtype when autocast is on, as it treats a convolution's inputs,
    None kept; whether autocast exists on their device: not on "meta", the planner's pass).
    With ``autocast_off``, how a custom autograd function of ops/ takes autocast's dtype."""
    device = next(t for t in tensors if t is not None).device.type
    available = torch.amp.is_autocast_available(device)
    if available and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        tensors = [None if t is None else t.to(dtype) for t in tensors]
    return tensors, available


def autocast_off(device: str, available: bool):
    """Autocast off around an autograd function whose inputs ``in_autocast_dtype`` cast: it
    computes in their dtype."""
    return torch.autocast(device, enabled=False) if available else contextlib.nullcontext()


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
