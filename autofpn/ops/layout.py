"""Memory layout of the feature maps: NCHW (``torch.contiguous_format``) or NHWC
(``torch.channels_last``).

The detector puts its input batch in the layout of ``model.memory_format``; convolutions,
pooling, interpolation and element-wise ops keep it, so the whole pyramid follows. Ops that
always return NCHW (RoIAlign) give their result back in the layout of their input. Same
numbers in both layouts, up to float rounding.
"""
import torch
from torch import Tensor

MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def memory_format_of(x: Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a genuinely channels-last 4-D tensor, else
    ``torch.contiguous_format`` (the rule of common_memory_format in cuda_ext/mixed_sum.cpp: a
    tensor contiguous in both layouts, e.g. C = 1 or H = W = 1, counts as NCHW)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def check_memory_format(setting: str) -> str:
    """``setting`` if it names a ``model.memory_format``, else a ValueError naming the key."""
    if setting not in MEMORY_FORMATS:
        raise ValueError(f"model.memory_format must be one of {', '.join(MEMORY_FORMATS)}, got {setting!r}")
    return setting


def resolve_memory_format(setting: str, device: torch.device, searched: bool = True) -> torch.memory_format:
    """``model.memory_format`` on ``device``. "auto" is channels-last on the CPU for a detector
    with a searched part (``searched``: an Auto-fusion neck or Auto-head, supernet or decoded),
    whose depthwise and dilated convolutions' backward passes it makes faster (a neck search
    iteration 1.6x, a head search iteration 1.4x, the decoded detector's training step 1.1x), and
    NCHW otherwise: for the FPN detector channels-last gained nothing in training and lost 7-9 %
    at inference; on a GPU it is not measured yet (docs/BENCHMARKS.md). Under CPU autocast
    (``search.amp`` on the CPU) "auto" is NCHW too: there, with torch 2.14, a supernet's dilated
    depthwise convolutions got non-finite weight gradients in channels-last (not in NCHW)."""
    check_memory_format(setting)
    if setting == "auto":
        cpu = torch.device(device).type == "cpu"
        setting = "channels_last" if searched and cpu and not torch.is_autocast_enabled("cpu") else "contiguous"
    return torch.channels_last if setting == "channels_last" else torch.contiguous_format
