"""Box coding between boxes and regression targets (the R-CNN parameterization)."""
import math
from typing import Sequence, Tuple

import torch
import torchvision
from torch import Tensor

from autofpn.ops.extension import extension_has

# Largest log-scale a decoded box may grow by: exp(clip) = 1000/16, as in Detectron.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


class BoxCoder:
    """Encodes boxes as (dx, dy, dw, dh) deltas relative to reference boxes, and back.

    dx = wx * (gx - rx) / rw,  dw = ww * log(gw / rw)  (centres and sizes in pixels).
    """

    def __init__(self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 scale_clamp: float = DEFAULT_SCALE_CLAMP):
        self.weights: Tuple[float, float, float, float] = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, gt_boxes: Tensor, reference_boxes: Tensor) -> Tensor:
        """gt_boxes, reference_boxes: Tensor[N, 4] xyxy -> deltas Tensor[N, 4]."""
        wx, wy, ww, wh = self.weights
        ref_w = reference_boxes[:, 2] - reference_boxes[:, 0]
        ref_h = reference_boxes[:, 3] - reference_boxes[:, 1]
        ref_cx = reference_boxes[:, 0] + 0.5 * ref_w
        ref_cy = reference_boxes[:, 1] + 0.5 * ref_h
        gt_w = gt_boxes[:, 2] - gt_boxes[:, 0]
        gt_h = gt_boxes[:, 3] - gt_boxes[:, 1]
        gt_cx = gt_boxes[:, 0] + 0.5 * gt_w
        gt_cy = gt_boxes[:, 1] + 0.5 * gt_h
        dx = wx * (gt_cx - ref_cx) / ref_w
        dy = wy * (gt_cy - ref_cy) / ref_h
        dw = ww * torch.log(gt_w / ref_w)
        dh = wh * torch.log(gt_h / ref_h)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def decode(self, deltas: Tensor, reference_boxes: Tensor) -> Tensor:
        """deltas: Tensor[N, 4*C] (C boxes per reference), reference_boxes: Tensor[N, 4] xyxy
        -> boxes Tensor[N, C, 4] xyxy."""
        reference_boxes = reference_boxes.to(deltas.dtype)
        wx, wy, ww, wh = self.weights
        widths = reference_boxes[:, 2] - reference_boxes[:, 0]
        heights = reference_boxes[:, 3] - reference_boxes[:, 1]
        ctr_x = reference_boxes[:, 0] + 0.5 * widths
        ctr_y = reference_boxes[:, 1] + 0.5 * heights

        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.scale_clamp)

        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        half_w = 0.5 * torch.exp(dw) * widths[:, None]
        half_h = 0.5 * torch.exp(dh) * heights[:, None]
        return torch.stack((pred_ctr_x - half_w, pred_ctr_y - half_h,
                            pred_ctr_x + half_w, pred_ctr_y + half_h), dim=2)


# torchvision's box operators, except when traced for ONNX export (``autofpn.export``): there
# torchvision's versions freeze the image size of the trace into the graph (clipping) or assume
# at least one box (its batched NMS), so these write the same arithmetic as graph operations.

def clip_boxes_to_image(boxes: Tensor, size: Tuple[int, int]) -> Tensor:
    """Clamp xyxy boxes Tensor[..., 4] to an image of ``size`` (H, W: ints, or 0-dim tensors
    when traced)."""
    if not torch.jit.is_tracing():
        return torchvision.ops.clip_boxes_to_image(boxes, size)
    height, width = size
    upper = torch.stack([width, height, width, height]).to(boxes.dtype)
    return torch.min(boxes.clamp(min=0), upper)


# torch.ops.autofpn.nms (cuda_ext/nms_cpu.cpp): torchvision's CPU NMS with its IoU test vectorised,
# the same kept indices (tests/test_nms.py), 10-16x faster at the RPN's sizes (bench/bench_nms.py)
_CPU_NMS = extension_has("nms")


def _our_cpu_nms(boxes: Tensor) -> bool:
    return (_CPU_NMS and boxes.device.type == "cpu" and boxes.dtype in (torch.float32, torch.float64)
            and not torch.jit.is_tracing())


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """torchvision.ops.nms: boxes [K, 4] xyxy, scores [K] -> indices int64 of the kept boxes, by
    decreasing score (a stable order among equal scores)."""
    if _our_cpu_nms(boxes):
        return torch.ops.autofpn.nms(boxes, scores, iou_threshold)
    return torchvision.ops.nms(boxes, scores, iou_threshold)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each class ``idxs``: indices int64[K] of the kept boxes, by decreasing score.
    torchvision.ops.batched_nms's result; on the CPU its two strategies (torchvision 0.29's rule:
    one NMS per class above 1000 boxes, else the coordinate trick) over our ``nms``."""
    if torch.jit.is_tracing():
        # the coordinate trick: boxes of different classes are moved apart so they never overlap;
        # the extra 0 keeps max() defined when no box is left
        max_coordinate = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
        offsets = idxs.to(boxes) * (max_coordinate + 1)
        return torchvision.ops.nms(boxes + offsets[:, None], scores, iou_threshold)
    if not _our_cpu_nms(boxes):
        return torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)
    if boxes.numel() > 4000:
        keep_mask = torch.zeros_like(scores, dtype=torch.bool)
        for class_id in torch.unique(idxs):
            members = torch.where(idxs == class_id)[0]
            keep_mask[members[nms(boxes[members], scores[members], iou_threshold)]] = True
        kept = torch.where(keep_mask)[0]
        return kept[scores[kept].sort(descending=True)[1]]
    if boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    offsets = idxs.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
    return nms(boxes + offsets[:, None], scores, iou_threshold)
