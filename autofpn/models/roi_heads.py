"""The second stage: sample proposals, pool RoI features, classify and refine boxes."""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, remove_small_boxes

from autofpn.ops.boxes import BoxCoder, batched_nms, clip_boxes_to_image
from autofpn.ops.matcher import BalancedPositiveNegativeSampler, Matcher
from autofpn.ops.roi_align import MultiLevelRoIAlign


class RoIHeads(nn.Module):
    """Proposals -> (training) sampled RoIs with class and box targets, losses
    ``loss_cls`` / ``loss_box``; (eval) per-image detections after class-wise NMS.

    ``box_head`` maps pooled features Tensor[R, C, S, S] to Tensor[R, D] (2-MLP or Auto-head);
    when ``head_weights`` is given (search) it is passed to the head.
    """

    MIN_DETECTION_SIZE = 1e-2

    def __init__(self, box_roi_pool: MultiLevelRoIAlign, box_head: nn.Module, box_predictor: nn.Module,
                 cfg_roi: Dict):
        super().__init__()
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.box_coder = BoxCoder(cfg_roi["bbox_reg_weights"])
        self.matcher = Matcher(cfg_roi["fg_iou_thresh"], cfg_roi["bg_iou_thresh"],
                               allow_low_quality_matches=False)
        self.sampler = BalancedPositiveNegativeSampler(cfg_roi["batch_size_per_image"],
                                                       cfg_roi["positive_fraction"])
        self.score_thresh = cfg_roi["score_thresh"]
        self.nms_thresh = cfg_roi["nms_thresh"]
        self.detections_per_img = cfg_roi["detections_per_img"]

    def sample_proposals(self, proposals: List[Tensor], targets: List[Dict[str, Tensor]]
                         ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Adds the gt boxes to the proposals, matches and samples them.
        Returns per image: sampled proposals [S_i, 4], labels int64[S_i] (0 = background) and
        regression targets [S_i, 4]."""
        out_props, out_labels, out_targets = [], [], []
        for props, target in zip(proposals, targets):
            gt_boxes, gt_labels = target["boxes"].to(props.dtype), target["labels"]
            props = torch.cat([props, gt_boxes])
            if gt_boxes.numel() == 0:
                labels = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
                matched = torch.zeros_like(props)
            else:
                matches = self.matcher(box_iou(gt_boxes, props))
                matched = gt_boxes[matches.clamp(min=0)]
                labels = gt_labels[matches.clamp(min=0)].to(torch.int64)
                labels[matches == Matcher.BELOW_LOW_THRESHOLD] = 0
                labels[matches == Matcher.BETWEEN_THRESHOLDS] = -1
            pos_mask, neg_mask = self.sampler([labels])
            keep = torch.where(pos_mask[0] | neg_mask[0])[0]
            out_props.append(props[keep])
            out_labels.append(labels[keep])
            out_targets.append(self.box_coder.encode(matched[keep], props[keep]))
        return out_props, out_labels, out_targets

    def losses(self, class_logits: Tensor, box_deltas: Tensor, labels: List[Tensor],
               regression_targets: List[Tensor]) -> Dict[str, Tensor]:
        """class_logits: [R, K], box_deltas: [R, 4K]; box loss on the gt class's deltas of
        positive RoIs, normalised by the number of sampled RoIs."""
        labels = torch.cat(labels)
        regression_targets = torch.cat(regression_targets)
        cls_loss = F.cross_entropy(class_logits, labels)
        pos = torch.where(labels > 0)[0]
        deltas = box_deltas.reshape(box_deltas.shape[0], -1, 4)[pos, labels[pos]]
        box_loss = F.smooth_l1_loss(deltas, regression_targets[pos], beta=1 / 9,
                                    reduction="sum") / max(1, labels.numel())
        return {"loss_cls": cls_loss, "loss_box": box_loss}

    def postprocess(self, class_logits: Tensor, box_deltas: Tensor, proposals: List[Tensor],
                    image_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """Per image: boxes [D, 4], scores [D], labels int64[D] (1..K-1), D <= detections_per_img."""
        num_classes = class_logits.shape[-1]
        boxes_all = self.box_coder.decode(box_deltas, torch.cat(proposals))  # [R, K, 4]
        scores_all = F.softmax(class_logits, -1)
        counts = [p.shape[0] for p in proposals]
        results = []
        for boxes, scores, size in zip(boxes_all.split(counts), scores_all.split(counts), image_sizes):
            boxes = clip_boxes_to_image(boxes, size)
            labels = torch.arange(num_classes, device=boxes.device).view(1, -1).expand_as(scores)
            # drop the background column, then one candidate per (RoI, class)
            boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = remove_small_boxes(boxes, self.MIN_DETECTION_SIZE)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results

    def forward(self, features: Dict[str, Tensor], proposals: List[Tensor], image_sizes: List[Tuple[int, int]],
                targets: Optional[List[Dict[str, Tensor]]] = None, head_weights: Optional[Tensor] = None
                ) -> Tuple[List[Dict[str, Tensor]], Dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            proposals, labels, regression_targets = self.sample_proposals(proposals, targets)
        roi_features = self.box_roi_pool(features, proposals)
        if head_weights is None:
            x = self.box_head(roi_features)
        else:
            x = self.box_head(roi_features, head_weights)
        class_logits, box_deltas = self.box_predictor(x)
        if self.training:
            return [], self.losses(class_logits, box_deltas, labels, regression_targets)
        return self.postprocess(class_logits, box_deltas, proposals, image_sizes), {}
