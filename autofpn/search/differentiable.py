"""The Auto-FPN search: first-order alternating optimisation of weights and architecture.

One search stage (neck or head) runs ``Searcher.search``:

- the training set is split at random (``search.split_seed``) into two disjoint halves, A for
  the network weights and B for the architecture parameters;
- every iteration takes one batch of each: an architecture step on B (Adam, loss = detection
  losses + lambda * C(alpha, beta)), once ``search.arch_start_epoch_fraction`` of the iterations
  have passed, then a weight step on A (SGD, cosine lr ``w_lr -> w_lr_min``). Each optimizer
  holds only its own parameters, and the other set does not require grad during a step, so a
  weight step cannot move alpha and an architecture step cannot move a weight;
- ``search.mode: gdas`` runs each step on one sampled path per link/edge (Gumbel-softmax,
  straight-through; see ``models/architecture.py``), seeded by (train.seed, stage, iteration,
  step) so ranks agree and a resumed stage draws the same paths; ``sampled_weights`` samples
  the weight steps only; ``full`` mixes every op;
- gradients are averaged across processes by hand (no DDP: two optimizers over disjoint sets
  and ``autograd.grad`` for the architecture do not fit DDP's one-backward contract), so every
  rank holds the same weights and the same alpha/beta after every step;
- checkpoints hold both optimizers, the scheduler, the iteration and every rank's RNG states;
  a resumed stage continues bit for bit on the CPU.

``run_search`` chains the stages: the neck first with the standard head, then the head with the
searched neck (``search.head_with_searched_neck``) or FPN, and writes ``geno.json``. A RetinaNet
(``model.detector: retinanet``) has no RoI head: only its neck stage runs (``DETECTOR_STAGES``),
the Auto-fusion supernet over ``model.neck.levels`` inside ``ConvExtraLevels``, whose P6 / P7
convolutions are trained but neither searched nor counted in the resource penalty. An SSD
(``model.detector: ssd``) likewise: the supernet over ``model.neck.levels`` of its levels inside
``SSDNeck``, whose fc6 / fc7 and extra layers are trained, not searched, not counted.
"""
import copy
import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from autofpn.engine import distributed as du
from autofpn.engine.checkpoint import (CheckpointManager, atomic_write_json, capture_rng_state, load_checkpoint,
                                      restore_rng_state)
from autofpn.engine.logging import MetricsLog, Progress, RunClock, TensorBoard, read_metrics
from autofpn.engine.trainer import (check_finite_losses, inject_nan_for_test,
                                    move_to_device, parse_nan_hook, seed_everything, set_loader_position)
from autofpn.models.necks import ConvExtraLevels
from autofpn.models.ssd import SSDNeck
from autofpn.models.operations import HEAD_OPS, NECK_OPS

# search.mode -> the steps that run on one Gumbel-sampled path per link/edge (the others mix
# every op): full (the paper), gdas (Dong & Yang 2019: both), sampled_weights (weights trained
# on sampled paths, cheap; architecture gradients from the full mixed op, which are consistent
# from batch to batch: docs/STUDY.md)
SAMPLED_STEPS = {"full": (), "gdas": ("weight", "arch"), "sampled_weights": ("weight",)}
# search.amp -> the autocast dtype of the forward passes (None: float32 throughout)
AMP_DTYPES = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}

# lambda presets of the paper (sec. 3.3): the "small" model gets the strongest constraint
LAMBDA_PRESETS = {"small": 0.2, "middle": 0.02, "large": 0.002}
STAGES = ("neck", "head")
# model.detector -> the stages its search can run: a one-stage detector has no RoI head
DETECTOR_STAGES = {"faster_rcnn": STAGES, "retinanet": ("neck",), "ssd": ("neck",)}
# necks that wrap the searched neck in ``.base`` with fixed layers of their own (not searched, not
# in the resource penalty): RetinaNet's P6 / P7, SSD's fc6 / fc7 and extra layers
WRAPPING_NECKS = (ConvExtraLevels, SSDNeck)


def resource_lambda(search_cfg: Dict[str, Any]) -> float:
    """``search.resource_lambda`` (a preset name or a number) x ``resource_lambda_scale``."""
    value = search_cfg["resource_lambda"]
    if isinstance(value, str):
        if value not in LAMBDA_PRESETS:
            raise ValueError(f"search.resource_lambda must be one of {sorted(LAMBDA_PRESETS)} or a "
                             f"number, got {value!r}")
        value = LAMBDA_PRESETS[value]
    return float(value) * float(search_cfg["resource_lambda_scale"])


def search_seed(cfg: Dict[str, Any]) -> int:
    """The seed of everything random in a search (supernet and alpha init, data order, sampled
    paths): ``search.seed``, or ``train.seed`` when that is -1 (the default)."""
    seed = int(cfg["search"]["seed"])
    return int(cfg["train"]["seed"]) if seed < 0 else seed


def split_halves(num_images: int, seed: int) -> Tuple[List[int], List[int]]:
    """A seeded random split of ``range(num_images)`` into two disjoint halves (A, B)."""
    if num_images < 2:
        raise ValueError(f"the search needs at least 2 training images to split, got {num_images}")
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed)).tolist()
    half = num_images // 2
    return sorted(order[:half]), sorted(order[half:])


def average_gradients(params: List[nn.Parameter], world_size: int) -> None:
    """All-reduce (mean) the gradients of ``params`` in one flat buffer; a missing gradient
    counts as zeros so every rank takes part with the same layout."""
    if world_size <= 1 or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset: offset + n].view_as(p).clone()
        offset += n


def head_stage_rois(cfg: Dict[str, Any]) -> int:
    """RoIs per image the head supernet trains on: ``search.head_rois_per_image``, 0 = the
    retrained detector's ``model.roi.batch_size_per_image``."""
    k = int(cfg["search"]["head_rois_per_image"])
    if k < 0:
        raise ValueError(f"search.head_rois_per_image must be >= 0 (0: model.roi.batch_size_per_image), got {k}")
    return k or int(cfg["model"]["roi"]["batch_size_per_image"])


def search_image_size(cfg: Dict[str, Any]) -> Tuple[int, int]:
    """The largest training input (H, W) the supernet sees: short side max(min_size), long side
    capped by max_size (a square-ish image), used for the cost tables; an SSD's square of side
    max(min_size), every image warped to it."""
    t = cfg["model"]["transform"]
    short = max(t["min_size"])
    if cfg["model"]["detector"] == "ssd":
        return short, short
    return short, min(t["max_size"], int(round(short * 4 / 3)))


def search_resource_cost(cfg: Dict[str, Any], neck: Optional[nn.Module], head: Optional[nn.Module]):
    """The ``ResourceCost`` tables of the penalty C(alpha, beta) for a supernet ``neck`` and/or
    ``head`` (None: that part is not counted), at the search's largest input
    (``search_image_size``) and the retrained detector's RoI batch. The evolution strategy scores
    its genotypes with the same tables (``ResourceCost.normalized_cost``). A RetinaNet's neck
    (``ConvExtraLevels``) is counted without its P6 / P7 convolutions: they are the same for every
    alpha, a constant without gradient, as the neck's input projections are; an SSD's (``SSDNeck``)
    without its fc6 / fc7 and extra layers, for the same reason."""
    from autofpn.search.cost import ResourceCost
    if isinstance(neck, WRAPPING_NECKS):
        neck = neck.base
    return ResourceCost(neck, head, search_image_size(cfg), num_rois=cfg["model"]["roi"]["batch_size_per_image"],
                        size_divisible=cfg["model"]["transform"]["size_divisible"])


def supernet_cost_tables(cfg: Dict[str, Any], parts: Sequence[str] = ("neck", "head")):
    """``search_resource_cost`` of the supernet ``cfg``'s search builds, for the searched
    ``parts`` ("neck" and/or "head"): the supernet is built at the search's input sizes without
    backbone weights (shapes only); a config whose class count is filled in from its data later
    gets a placeholder one (the box predictor is not counted)."""
    from autofpn.models.detector import build_detector
    table_cfg = copy.deepcopy(cfg)
    table_cfg["model"]["transform"] = search_transform(cfg)
    table_cfg["model"]["backbone"]["weights"] = "none"
    table_cfg["model"]["num_classes"] = table_cfg["model"]["num_classes"] or 2
    supernet = build_detector(table_cfg, search=True)
    return search_resource_cost(table_cfg, supernet.neck if "neck" in parts else None,
                                supernet.roi_heads.box_head if "head" in parts else None)


def searched_neck(model: nn.Module) -> nn.Module:
    """The Auto-fusion supernet of a detector built with ``search="neck"``: its ``neck``, or the
    neck RetinaNet's ``ConvExtraLevels`` adds its fixed P6 / P7 convolutions to, or the neck SSD's
    ``SSDNeck`` fuses some of its levels with. The cost tables, the link pairs and the decode read
    this module (alpha's shape is its ``arch_shape``)."""
    return model.neck.base if isinstance(model.neck, WRAPPING_NECKS) else model.neck


class Searcher:
    """Searches one stage ("neck" or "head") of ``model`` (built with ``search=stage``)."""

    def __init__(self, cfg: Dict[str, Any], stage: str, model: nn.Module, loader_a, loader_b,
                 ctx: du.DistContext, out_dir: str, desc: Optional[str] = None):
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.cfg, self.stage, self.ctx, self.out_dir = cfg, stage, ctx, out_dir
        self.desc = desc or f"search {stage}"  # the progress bar's name
        self.search_cfg = s = cfg["search"]
        self.model = model.to(ctx.device)
        self.loader_a, self.loader_b = loader_a, loader_b
        self.iters_per_epoch = min(len(loader_a), len(loader_b))
        if self.iters_per_epoch == 0:
            raise ValueError("a search half has no batch on this rank (too few training images)")
        self.max_iter = int(s["epochs"]) * self.iters_per_epoch
        if int(s["max_iters"]) > 0:
            self.max_iter = min(self.max_iter, int(s["max_iters"]))
        self.arch_start_iter = int(math.floor(self.max_iter * float(s["arch_start_epoch_fraction"])))

        if s["freeze_backbone"]:
            model.backbone.requires_grad_(False)
        if stage == "head":  # the head supernet's RoI batch; the cost below keeps the retrained one
            model.roi_heads.sampler.batch_size_per_image = head_stage_rois(cfg)
        if s["recompute"]:  # the mixed ops keep their inputs only and run again in the backward pass
            from autofpn.config import ConfigError
            from autofpn.models.operations import set_recompute
            try:
                set_recompute(model)
            except ValueError as e:
                raise ConfigError(f"'search.recompute' = true: {e}") from None
        self.arch_params = model.arch_parameters()
        self.weight_params = [p for p in model.weight_parameters() if p.requires_grad]
        self.w_optimizer = torch.optim.SGD(self.weight_params, lr=s["w_lr"], momentum=s["w_momentum"],
                                           weight_decay=s["w_weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.w_optimizer, T_max=self.max_iter,
                                                                    eta_min=s["w_lr_min"])
        # DARTS' architecture optimizer: Adam with beta1 = 0.5
        self.a_optimizer = torch.optim.Adam(self.arch_params, lr=s["arch_lr"], betas=(0.5, 0.999),
                                            weight_decay=s["arch_weight_decay"])
        self.lam = resource_lambda(s)
        # search.amp: the forward passes under autocast; float16 scales each optimizer's loss
        self.amp_dtype = AMP_DTYPES[s["amp"]]
        scale = self.amp_dtype == torch.float16
        self.w_scaler = torch.amp.GradScaler(ctx.device.type, enabled=scale)
        self.a_scaler = torch.amp.GradScaler(ctx.device.type, enabled=scale)
        # which steps run on one sampled path per link/edge (SAMPLED_STEPS of search.mode)
        self.sampled_steps = SAMPLED_STEPS[s["mode"]]
        self.sampled = bool(self.sampled_steps)
        self.cost = self._build_cost()
        self.checkpoints = CheckpointManager(os.path.join(out_dir, "checkpoints"),
                                             keep=cfg["train"]["keep_checkpoints"], enabled=ctx.is_main)
        self.nan_hook = parse_nan_hook(cfg["train"]["debug_nan_at"])
        self.iter = 0
        self._pending_rng: Optional[Dict[str, Any]] = None
        self.clock = RunClock()  # search seconds of this stage over every process
        self.seconds = 0.0  # set when the stage finishes
        self.set_train_mode()

    def set_train_mode(self) -> None:
        """Train mode, except a frozen backbone, whose BatchNorm statistics stay as loaded."""
        self.model.train()
        if self.search_cfg["freeze_backbone"]:
            self.model.backbone.eval()

    def _build_cost(self):
        neck = searched_neck(self.model) if self.stage == "neck" else None
        head = self.model.roi_heads.box_head if self.stage == "head" else None
        return search_resource_cost(self.cfg, neck, head)

    def arch_weights(self) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        arch = self.model.arch
        return (arch.neck_weights() if self.stage == "neck" else None,
                arch.head_weights() if self.stage == "head" else None)

    def expected_cost(self) -> Tensor:
        return self.cost.expected_cost(*self.arch_weights())

    # ------------------------------------------------------------------------------- steps

    def _losses(self, images, targets) -> Dict[str, Tensor]:
        images, targets = move_to_device(images, targets, self.ctx.device)
        with torch.autocast(self.ctx.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            losses = self.model(images, targets)
        losses = inject_nan_for_test(losses, self.iter, self.nan_hook)
        check_finite_losses(losses, self.iter, self.ctx.device)
        return losses

    def tau(self) -> float:
        """Gumbel-softmax temperature of this iteration: linear from tau[0] to tau[1] (GDAS)."""
        start, end = (float(t) for t in self.search_cfg["tau"])
        return start + (end - start) * self.iter / max(self.max_iter - 1, 1)

    def sample_seed(self, step: str) -> int:
        """The seed of the Gumbel noise of ``step`` ("weight" or "arch") at this iteration, fixed
        by (search seed, stage, iteration, step): ranks agree and a resumed run draws the same."""
        return ((search_seed(self.cfg) * 2 + STAGES.index(self.stage)) * 10_000_019
                + 2 * self.iter + (step == "arch"))

    def path(self, step: str):
        """The forwards of ``step`` ("weight" or "arch") run one sampled path per link/edge when
        search.mode samples that step (gdas: both; sampled_weights: the weight step), drawn from
        ``sample_seed(step)``; otherwise (full) a no-op context: every op runs."""
        if step not in self.sampled_steps:
            return nullcontext()
        return self.model.arch.sampled(self.tau(), self.sample_seed(step))

    def arch_step(self, images, targets) -> Dict[str, float]:
        """One Adam step of alpha/beta on a batch of half B; weights get no gradient."""
        for p in self.weight_params:
            p.requires_grad_(False)
        try:
            with self.path("arch"):
                losses = self._losses(images, targets)
            detection = sum(losses.values())
            cost = self.expected_cost()
            total = detection + self.lam * cost
            grads = torch.autograd.grad(self.a_scaler.scale(total), self.arch_params)
        finally:
            for p in self.weight_params:
                p.requires_grad_(True)
        for p, g in zip(self.arch_params, grads):
            p.grad = g
        average_gradients(self.arch_params, self.ctx.world_size)
        self.a_scaler.step(self.a_optimizer)  # unscales; skips a step whose gradient overflowed
        self.a_scaler.update()
        self.a_optimizer.zero_grad(set_to_none=True)
        return {"arch_loss": float(detection.detach()), "cost": float(cost.detach())}

    def weight_step(self, images, targets) -> Dict[str, float]:
        """One SGD step of the network weights on a batch of half A; alpha/beta stay fixed."""
        for p in self.arch_params:
            p.requires_grad_(False)
        try:
            with self.path("weight"):
                losses = self._losses(images, targets)
            total = sum(losses.values())
            self.w_optimizer.zero_grad(set_to_none=True)
            self.w_scaler.scale(total).backward()
        finally:
            for p in self.arch_params:
                p.requires_grad_(True)
        average_gradients(self.weight_params, self.ctx.world_size)
        clip = float(self.search_cfg["w_grad_clip"])
        if clip > 0:
            self.w_scaler.unscale_(self.w_optimizer)
            nn.utils.clip_grad_norm_(self.weight_params, clip)
        self.w_scaler.step(self.w_optimizer)
        self.w_scaler.update()
        self.scheduler.step()
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["loss"] = float(total.detach())
        return out

    # ------------------------------------------------------------------------------- state

    def state_dict(self) -> Dict[str, Any]:
        return {"model": self.model.state_dict(), "w_optimizer": self.w_optimizer.state_dict(),
                "a_optimizer": self.a_optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "w_scaler": self.w_scaler.state_dict(), "a_scaler": self.a_scaler.state_dict(),
                "iter": self.iter, "stage": self.stage, "rng": du.all_gather_object(capture_rng_state()),
                "world_size": self.ctx.world_size, "cfg": self.cfg, "seconds": self.clock.total()}

    def save_checkpoint(self) -> None:
        state = self.state_dict()  # collective: every rank takes part in the RNG gather
        self.checkpoints.save(state, self.iter)
        du.barrier()

    def resume(self, path: Optional[str] = None) -> bool:
        """Continue from ``path`` or the newest checkpoint of this stage's folder."""
        if path:
            state = load_checkpoint(path)
        else:
            path, state = self.checkpoints.load_latest()
        if path is None:
            return False
        if state.get("stage") != self.stage:
            raise ValueError(f"{path}: a checkpoint of stage {state.get('stage')!r}, not {self.stage!r}")
        self.model.load_state_dict(state["model"])
        self.w_optimizer.load_state_dict(state["w_optimizer"])
        self.a_optimizer.load_state_dict(state["a_optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for name in ("w_scaler", "a_scaler"):  # absent from checkpoints written before search.amp
            if state.get(name):
                getattr(self, name).load_state_dict(state[name])
        self.iter = int(state["iter"])
        self.clock.before = float(state.get("seconds", 0.0))
        rng = state.get("rng") or []
        if rng:
            self._pending_rng = rng[self.ctx.rank] if len(rng) == self.ctx.world_size else rng[0]
        if self.ctx.is_main:
            print(f"search {self.stage}: resumed from {path} at iteration {self.iter}", flush=True)
        return True

    def _restore_pending_rng(self) -> None:
        if self._pending_rng is not None:
            restore_rng_state(self._pending_rng)
            self._pending_rng = None

    # ------------------------------------------------------------------------------- the loop

    def _log_arch(self, log: MetricsLog, epoch: int) -> None:
        neck_w, head_w = self.arch_weights()
        record = {"type": "arch", "stage": self.stage, "iter": self.iter, "epoch": epoch,
                  "expected_cost": float(self.expected_cost().detach())}
        if neck_w is not None:
            record["alpha"] = neck_w.detach().cpu().tolist()
        if head_w is not None:
            record["beta"] = head_w.detach().cpu().tolist()
        record.update(self.decisiveness())
        log.write(record)  # entropy, margin, parameter-free share also to TensorBoard (arch/...)
        if log.board is not None:
            log.board.arch_weights(self.stage, self.stage_weights(), self.link_pairs(), self.iter)

    def stage_weights(self) -> Tensor:
        """This stage's softmaxed weights ``Tensor[layers or cells, rows, ops]`` (detached, CPU)."""
        neck_w, head_w = self.arch_weights()
        return (neck_w if self.stage == "neck" else head_w).detach().cpu()

    def link_pairs(self) -> Optional[List[Tuple[int, int]]]:
        """(source, target) level of each neck link, in weight order (None for the head stage)."""
        return list(searched_neck(self.model).link_pairs) if self.stage == "neck" else None

    def decisiveness(self) -> Dict[str, float]:
        """Entropy, best-second margin and parameter-free share of this stage's weights."""
        from autofpn.search.decode import decisiveness
        neck_w, head_w = self.arch_weights()
        return decisiveness(neck_w if self.stage == "neck" else head_w,
                            NECK_OPS if self.stage == "neck" else HEAD_OPS)

    def search(self) -> Dict[str, Any]:
        """Run the stage to ``max_iter``; returns the decoded genotype of this stage."""
        self.set_train_mode()
        resumed = self.iter > 0 or self._pending_rng is not None
        board = TensorBoard(os.path.join(self.out_dir, "tensorboard"),
                            enabled=self.ctx.is_main and bool(self.cfg["train"]["tensorboard"]),
                            resume_iter=self.iter if resumed else None)
        log = MetricsLog(os.path.join(self.out_dir, "metrics.jsonl"), enabled=self.ctx.is_main,
                         resume_iter=self.iter if resumed else None, board=board)
        trajectory = MetricsLog(os.path.join(self.out_dir, "arch_trajectory.jsonl"), enabled=self.ctx.is_main,
                                resume_iter=self.iter if resumed else None, board=board)
        progress = Progress(self.max_iter, self.iter, enabled=self.ctx.is_main, desc=self.desc)
        ckpt_period = int(self.cfg["train"]["checkpoint_period"])
        log_period = max(int(self.cfg["train"]["log_period"]), 1)
        if not resumed:
            self._log_arch(trajectory, 0)
        self.clock.start()
        try:
            while self.iter < self.max_iter:
                epoch, start_batch = divmod(self.iter, self.iters_per_epoch)
                for loader in (self.loader_a, self.loader_b):
                    set_loader_position(loader, epoch, start_batch)
                if start_batch == 0:
                    self._restore_pending_rng()  # before the iterators draw their base seeds
                batches = zip(iter(self.loader_a), iter(self.loader_b))
                self._restore_pending_rng()  # mid-epoch: after those draws, as in the first run
                for (images_a, targets_a), (images_b, targets_b) in batches:
                    # the temperature this iteration's samples use (logged after the increment below)
                    record = {"tau": self.tau()} if self.sampled else {}
                    if self.iter >= self.arch_start_iter:
                        record.update(self.arch_step(images_b, targets_b))
                    record.update(self.weight_step(images_a, targets_a))
                    lr = self.w_optimizer.param_groups[0]["lr"]
                    progress.update({k: v for k, v in record.items() if k.startswith("loss") or k == "cost"},
                                    lr, len(images_a) * self.ctx.world_size)
                    self.iter += 1
                    if self.iter % log_period == 0 or self.iter == self.max_iter:
                        log.write({"type": "search", "stage": self.stage, "iter": self.iter, "epoch": epoch,
                                   "lr": lr, **record})
                        self._log_arch(trajectory, epoch)
                    if self.iter >= self.max_iter:
                        break
                    at_epoch_end = self.iter % self.iters_per_epoch == 0
                    if at_epoch_end or (ckpt_period > 0 and self.iter % ckpt_period == 0):
                        self.save_checkpoint()
                        board.arch_heatmap(self.stage, self.stage_weights(), self.link_pairs(), self.iter)
            self.save_checkpoint()
            board.arch_heatmap(self.stage, self.stage_weights(), self.link_pairs(), self.iter)
            self.seconds = self.clock.total()  # the stage's search time, as logged
            if self.ctx.is_main:
                log.write({"type": "time", "stage": self.stage, "iter": self.iter,
                           "seconds": self.seconds, "seconds_this_process": self.clock.this_process()})
                from autofpn.search.decode import format_decisiveness
                print(format_decisiveness(self.stage, self.decisiveness()), flush=True)
        finally:
            progress.close()
            board.close()
        return self.decode()

    def decode(self) -> Dict[str, Any]:
        """This stage's genotype: ``search.decode_rule`` applied to the softmax weights; with
        ``search.selection: perturbation`` the op of each kept link/edge is then the one whose
        removal from the trained supernet raises the loss most (``autofpn.search.perturbation``)."""
        from autofpn.search.decode import decode, decode_weights
        neck = searched_neck(self.model) if self.stage == "neck" else None
        head = self.model.roi_heads.box_head if self.stage == "head" else None
        rule = self.search_cfg["decode_rule"]
        if self.search_cfg["selection"] == "weights":
            return decode(self.model.arch, neck, head, rule=rule)
        weights, scores = self.stage_weights(), self.op_importance()
        if neck is not None:
            return decode_weights(weights, None, neck.levels, rule, neck_scores=scores)
        return decode_weights(None, weights, rule=rule, head_scores=scores)

    def op_importance(self) -> Tensor:
        """``Tensor[layers or cells, rows, ops]``: how much the detection loss on the first
        ``search.selection_batches`` batches of half B rises when each op is removed from the
        trained supernet; written to ``op_importance.json`` and read back by a rerun at the same
        iteration (a stage killed after its last step does not measure again)."""
        from autofpn.search.perturbation import fixed_batches, importance_record, op_importance
        path = os.path.join(self.out_dir, "op_importance.json")
        count = int(self.search_cfg["selection_batches"])
        if os.path.isfile(path):
            with open(path) as f:
                record = json.load(f)
            if record.get("iter") == self.iter and record.get("requested") == count:
                return torch.tensor(record["importance"], dtype=torch.float32)
        batches = fixed_batches(self.loader_b, count, self.ctx.device)
        self.set_train_mode()
        scores = op_importance(self.model, self.stage, batches, seed=search_seed(self.cfg),
                               progress=self.ctx.is_main)
        if self.ctx.is_main:
            ops = NECK_OPS if self.stage == "neck" else HEAD_OPS
            atomic_write_json({**importance_record(scores, ops, self.iter, len(batches)), "requested": count}, path)
        du.barrier()
        return scores


# ----------------------------------------------------------------------------------- stages

def search_transform(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """``model.transform`` with the search's input sizes (``search.min_size`` / ``max_size``,
    where set) in place of the training sizes."""
    t = dict(cfg["model"]["transform"])
    s = cfg["search"]
    if s["min_size"] is not None:
        sizes = s["min_size"] if isinstance(s["min_size"], (list, tuple)) else [s["min_size"]]
        if not sizes or any(not isinstance(v, int) or v <= 0 for v in sizes):
            raise ValueError(f"search.min_size must be a positive int or a list of them, got {s['min_size']!r}")
        t["min_size"] = list(sizes)
    if s["max_size"] is not None:
        if not isinstance(s["max_size"], int) or s["max_size"] <= 0:
            raise ValueError(f"search.max_size must be a positive int, got {s['max_size']!r}")
        t["max_size"] = s["max_size"]
    return t


def stage_config(cfg: Dict[str, Any], stage: str, neck_genotype: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The config a stage builds its detector from: the search's input sizes; the neck stage keeps
    the standard 2-MLP head; the head stage uses the searched neck (or FPN when
    ``head_with_searched_neck`` is off) and a head supernet ``search.head_channels`` wide."""
    cfg = copy.deepcopy(cfg)
    cfg["model"]["transform"] = search_transform(cfg)
    cfg["model"]["head"]["type"] = "mlp"
    if stage == "head":
        width = int(cfg["search"]["head_channels"])
        if width < 0:
            raise ValueError(f"search.head_channels must be >= 0 (0: model.head.channels), got {width}")
        cfg["model"]["head"]["channels"] = width or cfg["model"]["head"]["channels"]
        use_searched = cfg["search"]["head_with_searched_neck"] and neck_genotype is not None
        cfg["model"]["neck"]["type"] = "auto" if use_searched else "fpn"
        # the searched neck is trained inside the head search without norm, like the supernets
        cfg["model"]["neck"]["norm"] = cfg["search"]["searched_norm"]
    return cfg


def search_halves(cfg: Dict[str, Any], dataset=None):
    """``(Subset A, Subset B)``: the two disjoint halves of the training set (``dataset``, else
    built from the config) split by ``search.split_seed``; fills ``model.num_classes`` in. Every
    strategy searches on these (differentiable: A weights, B architecture; evolution: A trains
    each candidate, B scores it), never on ``data.val``."""
    from torch.utils.data import Subset

    from autofpn.data import build_dataset, resolve_num_classes
    if dataset is None:
        dataset = build_dataset(cfg, "train")
    resolve_num_classes(cfg, dataset)
    half_a, half_b = split_halves(len(dataset), int(cfg["search"]["split_seed"]))
    return Subset(dataset, half_a), Subset(dataset, half_b)


def build_search_loaders(cfg: Dict[str, Any], ctx: du.DistContext, dataset=None):
    """Loaders over the two disjoint halves (A: weights, B: architecture) of the training set
    (``dataset``, else built from the config)."""
    from autofpn.data import build_loader
    half_a, half_b = search_halves(cfg, dataset)
    seed = search_seed(cfg)
    loader_a = build_loader(cfg, half_a, train=True, seed=seed,
                            rank=ctx.rank, world_size=ctx.world_size)
    loader_b = build_loader(cfg, half_b, train=True, seed=seed + 1,
                            rank=ctx.rank, world_size=ctx.world_size)
    return loader_a, loader_b


def stages_to_run(cfg: Dict[str, Any]) -> List[str]:
    """The stages ``search.stage`` runs on ``model.detector``: ``both`` is every stage the
    detector has (a RetinaNet's or an SSD's neck only); a stage it lacks is a ConfigError."""
    from autofpn.config import ConfigError
    stage = cfg["search"]["stage"]
    if stage != "both" and stage not in STAGES:
        raise ValueError(f"search.stage must be neck, head or both, got {stage!r}")
    detector = cfg["model"]["detector"]
    if detector not in DETECTOR_STAGES:
        raise ConfigError(f"'model.detector' = {detector!r}: the search covers {', '.join(DETECTOR_STAGES)}")
    available = DETECTOR_STAGES[detector]
    if stage == "both":
        return list(available)
    if stage not in available:
        raise ConfigError(f"'search.stage' = {stage!r}: model.detector {detector!r} has no RoI head to search; "
                          f"set search.stage to {' or '.join(available)} (or both)")
    return [stage]


def check_config(cfg: Dict[str, Any]) -> None:
    """A stage the detector lacks, a selection an ensemble cannot use, or partial channels that
    do not divide a supernet's width fail before search.py claims the output folder."""
    from autofpn.config import ConfigError
    from autofpn.models.detector import partial_channels
    for stage in stages_to_run(cfg):  # the width each searched supernet is built at
        partial_channels(stage_config(cfg, stage, None), stage)
    if cfg["search"]["selection"] != "weights" and int(cfg["search"]["ensemble"]) > 1:
        raise ConfigError(f"'search.selection' = {cfg['search']['selection']!r} measures one trained supernet; "
                          f"search.ensemble > 1 decodes the mean weights of several: use one of the two")


@dataclass
class SearchResult:
    """What ``run_search`` found: the genotype (neck + head), and for each stage run in this
    call its final softmaxed architecture weights (an ensemble's: the members' mean) and, for the
    neck, the (source, target) level pair of each link (the caller draws them: ``autofpn.viz``)."""
    genotype: Dict[str, Any]
    stage_weights: Dict[str, Tensor] = field(default_factory=dict)
    link_pairs: Optional[List[Tuple[int, int]]] = None
    decisiveness: Dict[str, Dict[str, float]] = field(default_factory=dict)  # stage -> decode.decisiveness
    ensemble: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # stage -> ensemble.json of that stage


@dataclass
class StageSearch:
    """One finished search of one stage: its genotype part, final softmaxed weights
    ``Tensor[layers or cells, rows, ops]`` and search seconds (every process)."""
    part: Dict[str, Any]
    weights: Tensor
    seconds: float


def stage_time(stage_dir: str) -> Optional[float]:
    """Search seconds recorded when the stage in ``stage_dir`` finished (None: no record)."""
    done = [r for r in read_metrics(os.path.join(stage_dir, "metrics.jsonl")) if r["type"] == "time"]
    return done[-1]["seconds"] if done else None


def final_weights(stage_dir: str, stage: str) -> Tensor:
    """The softmaxed weights of the last record of a finished stage's ``arch_trajectory.jsonl``
    (written at the last iteration: the weights the stage decoded)."""
    path = os.path.join(stage_dir, "arch_trajectory.jsonl")
    records = read_metrics(path)
    key = "alpha" if stage == "neck" else "beta"
    if not records or key not in records[-1]:
        raise ValueError(f"{path}: no final '{key}' record; delete {stage_dir} to search this member again")
    return torch.tensor(records[-1][key], dtype=torch.float32)


def search_stage(cfg: Dict[str, Any], stage: str, neck_part: Optional[Dict[str, Any]], ctx: du.DistContext,
                 stage_dir: str, dataset, desc: Optional[str] = None, searcher_class: type = None) -> StageSearch:
    """One search of ``stage`` in ``stage_dir`` with the seed and data order of ``cfg``; resumes
    from the newest checkpoint there. ``neck_part``: the searched neck the head stage builds on;
    ``searcher_class``: ``Searcher`` (default) or a subclass with another relaxation (snas)."""
    from autofpn.models.detector import build_detector
    from autofpn.models.genotype import save_genotype
    loader_a, loader_b = build_search_loaders(cfg, ctx, dataset)
    stage_cfg = stage_config(cfg, stage, {"neck": neck_part} if neck_part else None)
    seed_everything(search_seed(cfg))  # same supernet and alpha on every rank
    model = build_detector(stage_cfg, genotype={"neck": neck_part, "head": None}, search=stage)
    searcher = (searcher_class or Searcher)(stage_cfg, stage, model, loader_a, loader_b, ctx, stage_dir, desc=desc)
    searcher.resume()
    stage_geno = searcher.search()
    if ctx.is_main:
        save_genotype(stage_geno, os.path.join(stage_dir, "genotype.json"))
        with open(os.path.join(stage_dir, "decisiveness.json"), "w") as f:
            json.dump(searcher.decisiveness(), f, indent=2)
    du.barrier()
    return StageSearch(stage_geno[stage], searcher.stage_weights(), searcher.seconds)


def search_ensemble_stage(cfg: Dict[str, Any], stage: str, neck_part: Optional[Dict[str, Any]],
                          ctx: du.DistContext, stage_dir: str, dataset,
                          searcher_class: type = None) -> Tuple[StageSearch, Dict[str, Any]]:
    """``search.ensemble`` = K searches of ``stage``, seeds ``search_seed .. +K-1`` (each exactly
    the search that seed would run alone), in ``<stage_dir>/seed_<s>/``; the stage is decoded
    from the mean of their final softmaxed weights. Decisions that follow one supernet's
    initialisation disagree between seeds and average out, those the members share stay
    (docs/STUDY.md, section 1). A member that finished earlier is read back, not searched again.
    Returns the stage and its report (members, their agreement, decisiveness of the mean)."""
    from autofpn.search.agreement import movement_agreement, trajectory_movement
    from autofpn.search.decode import decisiveness, decode_weights
    base, count = search_seed(cfg), int(cfg["search"]["ensemble"])
    members: List[StageSearch] = []
    for k, seed in enumerate(range(base, base + count)):
        member_dir = os.path.join(stage_dir, f"seed_{seed}")
        if os.path.isfile(os.path.join(member_dir, "genotype.json")):
            from autofpn.models.genotype import load_genotype
            members.append(StageSearch(load_genotype(os.path.join(member_dir, "genotype.json"))[stage],
                                       final_weights(member_dir, stage), stage_time(member_dir) or 0.0))
            if ctx.is_main:
                print(f"search {stage}: member seed {seed} already done ({member_dir})", flush=True)
            continue
        member_cfg = copy.deepcopy(cfg)
        member_cfg["search"]["seed"] = seed
        members.append(search_stage(member_cfg, stage, neck_part, ctx, member_dir, dataset,
                                    desc=f"search {stage} seed {seed} ({k + 1}/{count})",
                                    searcher_class=searcher_class))
    mean = torch.stack([m.weights for m in members]).mean(dim=0)
    levels = cfg["model"]["neck"]["levels"]
    rule = cfg["search"]["decode_rule"]
    part = decode_weights(mean if stage == "neck" else None, mean if stage == "head" else None, levels, rule)[stage]
    ops = NECK_OPS if stage == "neck" else HEAD_OPS
    seeds = list(range(base, base + count))
    moves = {f"seed_{s}": trajectory_movement(os.path.join(stage_dir, f"seed_{s}", "arch_trajectory.jsonl"), stage)
             for s in seeds}
    pairs = movement_agreement(moves, stage)
    report = {"seeds": seeds, "rule": rule,
              "agreement": {f"{a} vs {b}": r for (a, b), r in pairs.items()},
              "mean_agreement": sum(pairs.values()) / len(pairs) if pairs else None,
              "member_decisiveness": [decisiveness(m.weights, ops) for m in members],
              "decisiveness": decisiveness(mean, ops),
              "changed_from_first_member": _changed_rows(part, members[0].part, stage)}
    return StageSearch(part, mean, sum(m.seconds for m in members)), report


def _changed_rows(part: Dict[str, Any], other: Dict[str, Any], stage: str) -> int:
    """How many links / edges (kept or dropped, op) differ between two decoded stage parts."""
    key = "layers" if stage == "neck" else "cells"
    ident = (lambda e: (e["from"], e["to"])) if stage == "neck" else (lambda e: (e["input"], e["node"]))
    changed = 0
    for mine, theirs in zip(part[key], other[key]):
        a, b = ({ident(e): e["op"] for e in group} for group in (mine, theirs))
        changed += sum(a.get(r) != b.get(r) for r in set(a) | set(b))
    return changed


def format_ensemble(stage: str, report: Dict[str, Any]) -> str:
    """One line on an ensemble stage: its members and how far they agreed."""
    r = report["mean_agreement"]
    text = (f"search {stage}: decoded from the mean weights of {len(report['seeds'])} searches (seeds "
            f"{', '.join(map(str, report['seeds']))}); their weight movements agree {r:+.3f} on average "
            f"(about 0: each member's picks follow its own initialisation, and the mean keeps what they share); "
            f"{report['changed_from_first_member']} links/edges differ from the first member's decode")
    return text


def run_search(cfg: Dict[str, Any], ctx: du.DistContext, out_dir: str,
               neck_genotype: Optional[Dict[str, Any]] = None, dataset=None,
               searcher_class: type = None) -> SearchResult:
    """Run the configured stages; a finished stage (its ``<stage>/genotype.json`` exists) is not
    run again, an interrupted one resumes from its newest checkpoint. With ``search.ensemble`` > 1
    each stage is several searches (``search_ensemble_stage``). Writes ``geno.json`` and
    ``search_times.json``. ``dataset``: the training set when the caller has built it;
    ``searcher_class``: the stages' ``Searcher`` (another strategy's subclass: snas)."""
    from autofpn.data import build_dataset
    from autofpn.models.genotype import GENOTYPE_VERSION, load_genotype, save_genotype, validate_genotype
    from autofpn.search.decode import decisiveness

    if dataset is None:
        dataset = build_dataset(cfg, "train")
    parts: Dict[str, Optional[Dict[str, Any]]] = {"neck": None, "head": None}
    if neck_genotype is not None:
        parts["neck"] = neck_genotype.get("neck")
    times = {}
    result = SearchResult(genotype={})
    ensemble = int(cfg["search"]["ensemble"]) > 1
    stages = stages_to_run(cfg)
    if ctx.is_main and cfg["search"]["stage"] == "both" and stages != list(STAGES):
        print(f"search: model.detector {cfg['model']['detector']!r} has no RoI head: search.stage=both searches "
              f"the {' and '.join(stages)} only", flush=True)
    for stage in stages:
        stage_dir = os.path.join(out_dir, stage)
        geno_path = os.path.join(stage_dir, "genotype.json")
        if os.path.isfile(geno_path):
            parts[stage] = load_genotype(geno_path)[stage]
            if ctx.is_main:
                print(f"search {stage}: already done ({geno_path})", flush=True)
            seconds = stage_time(stage_dir)
            if seconds is not None:  # its time, recorded when it finished, stays in search_times.json
                times[stage] = seconds
            continue
        if ensemble:
            found, report = search_ensemble_stage(cfg, stage, parts["neck"], ctx, stage_dir, dataset, searcher_class)
            result.ensemble[stage] = report
            if ctx.is_main:
                with open(os.path.join(stage_dir, "ensemble.json"), "w") as f:
                    json.dump(report, f, indent=2)
                with open(os.path.join(stage_dir, "decisiveness.json"), "w") as f:
                    json.dump(report["decisiveness"], f, indent=2)
                # the stage's time, so a later run that finds the stage done keeps it
                MetricsLog(os.path.join(stage_dir, "metrics.jsonl"), enabled=True).write(
                    {"type": "time", "stage": stage, "seconds": found.seconds, "members": report["seeds"]})
                save_genotype({"version": GENOTYPE_VERSION, "decode_rule": cfg["search"]["decode_rule"],
                               "neck": None, "head": None, stage: found.part},
                              geno_path)
                print(format_ensemble(stage, report), flush=True)
            du.barrier()
        else:
            found = search_stage(cfg, stage, parts["neck"], ctx, stage_dir, dataset, searcher_class=searcher_class)
        parts[stage] = found.part
        result.stage_weights[stage] = found.weights
        result.decisiveness[stage] = decisiveness(found.weights, NECK_OPS if stage == "neck" else HEAD_OPS)
        if stage == "neck":
            levels = [int(lv) for lv in cfg["model"]["neck"]["levels"]]
            result.link_pairs = [(s, t) for t in levels for s in levels]  # AutoFusionNeck.link_pairs order
        times[stage] = found.seconds  # every process of the stage, resumes included
    result.genotype = validate_genotype({"version": GENOTYPE_VERSION, "name": "auto-fpn",
                                         "decode_rule": cfg["search"]["decode_rule"],
                                         "description": f"searched by search.py ({', '.join(stages)}"
                                                        + (f", {cfg['search']['strategy']}"
                                                           if cfg["search"]["strategy"] != "differentiable" else "")
                                                        + (f", ensemble of {cfg['search']['ensemble']} searches per stage"
                                                           if ensemble else "") + ")",
                                         "neck": parts["neck"], "head": parts["head"]})
    if ctx.is_main:
        save_genotype(result.genotype, os.path.join(out_dir, "geno.json"))
        with open(os.path.join(out_dir, "search_times.json"), "w") as f:
            json.dump(times, f, indent=2)
    return result
