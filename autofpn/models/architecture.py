"""The architecture parameters of a search: alpha (neck) and beta (head).

They live in their own ``nn.Module`` (the detector's ``model.arch``) so that they are in the
state_dict, move with ``.to()``, and are disjoint from the network weights: an optimizer over
``model.arch.parameters()`` never touches a conv weight and vice versa. Softmaxed weights are
returned, never stored on the neck/head; the detector passes them down as arguments.

Three ways the supernet uses them (``forward_weights``):

- the paper's relaxation (``search.mode: full``): every op of a link/edge runs, weighted by
  softmax(alpha);
- a sampled path (``search.mode: gdas``, Dong & Yang, CVPR 2019): inside ``sampled(tau, seed)``
  each link/edge gets a one-hot sample of the Gumbel-softmax softmax((alpha + g) / tau), with the
  straight-through gradient of the soft sample, so only the sampled op runs (the supernet is
  built with ``sampled=True``) and alpha still gets a gradient;
- a soft sample (``search.strategy: snas``, Xie et al., ICLR 2019): inside
  ``sampled(tau, seed, hard=False)`` every op still runs, weighted by the Gumbel-softmax sample
  itself (SNAS's continuous relaxation, no straight-through), so the gradient reaches alpha
  through the sample (reparameterisation).

The two samples draw their noise with ``gumbel_noise`` from ``seed`` alone, so every rank draws the same
sample and a resumed run draws what the first one drew.
"""
from contextlib import contextmanager
from typing import Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn


def gumbel_noise(shape: torch.Size, generator: torch.Generator) -> Tensor:
    """g ~ Gumbel(0, 1) of ``shape``, float64 on the CPU from ``generator``: the same draw on any
    device and any rank for the same generator state."""
    u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp_(1e-12, 1.0 - 1e-12)
    return -torch.log(-torch.log(u))


def gumbel_softmax(logits: Tensor, tau: float, generator: torch.Generator) -> Tensor:
    """The soft Gumbel-softmax sample softmax((logits + g) / tau) per row of ``logits`` (last
    dim), g from ``gumbel_noise``; same shape and dtype as ``logits``, rows sum to 1, every entry
    > 0 (up to underflow), differentiable in ``logits``.

    SNAS writes it with the log-probabilities, softmax((log softmax(alpha) + g) / tau); that is
    this sample: log softmax(alpha) = alpha - logsumexp(alpha) shifts each row by a constant,
    which the softmax cancels."""
    gumbel = gumbel_noise(logits.shape, generator).to(device=logits.device, dtype=logits.dtype)
    return torch.softmax((logits + gumbel) / tau, dim=-1)


def gumbel_straight_through(logits: Tensor, tau: float, generator: torch.Generator) -> Tensor:
    """A one-hot sample per row of ``logits`` (last dim): the argmax of ``gumbel_softmax`` (drawn
    from softmax(logits)), whose gradient is that of the soft sample. The non-sampled entries are
    exactly 0.
    """
    soft = gumbel_softmax(logits, tau, generator)
    hard = torch.zeros_like(soft).scatter_(-1, soft.detach().argmax(-1, keepdim=True), 1.0)
    return (hard - soft.detach()) + soft  # (0 - s) + s == 0 exactly for the other entries


class Architecture(nn.Module):
    """alpha: Parameter[neck_shape] (e.g. [layers, links, 8]), beta: Parameter[head_shape]
    (e.g. [cells, 14, 8]); a part that is not searched (shape None) has no parameter.

    Initialised as in DARTS: 1e-3 * randn, i.e. nearly uniform op weights after the softmax.
    """

    def __init__(self, neck_shape: Optional[Tuple[int, ...]], head_shape: Optional[Tuple[int, ...]]):
        super().__init__()
        self.alpha = nn.Parameter(1e-3 * torch.randn(*neck_shape)) if neck_shape is not None else None
        self.beta = nn.Parameter(1e-3 * torch.randn(*head_shape)) if head_shape is not None else None
        self._sampling: Optional[Tuple[float, int, bool]] = None  # (tau, seed, hard) inside ``sampled``
        self._override: Optional[Tuple[Optional[Tensor], Optional[Tensor]]] = None  # inside ``overridden``

    def neck_weights(self) -> Optional[Tensor]:
        """softmax(alpha) over the op dimension (last), or None when the neck is not searched."""
        return None if self.alpha is None else torch.softmax(self.alpha, dim=-1)

    def head_weights(self) -> Optional[Tensor]:
        """softmax(beta) over the op dimension (last), or None when the head is not searched."""
        return None if self.beta is None else torch.softmax(self.beta, dim=-1)

    @contextmanager
    def sampled(self, tau: float, seed: int, hard: bool = True) -> Iterator[None]:
        """Forwards inside use a Gumbel-softmax sample per link/edge at temperature ``tau``, noise
        from ``seed``: one-hot straight-through paths (``hard``, GDAS) or the soft sample (SNAS);
        outside, the supernet mixes every op by the softmax."""
        if tau <= 0:
            raise ValueError(f"the Gumbel-softmax temperature must be > 0, got {tau}")
        self._sampling = (float(tau), int(seed), bool(hard))
        try:
            yield
        finally:
            self._sampling = None

    @contextmanager
    def overridden(self, neck: Optional[Tensor], head: Optional[Tensor]) -> Iterator[None]:
        """Forwards inside multiply the ops by these weights (shaped like ``neck_weights()`` /
        ``head_weights()``; None where a part is not searched) instead of the softmax: e.g. the
        softmax with one op of one link zeroed, to measure what that op adds
        (``autofpn.search.perturbation``)."""
        self._override = (neck, head)
        try:
            yield
        finally:
            self._override = None

    def forward_weights(self) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """(neck, head) weights the supernet multiplies its ops by: the softmax, or inside
        ``sampled`` a Gumbel-softmax sample of each link/edge (alpha's noise drawn first, then
        beta's, from one generator), or inside ``overridden`` the given weights."""
        if self._override is not None:
            return self._override
        if self._sampling is None:
            return self.neck_weights(), self.head_weights()
        tau, seed, hard = self._sampling
        sample = gumbel_straight_through if hard else gumbel_softmax
        generator = torch.Generator().manual_seed(seed)
        return tuple(None if p is None else sample(p, tau, generator) for p in (self.alpha, self.beta))

    def extra_repr(self) -> str:
        shape = lambda p: None if p is None else tuple(p.shape)
        return f"alpha={shape(self.alpha)}, beta={shape(self.beta)}"


class SearchableDetector(nn.Module):
    """A detector whose supernet keeps its architecture parameters in ``self.arch`` (an
    ``Architecture``, or None for a fixed detector): the two parameter sets the search's two
    optimizers take, disjoint."""

    arch: Optional[Architecture]

    def arch_parameters(self) -> List[nn.Parameter]:
        return list(self.arch.parameters()) if self.arch is not None else []

    def weight_parameters(self) -> List[nn.Parameter]:
        arch_ids = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch_ids]
