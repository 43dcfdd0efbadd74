"""Backbones from torchvision's constructors, returning C2..C5 feature maps.

Supported: resnet18, resnet50, resnet101, resnext101_32x8d, mobilenet_v2. Each backbone is a
stem and four stages; ``frozen_stages = k`` freezes the stem and the first k stages (-1 freezes
nothing), so k=1 matches torchvision's default of three trainable ResNet layers.
"""
import os
from typing import Dict, List

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from autofpn.ops.pooling import max_pool2d

# name -> (torchvision constructor, weights enum used for "imagenet")
_RESNETS = {
    "resnet18": (torchvision.models.resnet18, "ResNet18_Weights"),
    "resnet50": (torchvision.models.resnet50, "ResNet50_Weights"),
    "resnet101": (torchvision.models.resnet101, "ResNet101_Weights"),
    "resnext101_32x8d": (torchvision.models.resnext101_32x8d, "ResNeXt101_32X8D_Weights"),
}
_MOBILENETS = {"mobilenet_v2": (torchvision.models.mobilenet_v2, "MobileNet_V2_Weights")}
BACKBONE_NAMES = sorted(_RESNETS) + sorted(_MOBILENETS)
SSD_BACKBONES = ("vgg16", "vgg16_bn")  # model.detector ssd's only (autofpn/models/ssd.py, VGG16Trunk)

# MobileNetV2 ``features`` indices that end each stage (stem = features[0..1]): the outputs
# after features[3], [6], [13], [18] have strides 4, 8, 16, 32.
_MOBILENET_V2_STAGE_ENDS = (1, 3, 6, 13, 18)


class BackboneWeightsError(RuntimeError):
    """Weights that cannot be loaded into a backbone; the message names the file and keys."""


def _imagenet_state_dict(weights_enum_name: str, variant: str = "IMAGENET1K_V1") -> Dict[str, Tensor]:
    """ImageNet weights through torchvision's weights API (``<weights_enum_name>.<variant>``): a
    file already in ``$TORCH_HOME/hub/checkpoints`` is used without network access."""
    weights = getattr(getattr(torchvision.models, weights_enum_name), variant)
    cache_dir = os.path.join(torch.hub.get_dir(), "checkpoints")
    file_name = os.path.basename(weights.url)
    try:
        return weights.get_state_dict(progress=False, check_hash=False)
    except Exception as e:  # URLError, HTTPError, corrupt file ...
        raise BackboneWeightsError(
            f"cannot load ImageNet weights {weights_enum_name}.{variant}: expected the file "
            f"{os.path.join(cache_dir, file_name)} (or network access to download it): {e}") from e


def _file_state_dict(path: str) -> Dict[str, Tensor]:
    if not os.path.isfile(path):
        raise BackboneWeightsError(f"backbone weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds here
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BackboneWeightsError(f"{path}: cannot read these backbone weights: the file is truncated or "
                                   f"not written by torch.save ({reason[:160]})") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise BackboneWeightsError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def load_backbone_state(module: nn.Module, state: Dict[str, Tensor], source: str) -> None:
    """Load ``state`` into ``module``, ignoring the classifier (``fc.*``, ``classifier.*``).
    Missing, unexpected or mis-shaped keys are an error naming ``source`` and the first keys."""
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "classifier."))}
    own = module.state_dict()
    # FrozenBatchNorm2d has no num_batches_tracked; BatchNorm2d checkpoints do.
    state = {k: v for k, v in state.items()
             if not (k.endswith("num_batches_tracked") and k not in own)}
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in state if k in own and state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, first: {missing[:5]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, first: {unexpected[:5]}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches, first: {mismatched[:5]}")
    if problems:
        raise BackboneWeightsError(f"backbone weights {source} do not fit {type(module).__name__}: "
                                   + "; ".join(problems))
    module.load_state_dict(state, strict=False)


class Backbone(nn.Module):
    """A torchvision classification network cut into a stem and four stages.

    forward(x: Tensor[N, 3, H, W]) -> {"c2": Tensor[N, C2, H/4, W/4], ..., "c5": [N, C5, H/32, W/32]}
    """

    def __init__(self, name: str = "resnet50", weights: str = "none", frozen_stages: int = 1,
                 norm: str = "frozen_bn"):
        super().__init__()
        if name not in BACKBONE_NAMES:
            raise ValueError(f"unknown backbone '{name}'; choose one of {BACKBONE_NAMES}")
        if norm not in ("frozen_bn", "bn"):
            raise ValueError(f"backbone norm must be 'frozen_bn' or 'bn', got '{norm}'")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in -1..4, got {frozen_stages}")
        norm_layer = FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d
        self.name = name
        if name in _RESNETS:
            constructor, weights_enum = _RESNETS[name]
            body = constructor(weights=None, norm_layer=norm_layer)
            del body.fc, body.avgpool
            widths = [_resnet_out(body, i) for i in range(1, 5)]
        else:
            constructor, weights_enum = _MOBILENETS[name]
            body = constructor(weights=None, norm_layer=norm_layer).features
            widths = [_last_out_channels(body[end]) for end in _MOBILENET_V2_STAGE_ENDS[1:]]
        self.body = body
        if weights == "imagenet":
            load_backbone_state(self.body, self._adapt_keys(_imagenet_state_dict(weights_enum)),
                                f"{weights_enum}.IMAGENET1K_V1")
        elif weights not in ("none", None):
            load_backbone_state(self.body, self._adapt_keys(_file_state_dict(weights)), weights)
        self.out_channels: Dict[str, int] = {f"c{i}": w for i, w in zip(range(2, 6), widths)}
        self.strides: Dict[str, int] = {f"c{i}": 2 ** i for i in range(2, 6)}
        self.frozen_stages = frozen_stages
        for stage in self.stages()[: frozen_stages + 1]:
            for p in stage.parameters():
                p.requires_grad_(False)

    def _adapt_keys(self, state: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """MobileNetV2 files hold ``features.N.*``; our body is ``features`` itself."""
        if self.name in _MOBILENETS:
            return {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        return state

    def stages(self) -> List[nn.Module]:
        """[stem, stage2, stage3, stage4, stage5] as modules (for freezing)."""
        if self.name in _RESNETS:
            b = self.body
            return [nn.ModuleList([b.conv1, b.bn1]), b.layer1, b.layer2, b.layer3, b.layer4]
        ends = _MOBILENET_V2_STAGE_ENDS
        starts = (0,) + tuple(e + 1 for e in ends[:-1])
        return [nn.ModuleList(self.body[s: e + 1]) for s, e in zip(starts, ends)]

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        feats: Dict[str, Tensor] = {}
        if self.name in _RESNETS:
            b = self.body
            x = self._stem_pool(b.relu(b.bn1(b.conv1(x))))
            for i, layer in enumerate((b.layer1, b.layer2, b.layer3, b.layer4)):
                x = layer(x)
                feats[f"c{i + 2}"] = x
            return feats
        level = 2
        for idx, block in enumerate(self.body):
            x = block(x)
            if idx in _MOBILENET_V2_STAGE_ENDS[1:]:
                feats[f"c{level}"] = x
                level += 1
        return feats

    def _stem_pool(self, x: Tensor) -> Tensor:
        """The ResNet stem's max pool (3x3, stride 2, padding 1), through autofpn.ops.pooling:
        the same values in a third of the time on the CPU where no gradient flows (a frozen stem,
        inference)."""
        pool = self.body.maxpool
        if pool.dilation != 1 or pool.ceil_mode or not all(isinstance(v, int) for v in
                                                           (pool.kernel_size, pool.stride, pool.padding)):
            return pool(x)
        return max_pool2d(x, pool.kernel_size, pool.stride, pool.padding)


def _resnet_out(body: nn.Module, i: int) -> int:
    layer = getattr(body, f"layer{i}")
    last = layer[-1]
    return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels


def _last_out_channels(block: nn.Module) -> int:
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


def build_backbone(cfg_backbone: Dict) -> Backbone:
    """From ``cfg["model"]["backbone"]``: name, weights, frozen_stages, norm."""
    if cfg_backbone["name"] in SSD_BACKBONES:
        from autofpn.config import ConfigError
        raise ConfigError(f"model.backbone.name {cfg_backbone['name']!r} is SSD's backbone (model.detector: ssd); "
                          f"choose one of {', '.join(BACKBONE_NAMES)} for this detector")
    return Backbone(cfg_backbone["name"], cfg_backbone["weights"], cfg_backbone["frozen_stages"],
                    cfg_backbone["norm"])

