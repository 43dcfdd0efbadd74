"""Configuration: YAML files with base-file inheritance, validated against DEFAULTS.

A config file is a nested mapping whose keys must all exist in ``DEFAULTS`` (a misspelt key is
an error naming the valid keys at that level). ``_base_: other.yaml`` (path relative to the
file) is loaded first and the file's values are merged over it (a ``data.train`` / ``data.val``
that names its ``type`` replaces the inherited one). Command-line overrides are
``dotted.key=value`` strings whose value is parsed as YAML (``solver.lr=0.01``,
``data.min_size=[480,512]``).

The resolved config is a plain nested ``dict``; ``save_config`` writes it next to a run's
outputs so the run can be reproduced from that file alone.
"""
import copy
import os
from typing import Any, Dict, Iterable, List, Optional

import yaml

# Every key a config may set. Values here are the defaults; ``None`` means "no default, the
# component decides" and accepts any type.
DEFAULTS: Dict[str, Any] = {
    "model": {
        "detector": "faster_rcnn",  # autofpn.models.detector.DETECTORS
        # layout of the feature maps (autofpn.ops.layout): auto = channels_last on the CPU for a
        # detector with a searched neck or head (a neck search iteration 1.6x faster, a head
        # search iteration 1.4x, a decoded Auto-FPN's training step 1.1x: docs/BENCHMARKS.md),
        # contiguous (NCHW) for FPN and on CUDA until a GPU measures it | channels_last |
        # contiguous. Same numbers up to rounding
        "memory_format": "auto",
        # including background (label 0), as torchvision counts; null: the training data's
        # classes + 1 (train.py / search.py / evaluate.py fill it in and record it)
        "num_classes": None,
        "backbone": {
            # resnet18 | resnet50 | resnet101 | resnext101_32x8d | mobilenet_v2 | vgg16 | vgg16_bn (SSD's
            # only: vgg16 has no norm layers, vgg16_bn a BatchNorm after every conv, model.backbone.norm
            # unused; imagenet = torchvision's VGG16_Weights.IMAGENET1K_FEATURES / VGG16_BN_Weights.IMAGENET1K_V1)
            "name": "resnet50",
            "weights": "imagenet",  # none | imagenet | path to a state dict
            # stem + this many stages are frozen (0..4); -1 = nothing frozen. VGG16: stem conv1_x, stages
            # conv2_x .. conv5_x (1: conv1_x and conv2_x frozen, as the SSD paper's Caffe model)
            "frozen_stages": 1,
            "norm": "frozen_bn",  # frozen_bn | bn
        },
        "neck": {
            # fpn | panet | auto (from a genotype) | none (SSD only: its levels as they are); search builds the supernet
            "type": "fpn",
            "channels": 256,
            "levels": [2, 3, 4, 5],  # backbone levels fused by the neck (C2..C5 -> P2..P5)
            "extra_pool_level": True,  # P6 = max pool of the top level, for the RPN
            "layers": 2,  # auto-fusion layers
            "norm": "none",  # none | gn | bn (for a derived Auto-fusion neck when retraining)
            # auto: each link's convolution op as a zero-initialised residual branch, x + op(x);
            # the paper's ops are plain. Neck-only searches with it beat FPN's neck by 1.8-1.9 AP on
            # the demo, without it they lost 1.8, and the demo's neck + head search gained 2.0 AP
            # with it (docs/STUDY.md, sections 35-37). Off here, on in configs/demo.yaml
            "residual_ops": False,
        },
        "head": {
            "type": "mlp",  # mlp | conv (Xconv1fc, handcrafted) | auto (from a genotype)
            "mlp_dim": 1024,  # mlp: both fully connected layers; conv and auto with readout fc: its one
            "convs": 4,  # conv: 3x3 convolutions over each RoI (Detectron's 4conv1fc)
            "channels": 512,  # auto-head cell width; conv: the convolutions' width
            "cells": 2,
            # auto: the last cell's [R, 4C, 7, 7] to one vector per RoI: gap (the paper's global average
            # pool) | fc (flatten + one fully connected layer of mlp_dim, as the conv head; docs/STUDY.md 32)
            "readout": "gap",
            # auto: each edge's convolution op as a zero-initialised residual branch, x + op(x), as
            # model.neck.residual_ops for the neck's links; the paper's ops are plain. Not for a
            # search: its convolutions start as identity, so identity and "none" outrank them on
            # every edge and the demo's searched heads scored 2-3 AP against FPN's 18.8 (STUDY.md, 44)
            "residual_ops": False,
            # auto: average-pool the [R, C, 7, 7] RoI features to cell_size x cell_size before the first
            # cell (0: no pooling, the paper's). The cells' compute scales with cell_size ** 2: at 3
            # an Auto-head comes near the FLOPs of FPN's 2-MLP head (docs/STUDY.md, 45)
            "cell_size": 0,
            # derived Auto-head (and the conv head) when retraining: none | gn | bn. BN (statistics
            # over the image batch's RoIs, as DARTS cells use): without a norm the retrained cells diverged on
            # the demo, and GN followed by the global average pool erased the per-RoI signal
            # (docs/BENCHMARKS.md, "The demo").
            "norm": "bn",
        },
        "transform": {
            "min_size": [800],  # one is chosen at random per batch in training
            "max_size": 1333,
            "test_min_size": 800,
            "size_divisible": 32,
            "image_mean": [0.485, 0.456, 0.406],
            "image_std": [0.229, 0.224, 0.225],
        },
        "rpn": {
            "anchor_sizes": [32, 64, 128, 256, 512],  # one per feature level P2..P6
            "aspect_ratios": [0.5, 1.0, 2.0],
            "pre_nms_top_n_train": 2000,  # per level
            "pre_nms_top_n_test": 1000,
            "post_nms_top_n_train": 2000,  # per image
            "post_nms_top_n_test": 1000,
            "nms_thresh": 0.7,
            "fg_iou_thresh": 0.7,
            "bg_iou_thresh": 0.3,
            "batch_size_per_image": 256,
            "positive_fraction": 0.5,
            "score_thresh": 0.0,
        },
        "roi": {
            "fg_iou_thresh": 0.5,
            "bg_iou_thresh": 0.5,
            "batch_size_per_image": 512,
            "positive_fraction": 0.25,
            "bbox_reg_weights": [10.0, 10.0, 5.0, 5.0],
            "score_thresh": 0.05,
            "nms_thresh": 0.5,
            "detections_per_img": 100,
            "pooler_size": 7,
            "sampling_ratio": 2,
            "canonical_size": 224,
            "canonical_level": 4,
            "adaptive_pooling": False,  # PANet adaptive feature pooling: RoIs pooled from every level
        },
        # model.detector: retinanet (autofpn/models/retinanet.py); torchvision's retinanet_resnet50_fpn
        # defaults. The neck (model.neck: type, levels, channels; extra_pool_level false) gives
        # P3..P5, these extra_levels convolutions P6, P7. The classifier has model.num_classes - 1
        # sigmoid outputs: no background column, label k is output k - 1
        "retinanet": {
            "anchor_sizes": [32, 64, 128, 256, 512],  # one base size per level, P3..P7
            "scales_per_octave": 3,  # sizes: base x 2^(i/3), i = 0..2, truncated to integers
            "aspect_ratios": [0.5, 1.0, 2.0],
            "extra_levels": 2,  # stride-2 3x3 convs on the neck's top level (P6, P7)
            "subnet_convs": 4,  # 3x3 conv + ReLU layers of the class and box subnets
            # none (v1) | gn: conv (no bias) + GroupNorm + ReLU in both subnets, as torchvision's
            # retinanet_resnet50_fpn_v2 (groups: the largest divisor of the width <= min(32, width // 4))
            "head_norm": "none",
            "prior_probability": 0.01,  # classifier bias init: sigmoid = this at the start
            "fg_iou_thresh": 0.5,
            "bg_iou_thresh": 0.4,  # anchors in between are ignored
            "focal_alpha": 0.25,
            "focal_gamma": 2.0,
            "box_loss": "l1",  # l1 | smooth_l1 (beta 1), on the encoded boxes | giou, on the decoded ones
            "score_thresh": 0.05,
            "topk_candidates": 1000,  # per level, before NMS
            "nms_thresh": 0.5,
            "detections_per_img": 300,
        },
        # model.detector: ssd (autofpn/models/ssd.py), SSD512 of the SSD paper (Liu et al. 2016, VOC
        # settings) by default, trained and post-processed as torchvision's ssd300_vgg16. Backbone:
        # model.backbone.name vgg16 or vgg16_bn (conv1_1..conv5_3, ceil-mode pool3); conv4_3 L2-normalised, pool5
        # 3x3/1, fc6 (3x3 dilation 6) and fc7 (1x1) of 1024 channels, then extra_layers. Levels: c3 =
        # conv4_3, c4 = fc7, c5.. = one per extra layer; model.neck (type none: plain SSD; fpn /
        # panet / auto over model.neck.levels, the others passed on as they are, extra_pool_level
        # false). Input: each image warped to a square of side model.transform.min_size (training,
        # one drawn per batch) / test_min_size (eval); max_size is not used. The classifier has
        # model.num_classes outputs, column 0 the background (softmax)
        "ssd": {
            # one level each: [1x1 conv channels, kxk conv channels, k, stride, padding], each conv + ReLU.
            # SSD512: conv8_2 .. conv12_2; SSD300 (torchvision): [[256, 512, 3, 2, 1], [128, 256, 3, 2, 1],
            # [128, 256, 3, 1, 0], [128, 256, 3, 1, 0]]
            "extra_layers": [[256, 512, 3, 2, 1], [128, 256, 3, 2, 1], [128, 256, 3, 2, 1],
                             [128, 256, 3, 2, 1], [128, 256, 4, 1, 1]],
            "l2norm_scale": 20.0,  # initial (learnt) scale of the L2-normalised conv4_3
            # the VGG16 trunk's and fc6 / fc7's widths times this (1: the paper's; a CPU-sized
            # demo's trunk is narrower: configs/ssd_demo.yaml); extra_layers keep their own widths
            "width_mult": 1.0,
            # default boxes: s_k of each level plus one more (the extra square box of level k is
            # sqrt(s_k s_k+1)), as fractions of the image side. SSD512 on VOC: 0.07 on conv4_3, then
            # s_min 0.15 .. 0.9 (the paper's COCO SSD512: 0.04, then 0.1 .. 0.9: configs/ssd512_coco.yaml)
            "scales": [0.07, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 1.05],
            # per level: boxes of ratio 1 (s_k and s'_k) and of each ratio r and 1/r
            "aspect_ratios": [[2], [2, 3], [2, 3], [2, 3], [2, 3], [2], [2]],
            # box centres (i + 0.5) x step px per level; null: (i + 0.5) / cells of the level
            "steps": [8, 16, 32, 64, 128, 256, 512],
            "clip": True,  # box widths / heights clipped to the image (torchvision's DefaultBoxGenerator)
            "iou_thresh": 0.5,  # foreground at IoU >= this, plus each gt's best default box
            "neg_to_pos_ratio": 3.0,  # hard negative mining: the highest-loss negatives, 3 per positive
            "bbox_reg_weights": [10.0, 10.0, 5.0, 5.0],  # box coding (the paper's variances 0.1, 0.2)
            "score_thresh": 0.01,
            "topk_candidates": 400,  # per class, before NMS
            "nms_thresh": 0.45,
            "detections_per_img": 200,
        },
    },
    "data": {
        # voc also reads a folder of XML files: {type: voc, annotations: DIR, images: DIR}
        "train": {"type": "synthetic", "root": None, "ann_file": None, "splits": None,
                  "annotations": None, "images": None},
        "val": {"type": "synthetic", "root": None, "ann_file": None, "splits": None,
                "annotations": None, "images": None},
        # VOC XML folder named by both train and val: the seeded split of its files
        "split": {"val_fraction": 0.2, "seed": 0},
        "synthetic": {"root": "data_cache/synthetic", "num_train": 300, "num_val": 100,
                      "image_size": 256, "seed": 0},
        "class_names": None,  # VOC / BDD: the class list (default: the standard one; a VOC XML folder: read from its files)
        "categories": None,  # class names to keep, relabelled 1..len in this order (None: all)
        "keep_empty_images": False,  # images without annotations used as negatives in training
        "bad_images": "stop",  # an image that is missing or does not decode: stop (listing them) | skip
        "hflip_prob": 0.5,
        "aspect_ratio_grouping": True,
        "num_workers": 2,
        "images_per_batch": 2,  # per process
        "use_difficult": False,  # VOC: train on boxes flagged difficult too (always kept for eval)
    },
    "solver": {
        "epochs": 24,
        "lr": 0.02,  # for the total batch; not rescaled automatically
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "weight_decay_norm_bias": 0.0,  # decay of norm weights and biases
        "schedule": "step",  # step | cosine
        "steps": [16, 22],  # epochs at which the lr is multiplied by gamma
        "gamma": 0.1,
        "min_lr": 0.0,  # cosine floor
        "warmup_iters": 500,
        "warmup_factor": 0.001,
        "clip_grad_norm": 0.0,  # 0 = off
        "amp": True,  # mixed precision on CUDA only
        "max_iters": 0,  # > 0 stops early (tests, smoke runs)
    },
    "search": {
        # autofpn.search.STRATEGIES: differentiable (the paper's first-order DARTS-style search) |
        # evolution | snas (the differentiable search on soft Gumbel-softmax samples, search.mode full)
        "strategy": "differentiable",
        "mode": "full",  # full: the paper's mixed op (every op runs) | gdas: one Gumbel-sampled op per link/edge
        # | sampled_weights: weight steps on a sampled op, architecture steps on the full mixed op
        # Gumbel-softmax temperature [start, end]: gdas anneals it linearly, search.strategy=snas
        # exponentially (SNAS starts at 1.0: search.tau=[1.0,0.03]; docs/SEARCH_SPACE.md)
        "tau": [10.0, 0.1],
        "epochs": 24,
        "stage": "both",  # neck | head | both (neck first, then head with the searched neck)
        "w_lr": 0.02,
        "w_lr_min": 0.001,
        "w_momentum": 0.9,
        "w_weight_decay": 1e-4,
        "arch_lr": 3e-3,
        "arch_weight_decay": 1e-3,
        "arch_start_epoch_fraction": 1 / 3,  # 0 = architecture updates from the start
        "freeze_backbone": True,
        "searched_norm": "none",  # none | bn : norm inside the searched modules
        "head_with_searched_neck": True,
        # search.stage=head: a genotype JSON whose neck the head is searched on (search.py
        # --neck-genotype sets it; recorded in the search folder's config.yaml like any setting)
        "neck_genotype": None,
        "resource_lambda": "middle",  # small | middle | large | a number | 0 (off)
        "resource_lambda_scale": 1.0,  # VOC: 0.5 (the paper halves the presets)
        "split_seed": 0,
        "seed": -1,  # supernet / alpha init, data order, sampled paths; -1: train.seed (another search, same data split)
        # searches per stage whose final softmax weights are averaged before the decode (seeds
        # search.seed .. +K-1): the seed-specific part of the decisions averages out (docs/STUDY.md)
        "ensemble": 1,
        "w_grad_clip": 10.0,  # gradient-norm clipping of the weight step (0 = off)
        # mixed precision of the search's forward passes: none | bfloat16 | float16 (autocast; the
        # softmax weights and the resource penalty stay float32; float16 adds a gradient scaler per
        # optimizer). bfloat16 needs no scaler (A100 / H100, and CPUs); float16 is the V100's
        "amp": "none",
        # recompute each mixed op's ops in the backward pass instead of keeping their activations
        # (torch.utils.checkpoint per link / edge): the same gradients, a fraction of the supernet's
        # activation memory, about one more forward of the ops in time (docs/SEARCH_PLAN.md)
        "recompute": False,
        # RoIs per image the head supernet trains on in the head stage (0: model.roi.batch_size_per_image,
        # the retrained detector's); fewer make each head-stage iteration cheaper. The sampler keeps
        # model.roi.positive_fraction; the resource penalty is still counted at the retrained RoI batch
        "head_rois_per_image": 0,
        # channels of the head supernet in the head stage (0: model.head.channels, the retrained
        # head's). A narrower supernet is DARTS's proxy (it searches at 16 channels, retrains at 36):
        # the genotype does not depend on the width; the head stage's compute scales about with its
        # square (docs/SEARCH_PLAN.md). The resource penalty is counted on the supernet as searched
        "head_channels": 0,
        # K > 1: every mixed op of the supernets runs its ops on 1 / K of the channels, the others
        # pass by (partial channel connections, PC-DARTS, Xu et al. 2020): about 1 / K of the ops'
        # compute and activation memory. 1: every channel (the paper). The decoded modules and the
        # resource penalty are at full width (docs/SEARCH_PLAN.md)
        "partial_channels": 1,
        # input sizes of both search stages (null: model.transform's, the retrain's). The paper
        # searches at 400-800 px and retrains at 400-1300; a smaller search input makes every
        # search iteration cheaper (the supernet's cost grows with the pixels)
        "min_size": None,  # short side, one drawn per batch, like model.transform.min_size
        "max_size": None,
        "output_dir": "out/search",
        "decode_rule": "argmax",  # the paper's; the others in autofpn/search/decode.py
        # how the op of each link / edge the decode rule keeps is picked: by its softmax weight
        # ("weights", the paper) or by its importance, the rise of the supernet's loss on
        # search.selection_batches batches of half B when that op is removed ("perturbation",
        # DARTS-PT; autofpn/search/perturbation.py; on the demo no better: docs/STUDY.md, 49)
        "selection": "weights",
        "selection_batches": 8,
        "max_iters": 0,
        # search.strategy: evolution (regularized / aging evolution, Real et al. 2019; the paper's
        # Table 8 "evolutionary algorithm with early stopping"): each candidate is trained alone
        # on training half A and scored on half B (COCO AP - lambda x cost), docs/SEARCH_SPACE.md
        "evolution": {
            "population": 10,  # members alive at once; the first ones are random valid genotypes
            "sample_size": 3,  # tournament: members drawn per cycle, the fittest is mutated (<= population)
            "candidates": 50,  # architectures trained in all, the initial population included (>= population)
            "candidate_epochs": 6,  # early-stopped training of each candidate (paper: 6 on VOC, 4 on COCO)
            "max_iters": 0,  # > 0 caps each candidate's training iterations (tests, smoke runs)
            "seed": -1,  # initial population, tournaments and mutations; -1: search.seed (else train.seed)
            # children bred at a time from the population before their round: a round's candidates
            # may train at once (search.py --jobs / --shard); 1 = strictly sequential aging evolution
            "round_size": 1,
        },
    },
    "train": {
        "output_dir": "out/run",
        "seed": 0,
        "device": "auto",  # auto | cpu | cuda
        "checkpoint_period": 0,  # iterations between checkpoints; 0 = epoch ends only
        "keep_checkpoints": 3,
        "eval_period": 0,  # epochs between evaluations; 0 = final evaluation only
        # BatchNorm statistics recomputed at the current weights over this many training batches
        # before every evaluation and the final checkpoint ("precise BN"); 0 = keep the running
        # averages of training, which lag behind the weights (README, "Using it on your data")
        "precise_bn_batches": 32,
        "log_period": 20,
        # TensorBoard event files beside metrics.jsonl (<run>/tensorboard, a search's
        # <stage>/tensorboard): losses, lr, AP, images/s; a search's op weights and heat maps
        "tensorboard": True,
        "auto_resume": True,  # continue from output_dir/checkpoints when a checkpoint is there
        "deterministic": False,  # torch.use_deterministic_algorithms (exact resume on GPU)
        "find_unused_parameters": False,  # DDP
        "debug_nan_at": None,  # test hook "ITER:TERM": that loss term becomes NaN at ITER
    },
    "eval": {
        "metric": "coco",  # coco | voc | both
        "max_images": 0,  # 0 = all
        "images_per_batch": 1,  # per process, at inference
        "output_dir": None,  # where detections.json / metrics.json go (None: train.output_dir/eval)
        # training: the first N validation images with the final model's detections drawn (score
        # >= 0.5), written at the final evaluation to train.output_dir/detections/; 0 = none
        "draw_images": 4,
    },
}

_MISSING = object()

# The documented choices of string keys (parts built by name from a registry, such as
# model.neck.type, name their choices when they are built).
CHOICES: Dict[str, tuple] = {
    "model.detector": ("faster_rcnn", "retinanet", "ssd"),
    "model.retinanet.box_loss": ("l1", "smooth_l1", "giou"),
    "model.retinanet.head_norm": ("none", "gn"),
    "model.memory_format": ("auto", "channels_last", "contiguous"),
    "model.backbone.name": ("resnet18", "resnet50", "resnet101", "resnext101_32x8d", "mobilenet_v2", "vgg16",
                            "vgg16_bn"),
    "model.backbone.norm": ("frozen_bn", "bn"),
    "model.neck.norm": ("none", "gn", "bn"),
    "model.head.norm": ("none", "gn", "bn"),
    "model.head.readout": ("gap", "fc"),
    "search.searched_norm": ("none", "gn", "bn"),
    "search.stage": ("neck", "head", "both"),
    "search.mode": ("full", "gdas", "sampled_weights"),
    "search.amp": ("none", "bfloat16", "float16"),
    "search.selection": ("weights", "perturbation"),
    "data.bad_images": ("stop", "skip"),
    "search.decode_rule": ("argmax", "argmax_nonnone", "top2", "argmax_head_noidentity",
                           "argmax_head_dropidentity"),
    "solver.schedule": ("step", "cosine"),
    "train.device": ("auto", "cpu", "cuda"),
    "eval.metric": ("coco", "voc", "both"),
    "data.train.type": ("synthetic", "coco", "voc", "bdd"),
    "data.val.type": ("synthetic", "coco", "voc", "bdd"),
}
NULLABLE = ("model.backbone.weights", "model.ssd.steps")  # null = "none"; steps null = from the grid
# the integer keys of search.evolution and their smallest value (the keys' relations, such as
# sample_size <= population, are checked by autofpn.search.evolution.check_config)
EVOLUTION_MINIMUMS = {"search.evolution.population": 1, "search.evolution.sample_size": 1,
                      "search.evolution.candidates": 1, "search.evolution.candidate_epochs": 1,
                      "search.evolution.max_iters": 0, "search.evolution.seed": -1,
                      "search.evolution.round_size": 1}
LAMBDA_PRESET_NAMES = ("small", "middle", "large")
# model.retinanet keys with a range: integers with their smallest value, numbers in [low, high]
RETINANET_INT_MINIMUMS = {"model.retinanet.scales_per_octave": 1, "model.retinanet.extra_levels": 0,
                          "model.retinanet.subnet_convs": 0, "model.retinanet.topk_candidates": 1,
                          "model.retinanet.detections_per_img": 1}
RETINANET_RANGES = {"model.retinanet.fg_iou_thresh": (0.0, 1.0),
                    "model.retinanet.bg_iou_thresh": (0.0, 1.0), "model.retinanet.focal_alpha": (0.0, 1.0),
                    "model.retinanet.score_thresh": (0.0, 1.0), "model.retinanet.nms_thresh": (0.0, 1.0)}
# model.ssd keys with a range (their list keys' lengths are checked when the SSD is built)
SSD_INT_MINIMUMS = {"model.ssd.topk_candidates": 1, "model.ssd.detections_per_img": 1}
SSD_RANGES = {"model.ssd.iou_thresh": (0.0, 1.0), "model.ssd.score_thresh": (0.0, 1.0),
              "model.ssd.nms_thresh": (0.0, 1.0)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_value(dotted: str, value: Any, default: Any) -> Optional[str]:
    """What is wrong with ``value`` for key ``dotted`` whose default is ``default`` (None: fine).
    The type is the default's type (an int key takes integers, a float key any number, a list
    key a list of numbers when the default's are numbers); see CHOICES for string keys."""
    if dotted == "search.resource_lambda":
        if _is_number(value) or value in LAMBDA_PRESET_NAMES:
            return None
        return f"expected one of {', '.join(LAMBDA_PRESET_NAMES)} or a number"
    if dotted == "model.num_classes":
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 2):
            return None
        return "expected an integer >= 2 (the classes + background), or null to take it from the data"
    if dotted == "search.selection_batches":
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return None
        return "expected an integer >= 1 (batches of half B the op importances are measured on)"
    if dotted == "search.ensemble":
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return None
        return "expected an integer >= 1 (searches per stage; 1 = one search)"
    if dotted in RETINANET_INT_MINIMUMS:
        low = RETINANET_INT_MINIMUMS[dotted]
        if isinstance(value, int) and not isinstance(value, bool) and value >= low:
            return None
        return f"expected an integer >= {low}"
    if dotted == "model.retinanet.prior_probability":  # the bias init is -log((1 - p) / p)
        return None if _is_number(value) and 0 < value < 1 else "expected a number in (0, 1)"
    if dotted in RETINANET_RANGES:
        low, high = RETINANET_RANGES[dotted]
        if _is_number(value) and low <= value <= high:
            return None
        return f"expected a number in [{low}, {high}]"
    if dotted in SSD_INT_MINIMUMS:
        low = SSD_INT_MINIMUMS[dotted]
        if isinstance(value, int) and not isinstance(value, bool) and value >= low:
            return None
        return f"expected an integer >= {low}"
    if dotted in SSD_RANGES:
        low, high = SSD_RANGES[dotted]
        if _is_number(value) and low <= value <= high:
            return None
        return f"expected a number in [{low}, {high}]"
    if dotted in ("model.ssd.neg_to_pos_ratio", "model.ssd.l2norm_scale", "model.ssd.width_mult"):
        return None if _is_number(value) and value > 0 else "expected a number > 0"
    if dotted in ("model.ssd.extra_layers", "model.ssd.aspect_ratios"):
        inner = 5 if dotted == "model.ssd.extra_layers" else None
        what = ("a list of [1x1 channels, kxk channels, k, stride, padding] lists (integers)" if inner
                else "a list of lists of aspect ratios (numbers > 0), one list per level")
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, (list, tuple)) and (inner is None or len(v) == inner)
            and all((isinstance(x, int) and not isinstance(x, bool)) if inner else (_is_number(x) and x > 0)
                    for x in v) for v in value)
        return None if ok else f"expected {what}"
    if dotted in EVOLUTION_MINIMUMS:
        low = EVOLUTION_MINIMUMS[dotted]
        if isinstance(value, int) and not isinstance(value, bool) and value >= low:
            return None
        return f"expected an integer >= {low}"
    if dotted == "search.tau":
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) and v > 0 for v in value):
            return None
        return "expected [start, end], two positive numbers"
    if default is None or (value is None and dotted in NULLABLE):
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "expected true or false"
    if isinstance(default, int):
        return None if isinstance(value, int) and not isinstance(value, bool) else "expected an integer"
    if isinstance(default, float):
        return None if _is_number(value) else "expected a number"
    if isinstance(default, str):
        if not isinstance(value, str):
            return "expected a string"
        if dotted in CHOICES and value not in CHOICES[dotted]:
            return f"expected one of {', '.join(CHOICES[dotted])}"
        return None
    if isinstance(default, list):
        if not isinstance(value, (list, tuple)):
            return "expected a list" + (" of numbers" if default and _is_number(default[0]) else "")
        if default and _is_number(default[0]) and not all(_is_number(v) for v in value):
            return "expected a list of numbers"
    return None


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and key."""


# A dataset spec that names its ``type`` replaces the inherited one as a whole (a VOC root's
# ``splits`` must not leak into an XML-folder or COCO spec); without ``type`` it updates it
# (``--opts data.val.root=...``).
WHOLE_WHEN_TYPED = ("data.train", "data.val")


def _check_and_merge(base: Dict[str, Any], update: Dict[str, Any], schema: Dict[str, Any],
                     where: str, path: str) -> None:
    """Merge ``update`` into ``base`` in place, checking every key against ``schema``."""
    for key, value in update.items():
        dotted = f"{path}.{key}" if path else key
        if key not in schema:
            valid = ", ".join(sorted(schema))
            raise ConfigError(f"{where}: unknown key '{dotted}'; valid keys at this level: {valid}")
        if isinstance(schema[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{dotted}' must be a mapping, got {value!r}")
            if dotted in WHOLE_WHEN_TYPED and "type" in value:
                base[key] = copy.deepcopy(schema[key])  # another dataset: nothing inherited
            _check_and_merge(base[key], value, schema[key], where, dotted)
        else:
            problem = check_value(dotted, value, schema[key])
            if problem:
                raise ConfigError(f"{where}: '{dotted}' = {value!r}: {problem}")
            base[key] = value


def _read_yaml(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def _load_file(path: str, seen: tuple) -> Dict[str, Any]:
    """The file's own keys merged over its ``_base_`` chain (not yet over DEFAULTS)."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: _base_ inheritance cycle: {' -> '.join(seen + (path,))}")
    data = _read_yaml(path)
    base_name = data.pop("_base_", None)
    cfg = copy.deepcopy(DEFAULTS)
    if base_name is not None:
        base_path = os.path.join(os.path.dirname(path), base_name)
        cfg = _load_file(base_path, seen + (path,))
    _check_and_merge(cfg, data, DEFAULTS, path, "")
    return cfg


def parse_override(item: str) -> Dict[str, Any]:
    """``"a.b.c=value"`` -> ``{"a": {"b": {"c": parsed value}}}`` (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{item}': value is not valid YAML: {e}") from e
    out: Dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: Optional[str] = None, overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """Resolve a config: DEFAULTS <- base chain of ``path`` <- ``overrides``.

    Args:
        path: a YAML file, or None for the defaults alone.
        overrides: ``dotted.key=value`` strings, applied in order.
    Returns:
        the resolved config as a nested dict (a fresh copy).
    """
    cfg = _load_file(path, ()) if path else copy.deepcopy(DEFAULTS)
    for item in overrides:
        _check_and_merge(cfg, parse_override(item), DEFAULTS, f"override '{item}'", "")
    return cfg


def complete_config(saved: Dict[str, Any], overrides: Iterable[str] = (),
                    where: str = "saved config") -> Dict[str, Any]:
    """A resolved config saved earlier (in a checkpoint or a run's config.yaml) over the current
    DEFAULTS, then ``overrides``: keys added since it was saved take their default, so older
    checkpoints still build their model; a key that no longer exists is an error naming it."""
    cfg = copy.deepcopy(DEFAULTS)
    _check_and_merge(cfg, copy.deepcopy(saved), DEFAULTS, where, "")
    for item in overrides:
        _check_and_merge(cfg, parse_override(item), DEFAULTS, f"override '{item}'", "")
    return cfg


def save_config(cfg: Dict[str, Any], path: str) -> None:
    """Write the resolved config as YAML (atomically: temp file then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # per process: two writers of one file (shards) never share a temp file
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def diff_keys(a: Any, b: Any, prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two nested configs (missing counts as None)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")]
    plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731  (YAML reads tuples back as lists)
    return [] if plain(a) == plain(b) else [prefix.rstrip(".")]

