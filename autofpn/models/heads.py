"""The handcrafted Faster R-CNN box heads (two fully connected layers; convolutions then one
fully connected layer) and the predictor."""
from functools import partial
from typing import Tuple

from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead

from .operations import make_norm


class TwoMLPHead(nn.Module):
    """forward(x: Tensor[R, C, S, S]) -> Tensor[R, mlp_dim]: flatten, fc6 + ReLU, fc7 + ReLU."""

    def __init__(self, in_channels: int, pooler_size: int = 7, mlp_dim: int = 1024):
        super().__init__()
        self.fc6 = nn.Linear(in_channels * pooler_size * pooler_size, mlp_dim)
        self.fc7 = nn.Linear(mlp_dim, mlp_dim)
        self.out_channels = mlp_dim

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(start_dim=1)
        return self.fc7(self.fc6(x).relu_()).relu_()


class ConvFCHead(FastRCNNConvFCHead):
    """Detectron's "Xconv1fc" box head (torchvision's ``FastRCNNConvFCHead``): ``convs`` 3x3
    convolutions of ``channels`` with norm and ReLU over each RoI, then one fully connected layer
    + ReLU. forward(x: Tensor[R, C, S, S]) -> Tensor[R, fc_dim].

    The handcrafted control for the Auto-head, which also convolves every RoI: at the same FLOPs
    it tells the searched cells from any convolutional head."""

    def __init__(self, in_channels: int, pooler_size: int = 7, convs: int = 4, channels: int = 256,
                 fc_dim: int = 1024, norm: str = "bn"):
        norm_layer = None if norm == "none" else partial(make_norm, norm)
        super().__init__((in_channels, pooler_size, pooler_size), [channels] * convs, [fc_dim], norm_layer)
        self.out_channels = fc_dim


class BoxPredictor(nn.Module):
    """forward(x: Tensor[R, D]) -> (class logits [R, K], class-specific box deltas [R, 4K])."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)
