"""Handcrafted necks: FPN (Lin et al. 2017) and PANet (Liu et al. 2018), the baselines Auto-FPN
is compared with. Both map backbone features {"c2".."c5"} to {"p2".."p6"}; P6 (max pool of
the top level, stride 2) feeds the RPN only."""
from typing import Dict, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2)
    # torchvision's FPN initialisation, so a copied model and a fresh one start alike
    nn.init.kaiming_uniform_(conv.weight, a=1)
    nn.init.constant_(conv.bias, 0)
    return conv


class FPN(nn.Module):
    """Top-down pathway: P_i = conv3x3(lateral1x1(C_i) + nearest_upsample(inner_{i+1})).

    forward(feats {"c2": [N, C2, H/4, W/4], ...}) -> {"p2": [N, channels, H/4, W/4], ..., "p6"}
    """

    def __init__(self, in_channels: Dict[str, int], in_strides: Dict[str, int], channels: int = 256,
                 levels: Sequence[int] = (2, 3, 4, 5), extra_pool_level: bool = True):
        super().__init__()
        self.levels = list(levels)
        self.extra_pool_level = extra_pool_level
        self.lateral = nn.ModuleDict({f"c{l}": _conv(in_channels[f"c{l}"], channels, 1) for l in self.levels})
        self.output = nn.ModuleDict({f"p{l}": _conv(channels, channels, 3) for l in self.levels})
        self.out_channels = channels
        self.strides = {f"p{l}": in_strides[f"c{l}"] for l in self.levels}
        if extra_pool_level:
            top = self.levels[-1]
            self.strides[f"p{top + 1}"] = 2 * self.strides[f"p{top}"]

    def top_down(self, feats: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """FPN outputs P_i for the fused levels (no extra level)."""
        out: Dict[str, Tensor] = {}
        inner = None
        for l in reversed(self.levels):
            lateral = self.lateral[f"c{l}"](feats[f"c{l}"])
            if inner is not None:
                lateral = lateral + F.interpolate(inner, size=lateral.shape[-2:], mode="nearest")
            inner = lateral
            out[f"p{l}"] = self.output[f"p{l}"](inner)
        return {f"p{l}": out[f"p{l}"] for l in self.levels}

    def forward(self, feats: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return add_pool_level(self.top_down(feats), self.levels, self.extra_pool_level)


class PANet(FPN):
    """FPN followed by PANet's bottom-up path augmentation:
    N_low = P_low, N_{i+1} = ReLU(conv3x3(P_{i+1} + ReLU(conv3x3_stride2(N_i))))."""

    def __init__(self, in_channels: Dict[str, int], in_strides: Dict[str, int], channels: int = 256,
                 levels: Sequence[int] = (2, 3, 4, 5), extra_pool_level: bool = True):
        super().__init__(in_channels, in_strides, channels, levels, extra_pool_level)
        upper = self.levels[1:]
        self.downsample = nn.ModuleDict({f"p{l}": _conv(channels, channels, 3, stride=2) for l in upper})
        self.fuse = nn.ModuleDict({f"p{l}": _conv(channels, channels, 3) for l in upper})

    def forward(self, feats: Dict[str, Tensor]) -> Dict[str, Tensor]:
        p = self.top_down(feats)
        low = self.levels[0]
        out = {f"p{low}": p[f"p{low}"]}
        prev = out[f"p{low}"]
        for l in self.levels[1:]:
            down = F.relu(self.downsample[f"p{l}"](prev))
            prev = F.relu(self.fuse[f"p{l}"](p[f"p{l}"] + down))
            out[f"p{l}"] = prev
        return add_pool_level(out, self.levels, self.extra_pool_level)


def add_pool_level(feats: Dict[str, Tensor], levels: Sequence[int], enabled: bool) -> Dict[str, Tensor]:
    """Adds P_{top+1} = max_pool(P_top, kernel 1, stride 2) (FPN's extra RPN level)."""
    if enabled:
        top = levels[-1]
        feats[f"p{top + 1}"] = F.max_pool2d(feats[f"p{top}"], kernel_size=1, stride=2)
    return feats


class ConvExtraLevels(nn.Module):
    """A neck plus ``count`` coarser levels made by stride-2 3x3 convolutions, RetinaNet's P6 and
    P7: P_{top+1} = conv(P_top), then P_{k+1} = conv(ReLU(P_k)). P6 reads the neck's top output
    (not C5), as torchvision's ``LastLevelP6P7`` does when its in and out channels are equal
    (``retinanet_resnet50_fpn``, v1).

    forward(feats {"c3": ..., "c5": ...}, weights=None) -> {"p3": [N, C, H/8, W/8], ..., "p7": [N, C, H/128,
    W/128]}; ``weights`` (the softmaxed alpha ``Tensor[neck.arch_shape]``) go to a wrapped Auto-fusion
    supernet, which is the searched part: P6 / P7 stay fixed convolutions of its top output.
    """

    def __init__(self, neck: nn.Module, count: int = 2):
        super().__init__()
        if getattr(neck, "extra_pool_level", False):
            raise ValueError("the wrapped neck already adds a max-pooled level")
        self.base = neck
        self.out_channels = neck.out_channels
        self.strides = dict(neck.strides)
        top = max(int(name[1:]) for name in self.strides)
        self.new_levels = [top + 1 + i for i in range(count)]
        self.extra = nn.ModuleDict()
        for level in self.new_levels:
            self.extra[f"p{level}"] = _conv(self.out_channels, self.out_channels, 3, stride=2)
            self.strides[f"p{level}"] = 2 * self.strides[f"p{level - 1}"]

    def forward(self, feats: Dict[str, Tensor], weights: Optional[Tensor] = None) -> Dict[str, Tensor]:
        out = self.base(feats) if weights is None else self.base(feats, weights)
        for i, level in enumerate(self.new_levels):
            previous = out[f"p{level - 1}"]
            out[f"p{level}"] = self.extra[f"p{level}"](previous if i == 0 else F.relu(previous))
        return out


def torchvision_fpn_key(key: str, levels: Sequence[int], prefix: str = "neck.") -> Optional[str]:
    """Our key of a torchvision FPN parameter (``backbone.fpn.inner_blocks.{i}.0.<p>`` ->
    ``<prefix>lateral.c{levels[i]}.<p>``, ``backbone.fpn.layer_blocks.{i}.0.<p>`` ->
    ``<prefix>output.p{levels[i]}.<p>``), or None for a key outside those blocks. Shared by the
    Faster R-CNN and RetinaNet key mappings."""
    parts = key.split(".")
    if key.startswith("backbone.fpn.inner_blocks."):
        return f"{prefix}lateral.c{levels[int(parts[3])]}.{parts[-1]}"
    if key.startswith("backbone.fpn.layer_blocks."):
        return f"{prefix}output.p{levels[int(parts[3])]}.{parts[-1]}"
    return None

