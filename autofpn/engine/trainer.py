"""The training loop of a fixed detector, in pieces the search loop can reuse.

Reusable pieces (the ``Searcher`` of the search issue builds on them):
  ``seed_everything``        python / numpy / torch seeds;
  ``move_to_device``         images + targets to a device;
  ``check_finite_losses``    NaN/Inf check across ranks, raising ``NonFiniteLossError`` that names
                             the iteration and the loss term;
  ``inject_nan_for_test``    the tiny test hook (``train.debug_nan_at: "ITER:TERM"``);
  ``set_loader_position``    sampler epoch + start batch for resuming mid-epoch;
  ``recompute_bn_statistics`` BatchNorm statistics at the current weights (precise BN);
  ``Trainer``                SGD step with AMP / clipping, checkpoints, resume, eval, logs, plots.

Resume is exact on the CPU: the checkpoint holds model, optimizer, scheduler, scaler, the next
iteration and every rank's RNG states. The sampler is re-positioned to the next batch of the
epoch, and the RNG states are restored at the point where the uninterrupted run had them (see
``Trainer.train``: creating a DataLoader iterator draws from the torch generator, so the restore
goes after that draw when resuming mid-epoch and before it at an epoch boundary).
"""
import logging
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from autofpn.engine import distributed as du
from autofpn.engine.checkpoint import (CheckpointError, CheckpointManager, atomic_torch_save, capture_rng_state,
                                       load_checkpoint, restore_rng_state)
from autofpn.engine.logging import MetricsLog, Progress, RunClock, TensorBoard, read_metrics
from autofpn.engine.runs import dataset_classes
from autofpn.engine.solver import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or Inf; the message names the iteration and the term."""


def seed_everything(seed: int) -> None:
    import random
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def move_to_device(images: Sequence[torch.Tensor], targets: Sequence[Dict[str, Any]],
                   device: torch.device) -> Tuple[List[torch.Tensor], List[Dict[str, Any]]]:
    """images ``List[Tensor[3,H,W]]`` and targets ``List[dict]`` -> same structure on ``device``."""
    images = [img.to(device, non_blocking=True) for img in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
                for k, v in t.items()} for t in targets]
    return images, targets


def parse_nan_hook(spec: Optional[str]) -> Optional[Tuple[int, str]]:
    """``"ITER:TERM"`` (e.g. ``"7:loss_cls"``) -> (7, "loss_cls"); empty/None -> None."""
    if not spec:
        return None
    try:
        it, term = str(spec).split(":", 1)
        return int(it), term.strip()
    except ValueError as e:
        raise ValueError(f"train.debug_nan_at must look like 'ITER:TERM', got {spec!r}") from e


def inject_nan_for_test(losses: Dict[str, torch.Tensor], iteration: int,
                        hook: Optional[Tuple[int, str]]) -> Dict[str, torch.Tensor]:
    """Test hook: at iteration ``hook[0]`` the loss term ``hook[1]`` becomes NaN (all ranks)."""
    if hook is not None and iteration == hook[0]:
        if hook[1] not in losses:
            raise KeyError(f"train.debug_nan_at names loss term {hook[1]!r}; "
                           f"terms are {sorted(losses)}")
        losses = dict(losses)
        losses[hook[1]] = losses[hook[1]] * float("nan")
    return losses


def check_finite_losses(losses: Dict[str, torch.Tensor], iteration: int,
                        device: torch.device) -> None:
    """Raise ``NonFiniteLossError`` on every rank if any rank has a NaN/Inf loss term."""
    bad = [(name, float(v.detach())) for name, v in sorted(losses.items())
           if not torch.isfinite(v.detach()).all()]
    if not du.any_true(bool(bad), device):
        return
    reports = du.all_gather_object((du.get_rank(), bad))
    parts = [f"{name}={value} (rank {rank})" for rank, terms in reports for name, value in terms]
    raise NonFiniteLossError(f"non-finite loss at iteration {iteration}: {', '.join(parts)}; "
                             "stopping, the last good checkpoint is kept")


def set_loader_position(loader, epoch: int, start_batch: int) -> None:
    """Seed the sampler for ``epoch`` and make it skip the first ``start_batch`` batches."""
    for sampler in (getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        if sampler is not None and hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
    batch_sampler = loader.batch_sampler
    if hasattr(batch_sampler, "set_start_iter"):
        batch_sampler.set_start_iter(start_batch)
    elif start_batch:
        raise RuntimeError("the training loader's batch sampler cannot start mid-epoch "
                           "(no set_start_iter); cannot resume at batch "
                           f"{start_batch} of epoch {epoch}")


def recompute_bn_statistics(model: nn.Module, loader, num_batches: int, device: torch.device,
                            epoch: int = 0) -> int:
    """Replace the running statistics of every ``BatchNorm`` layer of ``model`` by their average
    over ``num_batches`` training batches at the current weights ("precise BN", as detectron2's
    hook). Returns the number of batches used (0: the model has no BatchNorm layer).

    Why: during training a BN layer normalises with the batch's statistics and keeps an
    exponential average (momentum 0.1, about the last 10 batches) for evaluation. When the
    features under it move while training (a backbone with frozen BN statistics and trainable
    convolutions feeding a BN neck, a high learning rate, few images per batch), that average
    describes earlier weights: a retrained Auto-fusion neck with BN gave neck outputs 7-15x off
    in eval mode and 0 detections, on real data with an ImageNet MobileNetV2 (README).

    The batches are the loader's order for ``epoch`` (``set_epoch``); the model runs its training
    forward (so RoI-head layers see sampled RoIs, as in training) without gradients, and the RNG
    state is restored afterwards, so training continues exactly as without this step. Under
    torch.distributed the statistics are averaged over the ranks (every rank must call it)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or num_batches <= 0:
        return 0
    was_training = model.training
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    model.train()
    used = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        set_loader_position(loader, epoch, 0)
        for images, targets in loader:
            model(*move_to_device(images, targets, device))
            used += 1
            if used == num_batches:
                break
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    if torch.distributed.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_world_size() > 1:
        for m in bns:
            for stat in (m.running_mean, m.running_var):
                torch.distributed.all_reduce(stat)
                stat /= torch.distributed.get_world_size()
    model.train(was_training)
    return used


def collapsed_bn_layers(model: nn.Module) -> List[str]:
    """Names of the BatchNorm layers whose running variance is below their ``eps`` in at least
    half of their channels: layers fed a (nearly) constant input. In evaluation mode such a layer
    divides rounding noise by about sqrt(eps) and passes it on, at hundreds of times its training
    scale. Seen on real data (docs/STUDY.md, section 17): a BN Auto-fusion neck let MobileNetV2's
    C5 (ReLU6) saturate to one value per channel, and the detector found nothing in eval mode."""
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_var is not None
            and (m.running_var < m.eps).float().mean().item() >= 0.5]


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class Trainer:
    """Trains ``model`` with the ``solver`` / ``train`` sections of ``cfg``.

    Args:
        cfg: the resolved config.
        model: the detector (not yet wrapped; moved to ``ctx.device`` here, DDP when distributed).
        train_loader: yields (images, targets); its batch sampler has ``set_epoch`` and
            ``set_start_iter``; ``len(train_loader)`` = batches per epoch on this rank.
        ctx: this process's ``DistContext``.
        evaluate: ``evaluate(model, out_dir) -> summary dict`` (keys "AP", "AP50", ...), run on
            every rank (it gathers results itself), or None for no evaluation.
        genotype: stored in checkpoints so a checkpoint rebuilds its own detector.
        val_dataset: the validation set; at the final evaluation the first ``eval.draw_images``
            of its images are drawn with the detections (None: no pictures).
    """

    def __init__(self, cfg: Dict[str, Any], model: nn.Module, train_loader, ctx: du.DistContext,
                 evaluate: Optional[Callable[[nn.Module, str], Dict[str, float]]] = None,
                 genotype: Optional[Dict[str, Any]] = None, val_dataset=None):
        self.cfg = cfg
        self.ctx = ctx
        self.solver_cfg = cfg["solver"]
        self.train_cfg = cfg["train"]
        self.out_dir = self.train_cfg["output_dir"]
        self.genotype = genotype
        self.evaluate_fn = evaluate
        self.train_loader = train_loader
        self.val_dataset = val_dataset
        # what the labels mean, kept with the weights (predictions name classes without the data)
        self.classes = dataset_classes(getattr(train_loader, "dataset", None))

        model.to(ctx.device)
        self.optimizer = build_optimizer(self.solver_cfg, model)
        self.iters_per_epoch = len(train_loader)
        if self.iters_per_epoch == 0:
            raise ValueError("the training loader is empty (no images on this rank)")
        self.epochs = int(self.solver_cfg["epochs"])
        self.max_iter = self.epochs * self.iters_per_epoch
        if self.solver_cfg["max_iters"] > 0:
            self.max_iter = min(self.max_iter, int(self.solver_cfg["max_iters"]))
        self.scheduler = build_scheduler(self.solver_cfg, self.optimizer, self.iters_per_epoch,
                                         self.max_iter)
        self.use_amp = bool(self.solver_cfg["amp"]) and ctx.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

        self.raw_model = model
        if ctx.distributed:
            kwargs = {"device_ids": [ctx.device.index]} if ctx.device.type == "cuda" else {}
            self.model = nn.parallel.DistributedDataParallel(
                model, find_unused_parameters=bool(self.train_cfg["find_unused_parameters"]),
                **kwargs)
        else:
            self.model = model

        self.checkpoints = CheckpointManager(os.path.join(self.out_dir, "checkpoints"),
                                             keep=self.train_cfg["keep_checkpoints"],
                                             enabled=ctx.is_main)
        self.nan_hook = parse_nan_hook(self.train_cfg["debug_nan_at"])
        self.iter = 0  # the next iteration to run (global, 0-based)
        self.best_metric = -math.inf
        self.history: List[Dict[str, float]] = []  # per-iteration losses on this rank
        self._pending_rng: Optional[Dict[str, Any]] = None
        self.clock = RunClock()  # training seconds over every process of this run
        self._precise_bn_iter: Optional[int] = None  # iteration of the last BN recomputation
        self.metrics_log: Optional[MetricsLog] = None

    # ----------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> Dict[str, Any]:
        """Everything needed to continue; collective (gathers every rank's RNG state)."""
        rng_states = du.all_gather_object(capture_rng_state())
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iter": self.iter,
            "epoch": self.iter // self.iters_per_epoch,
            "best_metric": self.best_metric,
            "rng": rng_states,
            "world_size": self.ctx.world_size,
            "cfg": self.cfg,
            "genotype": self.genotype,
            "classes": self.classes,
            "seconds": self.clock.total(),
        }

    def save_checkpoint(self, is_best: bool = False) -> None:
        state = self.state_dict()  # every rank takes part in the RNG gather
        self.checkpoints.save(state, self.iter, is_best=is_best)
        du.barrier()

    def resume(self, path: Optional[str] = None, required: bool = False) -> bool:
        """Load ``path`` or the newest checkpoint of the output folder. Returns True if loaded."""
        if path:
            state = load_checkpoint(path)
        else:
            path, state = self.checkpoints.load_latest()
        if path is None:
            if required:
                raise CheckpointError(f"{self.checkpoints.folder}: --resume, but the folder has no checkpoint")
            return False
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.iter = int(state["iter"])
        self.clock.before = float(state.get("seconds", 0.0))
        self.best_metric = float(state.get("best_metric", -math.inf))
        rng = state.get("rng") or []
        if len(rng) == self.ctx.world_size:
            self._pending_rng = rng[self.ctx.rank]
        elif rng:  # different number of processes: the run continues, not bit-exactly
            self._pending_rng = rng[0]
        if self.ctx.is_main:
            print(f"resumed from {path} at iteration {self.iter}", flush=True)
        return True

    def _restore_pending_rng(self) -> None:
        if self._pending_rng is not None:
            restore_rng_state(self._pending_rng)
            self._pending_rng = None

    # ----------------------------------------------------------------------------- one step

    def run_step(self, images, targets) -> Dict[str, float]:
        """Forward, NaN check, backward, (clip), optimizer and scheduler step. Returns the
        local loss terms as floats (plus "loss", their sum)."""
        images, targets = move_to_device(images, targets, self.ctx.device)
        with torch.autocast(device_type=self.ctx.device.type, dtype=torch.float16,
                            enabled=self.use_amp):
            losses = self.model(images, targets)
        losses = inject_nan_for_test(losses, self.iter, self.nan_hook)
        check_finite_losses(losses, self.iter, self.ctx.device)
        total = sum(losses.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        clip = float(self.solver_cfg["clip_grad_norm"])
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups
                                      for p in g["params"]], clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["loss"] = float(total.detach())
        return out

    # ----------------------------------------------------------------------------- evaluation

    def evaluate(self) -> Optional[Dict[str, float]]:
        """Run the evaluation on every rank; log it on rank 0. Returns the summary."""
        if self.evaluate_fn is None:
            return None
        self.precise_bn()
        eval_dir = os.path.join(self.out_dir, "eval", f"iter_{self.iter:07d}")
        summary = self.evaluate_fn(self.raw_model, eval_dir)
        self.raw_model.train()
        if self.metrics_log is not None and summary:
            self.metrics_log.write({"type": "eval", "iter": self.iter,
                                    **{k: float(v) for k, v in summary.items()
                                       if isinstance(v, (int, float))}})
        return summary

    def draw_detections(self) -> List[str]:
        """The first ``eval.draw_images`` validation images with the model's detections drawn
        (score >= 0.5), as the demo draws them: ``<output_dir>/detections/val_<i>.jpg``. Main
        process only, and only for a run that evaluates. Returns the paths."""
        count = int(self.cfg["eval"]["draw_images"])
        if count <= 0 or self.val_dataset is None or self.evaluate_fn is None or not self.ctx.is_main:
            return []
        from autofpn.viz.detections import save_dataset_detections
        written = save_dataset_detections(self.raw_model, self.val_dataset,
                                          os.path.join(self.out_dir, "detections"), count, prefix="val")
        logger.info("%d validation images with their detections drawn in %s (eval.draw_images)",
                    len(written), os.path.join(self.out_dir, "detections"))
        return written

    def precise_bn(self) -> None:
        """BatchNorm statistics at the current weights (``train.precise_bn_batches``), see
        ``recompute_bn_statistics``; once per iteration count."""
        if self._precise_bn_iter == self.iter:
            return
        self._precise_bn_iter = self.iter
        # an epoch the training never reaches: its own order, away from any resume position
        used = recompute_bn_statistics(self.raw_model, self.train_loader, int(self.train_cfg["precise_bn_batches"]),
                                       self.ctx.device, epoch=self.epochs + 1)
        if used and self.ctx.is_main:
            logger.info("BatchNorm statistics recomputed at iteration %d over %d training batches "
                        "(train.precise_bn_batches)", self.iter, used)
        collapsed = collapsed_bn_layers(self.raw_model)
        if collapsed and self.ctx.is_main:
            logger.warning("%d BatchNorm layer(s) normalise a constant input (running variance below eps in most "
                           "channels), so evaluation will amplify rounding noise: %s. Usually a saturated or "
                           "dead backbone level feeding a BN neck; model.neck.norm=gn avoids the feedback "
                           "(docs/STUDY.md, section 17)", len(collapsed),
                           ", ".join(collapsed[:4]) + (", ..." if len(collapsed) > 4 else ""))

    def _eval_due(self, epoch_done: int) -> bool:
        period = int(self.train_cfg["eval_period"])
        return period > 0 and epoch_done % period == 0 and self.iter < self.max_iter

    def _plot(self) -> None:
        if self.ctx.is_main:
            from autofpn.viz.curves import plot_curves
            plot_curves(read_metrics(self.metrics_log.path), self.out_dir)

    # ----------------------------------------------------------------------------- the loop

    def train(self) -> Optional[Dict[str, float]]:
        """Train from ``self.iter`` to ``self.max_iter``; final evaluation. Returns its summary."""
        self.raw_model.train()
        resumed = self.iter > 0 or self._pending_rng is not None
        # TensorBoard (train.tensorboard): the same records' numbers: train/loss*, train/lr,
        # train/images_per_s, eval/AP*
        board = TensorBoard(os.path.join(self.out_dir, "tensorboard"),
                            enabled=self.ctx.is_main and bool(self.train_cfg["tensorboard"]),
                            resume_iter=self.iter if resumed else None)
        self.metrics_log = MetricsLog(os.path.join(self.out_dir, "metrics.jsonl"),
                                      enabled=self.ctx.is_main,
                                      resume_iter=self.iter if resumed else None, board=board)
        progress = Progress(self.max_iter, self.iter, enabled=self.ctx.is_main)
        log_period = max(int(self.train_cfg["log_period"]), 1)
        ckpt_period = int(self.train_cfg["checkpoint_period"])
        self.clock.start()
        try:
            while self.iter < self.max_iter:
                epoch, start_batch = divmod(self.iter, self.iters_per_epoch)
                set_loader_position(self.train_loader, epoch, start_batch)
                if start_batch == 0:
                    self._restore_pending_rng()  # before the iterator draws its base seed
                batches = iter(self.train_loader)
                self._restore_pending_rng()  # mid-epoch: after that draw, as in the first run
                for images, targets in batches:
                    losses = self.run_step(images, targets)
                    self.history.append(losses)
                    lr = self.optimizer.param_groups[0]["lr"]
                    img_s = progress.update(losses, lr, len(images) * self.ctx.world_size)
                    self.iter += 1
                    if self.iter % log_period == 0 or self.iter == self.max_iter:
                        self._log_train(losses, lr, img_s, epoch)
                    if self.iter >= self.max_iter:
                        break
                    if ckpt_period > 0 and self.iter % ckpt_period == 0 \
                            and self.iter % self.iters_per_epoch != 0:
                        self.save_checkpoint()
                epoch_done = self.iter // self.iters_per_epoch
                if self.iter < self.max_iter:  # a full epoch ended (the last one is below)
                    summary = self.evaluate() if self._eval_due(epoch_done) else None
                    is_best = self._update_best(summary)
                    self.save_checkpoint(is_best=is_best)
                    self._plot()
            # the final weights reach the disk before the final evaluation: a crash there (a bad
            # image, a killed job) loses no training, and running again only evaluates again
            self.precise_bn()
            self.save_checkpoint()
            if self.ctx.is_main:
                atomic_torch_save({"model": self.raw_model.state_dict(), "cfg": self.cfg,
                                   "genotype": self.genotype, "classes": self.classes},
                                  os.path.join(self.out_dir, "model_final.pth"))
            summary = self.evaluate()
            self.draw_detections()
            if self._update_best(summary):
                self.save_checkpoint(is_best=True)
            if self.ctx.is_main:
                self.metrics_log.write({"type": "time", "iter": self.iter,
                                        "seconds": self.clock.total(),  # resumed runs included
                                        "seconds_this_process": self.clock.this_process()})
            self._plot()
            return summary
        finally:
            progress.close()
            board.close()

    def _update_best(self, summary: Optional[Dict[str, float]]) -> bool:
        if not summary or "AP" not in summary:
            return False
        if float(summary["AP"]) > self.best_metric:
            self.best_metric = float(summary["AP"])
            return True
        return False

    def _log_train(self, local_losses: Dict[str, float], lr: float, img_s: float,
                   epoch: int) -> None:
        # Reduce this iteration's terms over ranks (a collective: every rank calls it).
        reduced = du.reduce_loss_dict({k: torch.tensor(v, device=self.ctx.device)
                                       for k, v in local_losses.items()})
        self.metrics_log.write({"type": "train", "iter": self.iter, "epoch": epoch, "lr": lr,
                                "images_per_s": img_s, **reduced})
