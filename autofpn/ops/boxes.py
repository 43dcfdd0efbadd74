"""Box coding between boxes and regression targets (the R-CNN parameterization)."""
import math
from typing import Sequence, Tuple

import torch
import torchvision
from torch import Tensor

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


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each class ``idxs``: indices int64[K] of the kept boxes, by decreasing score."""
    if not torch.jit.is_tracing():
        return torchvision.ops.batched_nms(boxes, scores, idxs, iou_threshold)
    # the coordinate trick: boxes of different classes are moved apart so they never overlap;
    # the extra 0 keeps max() defined when no box is left
    max_coordinate = torch.cat([boxes.reshape(-1), boxes.new_zeros(1)]).max()
    offsets = idxs.to(boxes) * (max_coordinate + 1)
    return torchvision.ops.nms(boxes + offsets[:, None], scores, iou_threshold)
