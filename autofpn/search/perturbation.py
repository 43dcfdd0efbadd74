"""Perturbation-based op selection (``search.selection: perturbation``): what each op of a
link / edge adds to the trained supernet, measured by removing it.

DARTS' decode reads the softmax weights, but after a short search they sit near uniform and
their order follows the penalty and the initialisation more than the ops' worth (docs/STUDY.md,
sections 1 and 48: the searches' choice among convolutions of one kind ranks no better than
chance). Wang et al. (ICLR 2021, "Rethinking architecture selection in differentiable NAS",
DARTS-PT) select instead by the supernet's own validation performance: remove one op from one
edge, measure how much worse the supernet gets, keep the op whose removal hurts most. Here the
measure is the detection loss (the sum the search minimises) on fixed batches of the
architecture half B, every masked supernet on the same batches, the same resized sizes and the
same RoI samples (the torch RNG reseeded before each forward), so the differences are paired.
No fine-tuning between decisions (DARTS-PT's tuning epochs): one pass over all ops.

``importance[g, r, o] = loss(supernet with op o of row r of group g weighted 0) - loss(supernet)``,
0 for "none" (it outputs zeros: removing it changes nothing). The decode picks the op of each
kept link / edge by it, among the ops its rule allows, and keeps the rule's links / edges on the
softmax weights (``decode._choose``): removing any op also shrinks the link's output by its
weight, a shift common to all ops of the link that on the demo's searches lowered the loss for
most ops of most links, so the sign of an importance says little about whether to keep a link,
while the differences between the ops of one link cancel that shift.
"""
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from autofpn.engine import distributed as du


class _CachedOutput(nn.Module):
    """Stands in for a fixed module (the frozen backbone; the head stage's fixed neck) while the
    same batches are evaluated many times: the output of batch ``key`` is computed once."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.key = None
        self.cache: Dict[Any, Tuple[torch.Size, Any]] = {}

    def forward(self, x):
        shape = x.shape if torch.is_tensor(x) else tuple(v.shape for v in x.values())
        hit = self.cache.get(self.key)
        if hit is None or hit[0] != shape:  # a batch resized otherwise is computed again
            hit = (shape, self.module(x))
            self.cache[self.key] = hit
        return hit[1]


@contextmanager
def _cached(model: nn.Module, names: Sequence[str]) -> Iterator[List[_CachedOutput]]:
    """Replace ``model.<name>`` by a caching stand-in for the duration."""
    originals = {name: getattr(model, name) for name in names}
    stand_ins = [_CachedOutput(module) for module in originals.values()]
    try:
        for name, stand_in in zip(names, stand_ins):
            setattr(model, name, stand_in)
        yield stand_ins
    finally:
        for name, module in originals.items():
            setattr(model, name, module)


def _mean_loss(model: nn.Module, batches, seed: int, stand_ins: Sequence[_CachedOutput]) -> float:
    """Mean over ``batches`` of the summed detection losses, the torch RNG reseeded per batch."""
    total = 0.0
    for b, (images, targets) in enumerate(batches):
        for stand_in in stand_ins:
            stand_in.key = b
        torch.manual_seed(seed + b)
        total += float(sum(model(images, targets).values()))
    return total / len(batches)


def op_importance(model: nn.Module, stage: str, batches, seed: int = 0,
                  progress: bool = False) -> Tensor:
    """``Tensor[groups, rows, ops]``: the rise of the mean detection loss over ``batches`` (a list
    of ``(images, targets)`` on the model's device) when one op of one link (stage "neck") or edge
    ("head") of the supernet ``model`` is removed, its softmax weight set to 0 and the others left
    as they are; 0 for "none". The model runs in its current mode (train mode: the losses) without
    gradients; BatchNorm running statistics are restored afterwards. With several processes each
    rank evaluates its own batches and the result is their mean (the same on every rank)."""
    if stage not in ("neck", "head"):
        raise ValueError(f"stage must be neck or head, got {stage!r}")
    if not batches:
        raise ValueError("op_importance needs at least one batch")
    arch = model.arch
    neck_w, head_w = (None if w is None else w.detach() for w in (arch.neck_weights(), arch.head_weights()))
    searched = neck_w if stage == "neck" else head_w
    if searched is None:
        raise ValueError(f"the model has no {stage} supernet to perturb")
    groups, rows, ops = searched.shape
    fixed = ["backbone"] + (["neck"] if stage == "head" else [])  # what no perturbation changes
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or "num_batches" in k}
    importance = torch.zeros(groups, rows, ops, dtype=torch.float64)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=groups * rows * (ops - 1), desc=f"op importance {stage}", unit="op", leave=False)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), _cached(model, fixed) as stand_ins:
            base = _mean_loss(model, batches, seed, stand_ins)
            for g in range(groups):
                for r in range(rows):
                    for o in range(1, ops):  # "none" (index 0) adds nothing: importance 0
                        masked = searched.clone()
                        masked[g, r, o] = 0.0
                        weights = (masked, head_w) if stage == "neck" else (neck_w, masked)
                        with arch.overridden(*weights):
                            importance[g, r, o] = _mean_loss(model, batches, seed, stand_ins) - base
                        if bar is not None:
                            bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        model.load_state_dict(buffers, strict=False)
    if du.get_world_size() > 1:
        importance = du.all_reduce_mean(importance.to(searched.device)).cpu()
    return importance.float()


def fixed_batches(loader, count: int, device: torch.device) -> List[Tuple[List[Tensor], List[Dict[str, Any]]]]:
    """The first ``count`` batches of ``loader``'s epoch 0 on ``device`` (fewer if it has fewer)."""
    from autofpn.engine.trainer import move_to_device, set_loader_position
    if count < 1:
        raise ValueError(f"search.selection_batches must be >= 1, got {count}")
    set_loader_position(loader, 0, 0)
    out = []
    for images, targets in loader:
        out.append(move_to_device(images, targets, device))
        if len(out) == count:
            break
    return out


def importance_record(importance: Tensor, ops: Sequence[str], iteration: int, batches: int) -> Dict[str, Any]:
    """The JSON record a stage writes (``<stage>/op_importance.json``)."""
    return {"iter": iteration, "batches": batches, "ops": list(ops), "importance": importance.tolist()}
