"""Plan a search before spending GPU-days: params, FLOPs and activation memory per image of each
search stage and of the decoded (retrained) model, at the configured training size.

Stages (as ``search.py`` runs them):

- ``search: neck`` = ``build_detector(cfg, search="neck")``: neck supernet + the standard head.
- ``search: head`` = ``build_detector(cfg, genotype, search="head")``: the decoded neck of
  ``genotype`` + head supernet.
- ``decoded``      = ``build_detector(cfg, genotype)`` with ``model.neck.type = auto`` and
  ``model.head.type = auto``: the model that is retrained.
- a RetinaNet (``model.detector: retinanet``) has no RoI head: its plan has the neck stage
  (the Auto-fusion supernet inside ``ConvExtraLevels``) and the decoded model only, whose "rpn"
  part is 0 and whose "head" is the class and box subnets over every level (no RoIs); an SSD
  (``model.detector: ssd``) alike, its "neck" SSD's fc6 / fc7 and extra layers around the searched
  neck (``SSDNeck``), its "head" the per-level predictors, its image the square of side
  ``max(model.transform.min_size)``;
- ``evolution candidate`` (``plan["candidate"]``, only when ``search.strategy`` is evolution) =
  ``build_detector(evolution.candidate_config(cfg, candidate), candidate)``: what each evolution
  candidate trains, the searched parts (``search.stage``) decoded, the other part the one the
  evolution keeps (FPN or the given neck; the 2-MLP head), at the search's input size.

In both search stages the backbone is frozen when ``search.freeze_backbone`` (its parameters do
not require grad, so autograd saves nothing inside it); the decoded model and an evolution
candidate freeze ``model.backbone.frozen_stages`` as in training.

How it is counted (everything on the ``meta`` device: shapes only, no memory, no compute, so the
paper size is planned in seconds on a laptop):

- image: one image of the largest training size, short side ``max(model.transform.min_size)``,
  long side ``model.transform.max_size`` (the search stages: ``search.min_size`` / ``max_size``
  where set), padded to ``size_divisible``; the RoI head sees
  ``model.roi.batch_size_per_image`` RoIs (its training batch; the head search
  ``search.head_rois_per_image`` when set).
- params: ``parameter_breakdown`` (backbone / neck / rpn / head = box head + predictor) plus the
  architecture parameters of a supernet.
- FLOPs: forward FLOPs of convs and linears, a multiply-add = 2 FLOPs (as
  ``autofpn.search.cost.count_cost`` counts them, and every other FLOP figure of the project) of backbone, neck, RPN head convs, box
  head + predictor. A supernet computes every op of every link/edge. Backward costs about 2x the
  forward of the trainable part.
- activation memory: bytes of the tensors autograd saves for the backward pass during one
  training forward (``torch.autograd.graph.saved_tensors_hooks``), each storage counted once,
  parameters excluded (they exist anyway). These are what a training step holds at its peak (the
  start of the backward). Not counted: parameters, gradients, optimizer state (counted by the
  params), the RPN/RoI losses and box bookkeeping (kilobytes), allocator overhead. The check
  against measured peak memory on CPU is in ``tests/test_plan.py`` and ``docs/SEARCH_PLAN.md``.

Compute of a whole search (``search_compute``, printed when the training set's size is given),
by ``search.strategy`` (the paper's Table 8 compares these at their search cost):

- ``differentiable`` (``gradient_search_compute``): per search stage, weight steps on half A
  every epoch and, after the warm-up (``search.arch_start_epoch_fraction``), architecture steps
  on half B, i.e. ``epochs x N/2 x (1 + (1 - arch_start_fraction))`` images, each at the mean
  pixel count of the search's sizes (``mean_flops``: multi-scale draws smaller images than the
  plan's largest one). A weight step costs
  the forward plus twice the forward of what trains (the backbone is frozen: no backward in it);
  an architecture step (first order) the forward plus once that, since it needs the activations'
  gradients but not the weights'. ``search.max_iters`` > 0 caps the weight steps of a stage at
  max_iters x ``data.images_per_batch`` images (one process; the Searcher's cap), the architecture
  steps at the same fraction of them. The steps that ``search.mode`` runs on one sampled op per
  link/edge (``SAMPLED_STEPS``: gdas both, sampled_weights the weight steps) are counted at the
  supernet's forward with each mixed op replaced by the mean cost of the ops of its table ("none"
  costs nothing): the expected cost of a path drawn uniformly, as at the search's start (plan key
  "sampled_flops"). ``snas``: the same stages and alternation over the full mixed
  op, each op weighted by a soft Gumbel-softmax sample instead of the softmax: the same compute.
- ``evolution`` (``evolution_compute``): ``search.evolution.candidates`` candidates, each
  trained ``candidate_epochs`` epochs on half A (capped at ``search.evolution.max_iters`` x
  ``data.images_per_batch`` images when max_iters > 0) and evaluated once on half B.
- random search (``random_search_compute``, ``--random-architectures K``; not a
  ``search.strategy``): K architectures, each trained as the retrain trains the decoded model.

A training step of a fixed detector (``training_step_flops``) costs its forward plus twice the
forward of what trains: everything but the leading backbone stages that ``model.backbone.frozen_stages``
freezes (no backward runs through them; their forward FLOPs are counted exactly, per stage).
GPU-days = the compute / (an assumed fraction of the GPU's dense fp32 peak), the supernet's
depthwise and dilated convolutions not running on tensor cores.

``python -m autofpn.search.plan --cfg configs/coco.yaml [--genotype G] [--train-images N]
[--random-architectures K] [--opts k=v ...]``
"""
import argparse
import sys
import copy
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from autofpn.config import load_config
from autofpn.models.detector import build_detector, parameter_breakdown

from .cost import Cost, count_cost, level_sizes
from .decode import decode_weights
from .differentiable import DETECTOR_STAGES, SAMPLED_STEPS, head_stage_rois, search_transform, stages_to_run
from .evolution import candidate_config, evolution_settings, fixed_neck, searched_parts
from autofpn.models.genotype import load_genotype
from autofpn.models.architecture import Architecture
from autofpn.models.operations import MixedOp, set_recompute

PARTS = ("backbone", "neck", "rpn", "head")
STAGES = ("search: neck", "search: head", "decoded")
SEARCH_STAGES = STAGES[:2]  # the stages that train a supernet (backbone frozen by search.freeze_backbone)
CANDIDATE = "evolution candidate"  # planned with its own config: evolution.candidate_config
GRADIENT_STRATEGIES = ("differentiable", "snas")  # the same alternating supernet training
# dense fp32 peak FLOP/s (datasheets: V100 SXM2 15.7 TFLOP/s, the paper's GPU; A100 SXM4 19.5)
GPU_PEAK_FLOPS = {"V100": 15.7e12, "A100": 19.5e12}
# the fraction of that peak a search step is assumed to sustain: an assumption, not a measurement
# (no GPU has run this project's search yet); GPU-days scale with its inverse
DEFAULT_GPU_UTILIZATION = 0.3


def detector_stages(cfg: Dict) -> Tuple[str, ...]:
    """The STAGES of ``model.detector``: without a RoI head (RetinaNet, SSD) no "search: head"."""
    if "head" not in DETECTOR_STAGES.get(cfg["model"]["detector"], ("neck", "head")):
        return ("search: neck", "decoded")
    return STAGES


def training_image_size(cfg: Dict) -> Tuple[int, int]:
    """(H, W) of the largest training image: short side max(min_size), long side max_size (an
    SSD: the square of side max(min_size) every image is warped to)."""
    t = cfg["model"]["transform"]
    if cfg["model"]["detector"] == "ssd":
        return int(max(t["min_size"])), int(max(t["min_size"]))
    long_side = int(t["max_size"])
    return min(int(max(t["min_size"])), long_side), long_side


def representative_genotype(cfg: Dict, seed: int = 0) -> Dict:
    """The genotype decoded (rule ``search.decode_rule``) from architecture weights at their
    DARTS initialisation (1e-3 * randn, seeded): what a search whose alpha/beta never moved
    would give, i.e. a typical member of the space."""
    m = cfg["model"]
    levels = list(m["neck"]["levels"])
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        arch = Architecture((m["neck"]["layers"], len(levels) ** 2, 8), (m["head"]["cells"], 14, 8))
    finally:
        torch.random.set_rng_state(generator_state)
    with torch.no_grad():
        genotype = decode_weights(arch.neck_weights(), arch.head_weights(), levels,
                                  cfg["search"]["decode_rule"])
    genotype["name"] = f"decoded from DARTS-init weights (seed {seed}, rule {cfg['search']['decode_rule']})"
    return genotype


def _stage_cfg(cfg: Dict, stage: str) -> Dict:
    cfg = copy.deepcopy(cfg)
    cfg["model"]["backbone"]["weights"] = "none"  # shapes only; no weight file needed
    # the supernet with every op computed (a sampled mode's path is drawn from data at run time:
    # plan_stage counts its expected cost apart, "sampled_flops")
    cfg["search"]["mode"] = "full"
    if stage in ("search: head", "decoded"):
        cfg["model"]["neck"]["type"] = "auto"
    if stage == "search: head" and int(cfg["search"]["head_channels"]) > 0:  # the head supernet's own width
        cfg["model"]["head"]["channels"] = int(cfg["search"]["head_channels"])
    if stage == "decoded":
        cfg["model"]["head"]["type"] = "auto"
    return cfg


def build_stage_model(cfg: Dict, stage: str, genotype: Dict, device="meta") -> nn.Module:
    """The detector of ``stage`` (STAGES, or CANDIDATE with the candidate's config) in train mode,
    backbone frozen as the stage trains it."""
    stage_cfg = _stage_cfg(cfg, stage)
    search = {"search: neck": "neck", "search: head": "head", "decoded": False, CANDIDATE: False}[stage]
    with torch.device(device):
        model = build_detector(stage_cfg, genotype if stage != "search: neck" else None, search=search)
    if stage in SEARCH_STAGES and cfg["search"]["freeze_backbone"]:
        model.backbone.requires_grad_(False)
    if stage in SEARCH_STAGES and cfg["search"]["recompute"]:
        set_recompute(model)  # as the Searcher does: the mixed ops keep their inputs only
    return model.train()


class SavedTensorMeter:
    """Context manager summing the bytes of distinct storages autograd saves for backward,
    ignoring the given parameters' storages (``nbytes``, ``count`` after the block).

    A recomputed mixed op (``search.recompute``) saves nothing through autograd's hooks: its
    checkpoint holds the op's input itself, which is counted here (once per storage, like the
    saved tensors) by a pre-hook on every recomputed ``MixedOp`` of ``model``; and its backward
    runs the op again, holding that op's own activations for a moment: ``recompute_transient`` is
    the largest of these over the block's recomputed ops (the peak adds it once)."""

    def __init__(self, parameters=(), model: Optional[nn.Module] = None):
        self._param_storages = {p.untyped_storage()._cdata for p in parameters}
        self._seen = set()
        self.nbytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)
        self._recomputed = [m for m in (model.modules() if model is not None else ())
                            if isinstance(m, MixedOp) and m.recompute]
        self._handles = []
        self._recomputed_calls = []  # (mixed op, its input, its weights) of the block
        self.recompute_transient = 0

    def _pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self._param_storages and key not in self._seen:
            self._seen.add(key)
            self.nbytes += storage.nbytes()
        return t

    def __enter__(self):
        self._hooks.__enter__()
        self._handles = [m.register_forward_pre_hook(self._count_checkpoint_input) for m in self._recomputed]
        return self

    def _count_checkpoint_input(self, module: nn.Module, args: tuple) -> None:
        self._pack(args[0])  # returns None: the op's inputs stay as they are
        self._recomputed_calls.append((module, args[0], args[1]))

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._hooks.__exit__(*exc)
        for module, x, weights in self._recomputed_calls:  # what each one holds while it is recomputed
            module.recompute = False
            try:
                with SavedTensorMeter(module.parameters()) as inner:
                    inner._seen.add(x.untyped_storage()._cdata)  # the input: counted above already
                    module(x, weights)
            finally:
                module.recompute = True
            self.recompute_transient = max(self.recompute_transient, inner.nbytes)


def _head_cost(model: nn.Module, roi_feats: Tensor, head_weights: Optional[Tensor]) -> Cost:
    head = model.roi_heads.box_head
    cost = count_cost(head, roi_feats) if head_weights is None else count_cost(head, roi_feats, head_weights)
    d = torch.empty(roi_feats.shape[0], head.out_channels, device=roi_feats.device)
    return cost + count_cost(model.roi_heads.box_predictor, d)


def sampled_path_saving(module: nn.Module, run) -> float:
    """Forward FLOPs that one sampled op per mixed op saves against the whole mixed op, in the
    forward ``run()`` of ``module`` (meta device): for every mixed op of more than one op, the sum
    of its ops' FLOPs minus their mean over its op table (``len(op_table)``, "none" included at no
    cost), i.e. minus the expected FLOPs of one op drawn uniformly. The link / cell projections in
    front of the mixed ops are counted as computed (a sampled "none" skips a neck link's too)."""
    inputs: List[Tensor] = []
    mixed_ops: List[MixedOp] = []

    def remember(mod, args):
        mixed_ops.append(mod)
        inputs.append(args[0])

    handles = [m.register_forward_pre_hook(remember) for m in module.modules()
               if isinstance(m, MixedOp) and len(m.ops) > 1]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    saving = 0.0
    for mixed, x in zip(mixed_ops, inputs):
        x = x[:, :mixed.op_channels]  # a partial-channel op's ops run on its first channels
        costs = [count_cost(op, x).flops for op in mixed.ops.values()]
        saving += sum(costs) - sum(costs) / len(mixed.op_table)
    return saving


def frozen_backbone_flops(backbone: nn.Module, batch: Tensor) -> float:
    """Forward FLOPs (a multiply-add = 2) of ``backbone(batch)`` spent in its leading stages (stem
    first, ``backbone.stages()``) whose parameters are all frozen: nothing before them trains, so
    no backward runs through them. The whole backbone's when it is frozen (a search stage)."""
    frozen_leaves = []
    for stage in backbone.stages():
        if any(p.requires_grad for p in stage.parameters()):
            break
        frozen_leaves += [m for m in stage.modules() if not list(m.children())]
    calls = []  # (leaf, its inputs) of one forward, counted afterwards with count_cost
    handles = [m.register_forward_hook(lambda mod, args, out: calls.append((mod, args))) for m in frozen_leaves]
    try:
        with torch.no_grad():
            backbone(batch)
    finally:
        for h in handles:
            h.remove()
    return sum(count_cost(mod, *args).flops for mod, args in calls)


def plan_stage(cfg: Dict, stage: str, genotype: Dict, image_size: Tuple[int, int] = None,
               num_rois: int = None) -> Dict:
    """Params, forward FLOPs (a multiply-add = 2) and saved-activation bytes of one image for one stage.

    ``stage``: one of STAGES, or CANDIDATE with ``cfg`` = the candidate's config.

    Returns {"params": {part: int, "arch": int, "total": int}, "flops": {part: float, "total"},
    "sampled_flops": like "flops" for a supernet's forward on one uniformly drawn op per mixed op
    (``sampled_path_saving``), None for a model without architecture weights,
    "frozen_backbone_flops": float (``frozen_backbone_flops``: no backward through them),
    "activation_bytes": {part: int, "total": int}, "image_size": (H, W), "num_rois": int (0 for
    RetinaNet, whose head runs on every level: "rpn" is 0 and "head" its subnets)}."""
    fraction = 1.0
    if image_size is None:  # the search stages and an evolution candidate at the search's input size
        # (a candidate's own config holds it already), the decoded model at the training size
        sized = cfg if stage == "decoded" else {**cfg, "model": {**cfg["model"], "transform": search_transform(cfg)}}
        image_size = training_image_size(sized)
        fraction = mean_pixel_fraction(sized)
    model = build_stage_model(cfg, stage, genotype)
    dense = not hasattr(model, "roi_heads")  # RetinaNet: subnets on every level, no RPN, no RoIs
    if dense:
        num_rois = 0
    elif not num_rois:
        num_rois = head_stage_rois(cfg) if stage == "search: head" else cfg["model"]["roi"]["batch_size_per_image"]
    divisor = cfg["model"]["transform"]["size_divisible"]
    padded = tuple(level_sizes(image_size, [0], divisor)[0])
    batch = torch.empty(1, 3, *padded, device="meta")
    neck_weights = model.arch.neck_weights() if model.arch is not None else None
    head_weights = model.arch.head_weights() if model.arch is not None else None
    pooler = cfg["model"]["roi"]["pooler_size"]

    params = parameter_breakdown(model)
    params.setdefault("rpn", 0)
    params["arch"] = sum(p.numel() for p in model.arch_parameters())
    params["total"] += params["arch"]

    # forward MACs per part (no grad); count_cost wants the module's inputs
    feats = model.backbone(batch)
    flops = {"backbone": count_cost(model.backbone, batch).flops}
    nw = () if neck_weights is None else (neck_weights.detach(),)
    flops["neck"] = count_cost(model.neck, feats, *nw).flops
    with torch.no_grad():
        levels = model.neck(feats, *nw)
    ordered = [levels[k] for k in sorted(levels, key=lambda n: int(n[1:]))]
    if dense:
        flops["rpn"], flops["head"] = 0.0, count_cost(model.head, ordered).flops
    else:
        flops["rpn"] = count_cost(model.rpn.head, ordered).flops
        roi_feats = torch.empty(num_rois, model.neck.out_channels, pooler, pooler, device="meta")
        flops["head"] = _head_cost(model, roi_feats, None if head_weights is None else head_weights.detach()).flops
    flops["total"] = sum(flops[p] for p in PARTS)
    frozen_flops = frozen_backbone_flops(model.backbone, batch)
    sampled = None
    if model.arch is not None:  # a supernet: its forward on one uniformly drawn op per link / edge
        sampled = dict(flops)
        sampled["neck"] -= sampled_path_saving(model.neck, lambda: model.neck(feats, *nw))
        if not dense and head_weights is not None:
            sampled["head"] -= sampled_path_saving(
                model.roi_heads.box_head, lambda: model.roi_heads.box_head(roi_feats, head_weights.detach()))
        sampled["total"] = sum(sampled[p] for p in PARTS)

    # saved activations of one training forward, part by part (grad flows as in training)
    act = {}
    with SavedTensorMeter(model.parameters(), model) as meter:
        feats = model.backbone(batch)
    act["backbone"] = meter.nbytes
    with SavedTensorMeter(model.parameters(), model) as meter:
        levels = model.neck(feats, *(() if neck_weights is None else (neck_weights,)))
    act["neck"] = meter.nbytes + meter.recompute_transient
    ordered = [levels[k] for k in sorted(levels, key=lambda n: int(n[1:]))]
    if dense:
        with SavedTensorMeter(model.parameters(), model) as meter:
            model.head(ordered)
        act["rpn"], act["head"] = 0, meter.nbytes
    else:
        with SavedTensorMeter(model.parameters(), model) as meter:
            model.rpn.head(ordered)
        act["rpn"] = meter.nbytes
        neck_trains = any(p.requires_grad for p in model.neck.parameters())
        roi_feats = torch.empty(num_rois, model.neck.out_channels, pooler, pooler, device="meta",
                                requires_grad=neck_trains)  # RoIAlign output; it saves only the boxes
        with SavedTensorMeter(model.parameters(), model) as meter:
            x = model.roi_heads.box_head(roi_feats, *(() if head_weights is None else (head_weights,)))
            model.roi_heads.box_predictor(x)
        act["head"] = meter.nbytes + meter.recompute_transient
    act["total"] = sum(act[p] for p in PARTS)
    return {"params": params, "flops": flops, "sampled_flops": sampled, "frozen_backbone_flops": frozen_flops,
            "activation_bytes": act, "image_size": tuple(image_size), "padded_size": padded, "num_rois": num_rois,
            "pixel_fraction": fraction}


def mean_pixel_fraction(cfg: Dict) -> float:
    """An image's mean pixel count under multi-scale training, as a fraction of the planned
    (largest) image's: the mean of (s / max(sizes))^2 over the short sides ``model.transform.min_size``
    that the transform draws uniformly (the long side follows the short one below ``max_size``, as
    in the planned image); 1 for SSD, which warps every image to one size."""
    if cfg["model"]["detector"] == "ssd":
        return 1.0
    sizes = cfg["model"]["transform"]["min_size"]
    sizes = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
    return sum((size / max(sizes)) ** 2 for size in sizes) / len(sizes)


def mean_flops(stage_plan: Dict, key: str = "flops") -> Dict[str, float]:
    """``stage_plan[key]`` (forward FLOPs per part of the largest image) at the stage's mean image
    (``pixel_fraction``): the backbone, neck and RPN scale with the pixels, a RoI head does not (a
    fixed number of RoIs per image), a dense head (RetinaNet, SSD: ``num_rois`` 0) does. What a
    whole run's compute counts per image; the plan's table keeps the largest image (memory)."""
    f, fraction = dict(stage_plan[key]), stage_plan.get("pixel_fraction", 1.0)
    for part in ("backbone", "neck", "rpn") + (("head",) if stage_plan["num_rois"] == 0 else ()):
        f[part] *= fraction
    f["total"] = sum(f[p] for p in PARTS)
    return f


def plan_search(cfg: Dict, genotype: Optional[Dict] = None, image_size: Tuple[int, int] = None,
                num_rois: int = None) -> Dict:
    """Plan of the search stages and the decoded model (see the module docstring).

    Args:
        cfg: resolved config.
        genotype: the decoded neck (for stage "search: head") and neck + head (decoded model);
            None = ``representative_genotype(cfg)``. A genotype without a head part gets the
            representative head.
        image_size: (H, W) override of the training size; num_rois: override of RoIs/image.
    Returns:
        {"genotype": name, "image_size", "padded_size", "num_rois",
         "stages": {stage: plan_stage(...)} over ``detector_stages``}, and when ``search.strategy`` is evolution
        "candidate": plan_stage(...) of an evolution candidate + its "neck_type", "head_type".
    """
    stages_to_run(cfg)  # a search.stage the detector lacks fails here as in search.py
    given = genotype
    stage_names = detector_stages(cfg)
    rep = representative_genotype(cfg)
    parts = ("neck", "head") if "search: head" in stage_names else ("neck",)
    if "head" not in parts:  # a RetinaNet's genotype has no head part
        rep["head"] = None
        genotype = None if genotype is None else {**genotype, "head": None}
    if genotype is None:
        genotype = rep
    elif any(genotype.get(part) is None for part in parts):
        genotype = {**rep, **{k: v for k, v in genotype.items() if v is not None},
                    "name": f"{genotype.get('name', 'given')} (+ representative "
                            f"{'head' if genotype.get('head') is None else 'neck'})"}
    stages = {s: plan_stage(cfg, s, genotype, image_size, num_rois) for s in stage_names}
    first = stages[stage_names[0]]
    plan = {"genotype": genotype.get("name", "given genotype"), "image_size": first["image_size"],
            "padded_size": first["padded_size"], "num_rois": first["num_rois"], "stages": stages}
    if cfg["search"]["strategy"] == "evolution":
        candidate_cfg, candidate = evolution_candidate(cfg, genotype, given)
        plan["candidate"] = {**plan_stage(candidate_cfg, CANDIDATE, candidate, image_size, num_rois),
                             "neck_type": candidate_cfg["model"]["neck"]["type"],
                             "head_type": candidate_cfg["model"]["head"]["type"]}
    return plan


def evolution_candidate(cfg: Dict, genotype: Dict, given: Optional[Dict]) -> Tuple[Dict, Dict]:
    """(config, genotype) of a typical evolution candidate: its searched parts (``search.stage``)
    ``genotype``'s, the part it does not search the one the evolution keeps (``evolution.fixed_neck``
    of the ``given`` genotype: its neck under ``search.head_with_searched_neck``, else None = FPN;
    None = the 2-MLP head), and the config ``evolution.candidate_config`` trains it with (the
    retrain's model at the search's input sizes)."""
    parts = searched_parts(cfg)
    candidate = {**genotype, "neck": genotype["neck"] if "neck" in parts else fixed_neck(cfg, parts, given),
                 "head": genotype["head"] if "head" in parts else None}
    return candidate_config(cfg, candidate, evolution_settings(cfg), run_dir=""), candidate


def search_compute(cfg: Dict, plan: Dict, train_images: int,
                   utilization: float = DEFAULT_GPU_UTILIZATION) -> Dict:
    """FLOPs of a whole search of ``search.strategy`` over ``train_images`` training images and
    the GPU-days they take at ``utilization`` of each GPU_PEAK_FLOPS (the module docstring):
    ``gradient_search_compute`` for differentiable and snas, ``evolution_compute`` for evolution.
    Every result has "strategy", "architectures" (how many are trained), "flops" {..., "total"},
    "gpu_days" {gpu: days}, "utilization" and "train_images"."""
    strategy = cfg["search"]["strategy"]
    if strategy in GRADIENT_STRATEGIES:
        return gradient_search_compute(cfg, plan, train_images, utilization)
    if strategy == "evolution":
        return evolution_compute(cfg, plan, train_images, utilization)
    raise ValueError(f"search.strategy {strategy!r}: no compute model (expected one of "
                     f"{', '.join(GRADIENT_STRATEGIES + ('evolution',))})")


def gradient_search_compute(cfg: Dict, plan: Dict, train_images: int,
                            utilization: float = DEFAULT_GPU_UTILIZATION) -> Dict:
    """The differentiable search's FLOPs per stage (and SNAS's: the same stages, the same
    alternation over the full mixed op, the op weights a soft Gumbel-softmax sample instead of
    the softmax, so the same compute): one supernet per stage, weight steps on half A, architecture
    steps on half B after the warm-up; at most ``search.max_iters`` weight steps of
    ``data.images_per_batch`` images per stage (one process); the steps ``search.mode`` samples
    (``SAMPLED_STEPS``) at the plan's "sampled_flops".

    Returns {"strategy": differentiable | snas, "architectures": 1, "images": {stage: images
    through a forward}, "flops": {stage: FLOPs, "total"}, "gpu_days": {gpu: days}, "utilization",
    "train_images", "epochs", "arch_fraction", "mode", "weight_images": weight-step images per
    stage, "max_iters", "images_per_batch"}."""
    _check_compute_inputs(train_images, utilization)
    s = cfg["search"]
    stages = [f"search: {stage}" for stage in stages_to_run(cfg)]  # a RetinaNet's "both" is its neck
    epochs, arch_fraction = int(s["epochs"]), 1.0 - float(s["arch_start_epoch_fraction"])
    max_iters, images_per_batch = int(s["max_iters"]), int(cfg["data"]["images_per_batch"])
    weight_images = _training_images(epochs, train_images / 2, max_iters, images_per_batch)
    sampled_steps = SAMPLED_STEPS[s["mode"]]

    def step_flops(stage_plan: Dict, step: str) -> Tuple[float, float]:
        """(forward FLOPs, forward FLOPs of what trains) of a weight or architecture step."""
        f = mean_flops(stage_plan, "sampled_flops" if step in sampled_steps else "flops")
        return f["total"], f["total"] - f["backbone"] if s["freeze_backbone"] else f["total"]

    images, flops = {}, {}
    for stage in stages:
        forward, trained = step_flops(plan["stages"][stage], "weight")
        weight_step = forward + 2 * trained
        forward, trained = step_flops(plan["stages"][stage], "arch")
        arch_step = forward + trained
        images[stage] = weight_images * (1 + arch_fraction)
        flops[stage] = weight_images * (weight_step + arch_fraction * arch_step)
    flops["total"] = sum(flops.values())
    return {"strategy": s["strategy"], "architectures": 1, "images": images, "flops": flops,
            "gpu_days": _gpu_days(flops["total"], utilization), "utilization": utilization,
            "train_images": train_images, "epochs": epochs, "arch_fraction": arch_fraction, "mode": s["mode"],
            "weight_images": weight_images, "max_iters": max_iters, "images_per_batch": images_per_batch}


def evolution_compute(cfg: Dict, plan: Dict, train_images: int,
                      utilization: float = DEFAULT_GPU_UTILIZATION) -> Dict:
    """The evolution's FLOPs: ``search.evolution.candidates`` candidates (``plan["candidate"]``
    for each), each trained ``candidate_epochs`` epochs on half A (N // 2 images, as
    ``differentiable.split_halves`` splits; at most ``max_iters`` x ``data.images_per_batch``
    images when max_iters > 0, per process) at ``training_step_flops`` per image, then evaluated
    once on half B (N - N // 2 images) at one forward per image.

    Approximations: every candidate costs what the plan's typical candidate costs (its searched
    parts decoded from DARTS-init weights, or the given genotype's); each image is counted at the
    mean pixel count of the search sizes (``search.min_size`` / ``max_size``, ``mean_flops``), as
    the search stages are; the
    evaluation forward is counted as a training forward (``model.roi.batch_size_per_image`` RoIs
    in the box head), while evaluation runs at ``model.transform.test_min_size`` with up to
    ``model.rpn.post_nms_top_n_test`` proposals per image.

    Returns {"strategy": "evolution", "architectures": candidates, "images": {"train",
    "evaluate": images over all candidates}, "flops": {"train", "evaluate", "total"}, "gpu_days",
    "utilization", "train_images", "epochs": candidate_epochs, "half_a", "half_b",
    "images_per_candidate": training images of one candidate, "max_iters", "images_per_batch",
    "candidate": {"image_size": (H, W), "neck_type", "head_type", "forward_flops", "step_flops"}}."""
    _check_compute_inputs(train_images, utilization)
    if train_images < 2:
        raise ValueError(f"the evolution splits the training set in two halves: train_images must be >= 2, "
                         f"got {train_images}")
    if "candidate" not in plan:
        raise ValueError("the plan has no evolution candidate: plan_search with search.strategy=evolution")
    settings = evolution_settings(cfg)
    half_a = train_images // 2
    half_b = train_images - half_a
    images_per_batch = int(cfg["data"]["images_per_batch"])
    per_candidate = _training_images(settings.candidate_epochs, half_a, settings.max_iters, images_per_batch)
    candidate = plan["candidate"]
    forward, step = mean_flops(candidate)["total"], training_step_flops(candidate)
    images = {"train": settings.candidates * per_candidate, "evaluate": settings.candidates * half_b}
    flops = {"train": images["train"] * step, "evaluate": images["evaluate"] * forward}
    flops["total"] = flops["train"] + flops["evaluate"]
    return {"strategy": "evolution", "architectures": settings.candidates, "images": images, "flops": flops,
            "gpu_days": _gpu_days(flops["total"], utilization), "utilization": utilization,
            "train_images": train_images, "epochs": settings.candidate_epochs, "half_a": half_a, "half_b": half_b,
            "images_per_candidate": per_candidate, "max_iters": settings.max_iters,
            "images_per_batch": images_per_batch,
            "candidate": {"image_size": candidate["image_size"], "neck_type": candidate["neck_type"],
                          "head_type": candidate["head_type"], "forward_flops": forward, "step_flops": step}}


def random_search_compute(cfg: Dict, plan: Dict, train_images: int, architectures: int = 1,
                          utilization: float = DEFAULT_GPU_UTILIZATION) -> Dict:
    """FLOPs of training ``architectures`` decoded architectures as the retrain trains one:
    ``solver.epochs`` over all ``train_images`` (at most ``solver.max_iters`` x
    ``data.images_per_batch`` images when max_iters > 0, per process), ``training_step_flops``
    of ``plan["stages"]["decoded"]`` per image (at the mean pixel count of the training sizes,
    ``mean_flops``). ``architectures`` = 1: the retrain of a searched architecture;
    K: a random search of K architectures, each trained fully (the evaluation that picks the
    best, one forward per validation image each, is not counted).

    Returns {"strategy": "random", "architectures", "images": {"train": over all architectures},
    "flops": {"train", "total"}, "gpu_days", "utilization", "train_images", "epochs",
    "images_per_architecture": training images of one, "max_iters", "images_per_batch",
    "image_size": (H, W), "forward_flops", "step_flops"}."""
    _check_compute_inputs(train_images, utilization)
    if architectures < 1:
        raise ValueError(f"architectures must be >= 1, got {architectures}")
    epochs, max_iters = int(cfg["solver"]["epochs"]), int(cfg["solver"]["max_iters"])
    images_per_batch = int(cfg["data"]["images_per_batch"])
    per_architecture = _training_images(epochs, train_images, max_iters, images_per_batch)
    decoded = plan["stages"]["decoded"]
    step = training_step_flops(decoded)
    images = {"train": architectures * per_architecture}
    flops = {"train": images["train"] * step}
    flops["total"] = flops["train"]
    return {"strategy": "random", "architectures": architectures, "images": images, "flops": flops,
            "gpu_days": _gpu_days(flops["total"], utilization), "utilization": utilization,
            "train_images": train_images, "epochs": epochs, "images_per_architecture": per_architecture,
            "max_iters": max_iters, "images_per_batch": images_per_batch, "image_size": decoded["image_size"],
            "forward_flops": mean_flops(decoded)["total"], "step_flops": step}


def training_step_flops(stage_plan: Dict) -> float:
    """FLOPs of one image's training step of a fixed detector planned by ``plan_stage``, at its
    mean image (``mean_flops``): the forward plus twice the forward of what trains (all but its
    frozen leading backbone stages)."""
    total = mean_flops(stage_plan)["total"]
    return total + 2 * (total - stage_plan["frozen_backbone_flops"] * stage_plan.get("pixel_fraction", 1.0))


def _training_images(epochs: int, images: int, max_iters: int, images_per_batch: int) -> int:
    """Images a training run of ``epochs`` epochs over ``images`` steps on: capped at
    ``max_iters`` batches of ``images_per_batch`` when max_iters > 0 (the Trainer's cap)."""
    seen = epochs * images
    return min(seen, max_iters * images_per_batch) if max_iters > 0 else seen


def _check_compute_inputs(train_images: int, utilization: float) -> None:
    if train_images <= 0:
        raise ValueError(f"train_images must be positive, got {train_images}")
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")


def _gpu_days(flops: float, utilization: float) -> Dict[str, float]:
    """Days per GPU of GPU_PEAK_FLOPS that ``flops`` take at ``utilization`` of its peak."""
    return {gpu: flops / (peak * utilization) / 86400 for gpu, peak in GPU_PEAK_FLOPS.items()}


def format_compute(compute: Dict) -> str:
    """The compute and GPU-days of ``search_compute`` (any strategy) or ``random_search_compute``,
    a few lines."""
    strategy = compute["strategy"]
    if strategy == "evolution":
        return _format_evolution(compute)
    if strategy == "random":
        return _format_random_search(compute)
    text = _format_gradient_search(compute)
    if strategy == "snas":
        return ("SNAS: the gradient search's stages and alternation over the full mixed op, each op weighted "
                "by a soft Gumbel-softmax sample: the same compute\n" + text)
    return text


def _format_gradient_search(c: Dict) -> str:
    n = c["train_images"]
    stages = ", ".join(f"{stage[len('search: '):]} stage {_flops(c['flops'][stage])}"
                       for stage in c["images"])
    cap = _format_cap(c, c["weight_images"], c["epochs"] * (n / 2))
    sampled = SAMPLED_STEPS[c["mode"]]
    return (f"Whole search over {n} training images (two halves of {n // 2}; {c['epochs']} epochs per stage"
            f"{'; weight steps ' + cap if cap else ''}, architecture steps in the last "
            f"{100 * c['arch_fraction']:.0f} %): {stages}, total {_flops(c['flops']['total'])}\n"
            + _format_gpu_days(c)
            + ("" if not sampled else
               f"\n(search.mode {c['mode']}: the {' and '.join(sampled)} steps counted at one op per link/edge, "
               "the mean cost of its op table: a path drawn uniformly, as at the search's start)"))


def _format_evolution(c: Dict) -> str:
    h, w = c["candidate"]["image_size"]
    cap = _format_cap(c, c["images_per_candidate"], c["epochs"] * c["half_a"])
    cap = f"; {cap}" if cap else ""
    return (f"Evolution over {c['train_images']} training images: {c['architectures']} candidates x "
            f"{c['epochs']} epochs on half A ({c['half_a']} images{cap}) + one evaluation of half B "
            f"({c['half_b']} images) each; a candidate = {c['candidate']['neck_type']} neck + "
            f"{c['candidate']['head_type']} head at up to {h}x{w}, {c['candidate']['forward_flops'] / 1e9:.2f} GFLOPs "
            f"forward per image (mean over the multi-scale sizes): training {_flops(c['flops']['train'])}, evaluation "
            f"{_flops(c['flops']['evaluate'])}, total {_flops(c['flops']['total'])}\n"
            + _format_gpu_days(c))


def _format_random_search(c: Dict) -> str:
    h, w = c["image_size"]
    k = c["architectures"]
    cap = _format_cap(c, c["images_per_architecture"], c["epochs"] * c["train_images"])
    return (f"Random search of {k} architecture{'s' if k != 1 else ''}, each retrained {c['epochs']} epochs "
            f"on all {c['train_images']} training images ({cap + '; ' if cap else ''}the decoded "
            f"model at up to {h}x{w}, {c['forward_flops'] / 1e9:.2f} GFLOPs forward per image, mean over the "
            f"multi-scale sizes): "
            f"{_flops(c['flops']['total'] / k)} per architecture, total "
            f"{_flops(c['flops']['total'])}\n" + _format_gpu_days(c))


def _format_cap(c: Dict, images: int, uncapped: int) -> str:
    """"capped at ..." when max_iters cut a training run of ``uncapped`` images to ``images``."""
    if images == uncapped:
        return ""
    return f"capped at max_iters {c['max_iters']} x {c['images_per_batch']} images = {images} images"


def _flops(flops: float) -> str:
    """FLOPs in EFLOP down to 0.01 EFLOP, else in PFLOP or TFLOP (a CPU-sized search is ~1e13)."""
    for low, scale, unit in ((1e16, 1e18, "EFLOP"), (1e15, 1e15, "PFLOP")):
        if flops >= low:
            return f"{flops / scale:.2f} {unit}"
    return f"{flops / 1e12:.2f} TFLOP"


def _gpu_time(days: float) -> str:
    """GPU-days, and GPU-hours beside a figure under one day."""
    return f"{days:.1f} GPU-days" if days >= 1 else f"{days:.2g} GPU-days ({24 * days:.2g} GPU-hours)"


def _format_gpu_days(c: Dict) -> str:
    gpus = ", ".join(f"{gpu} ({GPU_PEAK_FLOPS[gpu] / 1e12:.1f} TFLOP/s) {_gpu_time(days)}"
                     for gpu, days in c["gpu_days"].items())
    return f"at an assumed {100 * c['utilization']:.0f} % of dense fp32 peak: {gpus}"


def format_plan(plan: Dict) -> str:
    """A readable table: one row per stage; params (M) per part, forward GFLOPs (a multiply-add = 2)
    per image, saved activations per image (MiB / GiB)."""
    h, w = plan["image_size"]
    ph, pw = plan["padded_size"]
    if "search: head" not in plan["stages"]:  # RetinaNet
        rois = "a dense head on every level (no RPN, no RoIs)"
    else:
        head_rois = plan["stages"]["search: head"]["num_rois"]
        rois = f"{plan['num_rois']} RoIs/image" + (f" ({head_rois} in the head search)"
                                                   if head_rois != plan["num_rois"] else "")
    dh, dw = plan["stages"]["decoded"]["image_size"]
    retrain = f" (the decoded model: {dh}x{dw})" if (dh, dw) != (h, w) else ""
    lines = [f"Search plan: one image {h}x{w} (padded {ph}x{pw}){retrain}, {rois}; "
             f"decoded genotype: {plan['genotype']}",
             "params in M (backbone / neck / rpn / head / arch = total); GFLOPs = forward, a multiply-add = 2 FLOPs, "
             "per image in G; activations = bytes saved for backward per image", ""]
    header = (f"| {'stage':<13}| {'backbone':>8} | {'neck':>7} | {'rpn':>5} | {'head':>7} | {'arch':>6} | "
              f"{'total':>7} | {'GFLOPs bb':>9} | {'neck':>8} | {'rpn':>6} | {'head':>8} | {'total':>8} | "
              f"{'act. neck':>10} | {'act. head':>10} | {'act. total':>10} |")
    lines += [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for stage, p in plan["stages"].items():
        pa, fl, ac = p["params"], p["flops"], p["activation_bytes"]
        lines.append(
            f"| {stage:<13}| {pa['backbone'] / 1e6:8.2f} | {pa['neck'] / 1e6:7.2f} | {pa['rpn'] / 1e6:5.2f} | "
            f"{pa['head'] / 1e6:7.2f} | {pa['arch'] / 1e6:6.4f} | {pa['total'] / 1e6:7.2f} | "
            f"{fl['backbone'] / 1e9:9.2f} | {fl['neck'] / 1e9:8.2f} | {fl['rpn'] / 1e9:6.2f} | "
            f"{fl['head'] / 1e9:8.2f} | {fl['total'] / 1e9:8.2f} | {_bytes(ac['neck']):>10} | "
            f"{_bytes(ac['head']):>10} | {_bytes(ac['total']):>10} |")
    lines.append("")
    lines.append("activations per part (backbone / neck / rpn / head): " + "; ".join(
        f"{s}: " + " / ".join(_bytes(p["activation_bytes"][k]) for k in PARTS) for s, p in plan["stages"].items()))
    sampled = [(s, p["sampled_flops"]) for s, p in plan["stages"].items() if p.get("sampled_flops")]
    if sampled:
        lines.append("GFLOPs on one sampled op per link/edge (search.mode gdas, sampled_weights; the mean of "
                     "each op table), neck / head / total: " + "; ".join(
                         f"{s}: {f['neck'] / 1e9:.2f} / {f['head'] / 1e9:.2f} / {f['total'] / 1e9:.2f}"
                         for s, f in sampled))
    return "\n".join(lines)


def _bytes(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cfg", default=None, help="config YAML (default: the built-in defaults)")
    parser.add_argument("--genotype", default=None, help="genotype JSON of the decoded neck (+ head)")
    parser.add_argument("--train-images", type=int, default=None,
                        help="size of the training set: also print the whole search's compute and GPU-days")
    parser.add_argument("--random-architectures", type=int, default=0, metavar="K",
                        help="with --train-images: also print a random search's compute, K architectures "
                             "each retrained like the decoded model")
    parser.add_argument("--gpu-utilization", type=float, default=DEFAULT_GPU_UTILIZATION,
                        help="assumed fraction of a GPU's dense fp32 peak a search step sustains")
    parser.add_argument("--opts", nargs="*", default=[], help="config overrides key.sub=value")
    args = parser.parse_args(argv)
    if args.random_architectures and not args.train_images:
        parser.error("--random-architectures needs --train-images")
    if args.random_architectures < 0:
        parser.error(f"--random-architectures must be >= 0, got {args.random_architectures}")
    cfg = load_config(args.cfg, args.opts)
    genotype = load_genotype(args.genotype) if args.genotype else None
    print(plan_report(cfg, genotype, args.train_images, args.gpu_utilization, args.random_architectures))


def plan_report(cfg: Dict, genotype: Optional[Dict], train_images: Optional[int],
                utilization: Optional[float] = None, random_architectures: int = 0) -> str:
    """The plan table, and the whole search's compute (``search.strategy``'s) when ``train_images``
    is given, then a random search's of ``random_architectures`` architectures when > 0
    (``utilization`` None: DEFAULT_GPU_UTILIZATION)."""
    plan = plan_search(cfg, genotype)
    text = format_plan(plan)
    if not train_images:
        return text + "\n\n(--train-images N: the whole search's compute and GPU-days)"
    utilization = DEFAULT_GPU_UTILIZATION if utilization is None else utilization
    text += "\n\n" + format_compute(search_compute(cfg, plan, train_images, utilization))
    if random_architectures:
        text += "\n" + format_compute(random_search_compute(cfg, plan, train_images, random_architectures,
                                                             utilization))
    return text


if __name__ == "__main__":
    from autofpn.cli import run_command
    sys.exit(run_command(main))
