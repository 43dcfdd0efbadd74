"""The architecture parameters of a search: alpha (neck) and beta (head).

They live in their own ``nn.Module`` (the detector's ``model.arch``) so that they are in the
state_dict, move with ``.to()``, and are disjoint from the network weights: an optimizer over
``model.arch.parameters()`` never touches a conv weight and vice versa. Softmaxed weights are
returned, never stored on the neck/head; the detector passes them down as arguments.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor, nn


class Architecture(nn.Module):
    """alpha: Parameter[neck_shape] (e.g. [layers, links, 8]), beta: Parameter[head_shape]
    (e.g. [cells, 14, 8]); a part that is not searched (shape None) has no parameter.

    Initialised as in DARTS: 1e-3 * randn, i.e. nearly uniform op weights after the softmax.
    """

    def __init__(self, neck_shape: Optional[Tuple[int, ...]], head_shape: Optional[Tuple[int, ...]]):
        super().__init__()
        self.alpha = nn.Parameter(1e-3 * torch.randn(*neck_shape)) if neck_shape is not None else None
        self.beta = nn.Parameter(1e-3 * torch.randn(*head_shape)) if head_shape is not None else None

    def neck_weights(self) -> Optional[Tensor]:
        """softmax(alpha) over the op dimension (last), or None when the neck is not searched."""
        return None if self.alpha is None else torch.softmax(self.alpha, dim=-1)

    def head_weights(self) -> Optional[Tensor]:
        """softmax(beta) over the op dimension (last), or None when the head is not searched."""
        return None if self.beta is None else torch.softmax(self.beta, dim=-1)

    def extra_repr(self) -> str:
        shape = lambda p: None if p is None else tuple(p.shape)
        return f"alpha={shape(self.alpha)}, beta={shape(self.beta)}"
