"""SSD (Liu et al., "SSD: Single Shot MultiBox Detector", ECCV 2016) written here on torchvision
ops: SSD512 of the paper by default, SSD300 when ``model.ssd.extra_layers`` says so, and the
Auto-fusion neck (or FPN / PANet) over some of its levels (the Auto-FPN paper's Table 6).

Parts (``build_ssd`` in autofpn/models/detector.py builds them from ``model.ssd``)::

    image --warp to S x S--> VGG16Trunk (conv1_1 .. conv5_3)           = backbone  {"c3": conv4_3, "c4": conv5_3}
          --> SSDExtraLayers: L2Norm(conv4_3); pool5 3x3/1, fc6, fc7;  ] = neck      {"c3": conv4_3 (normalised),
              extra_layers (conv8_2, conv9_2, ...)                      ]             "c4": fc7, "c5": conv8_2, ...}
          --> the fusion neck over model.neck.levels (none: nothing), ]             {"p3", "p4", ...}
              the other levels passed on as they are                  ]
          --> SSDHead: a 3x3 conv per level to A_l x K class logits and A_l x 4 box deltas
          --> DefaultBoxGenerator: A_l default boxes per cell of level l

The VGG16 trunk is what the ImageNet weights cover (torchvision's ``VGG16_Weights.IMAGENET1K_FEATURES``,
the weights of torchvision's ``ssd300_vgg16``) and what a search freezes (``search.freeze_backbone``);
fc6 / fc7 and the extra layers start from Xavier initialisations, as torchvision's (the paper
subsamples fc6 / fc7 from VGG16's fully connected layers), and are counted in the "neck" part with
the fusion neck, as RetinaNet's P6 / P7 are, and trained while the neck is searched.

Levels are named by their index, ``c3`` (conv4_3, stride 8) then one more per level; the name is
the stride exponent when every extra layer halves its input (SSD512, and the demo), not for
SSD300's two valid 3x3 convolutions (5x5 -> 3x3 -> 1x1): the searched neck's resampling pools to
the actual sizes there (``auto_fusion.resample``).

Training: each gt keeps its best default box, and every default box with IoU >= ``iou_thresh`` with
a gt is a positive of it (``ssd_match``); the boxes are coded with weights (10, 10, 5, 5); the
losses are smooth L1 (beta 1) of the positives' deltas and the softmax cross-entropy of the
positives plus the ``neg_to_pos_ratio`` x positives highest-loss negatives of each image (hard
negative mining, ``hard_negative_mask``), both summed over the batch and divided by its number of
positives: torchvision's ``SSD.compute_loss``. Eval: per class above ``score_thresh``, its best
``topk_candidates``, class-wise NMS, the best ``detections_per_img``: torchvision's
``SSD.postprocess_detections``. ``model.num_classes`` counts the background, the classifier has
that many outputs with column 0 the background, labels 1..K-1 in and out (the data contract).
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.vgg import cfgs as vgg_cfgs, make_layers
from torchvision.ops import box_iou

from autofpn.models.auto_fusion import AutoFusionNeck
from autofpn.models.backbone import _file_state_dict, _imagenet_state_dict, load_backbone_state
from autofpn.models.retinanet import OneStageDetector, per_anchor
from autofpn.models.transform import ImageTransform
from autofpn.ops.boxes import BoxCoder, clip_boxes_to_image
from autofpn.ops.layout import check_memory_format
from autofpn.ops.matcher import Matcher

# beta of the box loss: torchvision's SSD calls smooth_l1_loss with its default (the paper's smooth L1)
SMOOTH_L1_BETA = 1.0
# torchvision's ssd300_vgg16 layout, the parity test's (and what a config writes to get SSD300)
SSD300_EXTRA_LAYERS = [[256, 512, 3, 2, 1], [128, 256, 3, 2, 1], [128, 256, 3, 1, 0], [128, 256, 3, 1, 0]]
# torchvision's fc block (pool5, fc6, ReLU, fc7, ReLU): index -> our layer
FC_LAYERS = {"1": "fc6", "3": "fc7"}


def scaled_width(channels: int, width_mult: float) -> int:
    """A layer's width times ``model.ssd.width_mult``, at least 1."""
    return max(1, int(round(channels * width_mult)))


def _xavier(module: nn.Module) -> None:
    """torchvision's SSD initialisation of every layer it adds: Xavier-uniform weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0.0)


# ---------------------------------------------------------------------------------- backbone

class VGG16Trunk(nn.Module):
    """torchvision's VGG16 convolutions conv1_1 .. relu5_3 (``vgg.make_layers(cfgs["D"])``, what
    ``torchvision.models.vgg16`` builds its ``features`` from, without pool5 and the classifier),
    pool3 in ceil mode (38 x 38 conv4_3 at 300 px, as the paper), initialised as ``vgg16()`` does
    (Kaiming-normal fan-out, zero biases). ``batch_norm``: torchvision's ``vgg16_bn`` layout (a
    BatchNorm after every convolution), what a trunk trained from scratch needs to learn within a
    short schedule (DSOD, Shen et al. 2017; the demo's measurement in configs/ssd_demo.yaml).
    ``width_mult``: every convolution's width times this (1: VGG16; the CPU demo's is narrower, and
    no ImageNet weights fit it).

    ``weights``: none | imagenet (``VGG16_Weights.IMAGENET1K_FEATURES``, the weights torchvision's
    SSD starts from; they expect ``model.transform.image_mean`` [0.48235, 0.45882, 0.40784] and
    ``image_std`` [1/255] x 3; ``VGG16_BN_Weights.IMAGENET1K_V1`` with ``batch_norm``) | a
    state-dict file (``features.N.*`` or ``N.*`` keys). The body's indices are those of
    ``vgg16().features`` (``vgg16_bn().features``), so its keys are ``body.N.*``.

    ``frozen_stages`` (model.backbone.frozen_stages): stem conv1_x, then the stages conv2_x ..
    conv5_x; k freezes the stem and k stages (-1 nothing; 0 = torchvision's ssd300_vgg16 with
    weights; 1 = the SSD paper's Caffe model, conv1_x and conv2_x frozen).

    forward(x: Tensor[N, 3, H, W]) -> {"c3": conv4_3 Tensor[N, C, ~H/8, ~W/8], "c4": conv5_3
    Tensor[N, C, ~H/16, ~W/16]} (after their ReLUs; C = 512 x width_mult)
    """

    def __init__(self, weights: Optional[str] = "none", frozen_stages: int = -1, batch_norm: bool = False,
                 width_mult: float = 1.0):
        super().__init__()
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in -1..4, got {frozen_stages}")
        layout = [v if v == "M" else scaled_width(v, width_mult) for v in vgg_cfgs["D"]]
        body = make_layers(layout, batch_norm=batch_norm)
        pools = [i for i, layer in enumerate(body) if isinstance(layer, nn.MaxPool2d)]  # pool1 .. pool5
        self.body = body[: pools[4]]  # pool5 left out (SSDExtraLayers has its own)
        self.body[pools[2]].ceil_mode = True  # pool3
        self.conv4_3_relu = pools[3] - 1  # body index whose output is conv4_3
        # body slices [start, end) of stem, stage 2..5 (each ends with its max pool, the last with relu5_3)
        bounds = [0] + [i + 1 for i in pools[:4]] + [pools[4]]
        self.stage_bounds = list(zip(bounds[:-1], bounds[1:]))
        for m in self.body.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
        imagenet = ("VGG16_BN_Weights", "IMAGENET1K_V1") if batch_norm else ("VGG16_Weights", "IMAGENET1K_FEATURES")
        if weights == "imagenet":
            load_backbone_state(self.body, self._adapt_keys(_imagenet_state_dict(*imagenet)), ".".join(imagenet))
        elif weights not in ("none", None):
            load_backbone_state(self.body, self._adapt_keys(_file_state_dict(weights)), weights)
        width = scaled_width(512, width_mult)
        self.out_channels: Dict[str, int] = {"c3": width, "c4": width}
        self.strides: Dict[str, int] = {"c3": 8, "c4": 16}
        self.frozen_stages = frozen_stages
        for stage in self.stages()[: frozen_stages + 1]:
            for p in stage.parameters():
                p.requires_grad_(False)

    @staticmethod
    def _adapt_keys(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """A VGG16 file's ``features.N.*`` (``classifier.*`` dropped) -> ``N.*``; pool5 and beyond
        hold no parameters, so the body takes every convolution of the file."""
        if any(k.startswith("features.") for k in state):
            return {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        return state

    def stages(self) -> List[nn.Module]:
        """[stem (conv1_x), conv2_x, conv3_x, conv4_x, conv5_x] as modules (for freezing)."""
        return [nn.ModuleList(self.body[start:end]) for start, end in self.stage_bounds]

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        out: Dict[str, Tensor] = {}
        for index, layer in enumerate(self.body):
            x = layer(x)
            if index == self.conv4_3_relu:
                out["c3"] = x  # the next layer (pool4) makes a new tensor: the in-place ReLUs after it leave this alone
        out["c4"] = x
        return out


# ---------------------------------------------------------------------------------- levels

class L2Norm(nn.Module):
    """x / ||x||_2 over the channels at every location, times a learnt per-channel scale that
    starts at ``scale`` (ParseNet; SSD's conv4_3_norm, 20). forward(Tensor[N, C, H, W]) -> same shape."""

    def __init__(self, channels: int, scale: float = 20.0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: Tensor) -> Tensor:
        return self.weight.view(1, -1, 1, 1) * F.normalize(x)


class SSDExtraLayers(nn.Module):
    """SSD's source levels from the VGG16 trunk's conv4_3 and conv5_3: conv4_3 L2-normalised; pool5
    (3x3, stride 1, pad 1), fc6 (3x3, dilation 6, 1024 channels) + ReLU, fc7 (1x1, 1024) + ReLU;
    then one level per ``extra_layers`` entry ``[c1, c2, k, s, p]``: 1x1 conv to c1 + ReLU, k x k
    conv stride s padding p to c2 + ReLU, on the previous level. Xavier initialisation (torchvision).

    forward({"c3": conv4_3, "c4": conv5_3}) -> {"c3": normalised conv4_3, "c4": fc7, "c5": extra 0,
    ...}; attributes ``out_channels`` / ``strides`` per level name (nominal strides 2^k, see the
    module docstring), so a fusion neck builds on this as on a backbone.
    """

    def __init__(self, extra_layers: Sequence[Sequence[int]], l2norm_scale: float = 20.0, in_channels: int = 512,
                 fc_channels: int = 1024):
        super().__init__()
        self.l2norm = L2Norm(in_channels, l2norm_scale)
        self.pool5 = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.fc6 = nn.Conv2d(in_channels, fc_channels, kernel_size=3, padding=6, dilation=6)
        self.fc7 = nn.Conv2d(fc_channels, fc_channels, kernel_size=1)
        blocks, channels = [], fc_channels
        for mid, out, kernel, stride, padding in extra_layers:
            blocks.append(nn.Sequential(nn.Conv2d(channels, mid, 1), nn.ReLU(inplace=True),
                                        nn.Conv2d(mid, out, kernel, stride=stride, padding=padding),
                                        nn.ReLU(inplace=True)))
            channels = out
        self.blocks = nn.ModuleList(blocks)
        _xavier(self)
        self.out_channels: Dict[str, int] = {"c3": in_channels, "c4": fc_channels}
        self.out_channels.update({f"c{5 + i}": int(spec[1]) for i, spec in enumerate(extra_layers)})
        self.strides: Dict[str, int] = {name: 2 ** int(name[1:]) for name in self.out_channels}

    def forward(self, feats: Dict[str, Tensor]) -> Dict[str, Tensor]:
        out = {"c3": self.l2norm(feats["c3"])}
        x = F.relu(self.fc7(F.relu(self.fc6(self.pool5(feats["c4"])))))
        out["c4"] = x
        for i, block in enumerate(self.blocks):
            conv = block[2]
            rows, cols = ((size + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1 for size in x.shape[-2:])
            if rows < 1 or cols < 1:  # torch's own error names no config key
                raise ValueError(f"model.ssd.extra_layers[{i}] makes no cells of its {tuple(x.shape[-2:])} input: the "
                                 f"images (model.transform.min_size / test_min_size) are too small for these layers")
            x = block(x)
            out[f"c{5 + i}"] = x
        return out


class SSDNeck(nn.Module):
    """SSD's source levels (``extra``: ``SSDExtraLayers``) and a fusion neck (``base``: FPN, PANet, an
    Auto-fusion supernet or decoded neck, or None for plain SSD) over some of them
    (``base.levels``); the levels outside ``base.levels`` are passed on as they are, so SSD's
    coarsest levels stay SSD's.

    forward(feats {"c3": conv4_3, "c4": conv5_3}, weights=None) -> {"p3": ..., "p<last>": ...};
    ``weights`` (softmaxed alpha, ``Tensor[base.arch_shape]``) go to an Auto-fusion supernet, the
    searched part. ``out_channels``: {level name: channels} (the fused levels have
    ``base.out_channels``), ``strides``: nominal, as ``extra.strides``.
    """

    def __init__(self, extra: SSDExtraLayers, base: Optional[nn.Module] = None):
        super().__init__()
        if base is not None and getattr(base, "extra_pool_level", False):
            raise ValueError("the fusion neck of an SSD adds no max-pooled level (extra_pool_level false)")
        self.extra = extra
        self.base = base
        fused = {int(level) for level in base.levels} if base is not None else set()
        self.out_channels: Dict[str, int] = {}
        for name, channels in extra.out_channels.items():
            self.out_channels[f"p{name[1:]}"] = base.out_channels if int(name[1:]) in fused else channels
        self.strides = {f"p{name[1:]}": stride for name, stride in extra.strides.items()}

    def forward(self, feats: Dict[str, Tensor], weights: Optional[Tensor] = None) -> Dict[str, Tensor]:
        levels = self.extra(feats)
        fused: Dict[str, Tensor] = {}
        if self.base is not None:
            fused = self.base(levels) if weights is None else self.base(levels, weights)
        elif weights is not None:
            raise ValueError("an SSD without a fusion neck takes no architecture weights")
        return {f"p{name[1:]}": fused.get(f"p{name[1:]}", x) for name, x in levels.items()}


# ---------------------------------------------------------------------------------- head

class SSDHead(nn.Module):
    """One 3x3 convolution per level to ``A_l x K`` class logits and one to ``A_l x 4`` box deltas
    (torchvision's ``SSDHead``, Xavier initialisation).

    forward(features: List[Tensor[N, C_l, H_l, W_l]]) -> (class logits Tensor[N, H_l*W_l*A_l, K] per
    level, box deltas Tensor[N, H_l*W_l*A_l, 4] per level), anchor order cell-major, then anchor
    (``DefaultBoxGenerator``'s).
    """

    def __init__(self, in_channels: Sequence[int], num_anchors: Sequence[int], num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.cls_logits = nn.ModuleList([nn.Conv2d(c, a * num_classes, 3, padding=1)
                                         for c, a in zip(in_channels, num_anchors)])
        self.bbox_pred = nn.ModuleList([nn.Conv2d(c, a * 4, 3, padding=1) for c, a in zip(in_channels, num_anchors)])
        _xavier(self)

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        class_logits = [per_anchor(conv(x), self.num_classes) for conv, x in zip(self.cls_logits, features)]
        deltas = [per_anchor(conv(x), 4) for conv, x in zip(self.bbox_pred, features)]
        return class_logits, deltas


# ---------------------------------------------------------------------------------- default boxes

class DefaultBoxGenerator:
    """SSD's default boxes (paper Sec. 2.2; torchvision's ``DefaultBoxGenerator`` arithmetic).

    Level k (scales s_k, s_{k+1}, as fractions of the image side) has at every cell, in this order:
    a square of side s_k, a square of side s'_k = sqrt(s_k s_{k+1}), then for each aspect ratio r
    of the level a box of width s_k sqrt(r) and height s_k / sqrt(r) and its transpose; widths
    and heights clipped to [0, 1] when ``clip``. Centres ((j + 0.5) / f_x, (i + 0.5) / f_y) with
    f = image side / step of the level (``steps``) or its number of cells (``steps`` None). Then
    x times the image width, y times its height.

    Args: aspect_ratios: per level a list of ratios r >= 1 (2 boxes each); scales: one per level
    plus one; steps: one per level or None.
    """

    def __init__(self, aspect_ratios: Sequence[Sequence[float]], scales: Sequence[float],
                 steps: Optional[Sequence[float]] = None, clip: bool = True):
        if len(scales) != len(aspect_ratios) + 1:
            raise ValueError(f"{len(scales)} scales for {len(aspect_ratios)} levels: expected one per level plus one")
        if steps is not None and len(steps) != len(aspect_ratios):
            raise ValueError(f"{len(steps)} steps for {len(aspect_ratios)} levels")
        self.aspect_ratios = [list(r) for r in aspect_ratios]
        self.scales = [float(s) for s in scales]
        self.steps = None if steps is None else list(steps)
        self.clip = clip

    def num_anchors_per_location(self) -> List[int]:
        return [2 + 2 * len(ratios) for ratios in self.aspect_ratios]

    def wh_pairs(self, level: int) -> Tensor:
        """Tensor[A_l, 2]: (width, height) of each box of ``level`` as fractions of the image, clipped."""
        s_k, s_next = self.scales[level], self.scales[level + 1]
        s_prime = math.sqrt(s_k * s_next)
        pairs = [[s_k, s_k], [s_prime, s_prime]]
        for ratio in self.aspect_ratios[level]:
            root = math.sqrt(ratio)
            pairs += [[s_k * root, s_k / root], [s_k / root, s_k * root]]
        wh = torch.as_tensor(pairs, dtype=torch.float32)
        return wh.clamp(min=0, max=1) if self.clip else wh

    def __call__(self, image_size: Tuple[int, int], grid_sizes: Sequence[Tuple[int, int]], dtype: torch.dtype,
                 device: torch.device) -> List[Tensor]:
        """image_size: (H, W) of the batch; grid_sizes: (H_l, W_l) per level -> per level
        Tensor[H_l*W_l*A_l, 4] xyxy in pixels (cell-major, then box)."""
        if len(grid_sizes) != len(self.aspect_ratios):
            raise ValueError(f"{len(grid_sizes)} feature levels for default boxes of {len(self.aspect_ratios)} levels")
        height, width = int(image_size[0]), int(image_size[1])
        xy_size = torch.tensor([width, height])
        out = []
        for k, (rows, cols) in enumerate(grid_sizes):
            rows, cols = int(rows), int(cols)
            if self.steps is not None:
                f_x, f_y = width / self.steps[k], height / self.steps[k]
            else:
                f_x, f_y = cols, rows
            centre_x = ((torch.arange(0, cols) + 0.5) / f_x).to(dtype=dtype)
            centre_y = ((torch.arange(0, rows) + 0.5) / f_y).to(dtype=dtype)
            centre_y, centre_x = torch.meshgrid(centre_y, centre_x, indexing="ij")
            wh = self.wh_pairs(k)
            # (H_l*W_l, 2) centres, each repeated for the A_l boxes of its cell -> (H_l*W_l*A_l, 2)
            centres = torch.stack((centre_x.reshape(-1), centre_y.reshape(-1)), dim=-1).repeat_interleave(len(wh), 0)
            sizes = wh.repeat(rows * cols, 1)
            boxes = torch.cat(((centres - 0.5 * sizes) * xy_size, (centres + 0.5 * sizes) * xy_size), dim=-1)
            out.append(boxes.to(dtype=dtype, device=device))
        return out


# ---------------------------------------------------------------------------------- training

def ssd_match(iou: Tensor, threshold: float) -> Tensor:
    """iou: Tensor[G, P] (G >= 1) -> int64[P]: the gt index of each default box with IoU >=
    ``threshold`` (its best gt), else -1 (background); then every gt takes its best default box
    whatever the IoU (torchvision's ``SSDMatcher``, the paper's matching)."""
    matches = Matcher(threshold, threshold, allow_low_quality_matches=False)(iou)
    _, best_box = iou.max(dim=1)
    matches[best_box] = torch.arange(best_box.numel(), dtype=torch.int64, device=best_box.device)
    return matches


def hard_negative_mask(cls_loss: Tensor, foreground: Tensor, neg_to_pos_ratio: float) -> Tensor:
    """cls_loss: Tensor[N, A] (the cross-entropy of every default box), foreground: bool[N, A] ->
    bool[N, A]: per image the ``neg_to_pos_ratio`` x (its positives) negatives of highest loss (an
    image without positives keeps none), ranked as torchvision's ``SSD.compute_loss`` ranks them
    (the positives' losses set to -inf, a descending sort, the rank of each box < the count)."""
    num_negative = neg_to_pos_ratio * foreground.sum(1, keepdim=True)
    negative_loss = cls_loss.clone()
    negative_loss[foreground] = -float("inf")
    _, order = negative_loss.sort(1, descending=True)
    rank = order.sort(1)[1]
    return rank < num_negative


class SquareTransform(ImageTransform):
    """``ImageTransform`` whose resize warps every image to a ``min_size`` x ``min_size`` square
    (bilinear, as torchvision's SSD transform with ``fixed_size``), whatever its aspect ratio;
    boxes and detections follow with separate x and y scales. ``max_size`` is not used."""

    def resize(self, image: Tensor, min_size: int) -> Tensor:
        return F.interpolate(image[None], size=(min_size, min_size), mode="bilinear", align_corners=False)[0]


class SSD(OneStageDetector):
    """transform (warp to S x S) -> VGG16 trunk -> SSD's levels and fusion neck -> head on every
    default box.

    train: ``model(images, targets) -> {"loss_cls", "loss_box"}`` (module docstring; torchvision's
    ``classification`` / ``bbox_regression``).
    eval: ``model(images) -> [{"boxes" [D, 4], "labels" int64[D] in 1..K-1, "scores" [D]}]`` in the
    coordinates of the input images.

    ``cfg`` is ``cfg["model"]["ssd"]``. In search mode (``build_detector(cfg, search="neck")``)
    ``neck.base`` is an Auto-fusion supernet and ``arch`` holds alpha, as in ``FasterRCNN``.
    """

    # parameter_breakdown / count_flops: part -> submodules. backbone: the VGG16 trunk (conv1_1 ..
    # conv5_3); neck: L2Norm, fc6 / fc7, the extra layers and the fusion neck; head: the predictors
    PARTS = {"backbone": ("backbone",), "neck": ("neck",), "head": ("head",)}

    def __init__(self, transform: ImageTransform, backbone: nn.Module, neck: SSDNeck, head: SSDHead,
                 default_boxes: DefaultBoxGenerator, cfg: Dict, memory_format: str = "auto",
                 arch: Optional[nn.Module] = None):
        super().__init__()
        self.memory_format = check_memory_format(memory_format)  # fails here, not at the first batch
        self.searched = isinstance(neck.base, AutoFusionNeck)
        self.transform = transform
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.default_boxes = default_boxes
        self.arch = arch
        self.box_coder = BoxCoder(cfg["bbox_reg_weights"])
        self.iou_thresh = cfg["iou_thresh"]
        self.neg_to_pos_ratio = cfg["neg_to_pos_ratio"]
        self.score_thresh = cfg["score_thresh"]
        self.topk_candidates = cfg["topk_candidates"]
        self.nms_thresh = cfg["nms_thresh"]
        self.detections_per_img = cfg["detections_per_img"]

    def assign_targets(self, anchors: Tensor, targets: List[Dict[str, Tensor]]) -> List[Tensor]:
        """anchors: Tensor[A, 4] -> per image int64[A]: the matched gt index or -1 (background).
        An image without boxes is all background."""
        matched = []
        for target in targets:
            if target["boxes"].numel() == 0:
                matched.append(torch.full((anchors.shape[0],), Matcher.BELOW_LOW_THRESHOLD, dtype=torch.int64,
                                          device=anchors.device))
            else:
                matched.append(ssd_match(box_iou(target["boxes"], anchors), self.iou_thresh))
        return matched

    def _check_labels(self, targets: List[Dict[str, Tensor]]) -> None:
        labels = torch.cat([t["labels"] for t in targets])
        last = self.head.num_classes - 1
        if labels.numel() and (int(labels.min()) < 1 or int(labels.max()) > last):
            raise ValueError(f"target labels must be 1..{last} (model.num_classes - 1; 0 is the background), got "
                             f"{int(labels.min())}..{int(labels.max())}")

    def losses(self, class_logits: Tensor, deltas: Tensor, anchors: Tensor, matched: List[Tensor],
               targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """class_logits: Tensor[N, A, K], deltas: Tensor[N, A, 4], anchors: Tensor[A, 4], matched:
        per image int64[A] (``assign_targets``) -> {"loss_cls", "loss_box"}, each summed over the
        batch and divided by its positives (at least 1)."""
        self._check_labels(targets)
        box_losses, class_targets = [], []
        num_foreground = 0
        for image_deltas, image_matched, target in zip(deltas, matched, targets):
            foreground = torch.where(image_matched >= 0)[0]
            gt_index = image_matched[foreground]
            num_foreground += foreground.numel()
            box_targets = self.box_coder.encode(target["boxes"][gt_index], anchors[foreground])
            box_losses.append(F.smooth_l1_loss(image_deltas[foreground], box_targets, beta=SMOOTH_L1_BETA,
                                               reduction="sum"))
            labels = torch.zeros(image_matched.shape, dtype=torch.int64, device=image_matched.device)
            labels[foreground] = target["labels"][gt_index]
            class_targets.append(labels)
        class_targets = torch.stack(class_targets)  # (N, A), 0 = background
        num_classes = class_logits.shape[-1]
        # (N, A, K) -> (N*A, K) -> cross-entropy per default box -> (N, A)
        cls_loss = F.cross_entropy(class_logits.reshape(-1, num_classes), class_targets.reshape(-1),
                                   reduction="none").view(class_targets.shape)
        foreground = class_targets > 0
        negatives = hard_negative_mask(cls_loss.detach(), foreground, self.neg_to_pos_ratio)
        normaliser = max(1, num_foreground)
        return {"loss_cls": (cls_loss[foreground].sum() + cls_loss[negatives].sum()) / normaliser,
                "loss_box": torch.stack(box_losses).sum() / normaliser}

    def postprocess_detections(self, class_logits: Tensor, deltas: Tensor, anchors: Tensor,
                               image_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """class_logits: Tensor[N, A, K], deltas: Tensor[N, A, 4], anchors: Tensor[A, 4] -> per
        image: every box decoded and clipped; per label 1..K-1 the boxes whose softmax score is above
        ``score_thresh``, at most ``topk_candidates``; class-wise NMS; the best ``detections_per_img``."""
        scores_all = F.softmax(class_logits, dim=-1)
        detections = []
        for image_deltas, scores, size in zip(deltas, scores_all, image_sizes):
            boxes = clip_boxes_to_image(self.box_coder.decode(image_deltas, anchors)[:, 0], size)
            image_boxes, image_scores, image_labels = [], [], []
            for label in range(1, scores.shape[-1]):
                score = scores[:, label]
                keep = score > self.score_thresh
                score, box = score[keep], boxes[keep]
                score, order = score.topk(min(self.topk_candidates, score.numel()))
                image_boxes.append(box[order])
                image_scores.append(score)
                image_labels.append(torch.full_like(score, label, dtype=torch.int64))
            detections.append(self.final_detections(image_boxes, image_scores, image_labels))
        return detections

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
                ) -> Union[Dict[str, Tensor], List[Dict[str, Tensor]]]:
        original_sizes = [tuple(im.shape[-2:]) for im in images]
        batch, image_sizes, targets, levels = self.neck_levels(images, targets)
        class_logits, deltas = self.head(levels)
        # float32 whatever the features' dtype (autocast): the matching and box coding read pixels
        anchors = torch.cat(self.default_boxes(tuple(batch.shape[-2:]), [tuple(f.shape[-2:]) for f in levels],
                                               torch.float32, levels[0].device))
        class_logits, deltas = torch.cat(class_logits, dim=1), torch.cat(deltas, dim=1).float()
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            return self.losses(class_logits, deltas, anchors, self.assign_targets(anchors, targets), targets)
        detections = self.postprocess_detections(class_logits, deltas, anchors, image_sizes)
        return self.transform.postprocess(detections, image_sizes, original_sizes)


def torchvision_ssd_state_dict_to_ours(state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Key mapping from torchvision's ``ssd300_vgg16`` (any ``SSD`` on ``SSDFeatureExtractorVGG``,
    its ``highres`` variant too) to our SSD without a fusion neck (``model.neck.type: none``):

    ============================================  ==========================================
    torchvision                                   autofpn
    ============================================  ==========================================
    backbone.features.{i}.<p>  (conv1_1..conv4_3)  backbone.body.{i}.<p>
    backbone.extra.0.{j}.<p>   (conv5_1..conv5_3)  backbone.body.{23 + j}.<p>
    backbone.scale_weight                         neck.extra.l2norm.weight
    backbone.extra.0.7.1.<p>   (fc6)              neck.extra.fc6.<p>
    backbone.extra.0.7.3.<p>   (fc7)              neck.extra.fc7.<p>
    backbone.extra.{k}.{0,2}.<p>  (k >= 1)        neck.extra.blocks.{k - 1}.{0,2}.<p>
    head.classification_head.module_list.{l}.<p>  head.cls_logits.{l}.<p>
    head.regression_head.module_list.{l}.<p>      head.bbox_pred.{l}.<p>
    ============================================  ==========================================

    torchvision's ``backbone.extra.0`` is ``vgg16().features[23:30]`` (pool4 .. relu5_3) followed by
    its fc block (pool5, fc6, ReLU, fc7, ReLU) at index 7, so ``extra.0.{j}`` for j < 7 is
    ``features.{23 + j}``: our body keeps ``vgg16().features``' indices.
    """
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if key.startswith("backbone.features."):
            new = f"backbone.body.{parts[2]}.{parts[-1]}"
        elif key == "backbone.scale_weight":
            new = "neck.extra.l2norm.weight"
        elif key.startswith("backbone.extra.0.7."):  # (pool5, fc6, ReLU, fc7, ReLU)
            new = f"neck.extra.{FC_LAYERS[parts[4]]}.{parts[-1]}"
        elif key.startswith("backbone.extra.0."):
            new = f"backbone.body.{23 + int(parts[3])}.{parts[-1]}"
        elif key.startswith("backbone.extra."):
            new = f"neck.extra.blocks.{int(parts[2]) - 1}.{parts[3]}.{parts[-1]}"
        elif key.startswith("head.classification_head.module_list."):
            new = f"head.cls_logits.{parts[3]}.{parts[-1]}"
        elif key.startswith("head.regression_head.module_list."):
            new = f"head.bbox_pred.{parts[3]}.{parts[-1]}"
        else:
            new = key
        out[new] = value
    return out
