"""The weighted sum of a mixed op's full convolutions in an architecture step.

    out = sum_k w_k (conv(x, V_k) + b_k)        (stride 1, "same" padding, odd square kernels)

A fused mixed op (autofpn/models/operations.py) computes this as one convolution with the merged
kernel ``sum_k w_k V_k`` (the smaller kernels zero-padded to the largest). Its backward then needs
the merged kernel's weight gradient G for the architecture weights (dL/dw_k = <G, V_k>), a whole
convolution's FLOPs for K scalars. In an architecture step the kernels get no gradient, so here
each convolution's output c_k is computed and kept instead, and dL/dw_k = <dL/dout, c_k> is an
element-wise product; dL/dx is still the merged kernel's input gradient. For the head's conv_3x3
and conv_5x5 (in units of one tap's FLOPs): forward 9 + 25, backward 25, against 25 + 25 + 25
merged; two kept output maps more.
"""
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from autofpn.ops.pointwise import autocast_off, in_autocast_dtype

__all__ = ["weighted_convs", "merged_kernel"]


def merged_kernel(kernels: Sequence[Tensor]) -> Tensor:
    """``sum_k kernels[k]``, the smaller ones zero-padded (centred) to the largest: the kernel of
    the sum of "same"-padded convolutions (their padding is half the kernel)."""
    size = max(v.shape[-1] for v in kernels)
    return sum(F.pad(v, [(size - v.shape[-1]) // 2] * 4) for v in kernels)


class _WeightedConvs(torch.autograd.Function):
    """x: [N, C, H, W]; w: [K]; K kernels [C_out, C, k, k] and K biases [C_out] (no gradient).
    Computes in x's dtype (the kernels in it too); w and its gradient keep w's dtype."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, *kernels_and_biases: Tensor) -> Tensor:
        count = w.shape[0]
        kernels, biases = kernels_and_biases[:count], kernels_and_biases[count:]
        outs = [F.conv2d(x, v, b, padding=v.shape[-1] // 2) for v, b in zip(kernels, biases)]
        scale = w.detach().to(x.dtype)
        out = outs[0] * scale[0]
        for k in range(1, count):
            out = out + outs[k] * scale[k]
        merged = merged_kernel([v * scale[k] for k, v in enumerate(kernels)])
        ctx.save_for_backward(x, merged, *outs)
        ctx.w_dtype = w.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):
        x, merged, *outs = ctx.saved_tensors
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            pad = merged.shape[-1] // 2
            grad_x = torch.ops.aten.convolution_backward(
                grad_out, x, merged, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], 1, [True, False, False])[0]
        if ctx.needs_input_grad[1]:  # products and sum in w's dtype (float32 under autocast: a float16
            grad = grad_out.to(ctx.w_dtype)  # product of two maps' values overflows beyond 65504)
            grad_w = torch.stack([torch.sum(grad * c.to(ctx.w_dtype)) for c in outs])
        return (grad_x, grad_w) + (None,) * (2 * len(outs))


def weighted_convs(x: Tensor, w: Tensor, kernels: List[Tensor], biases: List[Tensor]) -> Tensor:
    """``sum_k w[k] * F.conv2d(x, kernels[k], biases[k], padding=k_k // 2)`` with gradients for x
    and w only (the kernels and biases must not need one: an architecture step). Same values and
    gradients as the merged convolution, up to float rounding. Under autocast the convolutions
    run in its dtype (x, kernels and biases cast, as autocast casts a convolution's inputs) and
    so does the result; w's gradient stays in w's dtype."""
    if any(t.requires_grad for t in (*kernels, *biases)):
        raise ValueError("weighted_convs gives no gradient to the kernels or biases: use the merged convolution")
    (x, *kernels_and_biases), autocast = in_autocast_dtype([x, *kernels, *biases])
    with autocast_off(x.device.type, autocast):
        return _WeightedConvs.apply(x, w, *kernels_and_biases)
