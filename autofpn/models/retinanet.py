"""RetinaNet (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017) on this project's
backbones, necks, anchors, box coder, matcher and transform.

It computes what torchvision's ``retinanet_resnet50_fpn`` computes (same anchors, matching,
losses and post-processing; tests/test_retinanet.py), with one difference in the classifier:
torchvision's has ``num_classes`` outputs, column 0 standing for the background label that is
never a target, ours has ``num_classes - 1`` (label k is output k - 1), so a sigmoid output
exists for every real class only. ``num_classes`` counts the background, as everywhere in this
project (``model.num_classes``), and the labels in and out are 1..K-1 (the data contract).
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from autofpn.models.architecture import SearchableDetector
from autofpn.models.auto_fusion import AutoFusionNeck
from autofpn.models.necks import torchvision_fpn_key
from autofpn.models.rpn import AnchorGenerator
from autofpn.models.transform import ImageTransform
from autofpn.ops.boxes import BoxCoder, batched_nms, clip_boxes_to_image
from autofpn.ops.layout import check_memory_format, resolve_memory_format
from autofpn.ops.matcher import Matcher

# the beta of torchvision's RetinaNet box loss "smooth_l1" (its ``_box_loss`` without a config)
SMOOTH_L1_BETA = 1.0
# the eps of torchvision's RetinaNet box loss "giou" (``_box_loss`` without a config)
GIOU_EPS = 1e-7


def retinanet_anchor_sizes(base_sizes: Sequence[float], scales_per_octave: int) -> List[List[int]]:
    """Anchor sizes per level: base x 2^(i / scales_per_octave), i = 0..scales_per_octave-1,
    truncated to integers as torchvision's RetinaNet does: (32, 64, ...) with 3 scales ->
    [[32, 40, 50], [64, 80, 101], ...]."""
    return [[int(base * 2 ** (i / scales_per_octave)) for i in range(scales_per_octave)] for base in base_sizes]


def per_anchor(x: Tensor, values: int) -> Tensor:
    """One level's head output, ``values`` numbers per anchor: (N, A*V, H, W) -> (N, H*W*A, V),
    in the anchor order of ``AnchorGenerator`` (cell-major, then anchor)."""
    n, _, h, w = x.shape
    # (N, A*V, H, W) -> (N, A, V, H, W) -> (N, H, W, A, V) -> (N, H*W*A, V)
    return x.view(n, -1, values, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, values)


def _subnet_conv(channels: int, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, padding=1, bias=bias)


def head_group_norm_groups(channels: int) -> int:
    """GroupNorm groups of the subnets with ``head_norm: gn``: the largest divisor of
    ``channels`` that is at most min(32, channels // 4) (32 at 256 channels, torchvision's
    ``retinanet_resnet50_fpn_v2``; 8 at the demo's 32, four channels a group)."""
    groups = max(1, min(32, channels // 4))
    while channels % groups:
        groups -= 1
    return groups


class RetinaNetHead(nn.Module):
    """The class and box subnets, shared over the levels: ``subnet_convs`` x (3x3 conv + ReLU)
    each, then a 3x3 conv to A*K class logits / A*4 box deltas. Weights start at N(0, std),
    std = 0.01 x sqrt(256 / in_channels): torchvision's 0.01 at its 256 channels, and the same
    signal gain per layer at any other width (with 0.01 a 32-channel head's logits started 170x
    weaker than a 256-channel one's, ~3e-5 (bench/retinanet_signal.py), and a demo RetinaNet
    never left its prior: 0 AP after 300 iterations). Biases at 0 except the classifier's, -log((1 - p) / p), so every class
    starts at sigmoid = ``prior_probability`` and the many background anchors do not swamp the
    first iterations.

    ``norm``: ``none`` (torchvision's ``retinanet_resnet50_fpn``, v1) or ``gn``: each subnet conv
    without bias, then GroupNorm (``head_group_norm_groups``), then ReLU, as torchvision's
    ``retinanet_resnet50_fpn_v2`` (one GroupNorm per conv and subnet, shared over the levels). The
    norms are in ``cls_norms`` / ``box_norms``, so the conv keys are those of ``none``.

    forward(features: List[Tensor[N, C, H_l, W_l]]) -> (class logits Tensor[N, H_l*W_l*A, K] per
    level, box deltas Tensor[N, H_l*W_l*A, 4] per level)
    """

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, subnet_convs: int = 4,
                 prior_probability: float = 0.01, norm: str = "none"):
        super().__init__()
        if norm not in ("none", "gn"):
            raise ValueError(f"unknown RetinaNet head norm '{norm}'; valid: none, gn")
        self.num_classes = num_classes
        self.norm = norm
        bias = norm == "none"
        self.cls_convs = nn.ModuleList([_subnet_conv(in_channels, bias) for _ in range(subnet_convs)])
        self.box_convs = nn.ModuleList([_subnet_conv(in_channels, bias) for _ in range(subnet_convs)])
        if norm == "gn":
            groups = head_group_norm_groups(in_channels)
            self.cls_norms = nn.ModuleList([nn.GroupNorm(groups, in_channels) for _ in range(subnet_convs)])
            self.box_norms = nn.ModuleList([nn.GroupNorm(groups, in_channels) for _ in range(subnet_convs)])
        else:
            self.cls_norms = self.box_norms = None
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        std = 0.01 * math.sqrt(256 / in_channels)
        for conv in [*self.cls_convs, *self.box_convs, self.cls_logits, self.bbox_pred]:
            nn.init.normal_(conv.weight, std=std)
            if conv.bias is not None:
                nn.init.constant_(conv.bias, 0)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_probability) / prior_probability))

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        class_logits, deltas = [], []
        for feature in features:
            c = b = feature
            for i, conv in enumerate(self.cls_convs):
                c = conv(c)
                c = F.relu(c if self.cls_norms is None else self.cls_norms[i](c))
            for i, conv in enumerate(self.box_convs):
                b = conv(b)
                b = F.relu(b if self.box_norms is None else self.box_norms[i](b))
            class_logits.append(per_anchor(self.cls_logits(c), self.num_classes))
            deltas.append(per_anchor(self.bbox_pred(b), 4))
        return class_logits, deltas


class OneStageDetector(SearchableDetector):
    """What RetinaNet and SSD share before their heads: the input transform, the backbone and the
    neck (a supernet's with its softmaxed alpha)."""

    def neck_levels(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]]):
        """-> (batch Tensor[N, 3, H, W], image sizes, transformed targets, neck outputs
        List[Tensor[N, C_l, H_l, W_l]] from the finest level to the coarsest)."""
        batch, image_sizes, targets = self.transform(images, targets)
        batch = batch.contiguous(memory_format=resolve_memory_format(self.memory_format, batch.device, self.searched))
        features = self.backbone(batch)
        neck_weights = self.arch.forward_weights()[0] if self.arch is not None else None
        features = self.neck(features) if neck_weights is None else self.neck(features, neck_weights)
        return batch, image_sizes, targets, [features[name] for name in sorted(features, key=lambda n: int(n[1:]))]

    def final_detections(self, boxes: List[Tensor], scores: List[Tensor], labels: List[Tensor]) -> Dict[str, Tensor]:
        """One image's candidates, gathered in pieces (per level or per label): class-wise NMS at
        ``nms_thresh`` over all of them, the best ``detections_per_img`` kept."""
        boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
        keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}


class RetinaNet(OneStageDetector):
    """transform -> backbone -> neck (P3..P7) -> class / box subnets on every anchor.

    train: ``model(images, targets) -> {"loss_cls", "loss_box"}``: the sigmoid focal loss
    (summed over the non-ignored anchors and classes) and the L1 (or smooth L1) loss of the
    encoded boxes of the foreground anchors (or, ``box_loss: giou``, the GIoU loss of their
    decoded boxes, as torchvision's ``retinanet_resnet50_fpn_v2``), each divided by the image's foreground anchor count
    (at least 1), then averaged over the images, as torchvision's RetinaNet does.
    eval: ``model(images) -> [{"boxes" [D, 4], "labels" int64[D] in 1..K-1, "scores" [D]}]`` in
    the coordinates of the input images.

    ``cfg`` is ``cfg["model"]["retinanet"]`` (matching thresholds, focal loss, post-processing).

    In search mode (``build_detector(cfg, search="neck")``) ``neck`` is ``ConvExtraLevels`` around
    an Auto-fusion supernet and ``arch`` holds alpha, as in ``FasterRCNN``: the softmaxed weights
    go to the supernet at every forward; the P6 / P7 convolutions and the subnets are not searched.
    """

    # parameter_breakdown / count_flops: part -> submodules
    PARTS = {"backbone": ("backbone",), "neck": ("neck",), "head": ("head",)}

    def __init__(self, transform: ImageTransform, backbone: nn.Module, neck: nn.Module, head: RetinaNetHead,
                 anchor_generator: AnchorGenerator, cfg: Dict, memory_format: str = "auto",
                 arch: Optional[nn.Module] = None):
        super().__init__()
        self.memory_format = check_memory_format(memory_format)  # fails here, not at the first batch
        self.searched = isinstance(getattr(neck, "base", neck), AutoFusionNeck)
        self.transform = transform
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.anchor_generator = anchor_generator
        self.arch = arch
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        # low-quality matches: every gt keeps its best anchors even below fg_iou_thresh
        self.matcher = Matcher(cfg["fg_iou_thresh"], cfg["bg_iou_thresh"], allow_low_quality_matches=True)
        self.focal_alpha = cfg["focal_alpha"]
        self.focal_gamma = cfg["focal_gamma"]
        self.box_loss = cfg["box_loss"]
        self.score_thresh = cfg["score_thresh"]
        self.topk_candidates = cfg["topk_candidates"]
        self.nms_thresh = cfg["nms_thresh"]
        self.detections_per_img = cfg["detections_per_img"]

    def assign_targets(self, anchors: Tensor, targets: List[Dict[str, Tensor]]) -> List[Tensor]:
        """anchors: Tensor[A_total, 4] -> per image int64[A_total]: the matched gt index,
        ``Matcher.BELOW_LOW_THRESHOLD`` (-1, background) or ``Matcher.BETWEEN_THRESHOLDS`` (-2,
        ignored). An image without boxes is all background."""
        matched = []
        for target in targets:
            if target["boxes"].numel() == 0:
                matched.append(torch.full((anchors.shape[0],), Matcher.BELOW_LOW_THRESHOLD,
                                          dtype=torch.int64, device=anchors.device))
            else:
                matched.append(self.matcher(box_iou(target["boxes"], anchors)))
        return matched

    def _check_labels(self, targets: List[Dict[str, Tensor]]) -> None:
        labels = torch.cat([t["labels"] for t in targets])
        if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > self.head.num_classes):
            raise ValueError(f"target labels must be 1..{self.head.num_classes} (model.num_classes - 1; 0 is "
                             f"the background, which RetinaNet does not classify), got "
                             f"{int(labels.min())}..{int(labels.max())}")

    def losses(self, class_logits: Tensor, deltas: Tensor, anchors: Tensor, matched: List[Tensor],
               targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """class_logits: Tensor[N, A_total, K], deltas: Tensor[N, A_total, 4], anchors:
        Tensor[A_total, 4], matched: per image int64[A_total] (``assign_targets``)."""
        self._check_labels(targets)
        cls_losses, box_losses = [], []
        for logits, image_deltas, image_matched, target in zip(class_logits, deltas, matched, targets):
            foreground = torch.where(image_matched >= 0)[0]
            num_foreground = max(1, foreground.numel())
            gt_index = image_matched[foreground]
            class_targets = torch.zeros_like(logits)
            class_targets[foreground, target["labels"][gt_index] - 1] = 1.0  # label k -> output k - 1
            valid = image_matched != Matcher.BETWEEN_THRESHOLDS
            cls_losses.append(sigmoid_focal_loss(logits[valid], class_targets[valid], self.focal_alpha,
                                                 self.focal_gamma, reduction="sum") / num_foreground)
            matched_boxes = target["boxes"][gt_index]
            if self.box_loss == "giou":  # on the decoded boxes, as torchvision's _box_loss("giou")
                boxes = self.box_coder.decode(image_deltas[foreground], anchors[foreground])[:, 0]
                box_loss = generalized_box_iou_loss(boxes, matched_boxes, reduction="sum", eps=GIOU_EPS)
            else:
                box_targets = self.box_coder.encode(matched_boxes, anchors[foreground])
                if self.box_loss == "l1":
                    box_loss = F.l1_loss(image_deltas[foreground], box_targets, reduction="sum")
                else:
                    box_loss = F.smooth_l1_loss(image_deltas[foreground], box_targets, beta=SMOOTH_L1_BETA,
                                                reduction="sum")
            box_losses.append(box_loss / num_foreground)
        return {"loss_cls": torch.stack(cls_losses).mean(), "loss_box": torch.stack(box_losses).mean()}

    def postprocess_detections(self, class_logits: List[Tensor], deltas: List[Tensor], level_anchors: List[Tensor],
                               image_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """Per level: the (anchor, class) pairs scoring above ``score_thresh``, at most
        ``topk_candidates`` of them, their boxes decoded and clipped; then class-wise NMS over
        all levels and the best ``detections_per_img``. class_logits: Tensor[N, A_l, K] per level,
        deltas: Tensor[N, A_l, 4] per level, level_anchors: Tensor[A_l, 4] per level."""
        detections = []
        for index, size in enumerate(image_sizes):
            image_boxes, image_scores, image_labels = [], [], []
            for logits, level_deltas, anchors in zip(class_logits, deltas, level_anchors):
                num_classes = logits.shape[-1]
                scores = torch.sigmoid(logits[index]).flatten()  # (A_l, K) -> (A_l*K), anchor-major
                candidates = torch.where(scores > self.score_thresh)[0]
                scores, order = scores[candidates].topk(min(self.topk_candidates, candidates.numel()))
                candidates = candidates[order]
                anchor_index = torch.div(candidates, num_classes, rounding_mode="floor")
                boxes = self.box_coder.decode(level_deltas[index][anchor_index], anchors[anchor_index])[:, 0]
                image_boxes.append(clip_boxes_to_image(boxes, size))
                image_scores.append(scores)
                image_labels.append(candidates % num_classes + 1)  # output k -> label k + 1
            detections.append(self.final_detections(image_boxes, image_scores, image_labels))
        return detections

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
                ) -> Union[Dict[str, Tensor], List[Dict[str, Tensor]]]:
        original_sizes = [tuple(im.shape[-2:]) for im in images]
        batch, image_sizes, targets, levels = self.neck_levels(images, targets)
        class_logits, deltas = self.head(levels)
        level_anchors = self.anchor_generator(tuple(batch.shape[-2:]), [tuple(f.shape[-2:]) for f in levels],
                                              levels[0].dtype, levels[0].device)
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            anchors = torch.cat(level_anchors)
            return self.losses(torch.cat(class_logits, dim=1), torch.cat(deltas, dim=1), anchors,
                               self.assign_targets(anchors, targets), targets)
        detections = self.postprocess_detections(class_logits, deltas, level_anchors, image_sizes)
        return self.transform.postprocess(detections, image_sizes, original_sizes)


def torchvision_retinanet_state_dict_to_ours(state: Dict[str, Tensor], levels: Sequence[int] = (3, 4, 5),
                                             num_anchors: int = 9) -> Dict[str, Tensor]:
    """Key mapping from torchvision's ``retinanet_resnet50_fpn`` (v1) to our RetinaNet with an
    FPN neck over ``levels`` (``model.neck.levels``) and ``num_anchors`` anchors per location:

    ==================================================  =====================================
    torchvision                                         autofpn
    ==================================================  =====================================
    backbone.body.<resnet key>                          backbone.body.<resnet key>
    backbone.fpn.inner_blocks.{i}.0.<p>                 neck.base.lateral.c{levels[i]}.<p>
    backbone.fpn.layer_blocks.{i}.0.<p>                 neck.base.output.p{levels[i]}.<p>
    backbone.fpn.extra_blocks.{p6,p7}.<p>               neck.extra.{p6,p7}.<p>
    head.classification_head.conv.{i}.0.<p>             head.cls_convs.{i}.<p>
    head.classification_head.conv.{i}.1.<p> (v2's GN)   head.cls_norms.{i}.<p> (head_norm gn)
    head.classification_head.cls_logits.<p>             head.cls_logits.<p>, column 0 dropped
    head.regression_head.conv.{i}.0.<p>                 head.box_convs.{i}.<p>
    head.regression_head.conv.{i}.1.<p> (v2's GN)       head.box_norms.{i}.<p> (head_norm gn)
    head.regression_head.bbox_reg.<p>                   head.bbox_pred.<p>
    ==================================================  =====================================

    torchvision's classifier has K outputs per anchor (``num_classes`` = K with the background)
    and never trains column 0 towards 1; ours has the K - 1 others (label k = output k - 1), so
    the two models detect the same boxes when column 0 scores below the score threshold (true
    of trained weights, where it learns to say "no" everywhere). The head of
    ``retinanet_resnet50_fpn_v2`` (GroupNorm subnets) maps onto ``head_norm: gn`` at 256 channels
    (32 groups in both); v2's P6 reads C5, not P5, so its neck does not map onto ours.
    """
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        fpn_key = torchvision_fpn_key(key, levels, prefix="neck.base.")
        if fpn_key is not None:
            new = fpn_key
        elif key.startswith("backbone.fpn.extra_blocks."):
            new = f"neck.extra.{parts[3]}.{parts[-1]}"
        elif key.startswith(("head.classification_head.conv.", "head.regression_head.conv.")):
            # conv.{i}.0 the convolution, conv.{i}.1 its GroupNorm (v2 heads: head_norm gn)
            subnet = "cls" if parts[1] == "classification_head" else "box"
            new = f"head.{subnet}_{'norms' if parts[4] == '1' else 'convs'}.{parts[3]}.{parts[-1]}"
        elif key.startswith("head.classification_head.cls_logits."):
            new = f"head.cls_logits.{parts[-1]}"
            # (A*K, ...) -> (A, K, ...) -> drop the background column -> (A*(K-1), ...)
            per_anchor_class = value.view(num_anchors, -1, *value.shape[1:])
            value = per_anchor_class[:, 1:].reshape(-1, *value.shape[1:])
        elif key.startswith("head.regression_head.bbox_reg."):
            new = f"head.bbox_pred.{parts[-1]}"
        else:
            new = key
        out[new] = value
    return out
