"""Plan a search before spending GPU-days: params, FLOPs and activation memory per image of each
search stage and of the decoded (retrained) model, at the configured training size.

Stages (as ``search.py`` runs them):

- ``search: neck`` = ``build_detector(cfg, search="neck")``: neck supernet + the standard head.
- ``search: head`` = ``build_detector(cfg, genotype, search="head")``: the decoded neck of
  ``genotype`` + head supernet.
- ``decoded``      = ``build_detector(cfg, genotype)`` with ``model.neck.type = auto`` and
  ``model.head.type = auto``: the model that is retrained.

In both search stages the backbone is frozen when ``search.freeze_backbone`` (its parameters do
not require grad, so autograd saves nothing inside it); the decoded model freezes
``model.backbone.frozen_stages`` as in training.

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

Compute of a whole search (``search_compute``, printed when the training set's size is given):
per search stage, weight steps on half A every epoch and, after the warm-up
(``search.arch_start_epoch_fraction``), architecture steps on half B, i.e.
``epochs x N/2 x (1 + (1 - arch_start_fraction))`` images. A weight step costs the forward plus
twice the forward of what trains (the backbone is frozen: no backward in it); an architecture
step (first order) the forward plus once that, since it needs the activations' gradients but
not the weights'. GPU-days = that compute / (an assumed fraction of the GPU's dense fp32 peak),
the supernet's depthwise and dilated convolutions not running on tensor cores.

``python -m autofpn.search.plan --cfg configs/coco.yaml [--genotype G] [--train-images N] [--opts k=v ...]``
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
from .differentiable import head_stage_rois, search_transform
from autofpn.models.genotype import load_genotype
from autofpn.models.architecture import Architecture

PARTS = ("backbone", "neck", "rpn", "head")
STAGES = ("search: neck", "search: head", "decoded")
# dense fp32 peak FLOP/s (datasheets: V100 SXM2 15.7 TFLOP/s, the paper's GPU; A100 SXM4 19.5)
GPU_PEAK_FLOPS = {"V100": 15.7e12, "A100": 19.5e12}
# the fraction of that peak a search step is assumed to sustain: an assumption, not a measurement
# (no GPU has run this project's search yet); GPU-days scale with its inverse
DEFAULT_GPU_UTILIZATION = 0.3


def training_image_size(cfg: Dict) -> Tuple[int, int]:
    """(H, W) of the largest training image: short side max(min_size), long side max_size."""
    t = cfg["model"]["transform"]
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
    # the supernet with every op computed (a sampled mode's path is drawn from data at run time;
    # its cost is at most this)
    cfg["search"]["mode"] = "full"
    if stage in ("search: head", "decoded"):
        cfg["model"]["neck"]["type"] = "auto"
    if stage == "decoded":
        cfg["model"]["head"]["type"] = "auto"
    return cfg


def build_stage_model(cfg: Dict, stage: str, genotype: Dict, device="meta") -> nn.Module:
    """The detector of ``stage`` in train mode, backbone frozen as the stage trains it."""
    stage_cfg = _stage_cfg(cfg, stage)
    search = {"search: neck": "neck", "search: head": "head", "decoded": False}[stage]
    with torch.device(device):
        model = build_detector(stage_cfg, genotype if stage != "search: neck" else None, search=search)
    if stage != "decoded" and cfg["search"]["freeze_backbone"]:
        model.backbone.requires_grad_(False)
    return model.train()


class SavedTensorMeter:
    """Context manager summing the bytes of distinct storages autograd saves for backward,
    ignoring the given parameters' storages (``nbytes``, ``count`` after the block)."""

    def __init__(self, parameters=()):
        self._param_storages = {p.untyped_storage()._cdata for p in parameters}
        self._seen = set()
        self.nbytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda x: x)

    def _pack(self, t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self._param_storages and key not in self._seen:
            self._seen.add(key)
            self.nbytes += storage.nbytes()
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def _head_cost(model: nn.Module, roi_feats: Tensor, head_weights: Optional[Tensor]) -> Cost:
    head = model.roi_heads.box_head
    cost = count_cost(head, roi_feats) if head_weights is None else count_cost(head, roi_feats, head_weights)
    d = torch.empty(roi_feats.shape[0], head.out_channels, device=roi_feats.device)
    return cost + count_cost(model.roi_heads.box_predictor, d)


def plan_stage(cfg: Dict, stage: str, genotype: Dict, image_size: Tuple[int, int] = None,
               num_rois: int = None) -> Dict:
    """Params, forward FLOPs (a multiply-add = 2) and saved-activation bytes of one image for one stage.

    Returns {"params": {part: int, "arch": int, "total": int}, "flops": {part: float, "total"},
    "activation_bytes": {part: int, "total": int}, "image_size": (H, W), "num_rois": int}."""
    if image_size is None:  # the search stages at the search's input size, the decoded model at the training size
        sized = cfg if stage == "decoded" else {**cfg, "model": {**cfg["model"], "transform": search_transform(cfg)}}
        image_size = training_image_size(sized)
    if not num_rois:
        num_rois = head_stage_rois(cfg) if stage == "search: head" else cfg["model"]["roi"]["batch_size_per_image"]
    model = build_stage_model(cfg, stage, genotype)
    divisor = cfg["model"]["transform"]["size_divisible"]
    padded = tuple(level_sizes(image_size, [0], divisor)[0])
    batch = torch.empty(1, 3, *padded, device="meta")
    neck_weights = model.arch.neck_weights() if model.arch is not None else None
    head_weights = model.arch.head_weights() if model.arch is not None else None
    pooler = cfg["model"]["roi"]["pooler_size"]

    params = parameter_breakdown(model)
    params["arch"] = sum(p.numel() for p in model.arch_parameters())
    params["total"] += params["arch"]

    # forward MACs per part (no grad); count_cost wants the module's inputs
    feats = model.backbone(batch)
    flops = {"backbone": count_cost(model.backbone, batch).flops}
    nw = () if neck_weights is None else (neck_weights.detach(),)
    flops["neck"] = count_cost(model.neck, feats, *nw).flops
    with torch.no_grad():
        levels = model.neck(feats, *nw)
    rpn_in = [levels[k] for k in sorted(levels, key=lambda n: int(n[1:]))]
    flops["rpn"] = count_cost(model.rpn.head, rpn_in).flops
    roi_feats = torch.empty(num_rois, model.neck.out_channels, pooler, pooler, device="meta")
    flops["head"] = _head_cost(model, roi_feats, None if head_weights is None else head_weights.detach()).flops
    flops["total"] = sum(flops[p] for p in PARTS)

    # saved activations of one training forward, part by part (grad flows as in training)
    act = {}
    with SavedTensorMeter(model.parameters()) as meter:
        feats = model.backbone(batch)
    act["backbone"] = meter.nbytes
    with SavedTensorMeter(model.parameters()) as meter:
        levels = model.neck(feats, *(() if neck_weights is None else (neck_weights,)))
    act["neck"] = meter.nbytes
    with SavedTensorMeter(model.parameters()) as meter:
        model.rpn.head([levels[k] for k in sorted(levels, key=lambda n: int(n[1:]))])
    act["rpn"] = meter.nbytes
    neck_trains = any(p.requires_grad for p in model.neck.parameters())
    roi_feats = torch.empty(num_rois, model.neck.out_channels, pooler, pooler, device="meta",
                            requires_grad=neck_trains)  # RoIAlign output; it saves only the boxes
    with SavedTensorMeter(model.parameters()) as meter:
        x = model.roi_heads.box_head(roi_feats, *(() if head_weights is None else (head_weights,)))
        model.roi_heads.box_predictor(x)
    act["head"] = meter.nbytes
    act["total"] = sum(act[p] for p in PARTS)
    return {"params": params, "flops": flops, "activation_bytes": act,
            "image_size": tuple(image_size), "padded_size": padded, "num_rois": num_rois}


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
         "stages": {stage: plan_stage(...)}}.
    """
    rep = representative_genotype(cfg)
    if genotype is None:
        genotype = rep
    elif genotype.get("head") is None or genotype.get("neck") is None:
        genotype = {**rep, **{k: v for k, v in genotype.items() if v is not None},
                    "name": f"{genotype.get('name', 'given')} (+ representative "
                            f"{'head' if genotype.get('head') is None else 'neck'})"}
    stages = {s: plan_stage(cfg, s, genotype, image_size, num_rois) for s in STAGES}
    first = stages[STAGES[0]]
    return {"genotype": genotype.get("name", "given genotype"), "image_size": first["image_size"],
            "padded_size": first["padded_size"], "num_rois": first["num_rois"], "stages": stages}


def search_compute(cfg: Dict, plan: Dict, train_images: int,
                   utilization: float = DEFAULT_GPU_UTILIZATION) -> Dict:
    """FLOPs of a whole search over ``train_images`` training images, per stage, and the GPU-days
    they take at ``utilization`` of each GPU_PEAK_FLOPS (see the module docstring for the model).

    Returns {"images": {stage: images through a forward}, "flops": {stage: FLOPs, "total"},
    "gpu_days": {gpu: days}, "utilization", "train_images", "epochs", "arch_fraction", "mode"}."""
    if train_images <= 0:
        raise ValueError(f"train_images must be positive, got {train_images}")
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    s = cfg["search"]
    stages = {"neck": ["search: neck"], "head": ["search: head"], "both": ["search: neck", "search: head"]}[s["stage"]]
    epochs, arch_fraction = int(s["epochs"]), 1.0 - float(s["arch_start_epoch_fraction"])
    half = train_images / 2
    images, flops = {}, {}
    for stage in stages:
        f = plan["stages"][stage]["flops"]
        trained = f["total"] - f["backbone"] if s["freeze_backbone"] else f["total"]
        weight_step, arch_step = f["total"] + 2 * trained, f["total"] + trained
        images[stage] = epochs * half * (1 + arch_fraction)
        flops[stage] = epochs * half * (weight_step + arch_fraction * arch_step)
    flops["total"] = sum(flops.values())
    gpu_days = {gpu: flops["total"] / (peak * utilization) / 86400 for gpu, peak in GPU_PEAK_FLOPS.items()}
    return {"images": images, "flops": flops, "gpu_days": gpu_days, "utilization": utilization,
            "train_images": train_images, "epochs": epochs, "arch_fraction": arch_fraction, "mode": s["mode"]}


def format_compute(compute: Dict) -> str:
    """The whole search's compute and GPU-days, a few lines."""
    n, c = compute["train_images"], compute
    stages = ", ".join(f"{stage[len('search: '):]} stage {c['flops'][stage] / 1e18:.2f} EFLOP"
                       for stage in c["images"])
    gpus = ", ".join(f"{gpu} ({GPU_PEAK_FLOPS[gpu] / 1e12:.1f} TFLOP/s) {days:.1f} GPU-days"
                     for gpu, days in c["gpu_days"].items())
    return (f"Whole search over {n} training images (two halves of {n // 2}; {c['epochs']} epochs per stage, "
            f"architecture steps in the last {100 * c['arch_fraction']:.0f} %): {stages}, total "
            f"{c['flops']['total'] / 1e18:.2f} EFLOP\n"
            f"at an assumed {100 * c['utilization']:.0f} % of dense fp32 peak: {gpus}"
            + ("" if c["mode"] == "full" else
               f"\n(counted with every op of the mixed op: an upper bound for search.mode {c['mode']}, "
               "whose weight steps run one sampled op per link/edge)"))


def format_plan(plan: Dict) -> str:
    """A readable table: one row per stage; params (M) per part, forward GFLOPs (a multiply-add = 2)
    per image, saved activations per image (MiB / GiB)."""
    h, w = plan["image_size"]
    ph, pw = plan["padded_size"]
    head_rois = plan["stages"]["search: head"]["num_rois"]
    rois = f"{plan['num_rois']} RoIs/image" + (f" ({head_rois} in the head search)" if head_rois != plan["num_rois"] else "")
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
    return "\n".join(lines)


def _bytes(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cfg", default=None, help="config YAML (default: the built-in defaults)")
    parser.add_argument("--genotype", default=None, help="genotype JSON of the decoded neck (+ head)")
    parser.add_argument("--train-images", type=int, default=None,
                        help="size of the training set: also print the whole search's compute and GPU-days")
    parser.add_argument("--gpu-utilization", type=float, default=DEFAULT_GPU_UTILIZATION,
                        help="assumed fraction of a GPU's dense fp32 peak a search step sustains")
    parser.add_argument("--opts", nargs="*", default=[], help="config overrides key.sub=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.cfg, args.opts)
    genotype = load_genotype(args.genotype) if args.genotype else None
    print(plan_report(cfg, genotype, args.train_images, args.gpu_utilization))


def plan_report(cfg: Dict, genotype: Optional[Dict], train_images: Optional[int],
                utilization: Optional[float] = None) -> str:
    """The plan table, and the whole search's compute when ``train_images`` is given
    (``utilization`` None: DEFAULT_GPU_UTILIZATION)."""
    plan = plan_search(cfg, genotype)
    text = format_plan(plan)
    if train_images:
        utilization = DEFAULT_GPU_UTILIZATION if utilization is None else utilization
        return text + "\n\n" + format_compute(search_compute(cfg, plan, train_images, utilization))
    return text + "\n\n(--train-images N: the whole search's compute and GPU-days)"


if __name__ == "__main__":
    from autofpn.cli import run_command
    sys.exit(run_command(main))
