"""SNAS (Xie et al., ICLR 2019, "Stochastic Neural Architecture Search") over the Auto-FPN space:
the search strategy ``search.strategy: snas``, one of the paper's Table 8 comparisons.

It is the differentiable search (``differentiable.Searcher``: weight steps on training half A,
architecture steps on half B, the same optimizers, resource penalty, checkpoints, resume, logs,
decode and outputs) with SNAS's relaxation of the op choice in place of the softmax:

- every forward of both steps weights the ops of each link/edge by a soft Gumbel-softmax sample
  z = softmax((log softmax(alpha) + g) / tau) (``Architecture.sampled(tau, seed, hard=False)``),
  fresh noise g every step, seeded by (search seed, stage, iteration, step) as GDAS's paths
  (``Searcher.sample_seed``), so all ranks draw the same z and a resumed run redraws it. Every
  op runs (no one-hot, no straight-through: search.mode stays ``full``), and the architecture
  gradient reaches alpha / beta through z (reparameterisation);
- the temperature anneals exponentially per iteration from ``search.tau[0]`` to ``search.tau[1]``
  (``snas_tau``); SNAS starts at 1.0 and anneals towards a small value: ``search.tau=[1.0,0.03]``;
- the resource penalty stays lambda x C(softmax(alpha)): SNAS constrains the expected cost
  E_z[C(z)] of the architecture distribution, and C is linear in the op weights, so for one-hot
  architectures z ~ Cat(softmax(alpha)) that expectation is exactly C(softmax(alpha)), with an
  exact, noise-free gradient (C of the soft sample would be a noisy, temperature-biased estimate);
- the decode (argmax of alpha) and the logged entropy / margins describe softmax(alpha), the
  distribution SNAS learns, not a sample.

The difference from ``search.mode: gdas``: GDAS runs one sampled op per link/edge (the hard
argmax of the same Gumbel-softmax, straight-through gradient) at a linear temperature; SNAS runs
every op weighted by the soft sample.
"""
from typing import Any, Dict, Optional

from autofpn.engine import distributed as du
from autofpn.search import differentiable
from autofpn.search.differentiable import SearchResult, Searcher


def snas_tau(start: float, end: float, iteration: int, max_iter: int) -> float:
    """The temperature at ``iteration`` (0-based) of ``max_iter``: exponential annealing,
    start x (end / start) ^ (iteration / (max_iter - 1)): ``start`` at the first iteration,
    ``end`` at the last, a constant factor per iteration in between."""
    return start * (end / start) ** (iteration / max(max_iter - 1, 1))


class SNASSearcher(Searcher):
    """``Searcher`` whose weight and architecture steps both run the full mixed op weighted by a
    soft Gumbel-softmax sample of alpha / beta (temperature ``tau()``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sampled_steps = ("weight", "arch")  # both steps draw a (soft) sample
        self.sampled = True  # the search log records tau

    def tau(self) -> float:
        """The temperature of this iteration: ``snas_tau`` over ``search.tau`` = [start, end]."""
        start, end = (float(t) for t in self.search_cfg["tau"])
        return snas_tau(start, end, self.iter, self.max_iter)

    def path(self, step: str):
        """The forwards of ``step`` weight every op by a soft sample (noise from ``sample_seed``)."""
        return self.model.arch.sampled(self.tau(), self.sample_seed(step), hard=False)


def check_config(cfg: Dict[str, Any]) -> None:
    """SNAS samples its own (soft) op weights on every step: ``search.mode`` must stay ``full``
    (gdas / sampled_weights build a supernet that runs one op per link/edge)."""
    from autofpn.config import ConfigError
    from autofpn.search.differentiable import check_config as check_differentiable
    check_differentiable(cfg)  # its stages, ensembles and decode
    if cfg["search"]["mode"] != "full":
        raise ConfigError(f"'search.mode' = {cfg['search']['mode']!r}: search.strategy=snas weights every op by a "
                          f"soft Gumbel-softmax sample on both steps; leave search.mode=full (gdas is the "
                          f"differentiable strategy's hard sampling)")


def run_search(cfg: Dict[str, Any], ctx: du.DistContext, out_dir: str,
               neck_genotype: Optional[Dict[str, Any]] = None, dataset=None) -> SearchResult:
    """The differentiable search's stages (neck, head, ensembles, resume, geno.json) with
    ``SNASSearcher``."""
    check_config(cfg)
    return differentiable.run_search(cfg, ctx, out_dir, neck_genotype, dataset, searcher_class=SNASSearcher)
