"""Anchors and the Region Proposal Network."""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, remove_small_boxes

from autofpn.ops.boxes import BoxCoder, batched_nms, clip_boxes_to_image
from autofpn.ops.matcher import BalancedPositiveNegativeSampler, Matcher


class AnchorGenerator:
    """Anchors of one or several sizes per feature level, times several aspect ratios (h / w).

    ``sizes[l]`` is one size (Faster R-CNN's RPN: one per level) or a list of sizes (RetinaNet:
    3 scales per octave); every level has the same number of them. Cell anchors are centred on 0
    and rounded to integers, ordered ratio-major then size (torchvision's order); a level with
    stride s places them at (x*s, y*s) for every feature-map cell (x, y). Anchors of one level
    are ordered cell-major then anchor: index = (y * W + x) * A + a.
    """

    def __init__(self, sizes: Sequence[Union[float, Sequence[float]]], aspect_ratios: Sequence[float]):
        self.sizes = [list(s) if isinstance(s, (list, tuple)) else [s] for s in sizes]
        if len({len(s) for s in self.sizes}) > 1:
            raise ValueError(f"every level needs the same number of anchor sizes, got {self.sizes}")
        self.aspect_ratios = list(aspect_ratios)
        self._cache: Dict[Tuple, Tensor] = {}

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.sizes[0]) * len(self.aspect_ratios)

    def cell_anchors(self, sizes: Union[float, Sequence[float]], dtype: torch.dtype = torch.float32,
                     device: torch.device = torch.device("cpu")) -> Tensor:
        """Tensor[R*S, 4] xyxy anchors of area size^2 centred on (0, 0), for R aspect ratios and
        S sizes (index = ratio * S + size)."""
        scales = torch.as_tensor(sizes, dtype=dtype, device=device).reshape(-1)
        ratios = torch.as_tensor(self.aspect_ratios, dtype=dtype, device=device)
        h_ratios = torch.sqrt(ratios)
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)  # (R, S) -> (R*S)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()

    def level_anchors(self, level: int, grid: Tuple[int, int], stride: Tuple[int, int],
                      dtype: torch.dtype, device: torch.device) -> Tensor:
        """Tensor[H*W*A, 4] anchors of one level for a feature grid (H, W)."""
        key = (level, grid, stride, dtype, device)
        if torch.jit.is_tracing() or key not in self._cache:  # traced: grid and stride are symbolic
            base = self.cell_anchors(self.sizes[level], dtype, device)
            shift_x = torch.arange(0, grid[1], dtype=torch.int32, device=device) * stride[1]
            shift_y = torch.arange(0, grid[0], dtype=torch.int32, device=device) * stride[0]
            shift_y, shift_x = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1).to(dtype)
            # (H*W, 1, 4) + (1, A, 4) -> (H*W*A, 4)
            anchors = (shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4)
            if torch.jit.is_tracing():
                return anchors
            self._cache[key] = anchors
        return self._cache[key]

    def __call__(self, batch_shape: Tuple[int, int], feature_shapes: List[Tuple[int, int]],
                 dtype: torch.dtype, device: torch.device) -> List[Tensor]:
        """Anchors per level for a padded batch of size ``batch_shape`` (H, W). The stride of a
        level is batch size // feature size, as torchvision computes it."""
        if len(feature_shapes) != len(self.sizes):
            raise ValueError(f"{len(feature_shapes)} feature levels but {len(self.sizes)} anchor sizes")
        return [self.level_anchors(i, grid, (batch_shape[0] // grid[0], batch_shape[1] // grid[1]),
                                   dtype, device)
                for i, grid in enumerate(feature_shapes)]


class RPNHead(nn.Module):
    """A shared 3x3 conv + ReLU, then per-anchor objectness logits and box deltas.

    forward(features: List[Tensor[N, C, H_l, W_l]]) -> (objectness [N, A, H_l, W_l] per level,
    deltas [N, 4A, H_l, W_l] per level)
    """

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.constant_(layer.bias, 0)

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        objectness, deltas = [], []
        for feature in features:
            t = F.relu(self.conv(feature))
            objectness.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return objectness, deltas


def flatten_level_outputs(objectness: List[Tensor], deltas: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """Per-level head outputs -> objectness Tensor[N, sum_l H_l*W_l*A] and deltas
    Tensor[N, sum_l H_l*W_l*A, 4], in anchor order."""
    flat_obj, flat_deltas = [], []
    for obj, delta in zip(objectness, deltas):
        n, a, h, w = obj.shape
        flat_obj.append(obj.permute(0, 2, 3, 1).reshape(n, -1))  # (N, A, H, W) -> (N, H*W*A)
        # (N, A*4, H, W) -> (N, A, 4, H, W) -> (N, H, W, A, 4) -> (N, H*W*A, 4)
        flat_deltas.append(delta.view(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
    return torch.cat(flat_obj, dim=1), torch.cat(flat_deltas, dim=1)


class RegionProposalNetwork(nn.Module):
    """Proposals from anchors: top-k per level, clip, drop tiny boxes, NMS per level, top-k.

    In training it also returns ``loss_rpn_cls`` (BCE over sampled anchors) and
    ``loss_rpn_box`` (smooth L1 over sampled positives, normalised by the sample count).
    """

    MIN_PROPOSAL_SIZE = 1e-3

    def __init__(self, in_channels: int, cfg_rpn: Dict):
        super().__init__()
        self.anchor_generator = AnchorGenerator(cfg_rpn["anchor_sizes"], cfg_rpn["aspect_ratios"])
        self.head = RPNHead(in_channels, self.anchor_generator.num_anchors_per_location)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(cfg_rpn["fg_iou_thresh"], cfg_rpn["bg_iou_thresh"],
                               allow_low_quality_matches=True)
        self.sampler = BalancedPositiveNegativeSampler(cfg_rpn["batch_size_per_image"],
                                                       cfg_rpn["positive_fraction"])
        self.pre_nms_top_n = {True: cfg_rpn["pre_nms_top_n_train"], False: cfg_rpn["pre_nms_top_n_test"]}
        self.post_nms_top_n = {True: cfg_rpn["post_nms_top_n_train"], False: cfg_rpn["post_nms_top_n_test"]}
        self.nms_thresh = cfg_rpn["nms_thresh"]
        self.score_thresh = cfg_rpn["score_thresh"]

    def top_k_per_level(self, objectness: Tensor, num_per_level: List[int]) -> Tensor:
        """objectness: Tensor[N, A_total] -> indices Tensor[N, sum_l min(k, A_l)] of the
        highest scores of each level."""
        picked, offset = [], 0
        k = self.pre_nms_top_n[self.training]
        for count in num_per_level:
            level_scores = objectness[:, offset: offset + count]
            # traced, count is a 0-dim tensor and so is the k of the exported TopK
            _, idx = level_scores.topk(count.clamp(max=k) if torch.jit.is_tracing() else min(k, count), dim=1)
            picked.append(idx + offset)
            offset += count
        return torch.cat(picked, dim=1)

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_sizes: List[Tuple[int, int]],
                         num_per_level: List[int]) -> Tuple[List[Tensor], List[Tensor]]:
        """proposals: Tensor[N, A_total, 4], objectness logits Tensor[N, A_total] ->
        per image (boxes Tensor[P_i, 4], scores Tensor[P_i] probabilities)."""
        num_images = proposals.shape[0]
        objectness = objectness.detach()
        levels = torch.cat([torch.full((n,), i, dtype=torch.int64, device=proposals.device)
                            for i, n in enumerate(num_per_level)])
        top_idx = self.top_k_per_level(objectness, num_per_level)
        batch_idx = torch.arange(num_images, device=proposals.device)[:, None]
        objectness = objectness[batch_idx, top_idx]
        proposals = proposals[batch_idx, top_idx]
        levels = levels[top_idx]
        scores = torch.sigmoid(objectness)
        final_boxes, final_scores = [], []
        for boxes, score, level, size in zip(proposals, scores, levels, image_sizes):
            boxes = clip_boxes_to_image(boxes, size)
            keep = remove_small_boxes(boxes, self.MIN_PROPOSAL_SIZE)
            boxes, score, level = boxes[keep], score[keep], level[keep]
            keep = torch.where(score >= self.score_thresh)[0]
            boxes, score, level = boxes[keep], score[keep], level[keep]
            keep = batched_nms(boxes, score, level, self.nms_thresh)[: self.post_nms_top_n[self.training]]
            final_boxes.append(boxes[keep])
            final_scores.append(score[keep])
        return final_boxes, final_scores

    def assign_targets(self, anchors: Tensor, targets: List[Dict[str, Tensor]]) -> Tuple[List[Tensor], List[Tensor]]:
        """anchors: Tensor[A_total, 4] -> per image labels float[A_total] (1 fg, 0 bg, -1 ignore)
        and matched gt boxes Tensor[A_total, 4]."""
        labels, matched_boxes = [], []
        for target in targets:
            gt = target["boxes"]
            if gt.numel() == 0:
                labels.append(torch.zeros(anchors.shape[0], dtype=torch.float32, device=anchors.device))
                matched_boxes.append(torch.zeros_like(anchors))
                continue
            matches = self.matcher(box_iou(gt, anchors))
            matched_boxes.append(gt[matches.clamp(min=0)])
            label = (matches >= 0).to(torch.float32)
            label[matches == Matcher.BETWEEN_THRESHOLDS] = -1.0
            labels.append(label)
        return labels, matched_boxes

    def losses(self, objectness: Tensor, deltas: Tensor, anchors: Tensor, labels: List[Tensor],
               matched_boxes: List[Tensor]) -> Dict[str, Tensor]:
        """objectness: Tensor[N, A_total] logits, deltas: Tensor[N, A_total, 4]."""
        pos_masks, neg_masks = self.sampler(labels)
        pos = torch.where(torch.cat(pos_masks))[0]
        sampled = torch.where(torch.cat(pos_masks) | torch.cat(neg_masks))[0]
        labels = torch.cat(labels)
        num_images = objectness.shape[0]
        targets = self.box_coder.encode(torch.cat(matched_boxes)[pos], anchors.repeat(num_images, 1)[pos])
        box_loss = F.smooth_l1_loss(deltas.reshape(-1, 4)[pos], targets, beta=1 / 9,
                                    reduction="sum") / max(1, sampled.numel())
        cls_loss = F.binary_cross_entropy_with_logits(objectness.reshape(-1)[sampled], labels[sampled])
        return {"loss_rpn_cls": cls_loss, "loss_rpn_box": box_loss}

    def forward(self, batch_shape: Tuple[int, int], image_sizes: List[Tuple[int, int]],
                features: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
                ) -> Tuple[List[Tensor], Dict[str, Tensor]]:
        """features: the RPN levels [N, C, H_l, W_l]; returns per-image proposals Tensor[P_i, 4]
        (detached) and the losses (empty dict in eval)."""
        objectness, deltas = self.head(features)
        shapes = [tuple(f.shape[-2:]) for f in features]
        level_anchors = self.anchor_generator(batch_shape, shapes, features[0].dtype, features[0].device)
        num_per_level = [a.shape[0] for a in level_anchors]
        anchors = torch.cat(level_anchors)
        objectness, deltas = flatten_level_outputs(objectness, deltas)
        num_images = objectness.shape[0]
        proposals = self.box_coder.decode(deltas.detach().reshape(-1, 4), anchors.repeat(num_images, 1))
        proposals = proposals.view(num_images, -1, 4)
        boxes, _ = self.filter_proposals(proposals, objectness, image_sizes, num_per_level)
        losses: Dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            labels, matched = self.assign_targets(anchors, targets)
            losses = self.losses(objectness, deltas, anchors, labels, matched)
        return boxes, losses
