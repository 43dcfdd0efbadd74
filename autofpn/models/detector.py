"""Faster R-CNN with a pluggable neck and box head, and ``build_detector`` from a config."""
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from autofpn.config import ConfigError
from autofpn.models.architecture import Architecture, SearchableDetector
from autofpn.models.auto_fusion import AutoFusionNeck
from autofpn.models.auto_head import AutoHead
from autofpn.models.backbone import SSD_BACKBONES, build_backbone
from autofpn.models.heads import BoxPredictor, ConvFCHead, TwoMLPHead
from autofpn.models.necks import FPN, ConvExtraLevels, PANet, torchvision_fpn_key
from autofpn.models.retinanet import RetinaNet, RetinaNetHead, retinanet_anchor_sizes
from autofpn.models.roi_heads import RoIHeads
from autofpn.models.ssd import (SSD, DefaultBoxGenerator, SSDExtraLayers, SSDHead, SSDNeck, SquareTransform,
                                VGG16Trunk, scaled_width)
from autofpn.models.rpn import AnchorGenerator, RegionProposalNetwork
from autofpn.models.transform import ImageTransform
from autofpn.ops.layout import check_memory_format, resolve_memory_format
from autofpn.ops.roi_align import MultiLevelRoIAlign


class FasterRCNN(SearchableDetector):
    """transform -> backbone -> neck -> RPN -> RoI heads (torchvision's contract).

    train: ``model(images, targets) -> {"loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"}``
    eval:  ``model(images) -> [{"boxes" [D, 4], "labels" int64[D], "scores" [D]}]`` in the
    coordinates of the input images.

    In search mode ``arch`` holds the architecture parameters; their softmaxed weights are
    passed to the neck and/or head at every forward.

    ``memory_format`` (``model.memory_format``): the layout the image batch is put in, which
    the backbone, neck, RPN and RoI features then keep (autofpn.ops.layout; "auto" depends on
    the device and on whether the neck or head is a searched one).
    """

    # parameter_breakdown / count_flops: part -> submodules (the architecture parameters are none)
    PARTS = {"backbone": ("backbone",), "neck": ("neck",), "rpn": ("rpn",),
             "head": ("roi_heads.box_head", "roi_heads.box_predictor")}

    def __init__(self, transform: ImageTransform, backbone: nn.Module, neck: nn.Module,
                 rpn: RegionProposalNetwork, roi_heads: RoIHeads, arch: Optional[nn.Module] = None,
                 memory_format: str = "auto"):
        super().__init__()
        self.memory_format = check_memory_format(memory_format)  # fails here, not at the first batch
        self.searched = isinstance(neck, AutoFusionNeck) or isinstance(roi_heads.box_head, AutoHead)
        self.transform = transform
        self.backbone = backbone
        self.neck = neck
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.arch = arch

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
                ) -> Union[Dict[str, Tensor], List[Dict[str, Tensor]]]:
        original_sizes = [tuple(im.shape[-2:]) for im in images]  # ints (0-dim tensors when traced)
        batch, image_sizes, targets = self.transform(images, targets)
        batch = batch.contiguous(memory_format=resolve_memory_format(self.memory_format, batch.device, self.searched))
        features = self.backbone(batch)
        neck_weights, head_weights = self.arch.forward_weights() if self.arch is not None else (None, None)
        features = self.neck(features) if neck_weights is None else self.neck(features, neck_weights)
        rpn_features = [features[name] for name in sorted(features, key=lambda n: int(n[1:]))]
        proposals, rpn_losses = self.rpn(tuple(batch.shape[-2:]), image_sizes, rpn_features, targets)
        detections, roi_losses = self.roi_heads(features, proposals, image_sizes, targets, head_weights)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return self.transform.postprocess(detections, image_sizes, original_sizes)


def _searched_part(cfg: Dict, part: str, genotype: Optional[Dict], search: bool) -> Tuple[Optional[Dict], str]:
    """(genotype part, norm) of an Auto-fusion neck / Auto-head: the supernet when searching
    (no genotype, the search's norm), else the decoded module of the genotype's ``part``."""
    if search:
        return None, cfg["search"]["searched_norm"]
    if not genotype or not genotype.get(part):
        raise ConfigError(f"model.{part}.type is 'auto' but no genotype with a '{part}' part was given "
                          f"(pass --genotype FILE)")
    _check_genotype_shape(cfg, part, genotype[part])
    return genotype[part], cfg["model"][part]["norm"]


# the config keys that fix a searched part's shape, and how its genotype spells that shape
_GENOTYPE_SHAPE = {"neck": {"layers": lambda g: len(g["layers"]), "levels": lambda g: list(g["levels"])},
                   "head": {"cells": lambda g: len(g["cells"])}}


def _check_genotype_shape(cfg: Dict, part: str, part_genotype: Dict) -> None:
    """A genotype decodes only into the shape it was searched in: one line naming the key, not a
    traceback from the module (a search's config.yaml beside its geno.json has the right keys)."""
    for key, shape_of in _GENOTYPE_SHAPE[part].items():
        configured, searched = cfg["model"][part][key], shape_of(part_genotype)
        if (list(configured) if key == "levels" else configured) != searched:
            raise ConfigError(f"the genotype's {part} has {key} = {searched} but model.{part}.{key} = {configured}: "
                              f"use the config its search wrote (config.yaml beside geno.json) or "
                              f"--opts model.{part}.{key}={str(searched).replace(' ', '')}")


def _neck_args(cfg: Dict, backbone: nn.Module) -> Dict:
    n = cfg["model"]["neck"]
    return dict(in_channels=backbone.out_channels, in_strides=backbone.strides, channels=n["channels"],
                levels=n["levels"], extra_pool_level=n["extra_pool_level"])


def build_auto_fusion(cfg: Dict, backbone: nn.Module, genotype: Optional[Dict], search: bool) -> nn.Module:
    neck_genotype, norm = _searched_part(cfg, "neck", genotype, search)
    return AutoFusionNeck(layers=cfg["model"]["neck"]["layers"], genotype=neck_genotype, norm=norm,
                          sampled=search and _sampled_search(cfg),
                          residual_ops=cfg["model"]["neck"]["residual_ops"],
                          partial_channels=partial_channels(cfg, "neck") if search else 1, **_neck_args(cfg, backbone))


def build_auto_head(cfg: Dict, in_channels: int, genotype: Optional[Dict], search: bool) -> nn.Module:
    head_genotype, norm = _searched_part(cfg, "head", genotype, search)
    h = cfg["model"]["head"]
    pooler_size = cfg["model"]["roi"]["pooler_size"]
    if not 0 <= h["cell_size"] <= pooler_size:
        raise ConfigError(f"model.head.cell_size = {h['cell_size']}: expected 0 (no pooling) up to "
                          f"model.roi.pooler_size = {pooler_size}")
    return AutoHead(in_channels, pooler_size=pooler_size, channels=h["channels"],
                    cells=h["cells"], genotype=head_genotype, norm=norm,
                    sampled=search and _sampled_search(cfg), readout=h["readout"], readout_dim=h["mlp_dim"],
                    residual_ops=h["residual_ops"], cell_size=h["cell_size"],
                    partial_channels=partial_channels(cfg, "head") if search else 1)


def partial_channels(cfg: Dict, part: str) -> int:
    """``search.partial_channels`` K (1: the paper's mixed op on every channel), checked against
    the width of the ``part`` ("neck" or "head") supernet, whose ops run on 1 / K of it."""
    k = cfg.get("search", {}).get("partial_channels", 1)
    width = cfg["model"][part]["channels"]
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or width % k:
        raise ConfigError(f"'search.partial_channels' = {k!r}: expected a positive int that divides the "
                          f"{part} supernet's {width} channels (model.{part}.channels"
                          f"{' or search.head_channels' if part == 'head' else ''}); 1 = every channel")
    return k


def _sampled_search(cfg: Dict) -> bool:
    """A supernet searched with one sampled path per link/edge computes only that path."""
    return cfg.get("search", {}).get("mode", "full") != "full"


# model.neck.type / model.head.type -> builder(cfg, backbone | in_channels, genotype, search).
# A new neck or head is one module plus one line here. "auto" is the searchable part: its
# supernet when searching, else the module decoded from the genotype.
NECKS: Dict[str, Callable[..., nn.Module]] = {
    "fpn": lambda cfg, backbone, genotype, search: FPN(**_neck_args(cfg, backbone)),
    "panet": lambda cfg, backbone, genotype, search: PANet(**_neck_args(cfg, backbone)),
    "auto": build_auto_fusion,
}
HEADS: Dict[str, Callable[..., nn.Module]] = {
    "mlp": lambda cfg, in_channels, genotype, search: TwoMLPHead(
        in_channels, cfg["model"]["roi"]["pooler_size"], cfg["model"]["head"]["mlp_dim"]),
    "conv": lambda cfg, in_channels, genotype, search: ConvFCHead(
        in_channels, cfg["model"]["roi"]["pooler_size"], cfg["model"]["head"]["convs"],
        cfg["model"]["head"]["channels"], cfg["model"]["head"]["mlp_dim"], cfg["model"]["head"]["norm"]),
    "auto": build_auto_head,
}


def _lookup(registry: Dict[str, Callable], key: str, kind: str) -> Callable:
    if kind not in registry:
        raise ConfigError(f"'{key}' = {kind!r}: expected one of {', '.join(registry)}")
    return registry[kind]


def _search_parts(search: Union[bool, str]) -> Tuple[bool, bool]:
    """search=False: fixed model; True: neck and head supernets; "neck" / "head": one of them."""
    if search in (False, None):
        return False, False
    if search is True:
        return True, True
    if search in ("neck", "head"):
        return search == "neck", search == "head"
    raise ValueError(f"search must be False, True, 'neck' or 'head', got {search!r}")


def use_genotype(cfg: Dict, genotype: Optional[Dict], neck: Optional[str] = None,
                 head: Optional[str] = None) -> Dict:
    """Set ``model.neck.type`` / ``model.head.type`` in ``cfg`` (in place, returned) for a run
    with ``genotype``: each part the genotype holds is the searched ("auto") one, unless a type
    was asked for explicitly (``neck`` / ``head``, e.g. train.py's ``--neck fpn``). Every entry
    point (train, evaluate, the study) builds a genotype's model through this."""
    if neck:
        cfg["model"]["neck"]["type"] = neck
    elif genotype is not None and genotype.get("neck"):
        cfg["model"]["neck"]["type"] = "auto"
    if head:
        cfg["model"]["head"]["type"] = head
    elif genotype is not None and genotype.get("head"):
        cfg["model"]["head"]["type"] = "auto"
    if genotype is None and "auto" in (cfg["model"]["neck"]["type"], cfg["model"]["head"]["type"]):
        raise ConfigError("model.neck.type / model.head.type is 'auto': pass --genotype FILE")
    return cfg


def _check_num_classes(model_cfg: Dict) -> None:
    if model_cfg["num_classes"] is None:
        raise ConfigError("model.num_classes is not set: train.py, search.py and evaluate.py take it from the "
                          "data; set it (classes + background) to build a model without data")


def _build_transform(model_cfg: Dict) -> ImageTransform:
    t = model_cfg["transform"]
    return ImageTransform(t["min_size"], t["max_size"], t["test_min_size"], t["image_mean"],
                          t["image_std"], t["size_divisible"])


def build_faster_rcnn(cfg: Dict, genotype: Optional[Dict], search_neck: bool, search_head: bool) -> FasterRCNN:
    model_cfg = cfg["model"]
    _check_num_classes(model_cfg)
    backbone = build_backbone(model_cfg["backbone"])
    neck_type = "auto" if search_neck else model_cfg["neck"]["type"]
    neck = _lookup(NECKS, "model.neck.type", neck_type)(cfg, backbone, genotype, search_neck)
    transform = _build_transform(model_cfg)
    num_levels = len(neck.strides)
    if len(model_cfg["rpn"]["anchor_sizes"]) != num_levels:
        raise ValueError(f"model.rpn.anchor_sizes has {len(model_cfg['rpn']['anchor_sizes'])} sizes but the "
                         f"neck outputs {num_levels} levels {sorted(neck.strides)}")
    rpn = RegionProposalNetwork(neck.out_channels, model_cfg["rpn"])
    roi = model_cfg["roi"]
    pooled_levels = [f"p{l}" for l in model_cfg["neck"]["levels"]]
    pooler = MultiLevelRoIAlign(pooled_levels, neck.strides, roi["pooler_size"], roi["sampling_ratio"],
                                roi["canonical_size"], roi["canonical_level"], roi["adaptive_pooling"])
    head_type = "auto" if search_head else model_cfg["head"]["type"]
    box_head = _lookup(HEADS, "model.head.type", head_type)(cfg, neck.out_channels, genotype, search_head)
    predictor = BoxPredictor(box_head.out_channels, model_cfg["num_classes"])
    roi_heads = RoIHeads(pooler, box_head, predictor, roi)
    arch = None
    if search_neck or search_head:
        arch = Architecture(neck.arch_shape if search_neck else None,
                            box_head.arch_shape if search_head else None)
    return FasterRCNN(transform, backbone, neck, rpn, roi_heads, arch, memory_format=model_cfg["memory_format"])


def _check_one_stage(model_cfg: Dict, search_neck: bool, search_head: bool) -> None:
    """What every one-stage detector refuses: a head-only search (it has no RoI head) and a bad
    ``model.num_classes``; the ConfigError names the detector."""
    if search_head and not search_neck:
        raise ConfigError(f"search.stage: model.detector '{model_cfg['detector']}' has no RoI head to search; "
                          "set search.stage=neck (or both, which searches its neck only)")
    _check_num_classes(model_cfg)


def build_retinanet(cfg: Dict, genotype: Optional[Dict], search_neck: bool, search_head: bool) -> RetinaNet:
    """RetinaNet (autofpn/models/retinanet.py): the neck of ``model.neck`` (FPN by default) over
    ``model.neck.levels`` (P3..P5), ``model.retinanet.extra_levels`` convolution levels above it
    (P6, P7), class and box subnets; ``model.head`` is Faster R-CNN's and not used.

    ``search_neck``: the neck over ``model.neck.levels`` is the Auto-fusion supernet (alpha in
    ``model.arch``), the extra levels stay fixed convolutions of its top output. There is no RoI
    head: ``search=True`` (every searchable part, as search.stage=both) is the neck supernet, the
    head alone (``search="head"``) is refused."""
    model_cfg = cfg["model"]
    r = model_cfg["retinanet"]
    _check_one_stage(model_cfg, search_neck, search_head)
    if model_cfg["neck"]["extra_pool_level"]:
        raise ConfigError("model.neck.extra_pool_level is true: RetinaNet's extra levels are convolutions "
                          "(model.retinanet.extra_levels); set model.neck.extra_pool_level=false")
    if r["bg_iou_thresh"] > r["fg_iou_thresh"]:
        raise ConfigError(f"model.retinanet.bg_iou_thresh ({r['bg_iou_thresh']}) is above "
                          f"model.retinanet.fg_iou_thresh ({r['fg_iou_thresh']})")
    backbone = build_backbone(model_cfg["backbone"])
    neck_type = "auto" if search_neck else model_cfg["neck"]["type"]
    base = _lookup(NECKS, "model.neck.type", neck_type)(cfg, backbone, genotype, search_neck)
    neck = ConvExtraLevels(base, r["extra_levels"])
    levels = sorted(neck.strides, key=lambda n: int(n[1:]))
    if len(r["anchor_sizes"]) != len(levels):
        raise ConfigError(f"model.retinanet.anchor_sizes has {len(r['anchor_sizes'])} sizes but the neck outputs "
                          f"{len(levels)} levels {levels} (model.neck.levels + model.retinanet.extra_levels)")
    anchor_generator = AnchorGenerator(retinanet_anchor_sizes(r["anchor_sizes"], r["scales_per_octave"]),
                                       r["aspect_ratios"])
    # no background output: label k is output k - 1 (model.num_classes counts the background)
    head = RetinaNetHead(neck.out_channels, anchor_generator.num_anchors_per_location, model_cfg["num_classes"] - 1,
                         r["subnet_convs"], r["prior_probability"], r["head_norm"])
    arch = Architecture(base.arch_shape, None) if search_neck else None
    return RetinaNet(_build_transform(model_cfg), backbone, neck, head, anchor_generator, r,
                     memory_format=model_cfg["memory_format"], arch=arch)


def _check_ssd_config(model_cfg: Dict, levels: int) -> None:
    """The list keys of ``model.ssd`` against the number of SSD levels (2 + extra layers)."""
    r = model_cfg["ssd"]
    for index, (mid, out, kernel, stride, padding) in enumerate(r["extra_layers"]):
        if min(mid, out, kernel, stride) < 1 or padding < 0:
            raise ConfigError(f"model.ssd.extra_layers[{index}] = {[mid, out, kernel, stride, padding]}: channels, "
                              f"kernel and stride must be >= 1, padding >= 0")
    expected = {"model.ssd.aspect_ratios": (r["aspect_ratios"], levels),
                "model.ssd.scales": (r["scales"], levels + 1)}
    if r["steps"] is not None:
        expected["model.ssd.steps"] = (r["steps"], levels)
    for key, (value, count) in expected.items():
        if len(value) != count:
            raise ConfigError(f"{key} has {len(value)} entries but the SSD has {levels} levels (conv4_3, fc7 and "
                              f"{levels - 2} model.ssd.extra_layers): expected {count}"
                              + (" (one per level plus one)" if key == "model.ssd.scales" else ""))
    if any(s <= 0 for s in r["scales"]) or (r["steps"] is not None and any(s <= 0 for s in r["steps"])):
        raise ConfigError("model.ssd.scales and model.ssd.steps must be > 0")
    if any(ratio < 1 for ratios in r["aspect_ratios"] for ratio in ratios):
        raise ConfigError(f"model.ssd.aspect_ratios = {r['aspect_ratios']}: each ratio r >= 1 gives the boxes r and 1/r")
    if len(r["bbox_reg_weights"]) != 4:
        raise ConfigError("model.ssd.bbox_reg_weights: expected 4 numbers (x, y, w, h)")


def build_ssd(cfg: Dict, genotype: Optional[Dict], search_neck: bool, search_head: bool) -> SSD:
    """SSD (autofpn/models/ssd.py) from ``model.ssd``: the VGG16 trunk of ``model.backbone`` (name
    vgg16), SSD's levels (conv4_3, fc7, one per ``model.ssd.extra_layers``), the neck of
    ``model.neck`` over ``model.neck.levels`` (type none: plain SSD; fpn / panet / auto fuse those
    levels into ``model.neck.channels`` channels, the other levels stay SSD's), the per-level
    predictors; ``model.head`` is Faster R-CNN's and not used. Images are warped to squares of
    side ``model.transform.min_size`` / ``test_min_size``.

    ``search_neck``: the neck over ``model.neck.levels`` is the Auto-fusion supernet (alpha in
    ``model.arch``); SSD's extra layers and the predictors are trained, not searched. No RoI head:
    ``search=True`` is the neck supernet, the head alone is refused."""
    model_cfg = cfg["model"]
    r = model_cfg["ssd"]
    _check_one_stage(model_cfg, search_neck, search_head)
    b = model_cfg["backbone"]
    if b["name"] not in SSD_BACKBONES:
        raise ConfigError(f"model.backbone.name = {b['name']!r}: model.detector 'ssd' is built on vgg16; "
                          f"set model.backbone.name to one of {', '.join(SSD_BACKBONES)}")
    levels = 2 + len(r["extra_layers"])
    _check_ssd_config(model_cfg, levels)
    neck_type = "auto" if search_neck else model_cfg["neck"]["type"]
    _lookup({"none": None, **NECKS}, "model.neck.type", neck_type)
    n = model_cfg["neck"]
    if neck_type != "none":
        available = list(range(3, 3 + levels))
        if not set(n["levels"]) <= set(available):
            raise ConfigError(f"model.neck.levels = {n['levels']}: the SSD's levels are {available} (3 = conv4_3, "
                              f"4 = fc7, 5.. = model.ssd.extra_layers)")
        if n["extra_pool_level"]:
            raise ConfigError("model.neck.extra_pool_level is true: an SSD's levels are its own; set "
                              "model.neck.extra_pool_level=false")
    t = model_cfg["transform"]
    backbone = VGG16Trunk(b["weights"], b["frozen_stages"], batch_norm=b["name"] == "vgg16_bn",
                          width_mult=r["width_mult"])
    extra = SSDExtraLayers(r["extra_layers"], r["l2norm_scale"], backbone.out_channels["c4"],
                           scaled_width(1024, r["width_mult"]))
    # the fusion neck reads SSD's levels as another detector's neck reads its backbone's
    base = None if neck_type == "none" else _lookup(NECKS, "model.neck.type", neck_type)(
        cfg, extra, genotype, search_neck)
    neck = SSDNeck(extra, base)
    names = sorted(neck.out_channels, key=lambda name: int(name[1:]))
    default_boxes = DefaultBoxGenerator(r["aspect_ratios"], r["scales"], r["steps"], r["clip"])
    head = SSDHead([neck.out_channels[name] for name in names], default_boxes.num_anchors_per_location(),
                   model_cfg["num_classes"])
    transform = SquareTransform(t["min_size"], t["max_size"], t["test_min_size"], t["image_mean"], t["image_std"],
                                t["size_divisible"])
    arch = Architecture(base.arch_shape, None) if search_neck else None
    return SSD(transform, backbone, neck, head, default_boxes, r, memory_format=model_cfg["memory_format"], arch=arch)


# model.detector -> builder(cfg, genotype, search_neck, search_head). A new detector is one
# module plus one line here; necks and heads come from NECKS / HEADS.
DETECTORS: Dict[str, Callable[..., nn.Module]] = {
    "faster_rcnn": build_faster_rcnn,
    "retinanet": build_retinanet,
    "ssd": build_ssd,
}


def build_detector(cfg: Dict, genotype: Optional[Dict] = None, search: Union[bool, str] = False) -> nn.Module:
    """Build the detector a resolved config describes.

    Args:
        cfg: resolved config (``autofpn.config.load_config``).
        genotype: a loaded genotype (``autofpn.models.genotype.load_genotype``) for
            ``model.neck.type == "auto"`` / ``model.head.type == "auto"``.
        search: False for a fixed model; "neck" / "head" / True (both) for supernets whose
            architecture parameters live in ``model.arch``.
    """
    search_neck, search_head = _search_parts(search)
    return _lookup(DETECTORS, "model.detector", cfg["model"]["detector"])(cfg, genotype, search_neck, search_head)


def count_parameters(module: Optional[nn.Module]) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def parameter_breakdown(model: nn.Module) -> Dict[str, int]:
    """Parameters per part of a detector (its ``PARTS``: backbone / neck / RPN / head = box
    head + predictor for Faster R-CNN; backbone / neck (P6, P7 included) / head = both subnets
    for RetinaNet; VGG16 trunk / neck (L2Norm, fc6, fc7, extra layers, fusion neck) / predictors
    for SSD) and the total; the architecture parameters of a supernet are not counted."""
    parts = {part: sum(count_parameters(model.get_submodule(path)) for path in paths)
             for part, paths in model.PARTS.items()}
    parts["total"] = sum(parts.values())
    return parts


def count_flops(model, height: int, width: int):
    """FLOPs of one eval forward on a ``[3, height, width]`` image, total and per part (the
    model's ``PARTS``).

    Counted with ``torch.utils.flop_counter.FlopCounterMode`` (a multiply-add = 2 FLOPs;
    convolutions, matmuls and RoIAlign-free ops it knows).
    """
    from torch.utils.flop_counter import FlopCounterMode

    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(0))
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model([image])
    model.train(was_training)
    counts = counter.get_flop_counts()  # keys: "Global", "FasterRCNN", "FasterRCNN.backbone" ...
    root = type(model).__name__

    def part(paths) -> int:
        return int(sum(sum(counts.get(f"{root}.{path}", {}).values()) for path in paths))

    return {"total": int(counter.get_total_flops()), **{name: part(paths) for name, paths in model.PARTS.items()}}


def torchvision_state_dict_to_ours(state: Dict[str, Tensor], levels=(2, 3, 4, 5)) -> Dict[str, Tensor]:
    """Key mapping from torchvision's ``fasterrcnn_resnet50_fpn`` (and other
    ``resnet_fpn_backbone`` Faster R-CNNs) to our FPN detector:

    ==========================================  ===============================
    torchvision                                 autofpn
    ==========================================  ===============================
    backbone.body.<resnet key>                  backbone.body.<resnet key>
    backbone.fpn.inner_blocks.{i}.0.<p>         neck.lateral.c{levels[i]}.<p>
    backbone.fpn.layer_blocks.{i}.0.<p>         neck.output.p{levels[i]}.<p>
    rpn.head.conv.0.0.<p>                       rpn.head.conv.<p>
    rpn.head.{cls_logits,bbox_pred}.<p>         rpn.head.{cls_logits,bbox_pred}.<p>
    roi_heads.box_head.{fc6,fc7}.<p>            roi_heads.box_head.{fc6,fc7}.<p>
    roi_heads.box_predictor.<p>                 roi_heads.box_predictor.<p>
    ==========================================  ===============================
    """
    out = {}
    for key, value in state.items():
        new = torchvision_fpn_key(key, levels)
        if new is None:
            new = f"rpn.head.conv.{key.split('.')[-1]}" if key.startswith("rpn.head.conv.") else key
        out[new] = value
    return out
