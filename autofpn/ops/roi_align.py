"""RoIAlign over a feature pyramid.

``roi_align`` is torchvision's operator, except on the CPU when the autofpn._C extension is
built: then ``torch.ops.autofpn.roi_align`` runs, the same arithmetic multi-threaded, reading
the features and writing their gradient channels-last (vectorised over the channels), with a
backward that computes each RoI's sampling weights once instead of per channel and bin
(cuda_ext/roi_align_cpu.cpp). Its output is NCHW, as torchvision's. ``MultiLevelRoIAlign`` then
pools all levels in one call of ``torch.ops.autofpn.multilevel_roi_align``, each RoI written
straight into its row in the boxes' order.
"""
import logging
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import box_area

from autofpn.ops.extension import extension_has
from autofpn.ops.layout import memory_format_of

logger = logging.getLogger("autofpn")


def _load_cpu_kernel() -> bool:
    if not extension_has("roi_align"):
        logger.info("roi_align: torchvision's kernel (autofpn._C not built)")
        return False

    @torch.library.register_fake("autofpn::roi_align")
    def _fake(input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned):
        return input.new_empty((rois.shape[0], input.shape[1], pooled_h, pooled_w))

    @torch.library.register_fake("autofpn::roi_align_backward")
    def _fake_backward(grad, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned,
                       batch_size, channels, height, width):
        return grad.new_empty((batch_size, channels, height, width))

    def _setup_context(ctx, inputs, output):
        input, rois, spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned = inputs
        ctx.save_for_backward(rois)
        ctx.args = (spatial_scale, pooled_h, pooled_w, sampling_ratio, aligned, *input.shape)

    def _backward(ctx, grad):
        (rois,) = ctx.saved_tensors
        grad_input = torch.ops.autofpn.roi_align_backward(grad, rois, *ctx.args)
        return grad_input, None, None, None, None, None, None

    torch.library.register_autograd("autofpn::roi_align", _backward, setup_context=_setup_context)
    return True


def _load_multilevel_cpu_kernel() -> bool:
    if not extension_has("multilevel_roi_align"):
        return False

    @torch.library.register_fake("autofpn::multilevel_roi_align")
    def _fake(features, rois, levels, scales, pooled_h, pooled_w, sampling_ratio, aligned):
        return features[0].new_empty((rois.shape[0], features[0].shape[1], pooled_h, pooled_w))

    @torch.library.register_fake("autofpn::multilevel_roi_align_backward")
    def _fake_backward(grad, rois, levels, scales, pooled_h, pooled_w, sampling_ratio, aligned, shapes):
        return [grad.new_empty((shapes[0], shapes[1], h, w)) for h, w in zip(shapes[2::2], shapes[3::2])]

    def _setup_context(ctx, inputs, output):
        features, rois, levels, scales, pooled_h, pooled_w, sampling_ratio, aligned = inputs
        ctx.save_for_backward(rois, levels)
        shapes = list(features[0].shape[:2]) + [size for f in features for size in f.shape[2:]]
        ctx.args = (scales, pooled_h, pooled_w, sampling_ratio, aligned, shapes)

    def _backward(ctx, grad):
        rois, levels = ctx.saved_tensors
        grads = torch.ops.autofpn.multilevel_roi_align_backward(grad, rois, levels, *ctx.args)
        return list(grads), None, None, None, None, None, None, None

    torch.library.register_autograd("autofpn::multilevel_roi_align", _backward, setup_context=_setup_context)
    return True


_CPU_KERNEL = _load_cpu_kernel()
_CPU_MULTILEVEL_KERNEL = _CPU_KERNEL and _load_multilevel_cpu_kernel()


def roi_align(input: Tensor, rois: Tensor, output_size: Tuple[int, int], spatial_scale: float,
              sampling_ratio: int, aligned: bool) -> Tensor:
    """torchvision.ops.roi_align's contract: input [N, C, H, W], rois [R, 5] (batch index, xyxy)
    -> [R, C, output_size[0], output_size[1]]."""
    # traced for ONNX export: torchvision's op, which has an ONNX symbolic (RoiAlign)
    if (_CPU_KERNEL and input.device.type == "cpu" and input.dtype in (torch.float32, torch.float64)
            and not torch.jit.is_tracing()):
        return torch.ops.autofpn.roi_align(input, rois.to(input.dtype), spatial_scale, output_size[0],
                                           output_size[1], sampling_ratio, aligned)
    return torchvision.ops.roi_align(input, rois, output_size, spatial_scale=spatial_scale,
                                     sampling_ratio=sampling_ratio, aligned=aligned)


def boxes_to_rois(boxes: List[Tensor]) -> Tensor:
    """Per-image boxes [R_i, 4] -> rois Tensor[sum R_i, 5] as (batch index, x1, y1, x2, y2)."""
    batch_idx = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)], dim=0)
    return torch.cat([batch_idx, torch.cat(boxes, dim=0)], dim=1)


class MultiLevelRoIAlign(nn.Module):
    """Pools a fixed-size feature for every box from a pyramid.

    Level assignment follows the FPN paper, Eq. (1): a box of size sqrt(wh) goes to level
    ``floor(canonical_level + log2(sqrt(wh) / canonical_size))``, clamped to the pooled levels.
    Level scales come from the declared strides, never inferred from a batch.

    With ``adaptive=True`` (PANet's adaptive feature pooling) every box is pooled from every
    level and the results are fused by an element-wise max.
    """

    def __init__(self, level_names: Sequence[str], strides: Dict[str, int], output_size: int = 7,
                 sampling_ratio: int = 2, canonical_size: int = 224, canonical_level: int = 4,
                 adaptive: bool = False, aligned: bool = False):
        super().__init__()
        self.level_names = list(level_names)
        self.scales = [1.0 / strides[name] for name in self.level_names]
        levels = [int(round(math.log2(strides[name]))) for name in self.level_names]
        if levels != list(range(levels[0], levels[0] + len(levels))):
            raise ValueError(f"pooled levels must be consecutive, got strides "
                             f"{[strides[n] for n in self.level_names]}")
        self.k_min, self.k_max = levels[0], levels[-1]
        self.output_size = output_size
        self.sampling_ratio = sampling_ratio
        self.canonical_size = canonical_size
        self.canonical_level = canonical_level
        self.adaptive = adaptive
        self.aligned = aligned  # False matches torchvision's MultiScaleRoIAlign

    def assign_levels(self, boxes: Tensor) -> Tensor:
        """boxes: Tensor[R, 4] xyxy -> int64[R] index into ``level_names``."""
        size = torch.sqrt(box_area(boxes))
        eps = torch.tensor(1e-6, dtype=size.dtype)
        level = torch.floor(self.canonical_level + torch.log2(size / self.canonical_size) + eps)
        return level.clamp(self.k_min, self.k_max).to(torch.int64) - self.k_min

    def _pool(self, feature: Tensor, rois: Tensor, scale: float) -> Tensor:
        return roi_align(feature, rois, (self.output_size, self.output_size), spatial_scale=scale,
                         sampling_ratio=self.sampling_ratio, aligned=self.aligned)

    def forward(self, features: Dict[str, Tensor], boxes: List[Tensor]) -> Tensor:
        """features: name -> Tensor[N, C, H, W]; boxes: per image Tensor[R_i, 4] in padded-image
        pixels. Returns Tensor[sum R_i, C, S, S] in the order of ``boxes``, in the memory layout
        of the features (the kernels return NCHW; a channels-last Auto-head wants NHWC)."""
        feats = [features[name] for name in self.level_names]
        return self._pool_levels(feats, boxes_to_rois(boxes)).contiguous(memory_format=memory_format_of(feats[0]))

    def _pool_levels(self, feats: List[Tensor], rois: Tensor) -> Tensor:
        if self.adaptive:
            pooled = [self._pool(f, rois, s) for f, s in zip(feats, self.scales)]
            return torch.stack(pooled, dim=0).amax(dim=0)
        if len(feats) == 1:
            return self._pool(feats[0], rois, self.scales[0])
        levels = self.assign_levels(rois[:, 1:])
        if self._one_kernel_call(feats):
            return torch.ops.autofpn.multilevel_roi_align(
                feats, rois.to(feats[0].dtype), levels, self.scales, self.output_size, self.output_size,
                self.sampling_ratio, self.aligned)
        shape = (rois.shape[0], feats[0].shape[1], self.output_size, self.output_size)
        indices = [torch.where(levels == level)[0] for level in range(len(feats))]
        pooled = [self._pool(feature, rois[idx], scale) for feature, scale, idx in zip(feats, self.scales, indices)]
        if torch.jit.is_tracing():  # an exported index_put fails on a level with no RoI
            out = feats[0].new_zeros(shape)
            for idx, rows in zip(indices, pooled):
                out = out.scatter(0, idx.view(-1, 1, 1, 1).expand_as(rows), rows.to(out.dtype))
            return out
        return _RowsInBoxOrder.apply(shape, feats[0].dtype, *indices, *pooled)

    @staticmethod
    def _one_kernel_call(feats: List[Tensor]) -> bool:
        """Whether the extension pools every level in one call, each RoI straight into its row (the
        CPU, float32 / float64 levels of one dtype; the same values as a call per level)."""
        dtype = feats[0].dtype
        return (_CPU_MULTILEVEL_KERNEL and dtype in (torch.float32, torch.float64) and not torch.jit.is_tracing()
                and all(f.device.type == "cpu" and f.dtype == dtype for f in feats))


class _RowsInBoxOrder(torch.autograd.Function):
    """The per-level results' rows back in the boxes' order: out[indices[l]] = pooled[l], an [R, C,
    S, S] tensor. Autograd's own index_put would clone the whole gradient once per level in the
    backward (four [R, C, 7, 7] copies, about 4 % of a Faster R-CNN train step on the CPU); here the
    backward only gathers each level's rows. A row that no level claims (a NaN box) stays zero."""

    @staticmethod
    def forward(ctx, shape, dtype, *indices_and_pooled):
        num_levels = len(indices_and_pooled) // 2
        indices, pooled = indices_and_pooled[:num_levels], indices_and_pooled[num_levels:]
        claimed = sum(int(idx.numel()) for idx in indices)
        make = pooled[0].new_empty if claimed == shape[0] else pooled[0].new_zeros
        out = make(shape, dtype=dtype)  # the features' dtype, whatever a level's kernel returned
        for idx, rows in zip(indices, pooled):
            out[idx] = rows.to(out.dtype)
        ctx.save_for_backward(*indices)
        return out

    @staticmethod
    def backward(ctx, grad):
        indices = ctx.saved_tensors
        return (None, None, *[None] * len(indices), *[grad[idx] for idx in indices])
