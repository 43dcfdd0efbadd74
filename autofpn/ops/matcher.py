"""Matching predictions (anchors, proposals) to ground truth, and sampling them for the loss."""
from typing import List, Tuple

import torch
from torch import Tensor


class Matcher:
    """Assigns each prediction the ground-truth box it overlaps most.

    For an IoU matrix ``[G, P]`` it returns ``matches: int64[P]`` holding a gt index for
    IoU >= high, ``BELOW_LOW_THRESHOLD`` (-1) for IoU < low and ``BETWEEN_THRESHOLDS`` (-2) in
    between. With ``allow_low_quality_matches`` every gt also keeps the predictions that
    overlap it most (all of them on ties), even below ``high``, so no gt is left unmatched
    (Faster R-CNN's RPN rule).
    """

    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, high_threshold: float, low_threshold: float,
                 allow_low_quality_matches: bool = False):
        if low_threshold > high_threshold:
            raise ValueError(f"low_threshold {low_threshold} > high_threshold {high_threshold}")
        self.high_threshold = high_threshold
        self.low_threshold = low_threshold
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, iou: Tensor) -> Tensor:
        """iou: Tensor[G, P] with G >= 1 -> matches: int64[P]."""
        if iou.numel() == 0:
            raise ValueError("Matcher needs at least one ground-truth box and one prediction; "
                             "images without boxes are handled by the caller")
        best_iou, matches = iou.max(dim=0)
        unthresholded = matches.clone() if self.allow_low_quality_matches else None
        matches[best_iou < self.low_threshold] = self.BELOW_LOW_THRESHOLD
        between = (best_iou >= self.low_threshold) & (best_iou < self.high_threshold)
        matches[between] = self.BETWEEN_THRESHOLDS
        if unthresholded is not None:
            best_per_gt, _ = iou.max(dim=1)
            # (gt, prediction) pairs achieving the gt's best IoU; ties keep every prediction
            _, pred_idx = torch.nonzero(iou == best_per_gt[:, None], as_tuple=True)
            matches[pred_idx] = unthresholded[pred_idx]
        return matches


class BalancedPositiveNegativeSampler:
    """Draws at most ``batch_size_per_image`` labels per image, a ``positive_fraction`` of them
    positive (fewer when there are not enough positives; negatives fill the rest)."""

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels_per_image: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """labels_per_image: int[P_i] each, >= 1 positive, 0 negative, -1 ignored.
        Returns (positive masks, negative masks), bool[P_i] each."""
        pos_masks, neg_masks = [], []
        for labels in labels_per_image:
            positive = torch.where(labels >= 1)[0]
            negative = torch.where(labels == 0)[0]
            num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
            pos_idx = positive[torch.randperm(positive.numel(), device=positive.device)[:num_pos]]
            neg_idx = negative[torch.randperm(negative.numel(), device=negative.device)[:num_neg]]
            pos_mask = torch.zeros_like(labels, dtype=torch.bool)
            neg_mask = torch.zeros_like(labels, dtype=torch.bool)
            pos_mask[pos_idx] = True
            neg_mask[neg_idx] = True
            pos_masks.append(pos_mask)
            neg_masks.append(neg_mask)
        return pos_masks, neg_masks
