"""The architecture parameters of a search: alpha (neck) and beta (head).

They live in their own ``nn.Module`` (the detector's ``model.arch``) so that they are in the
state_dict, move with ``.to()``, and are disjoint from the network weights: an optimizer over
``model.arch.parameters()`` never touches a conv weight and vice versa. Softmaxed weights are
returned, never stored on the neck/head; the detector passes them down as arguments.

Two ways the supernet uses them (``forward_weights``):

- the paper's relaxation (``search.mode: full``): every op of a link/edge runs, weighted by
  softmax(alpha);
- a sampled path (``search.mode: gdas``, Dong & Yang, CVPR 2019): inside ``sampled(tau, seed)``
  each link/edge gets a one-hot sample of the Gumbel-softmax softmax((alpha + g) / tau), with the
  straight-through gradient of the soft sample, so only the sampled op runs (the supernet is
  built with ``sampled=True``) and alpha still gets a gradient. The noise comes from ``seed``
  alone, so every rank draws the same path and a resumed run draws what the first one drew.
"""
from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor, nn


def gumbel_straight_through(logits: Tensor, tau: float, generator: torch.Generator) -> Tensor:
    """A one-hot sample per row of ``logits`` (last dim), drawn from softmax((logits + g) / tau)
    with g ~ Gumbel(0, 1) from ``generator`` (CPU, float64, so the draw is the same on any
    device), whose gradient is that of the soft sample. The non-sampled entries are exactly 0.
    """
    u = torch.rand(logits.shape, generator=generator, dtype=torch.float64).clamp_(1e-12, 1.0 - 1e-12)
    gumbel = (-torch.log(-torch.log(u))).to(device=logits.device, dtype=logits.dtype)
    soft = torch.softmax((logits + gumbel) / tau, dim=-1)
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
        self._sampling: Optional[Tuple[float, int]] = None

    def neck_weights(self) -> Optional[Tensor]:
        """softmax(alpha) over the op dimension (last), or None when the neck is not searched."""
        return None if self.alpha is None else torch.softmax(self.alpha, dim=-1)

    def head_weights(self) -> Optional[Tensor]:
        """softmax(beta) over the op dimension (last), or None when the head is not searched."""
        return None if self.beta is None else torch.softmax(self.beta, dim=-1)

    @contextmanager
    def sampled(self, tau: float, seed: int) -> Iterator[None]:
        """Forwards inside draw one path per link/edge (Gumbel-softmax at temperature ``tau``,
        noise from ``seed``); outside, the supernet mixes every op."""
        if tau <= 0:
            raise ValueError(f"the Gumbel-softmax temperature must be > 0, got {tau}")
        self._sampling = (float(tau), int(seed))
        try:
            yield
        finally:
            self._sampling = None

    def forward_weights(self) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        """(neck, head) weights the supernet multiplies its ops by: the softmax, or inside
        ``sampled`` a straight-through one-hot sample of each link/edge."""
        if self._sampling is None:
            return self.neck_weights(), self.head_weights()
        tau, seed = self._sampling
        generator = torch.Generator().manual_seed(seed)
        return tuple(None if p is None else gumbel_straight_through(p, tau, generator)
                     for p in (self.alpha, self.beta))

    def extra_repr(self) -> str:
        shape = lambda p: None if p is None else tuple(p.shape)
        return f"alpha={shape(self.alpha)}, beta={shape(self.beta)}"
