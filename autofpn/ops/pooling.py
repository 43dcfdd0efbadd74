"""Max pooling without indices on the CPU.

torch's CPU ``max_pool2d`` on an NCHW tensor always computes the argmax indices and does not
vectorise: the ResNet stem's 3x3 / stride-2 pool of bench_detector's [2, 64, 160, 240] map takes
25-50 ms, as long as a convolution. Where no gradient is needed (a frozen stem, inference), the
same maximum is taken separably here, over the kernel's rows and then its columns, with
element-wise ``torch.maximum`` on strided views: 0.30-0.33x of that time (``bench/bench_max_pool.py``)
and the same values bit for bit (a maximum does not round; NaN propagates as in ``max_pool2d``).
"""
import torch
import torch.nn.functional as F
from torch import Tensor


def max_pool2d(x: Tensor, kernel_size: int, stride: int, padding: int) -> Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding)`` (square kernel, no dilation, floor mode):
    x [N, C, H, W] -> [N, C, (H + 2p - k) // s + 1, (W + 2p - k) // s + 1]. Separable on an NCHW
    float CPU tensor that needs no gradient; ``F.max_pool2d`` otherwise (its backward sends a tie's
    gradient to one input, ``torch.maximum``'s would split it; channels-last and CUDA pools are
    already vectorised; a traced export keeps one MaxPool node)."""
    separable = (x.device.type == "cpu" and x.dim() == 4 and x.is_floating_point() and x.is_contiguous()
                 and not (x.requires_grad and torch.is_grad_enabled()) and not torch.jit.is_tracing()
                 and 0 <= padding <= kernel_size // 2)  # else torch's error message
    if not separable:
        return F.max_pool2d(x, kernel_size, stride, padding)
    if padding:  # max_pool2d's padding never wins a maximum: -inf does the same
        x = F.pad(x, (padding, padding, padding, padding), value=float("-inf"))
    return _max_along(_max_along(x, 2, kernel_size, stride), 3, kernel_size, stride)


def _max_along(x: Tensor, dim: int, kernel_size: int, stride: int) -> Tensor:
    """The maximum of each window of ``kernel_size`` along ``dim``, windows ``stride`` apart."""
    out_len = (x.shape[dim] - kernel_size) // stride + 1
    if out_len < 1:
        raise ValueError(f"max_pool2d: a {kernel_size}-wide window does not fit a size-{x.shape[dim]} input "
                         f"(padding included) along dim {dim}")
    span = stride * (out_len - 1) + 1

    def window(offset: int) -> Tensor:
        return x.narrow(dim, offset, span)[(slice(None),) * dim + (slice(None, None, stride),)]

    out = window(0)
    for offset in range(1, kernel_size):  # into a fresh tensor: faster than in place into strided views
        out = torch.maximum(out, window(offset))
    return out.contiguous()
