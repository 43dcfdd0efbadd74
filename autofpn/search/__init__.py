"""The search procedure (the networks it searches live in ``autofpn.models``).

- ``cost``: the resource cost C(alpha, beta) (params + FLOPs + memory access) of the supernets;
- ``plan``: params, FLOPs and activation memory per stage (``search.py --dry-run``);
- ``decode``: architecture weights -> genotype (argmax, argmax_nonnone, top2);
- ``random_sample``: genotypes drawn uniformly from the space (the study's random baseline);
- one file per search strategy, each exposing
  ``run_search(cfg, ctx, out_dir, neck_genotype=None, dataset=None) -> SearchResult`` (``genotype``, and the
  final weights of the stages it ran for the pictures); ``search.strategy`` picks one:
  ``differentiable`` (the paper's first-order alternating search on two data halves),
  ``evolution`` (regularized evolution: candidates trained on half A, scored on half B; its
  ``run_search`` also takes ``parallel``: who trains which candidates, search.py --jobs / --shard),
  ``snas`` (SNAS: the differentiable search with soft Gumbel-softmax samples of the op weights);
  a strategy module may also expose ``check_config(cfg)``, run before the output folder is claimed.
"""
import importlib
from types import ModuleType

STRATEGIES = {
    "differentiable": "autofpn.search.differentiable",
    "evolution": "autofpn.search.evolution",
    "snas": "autofpn.search.snas",
}


def get_strategy(name: str) -> ModuleType:
    """The module of search strategy ``name`` (imported on use: strategies pull in training code)."""
    if name not in STRATEGIES:
        from autofpn.config import ConfigError
        raise ConfigError(f"'search.strategy' = {name!r}: expected one of {', '.join(STRATEGIES)}")
    return importlib.import_module(STRATEGIES[name])
