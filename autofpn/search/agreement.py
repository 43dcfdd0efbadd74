"""Do two searches agree? The correlation of how far their architecture weights moved.

A search whose decisions come from the task should move the architecture weights the same way
when only its random parts change (the seed of the supernet's initialisation, the split of the
data into halves). For each search and stage the movement is the change of the log softmax
weights from the first to the last record of ``<stage>/arch_trajectory.jsonl``, centred per
link/edge (a per-link constant does not change the softmax); two searches agree as much as
the Pearson correlation of their movements over every (link, op). Searches that share only
noise give about 0.

    python -m autofpn.search.agreement out/search_seed0 out/search_seed1 [--stage neck] [--parts]
"""
import argparse
import itertools
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor


def weight_movement(search_dir: str, stage: str = "neck") -> Tensor:
    """Flattened, per-row centred change of log softmax(alpha or beta) over the stage."""
    path = os.path.join(search_dir, stage, "arch_trajectory.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: not a search folder, or its {stage} stage did not run")
    return trajectory_movement(path, stage)


def trajectory_movement(path: str, stage: str = "neck") -> Tensor:
    """``weight_movement`` of one stage's ``arch_trajectory.jsonl`` (also an ensemble member's)."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    key = "alpha" if stage == "neck" else "beta"
    if len(records) < 2 or key not in records[0]:
        raise ValueError(f"{path}: needs at least two records with '{key}'")
    first, last = (torch.tensor(r[key], dtype=torch.float64).clamp(min=1e-30).log() for r in (records[0], records[-1]))
    centred = lambda w: w - w.mean(-1, keepdim=True)  # noqa: E731
    return (centred(last) - centred(first)).flatten()


def agreement(search_dirs: Sequence[str], stage: str = "neck") -> Dict[tuple, float]:
    """Pearson correlation of the weight movements of every pair of ``search_dirs``."""
    return movement_agreement({d: weight_movement(d, stage) for d in search_dirs}, stage)


def movement_agreement(moves: Dict[str, Tensor], stage: str = "neck") -> Dict[tuple, float]:
    """Pearson correlation of every pair of named weight movements (``trajectory_movement``)."""
    out = {}
    for a, b in itertools.combinations(moves, 2):
        if moves[a].shape != moves[b].shape:
            raise ValueError(f"{a} and {b}: the {stage} search spaces differ ({tuple(moves[a].shape)} vs "
                             f"{tuple(moves[b].shape)} weights)")
        out[(a, b)] = float(torch.corrcoef(torch.stack([moves[a], moves[b]]))[0, 1])
    return out


def _corr(x: Tensor, y: Tensor) -> float:
    return float(torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1])


def agreement_parts(move_a: Tensor, move_b: Tensor, stage: str = "neck") -> Dict[str, float]:
    """Where two searches agree, from their movements (``trajectory_movement``):

    - ``op_type``: the share of search A's movement energy in its op-type part (the mean
      movement of each op over every link/edge: "identity rises everywhere");
    - ``per_row``: agreement of the rest, i.e. what differs from link to link;
    - ``among_parametric``: agreement restricted to the ops with weights (centred over them per
      row): which convolution a link/edge would take;
    - ``same_best_parametric``: share of rows whose best parametric op is the same in both;
    - ``identity_vs_none``: share of rows where both moved identity the same way against "none"
      (keep the link as a plain projection, or drop it).
    """
    from autofpn.models.operations import HEAD_OPS, NECK_OPS
    ops = NECK_OPS if stage == "neck" else HEAD_OPS
    a, b = (m.reshape(-1, len(ops)) for m in (move_a, move_b))
    op_mean = lambda m: m.mean(dim=0, keepdim=True)  # noqa: E731
    first = 2  # none, identity, then the ops with weights
    assert ops[:first] == ("none", "identity")
    para = lambda m: m[:, first:] - m[:, first:].mean(dim=1, keepdim=True)  # noqa: E731
    id_none = lambda m: torch.sign(m[:, 1] - m[:, 0])  # noqa: E731
    return {"total": _corr(a, b),
            "op_type": float((op_mean(a).expand_as(a) ** 2).sum() / (a ** 2).sum()),
            "per_row": _corr(a - op_mean(a), b - op_mean(b)),
            "among_parametric": _corr(para(a), para(b)),
            "same_best_parametric": float((para(a).argmax(1) == para(b).argmax(1)).float().mean()),
            "identity_vs_none": float((id_none(a) == id_none(b)).float().mean())}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("searches", nargs="+", help="search.output_dir folders (two or more)")
    parser.add_argument("--stage", default="neck", choices=("neck", "head"),
                        help="the stage to compare (a head stage is only comparable on the same neck)")
    parser.add_argument("--parts", action="store_true",
                        help="also say where they agree: op type, per link/edge, among the convolutions, "
                             "identity against none (agreement_parts)")
    args = parser.parse_args(argv)
    if len(args.searches) < 2:
        parser.error("give two or more search folders")
    for (a, b), r in agreement(args.searches, args.stage).items():
        print(f"{args.stage}: {a}  vs  {b}: correlation of the weight movements {r:+.3f}")
        if args.parts:
            p = agreement_parts(weight_movement(a, args.stage), weight_movement(b, args.stage), args.stage)
            print(f"    op-type part {100 * p['op_type']:.0f} % of the first's movement; per {args.stage} row "
                  f"{p['per_row']:+.3f}; among the convolutions {p['among_parametric']:+.3f} (same best on "
                  f"{100 * p['same_best_parametric']:.0f} % of rows); identity vs none same way on "
                  f"{100 * p['identity_vs_none']:.0f} % of rows")
    return 0


if __name__ == "__main__":
    from autofpn.cli import run_command
    sys.exit(run_command(main))
