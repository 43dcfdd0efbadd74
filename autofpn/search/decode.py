"""Decode architecture weights into a genotype, and a command line to do it from a checkpoint.

Rules (the op of a link/edge is chosen by argmax of its softmax weights, or with
``search.selection: perturbation`` by its importance among the ops the rule may pick; which
links/edges are kept is always the rule's on the softmax weights):

- ``"argmax"`` (the paper: "argmax per link/edge"): argmax over all ops, "none" included. A
  link/edge whose argmax is "none" is dropped, so the decoded neck keeps only the links the
  search kept (the paper's Fig. 4 shows a sparse Auto-fusion). If that would leave a target level
  (neck) or an intermediate node (head) without any input, the one input whose strongest
  non-none op has the largest weight is kept, so the module stays well formed.
- ``"argmax_nonnone"`` (DARTS' op choice): "none" is excluded from the argmax; every link/edge
  is kept with its strongest non-none op (a dense neck/head).
- ``"top2"`` (DARTS' full rule): op = argmax over non-none ops; each target level / node keeps the
  2 inputs whose chosen op has the largest weight.
- ``"argmax_head_noidentity"``: the neck by ``"argmax"``; the head by ``"argmax"`` with identity
  left out of the choice (an edge whose argmax is identity gets its next op, or "none"). Against
  the parameter-free collapse of the head: the one "large" search of the study that lost to FPN
  had 14 identity edges of 28 where the winners had 1-3 (docs/STUDY.md, section 6).
- ``"argmax_head_dropidentity"``: the neck by ``"argmax"``; in the head identity counts as
  "none": an edge is kept only when a convolution wins its argmax (identity and "none" lose), with
  that convolution; a node left without input keeps its strongest convolution edge. The same
  guard against the collapse without replacing identity edges by convolutions, so the head stays
  as small as argmax's (docs/STUDY.md, section 10).

    python -m autofpn.search.decode --checkpoint out/search/last.pth --out genotype.json [--rule argmax]
    python -m autofpn.viz.genotype_diagram genotype.json --out genotype   # then draw it
"""
import argparse
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from autofpn.models.genotype import GENOTYPE_VERSION, save_genotype, validate_genotype
from autofpn.models.auto_head import EDGE_PAIRS
from autofpn.models.operations import HEAD_OPS, NECK_OPS

DECODE_RULES = ("argmax", "argmax_nonnone", "top2", "argmax_head_noidentity", "argmax_head_dropidentity")
# rules that decode the neck with "argmax" and treat identity specially in the head only
HEAD_IDENTITY_RULES = ("argmax_head_noidentity", "argmax_head_dropidentity")


def _choose(weights: Tensor, pairs: Sequence[Tuple[int, int]], ops: Sequence[str],
            rule: str, scores: Optional[Tensor] = None) -> List[Tuple[Tuple[int, int], str]]:
    """weights: Tensor[len(pairs), len(ops)] (softmaxed) of one layer / cell; pairs (src, dst).
    ``scores`` (same shape, e.g. the ops' importances of ``search.selection: perturbation``):
    the op of each kept link/edge is its best-scored op among those the rule may pick ("none"
    never; identity not under the head-identity rules), the kept links/edges still the rule's on
    ``weights``. Returns the kept [((src, dst), op), ...] in ``pairs`` order."""
    assert ops[0] == "none"
    identity = ops.index("identity")
    if scores is not None:
        allowed = scores.detach().float().cpu().clone()
        allowed[:, 0] = float("-inf")
        if rule in HEAD_IDENTITY_RULES:
            allowed[:, identity] = float("-inf")
        scored_k = allowed.argmax(dim=1)
    if rule in HEAD_IDENTITY_RULES:  # the head's rules (the neck is decoded with "argmax")
        weights = weights.clone()
        if rule == "argmax_head_dropidentity":  # "none" wins wherever identity or "none" did
            weights[:, 0] = torch.maximum(weights[:, 0], weights[:, identity])
        weights[:, identity] = float("-inf")  # below any weight: never chosen
        rule = "argmax"
    best_w, best_k = weights[:, 1:].max(dim=1)  # strongest non-none op per link
    best_k = best_k + 1
    if rule == "argmax_nonnone":
        keep = set(range(len(pairs)))
    elif rule == "argmax":
        keep = {i for i in range(len(pairs)) if weights[i].argmax().item() != 0}
    elif rule == "top2":
        keep = set()
    else:
        raise ValueError(f"unknown decode rule '{rule}'; valid: {', '.join(DECODE_RULES)}")
    if scores is not None:
        best_k = scored_k
    for dst in sorted({d for _, d in pairs}):
        incoming = [i for i, (_, d) in enumerate(pairs) if d == dst]
        ranked = sorted(incoming, key=lambda i: -best_w[i].item())
        if rule == "top2":
            keep.update(ranked[:2])
        elif not keep.intersection(incoming):  # "argmax" left this target without input
            keep.add(ranked[0])
    return [(pairs[i], ops[best_k[i].item()]) for i in range(len(pairs)) if i in keep]


def decode_weights(neck_weights: Optional[Tensor], head_weights: Optional[Tensor],
                   levels: Sequence[int] = (2, 3, 4, 5), rule: str = "argmax",
                   neck_scores: Optional[Tensor] = None, head_scores: Optional[Tensor] = None) -> Dict[str, Any]:
    """neck_weights: Tensor[layers, len(levels)**2, len(NECK_OPS)] or None; head_weights:
    Tensor[cells, 14, len(HEAD_OPS)] or None (both softmaxed). ``neck_scores`` / ``head_scores``
    (shaped like the weights, or None): the ops of the kept links/edges by these instead (see
    ``_choose``). Returns a validated genotype."""
    for name, scores, weights in (("neck", neck_scores, neck_weights), ("head", head_scores, head_weights)):
        if scores is not None and (weights is None or tuple(scores.shape) != tuple(weights.shape)):
            raise ValueError(f"{name} scores of shape {tuple(scores.shape)} do not match its weights "
                             f"{None if weights is None else tuple(weights.shape)}")
    genotype: Dict[str, Any] = {"version": GENOTYPE_VERSION, "decode_rule": rule,
                                "neck": None, "head": None}
    if neck_weights is not None:
        levels = [int(lv) for lv in levels]
        pairs = [(s, t) for t in levels for s in levels]  # same order as AutoFusionNeck.link_pairs
        if tuple(neck_weights.shape[1:]) != (len(pairs), len(NECK_OPS)):
            raise ValueError(f"neck weights of shape {tuple(neck_weights.shape)} do not fit levels "
                             f"{levels} (expected [layers, {len(pairs)}, {len(NECK_OPS)}])")
        genotype["neck"] = {"levels": levels, "layers": [
            [{"from": s, "to": t, "op": op}
             for (s, t), op in _choose(w, pairs, NECK_OPS, "argmax" if rule in HEAD_IDENTITY_RULES else rule,
                                       None if neck_scores is None else neck_scores[g])]
            for g, w in enumerate(neck_weights.detach().float().cpu())]}
    if head_weights is not None:
        if tuple(head_weights.shape[1:]) != (len(EDGE_PAIRS), len(HEAD_OPS)):
            raise ValueError(f"head weights of shape {tuple(head_weights.shape)}, expected "
                             f"[cells, {len(EDGE_PAIRS)}, {len(HEAD_OPS)}]")
        genotype["head"] = {"cells": [
            [{"node": n, "input": k, "op": op}
             for (k, n), op in _choose(w, EDGE_PAIRS, HEAD_OPS, rule, None if head_scores is None else head_scores[c])]
            for c, w in enumerate(head_weights.detach().float().cpu())]}
    return validate_genotype(genotype)


def decode(architecture, neck=None, head=None, rule: str = "argmax") -> Dict[str, Any]:
    """Genotype of ``architecture`` (an ``Architecture``) for the supernet ``neck`` / ``head``
    (used for the levels and to check the shapes; None when that part was not searched)."""
    neck_w, head_w = architecture.neck_weights(), architecture.head_weights()
    if neck is not None and (neck_w is None or tuple(neck_w.shape) != neck.arch_shape):
        raise ValueError(f"alpha does not match the neck supernet {neck.arch_shape}")
    if head is not None and (head_w is None or tuple(head_w.shape) != head.arch_shape):
        raise ValueError(f"beta does not match the head supernet {head.arch_shape}")
    return decode_weights(neck_w if neck is not None else None, head_w if head is not None else None,
                          neck.levels if neck is not None else (2, 3, 4, 5), rule)


# Below this mean margin between the best and the second op, argmax picks are mostly noise:
# the search has not decided (on the demo, 30 iterations left margins of ~0.01).
DECISIVE_MARGIN = 0.05
PARAMETER_FREE_OPS = ("none", "identity")


def decisiveness(weights: Tensor, ops: Sequence[str]) -> Dict[str, float]:
    """How decided a search is, from its softmaxed weights ``Tensor[groups, rows, len(ops)]``
    (one row per neck link / head edge):

    - ``entropy``: mean entropy of a row over log(len(ops)) (1 = uniform, 0 = one-hot);
    - ``margin``: mean of (best - second best) weight of a row (0 = undecided);
    - ``min_margin``: the smallest of those;
    - ``parameter_free``: share of rows whose argmax is "none" or "identity" (a rising share
      is the usual first sign of DARTS' parameter-free collapse);
    - ``none``: share of rows whose argmax is "none".
    """
    w = weights.detach().float().cpu().reshape(-1, weights.shape[-1]).clamp_min(1e-12)  # a search's are on its device
    entropy = -(w * w.log()).sum(dim=1) / torch.log(torch.tensor(float(len(ops))))
    top2 = w.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    best = w.argmax(dim=1)
    free = torch.tensor([ops.index(o) for o in PARAMETER_FREE_OPS])
    return {"entropy": float(entropy.mean()), "margin": float(margin.mean()), "min_margin": float(margin.min()),
            "parameter_free": float(torch.isin(best, free).float().mean()),
            "none": float((best == ops.index("none")).float().mean())}


def format_decisiveness(stage: str, d: Dict[str, float]) -> str:
    """One line for logs and the demo; ends with a warning when argmax means little."""
    text = (f"search {stage}: entropy {d['entropy']:.3f} of uniform, best-second margin {d['margin']:.3f} "
            f"(min {d['min_margin']:.3f}), argmax parameter-free on {100 * d['parameter_free']:.0f} % "
            f"({100 * d['none']:.0f} % none)")
    if d["margin"] < DECISIVE_MARGIN:
        text += (f"\nWARNING: mean margin {d['margin']:.3f} < {DECISIVE_MARGIN}: the architecture weights "
                 f"barely left uniform, so the argmax decode means something only if searches with other "
                 f"seeds agree (python -m autofpn.search.agreement); on the demo they agreed after a long "
                 f"weight-only warm-up (search.arch_start_epoch_fraction), not with more or larger "
                 f"architecture steps (docs/STUDY.md, sections 1 and 8)")
    return text


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Decode a search checkpoint into a genotype JSON.")
    parser.add_argument("--checkpoint", required=True, help="search checkpoint (.pth) with model.arch")
    parser.add_argument("--out", required=True, help="genotype JSON to write")
    parser.add_argument("--rule", default=None, choices=DECODE_RULES,
                        help="decode rule (default: the checkpoint config's search.decode_rule)")
    args = parser.parse_args(argv)

    from autofpn.engine.checkpoint import load_checkpoint
    ckpt = load_checkpoint(args.checkpoint, "search checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise SystemExit(f"{args.checkpoint}: no 'model' entry (keys: {sorted(ckpt)})")
    state, cfg = ckpt["model"], ckpt.get("cfg") or {}
    alpha, beta = state.get("arch.alpha"), state.get("arch.beta")
    if alpha is None and beta is None:
        raise SystemExit(f"{args.checkpoint}: no architecture parameters 'arch.alpha' / 'arch.beta'")
    rule = args.rule or cfg.get("search", {}).get("decode_rule", "argmax")
    levels = cfg.get("model", {}).get("neck", {}).get("levels", [2, 3, 4, 5])
    genotype = decode_weights(None if alpha is None else torch.softmax(alpha, -1),
                              None if beta is None else torch.softmax(beta, -1), levels, rule)
    save_genotype(genotype, args.out)
    print(f"wrote {args.out} (rule {rule}); draw it: python -m autofpn.viz.genotype_diagram {args.out} --out NAME")


if __name__ == "__main__":
    from autofpn.cli import run_command
    sys.exit(run_command(main))
