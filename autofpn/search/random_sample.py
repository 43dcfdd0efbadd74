"""Random architectures: genotypes drawn uniformly from the Auto-FPN search space.

The baseline a search has to beat (weight-sharing searches are known to rank architectures
poorly, so "better than FPN" alone proves little). Uniform over the *valid* genotypes of the
same space the search explores:

- neck: every link (source j -> target i) of every layer takes an op of ``NECK_OPS`` uniformly,
  "none" included (the link is then absent); a target level whose links all drew "none" is
  redrawn (every level needs an input), which is uniform over the valid layers;
- head: every edge of every cell takes an op of ``HEAD_OPS`` uniformly, "none" included; an
  intermediate node whose edges all drew "none" is redrawn likewise.

A draw is a function of (seed, index) only, so the i-th random architecture of a study is the
same whatever the number of architectures asked for.

``identity_neck_with_convs``: the control of a neck search decoded with "none" excluded
(``argmax_nonnone``), whose neck keeps every link and makes a few of them convolutions: the
dense identity neck with K links, drawn uniformly without replacement, each given a convolution
of ``NECK_OPS`` drawn uniformly. A search that chose its K convolutions well beats these.

``random_genotype_within``: the baseline of a search under a resource constraint, uniform over
the valid genotypes whose cost (e.g. neck + head FLOPs from the penalty's tables) is at most a
budget. Uniform draws from the whole space almost never fall under a searched detector's cost
(on the demo config none of 3000 came within 15 % above the searches' neck + head FLOPs), so
rejection is hopeless; instead each draw is the end of its own random walk (Metropolis with a
symmetric proposal: one link / edge, drawn uniformly, takes an op drawn uniformly; the move is
kept when the genotype stays valid and within the budget). Its stationary distribution is
uniform over the valid genotypes within the budget (every one of which reaches the cheapest
genotype by cheapening one link at a time, so the walk can go everywhere), and the walk starts
from that cheapest genotype and takes ``sweeps`` moves per link / edge.
"""
import random
from typing import Any, Callable, Dict, List, Sequence, Tuple

from autofpn.models.genotype import GENOTYPE_VERSION, HEAD_INPUT_NODES, HEAD_INTERMEDIATE_NODES, validate_genotype
from autofpn.models.operations import HEAD_OPS, NECK_OPS

NECK_CONV_OPS = tuple(op for op in NECK_OPS if op not in ("none", "identity"))


def _neck_layer(rng: random.Random, levels: Sequence[int]) -> List[Dict[str, Any]]:
    links = []
    for target in levels:
        while True:  # redraw a level that received no link
            ops = [rng.choice(NECK_OPS) for _ in levels]
            if any(op != "none" for op in ops):
                break
        links += [{"from": source, "to": target, "op": op} for source, op in zip(levels, ops) if op != "none"]
    return links


def _head_cell(rng: random.Random) -> List[Dict[str, Any]]:
    edges = []
    for node in range(HEAD_INPUT_NODES, HEAD_INPUT_NODES + HEAD_INTERMEDIATE_NODES):
        while True:  # redraw a node that received no input
            ops = [rng.choice(HEAD_OPS) for _ in range(node)]
            if any(op != "none" for op in ops):
                break
        edges += [{"node": node, "input": k, "op": op} for k, op in enumerate(ops) if op != "none"]
    return edges


def random_genotype(seed: int, index: int, levels: Sequence[int] = (2, 3, 4, 5), layers: int = 2,
                    cells: int = 2) -> Dict[str, Any]:
    """The ``index``-th random genotype (neck and head) of random stream ``seed``."""
    rng = random.Random(f"autofpn-random-genotype-{seed}-{index}")  # str seeds are stable across runs
    genotype = {
        "version": GENOTYPE_VERSION,
        "name": f"random_{index:02d}",
        "description": f"drawn uniformly from the search space (seed {seed}, index {index})",
        "neck": {"levels": [int(lv) for lv in levels], "layers": [_neck_layer(rng, levels) for _ in range(layers)]},
        "head": {"cells": [_head_cell(rng) for _ in range(cells)]},
    }
    return validate_genotype(genotype)


def _as_genotype(neck_ops: Dict[Tuple[int, int, int], str], head_ops: Dict[Tuple[int, int, int], str],
                 levels: Sequence[int], layers: int, cells: int, name: str, description: str) -> Dict[str, Any]:
    """A genotype from one op per neck link (layer, source, target) and head edge (cell, node,
    input), "none" left out; ``cells`` = 0: no head part."""
    return {
        "version": GENOTYPE_VERSION, "name": name, "description": description,
        "neck": {"levels": list(levels),
                 "layers": [[{"from": s, "to": t, "op": neck_ops[(k, s, t)]} for t in levels for s in levels
                             if neck_ops[(k, s, t)] != "none"] for k in range(layers)]},
        "head": None if cells == 0 else {
            "cells": [[{"node": n, "input": i, "op": head_ops[(m, n, i)]}
                       for n in range(HEAD_INPUT_NODES, HEAD_INPUT_NODES + HEAD_INTERMEDIATE_NODES)
                       for i in range(n) if head_ops[(m, n, i)] != "none"] for m in range(cells)]},
    }


def random_genotype_within(seed: int, index: int, cost: Callable[[Dict[str, Any]], float], budget: float,
                           levels: Sequence[int] = (2, 3, 4, 5), layers: int = 2, cells: int = 2,
                           sweeps: int = 50) -> Dict[str, Any]:
    """The ``index``-th genotype of stream ``seed`` drawn uniformly from the valid genotypes with
    ``cost(genotype) <= budget`` (the module docstring: a random walk of ``sweeps`` moves per
    link / edge). ``cost``: genotype -> float, e.g. neck + head FLOPs, where "none" costs no more
    than identity and identity no more than a convolution; the walk starts from identity
    self-links in the neck (each level fed by itself) and identity edges from the head's first
    input, the cheapest genotype under such a cost.

    Raises ValueError when even that genotype costs more than ``budget``."""
    levels = [int(level) for level in levels]
    nodes = range(HEAD_INPUT_NODES, HEAD_INPUT_NODES + HEAD_INTERMEDIATE_NODES)
    neck = {(k, s, t): "identity" if s == t else "none" for k in range(layers) for t in levels for s in levels}
    head = {(m, n, i): "identity" if i == 0 else "none" for m in range(cells) for n in nodes for i in range(n)}
    name, description = f"budget_random_{index:02d}", (
        f"drawn uniformly from the genotypes of the search space costing at most {budget:.6g} "
        f"(seed {seed}, index {index})")
    cheapest = cost(_as_genotype(neck, head, levels, layers, cells, name, description))
    if cheapest > budget:
        raise ValueError(f"the budget {budget:.6g} is below the cheapest genotype of the space ({cheapest:.6g})")
    positions = [(neck, key, NECK_OPS) for key in neck] + [(head, key, HEAD_OPS) for key in head]
    rng = random.Random(f"autofpn-random-genotype-within-{seed}-{index}-{budget!r}")
    for _ in range(sweeps * len(positions)):
        ops, key, choices = rng.choice(positions)
        old, new = ops[key], rng.choice(choices)
        if new == old:
            continue
        ops[key] = new
        if new == "none":  # the target level / node must keep an input
            if ops is neck:
                valid = any(neck[(key[0], s, key[2])] != "none" for s in levels)
            else:
                valid = any(head[(key[0], key[1], i)] != "none" for i in range(key[1]))
            if not valid:
                ops[key] = old
                continue
        if cost(_as_genotype(neck, head, levels, layers, cells, name, description)) > budget:
            ops[key] = old
    return validate_genotype(_as_genotype(neck, head, levels, layers, cells, name, description))


def identity_neck_with_convs(seed: int, index: int, convs: int, levels: Sequence[int] = (2, 3, 4, 5),
                             layers: int = 2) -> Dict[str, Any]:
    """The ``index``-th draw of stream ``seed``: every link (source -> target) of every layer
    kept, ``convs`` of them (uniform without replacement over all layers' links) a convolution of
    ``NECK_CONV_OPS`` (uniform), the others identity; no head part."""
    levels = [int(level) for level in levels]
    links = [(layer, source, target) for layer in range(layers) for target in levels for source in levels]
    if not 0 < convs <= len(links):
        raise ValueError(f"convs must be between 1 and the neck's {len(links)} links, got {convs}")
    rng = random.Random(f"autofpn-identity-neck-convs-{seed}-{convs}-{index}")
    ops = {link: rng.choice(NECK_CONV_OPS) for link in rng.sample(links, convs)}
    return validate_genotype({
        "version": GENOTYPE_VERSION,
        "name": f"random_conv{convs}_{index:02d}",
        "description": f"the dense identity neck with {convs} random links made random convolutions "
                       f"(seed {seed}, index {index})",
        "neck": {"levels": levels, "layers": [[{"from": s, "to": t, "op": ops.get((layer, s, t), "identity")}
                                               for (lay, s, t) in links if lay == layer]
                                              for layer in range(layers)]},
        "head": None,
    })


def _distinct(count: int, draw: Callable[[int], Dict[str, Any]], prefix: str) -> List[Dict[str, Any]]:
    """The first ``count`` distinct draws, renamed ``<prefix>NN`` in order (a draw equal to an
    earlier one is skipped; the spaces are large enough that this essentially never happens)."""
    found, seen, index = [], set(), 0
    while len(found) < count:
        g = draw(index)
        key = repr((g["neck"], g["head"]))
        if key not in seen:
            seen.add(key)
            found.append({**g, "name": f"{prefix}{len(found):02d}"})
        index += 1
    return found


def random_genotypes(count: int, seed: int = 0, levels: Sequence[int] = (2, 3, 4, 5), layers: int = 2,
                     cells: int = 2) -> List[Dict[str, Any]]:
    """``count`` distinct random genotypes (the space holds ~10^40 architectures)."""
    return _distinct(count, lambda index: random_genotype(seed, index, levels, layers, cells), "random_")


def identity_necks_with_convs(count: int, convs: int, seed: int = 0, levels: Sequence[int] = (2, 3, 4, 5),
                              layers: int = 2) -> List[Dict[str, Any]]:
    """``count`` distinct ``identity_neck_with_convs`` draws, named ``random_conv<convs>_NN``."""
    return _distinct(count, lambda index: identity_neck_with_convs(seed, index, convs, levels, layers),
                     f"random_conv{convs}_")


def random_genotypes_within(count: int, cost: Callable[[Dict[str, Any]], float], budget: float, seed: int = 0,
                            levels: Sequence[int] = (2, 3, 4, 5), layers: int = 2,
                            cells: int = 2) -> List[Dict[str, Any]]:
    """``count`` distinct ``random_genotype_within`` draws, named ``budget_random_NN``."""
    return _distinct(count, lambda index: random_genotype_within(seed, index, cost, budget, levels, layers, cells),
                     "budget_random_")
