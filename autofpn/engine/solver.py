"""Optimizer and learning-rate schedule.

``build_optimizer`` makes SGD with two parameter groups: weights that get ``weight_decay`` and
norm weights / biases that get ``weight_decay_norm_bias`` (0 by default: decaying a norm's scale
or a bias towards 0 only fights the normalisation). ``WarmupScheduler`` is a per-iteration
schedule: linear warm-up from ``warmup_factor * lr`` to ``lr``, then either step decay (x gamma
at each milestone) or cosine decay to ``min_lr``. It is a plain object with ``state_dict`` /
``load_state_dict`` so a resumed run continues the exact same curve.

Both are independent of the training loop, so the search loop reuses them for its weight
optimizer.
"""
import math
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import torch
from torch import nn

# Module types whose parameters are "norm" parameters (scale/shift), excluded from weight decay.
_NORM_TYPES: Tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
)


def split_decay_parameters(named_modules: Iterable[Tuple[str, nn.Module]],
                           only: set = None) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """Split trainable parameters into (decayed, norm-or-bias).

    Args:
        named_modules: ``model.named_modules()``.
        only: if given, a set of parameter ids to restrict to (e.g. the weight parameters of a
            supernet, leaving the architecture parameters out).
    Returns:
        (params with weight decay, norm weights and biases); every trainable parameter lands in
        exactly one list, each once even when modules share it.
    """
    decay, no_decay, seen = [], [], set()
    for _, module in named_modules:
        is_norm = isinstance(module, _NORM_TYPES)
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            if only is not None and id(param) not in only:
                continue
            seen.add(id(param))
            (no_decay if is_norm or name == "bias" else decay).append(param)
    return decay, no_decay


def build_optimizer(solver_cfg: Dict[str, Any], model: nn.Module,
                    params: Iterable[nn.Parameter] = None) -> torch.optim.SGD:
    """SGD over ``model``'s trainable parameters (or the subset ``params``).

    Args:
        solver_cfg: the ``solver`` section (lr, momentum, weight_decay, weight_decay_norm_bias).
        model: the module whose parameters are optimised (unwrapped, not DDP).
        params: optional subset of ``model``'s parameters.
    """
    only = None if params is None else {id(p) for p in params}
    decay, no_decay = split_decay_parameters(model.named_modules(), only)
    groups = [{"params": decay, "weight_decay": float(solver_cfg["weight_decay"])}]
    if no_decay:
        groups.append({"params": no_decay,
                       "weight_decay": float(solver_cfg["weight_decay_norm_bias"])})
    return torch.optim.SGD(groups, lr=float(solver_cfg["lr"]),
                           momentum=float(solver_cfg["momentum"]))


class WarmupScheduler:
    """Per-iteration lr: linear warm-up, then step or cosine decay.

    lr(it) = base_lr * warmup(it) * decay(it), where
      warmup(it) = warmup_factor + (1 - warmup_factor) * it / warmup_iters  for it < warmup_iters
      decay(it)  = gamma ** (number of milestones <= it)                     (schedule "step")
                 = min_lr/base_lr + (1 - min_lr/base_lr) * (1 + cos(pi * it / max_iters)) / 2
                                                                             (schedule "cosine")
    Call ``step()`` once after every optimizer step; ``last_iter`` is the next iteration index.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_iters: int, schedule: str = "step",
                 milestones: Sequence[int] = (), gamma: float = 0.1, min_lr: float = 0.0,
                 warmup_iters: int = 0, warmup_factor: float = 0.001):
        if schedule not in ("step", "cosine"):
            raise ValueError(f"solver.schedule must be 'step' or 'cosine', got {schedule!r}")
        if list(milestones) != sorted(milestones):
            raise ValueError(f"lr milestones must be increasing, got {list(milestones)}")
        self.optimizer = optimizer
        self.max_iters = max(int(max_iters), 1)
        self.schedule = schedule
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)
        self.min_lr = float(min_lr)
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        self.base_lrs = [g.setdefault("initial_lr", g["lr"]) for g in optimizer.param_groups]
        self.last_iter = 0
        self._apply()

    def factor(self, it: int, base_lr: float) -> float:
        """The multiplier of ``base_lr`` at iteration ``it``."""
        if self.schedule == "step":
            decay = self.gamma ** sum(1 for m in self.milestones if m <= it)
        else:
            floor = self.min_lr / base_lr if base_lr > 0 else 0.0
            progress = min(it, self.max_iters) / self.max_iters
            decay = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            decay *= self.warmup_factor * (1.0 - alpha) + alpha
        return decay

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * self.factor(self.last_iter, base)

    def step(self) -> None:
        self.last_iter += 1
        self._apply()

    def get_last_lr(self) -> List[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, Any]:
        return {"last_iter": self.last_iter, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.last_iter = int(state["last_iter"])
        self.base_lrs = [float(b) for b in state["base_lrs"]]
        self._apply()


def build_scheduler(solver_cfg: Dict[str, Any], optimizer: torch.optim.Optimizer,
                    iters_per_epoch: int, max_iters: int) -> WarmupScheduler:
    """The schedule of the ``solver`` section; ``solver.steps`` are epochs, converted here."""
    milestones = [int(round(e * iters_per_epoch)) for e in solver_cfg["steps"]]
    return WarmupScheduler(optimizer, max_iters=max_iters, schedule=solver_cfg["schedule"],
                           milestones=milestones, gamma=solver_cfg["gamma"],
                           min_lr=solver_cfg["min_lr"], warmup_iters=solver_cfg["warmup_iters"],
                           warmup_factor=solver_cfg["warmup_factor"])
