"""Depthwise convolution (stride 1, "same" padding) with a faster backward on the CPU.

The supernet's mixed ops run many depthwise KxK convolutions (dilation 1, 2, 3). On the CPU,
oneDNN computes their forward quickly but their backward slowly when the kernel is dilated or
5x5: at the demo's neck shape ([4, 32, 48, 64], channels-last, one thread) the input gradient of
a dilated 3x3 / 5x5 depthwise conv took 5-10x its forward, the weight gradient of a 5x5 or
dilated one 8-14x. Here (``depthwise_conv2d``, CPU tensors):

- the input gradient is the forward convolution of ``grad_out`` with the kernel flipped in both
  spatial dimensions (same padding and dilation, since the padding is "same"): the transposed
  convolution written as a correlation, the same sums in another order, run by oneDNN's fast
  forward kernel;
- the weight gradient is ``torch.ops.autofpn.depthwise_conv2d_weight_grad`` when the autofpn._C
  extension is built (cuda_ext/depthwise_cpu.cpp: one multiply-add over the contiguous channels
  per output pixel and tap, 3-6x faster there; channels-last inputs), else PyTorch's
  (``aten::convolution_backward``).

On other devices it is ``F.conv2d`` (the GPU's backward kernels are not measured here).

Every forward convolution here (the forward, its recomputation, the input gradient) goes through
``depthwise_same_conv``: oneDNN runs a depthwise convolution with a padding above 4 (the 5x5 r3
op: 6) through a path 15-30x slower than the same convolution of the explicitly zero-padded input
(docs/BENCHMARKS.md), so on the CPU such an input is padded first.
"""
import logging
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from autofpn.ops.extension import extension_has
from autofpn.ops.layout import memory_format_of

logger = logging.getLogger("autofpn")

__all__ = ["depthwise_conv2d", "depthwise_conv2d_backward", "depthwise_same_conv"]

# The largest padding oneDNN's fast depthwise kernels take (torch 2.14, CPU; measured for 3x3,
# 5x5 and 7x7 kernels at dilations 1-6: padding 5 and above ran 10-30x slower).
ONEDNN_FAST_PADDING = 4


def _load_cpu_kernel() -> bool:
    if not extension_has("depthwise_conv2d_weight_grad"):
        logger.info("depthwise weight gradient: PyTorch's (autofpn._C not built, or built before the kernel)")
        return False

    @torch.library.register_fake("autofpn::depthwise_conv2d_weight_grad")
    def _fake(grad_out, input, kernel, padding, dilation):
        return input.new_empty((input.shape[1], 1, kernel, kernel))
    return True


_CPU_KERNEL = _load_cpu_kernel()


def depthwise_same_conv(x: Tensor, weight: Tensor, padding: int, dilation: int) -> Tensor:
    """``F.conv2d(x, weight, None, 1, padding, dilation, groups=C)`` (x: [N, C, H, W], weight:
    [C, 1, k, k]), with the zero padding done by ``F.pad`` on the CPU when it is above
    ``ONEDNN_FAST_PADDING``: the same values, in x's layout."""
    if padding > ONEDNN_FAST_PADDING and x.device.type == "cpu":
        return F.conv2d(F.pad(x, [padding] * 4), weight, None, 1, 0, dilation, x.shape[1])
    return F.conv2d(x, weight, None, 1, padding, dilation, x.shape[1])


def _weight_grad(grad_out: Tensor, x: Tensor, weight: Tensor, padding: int, dilation: int) -> Tensor:
    """The gradient of the depthwise conv ``y = F.conv2d(x, weight, None, 1, padding, dilation, C)``
    with respect to weight ([C, 1, k, k]) given ``grad_out`` (dL/dy)."""
    if _CPU_KERNEL and memory_format_of(x) == torch.channels_last:
        return torch.ops.autofpn.depthwise_conv2d_weight_grad(grad_out, x, weight.shape[-1], padding, dilation)
    return torch.ops.aten.convolution_backward(
        grad_out, x, weight, None, [1, 1], [padding, padding], [dilation, dilation], False, [0, 0],
        x.shape[1], [False, True, False])[1]


class _DepthwiseConv2d(torch.autograd.Function):
    """y = depthwise conv of x ([N, C, H, W]) with weight ([C, 1, k, k]), stride 1,
    padding = dilation * (k - 1) / 2 (output size = input size), no bias."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, padding: int, dilation: int) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conv = (padding, dilation)
        return depthwise_same_conv(x, weight, padding, dilation)

    @staticmethod
    @once_differentiable  # the extension's weight gradient has no derivative of its own
    def backward(ctx, grad_out: Tensor) -> Tuple:
        x, weight = ctx.saved_tensors
        grad_x, grad_w = depthwise_conv2d_backward(grad_out, x, weight, *ctx.conv, *ctx.needs_input_grad[:2])
        return grad_x, grad_w, None, None


def depthwise_conv2d_backward(grad_out: Tensor, x: Tensor, weight: Tensor, padding: int, dilation: int,
                              input_grad: bool = True, weight_grad: bool = True) -> Tuple:
    """(dL/dx or None, dL/dweight or None) of ``y = F.conv2d(x, weight, None, 1, padding,
    dilation, C)`` given ``grad_out`` = dL/dy: on the CPU as described above, elsewhere by
    PyTorch's convolution backward."""
    if x.device.type != "cpu":
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad_out, x, weight, None, [1, 1], [padding, padding], [dilation, dilation], False, [0, 0],
            x.shape[1], [input_grad, weight_grad, False])
        return grad_x, grad_w
    grad_x = grad_w = None
    if input_grad:  # the transposed convolution as a correlation with the flipped kernel
        grad_x = depthwise_same_conv(grad_out, weight.flip(-2, -1), padding, dilation)
    if weight_grad:
        grad_w = _weight_grad(grad_out, x, weight, padding, dilation)
    return grad_x, grad_w


def depthwise_conv2d(x: Tensor, weight: Tensor, padding: int, dilation: int) -> Tensor:
    """``F.conv2d(x, weight, None, 1, padding, dilation, groups=C)`` for x: Tensor[N, C, H, W],
    weight: Tensor[C, 1, k, k] (k odd), padding = dilation * (k - 1) // 2; same values and
    gradients (up to float rounding), faster backward on the CPU."""
    k = weight.shape[-1]
    if (x.device.type != "cpu" or weight.shape[-2] != k or k % 2 == 0 or padding != dilation * (k - 1) // 2
            or weight.shape[0] != x.shape[1] or weight.shape[1] != 1):
        return F.conv2d(x, weight, None, 1, padding, dilation, x.shape[1])
    if torch.is_autocast_enabled("cpu"):  # what autocast does for F.conv2d: both in its dtype
        dtype = torch.get_autocast_dtype("cpu")
        x, weight = x.to(dtype), weight.to(dtype)
    return _DepthwiseConv2d.apply(x, weight, padding, dilation)
