"""The standard Faster R-CNN box head (two fully connected layers) and the predictor."""
from typing import Tuple

from torch import Tensor, nn


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


class BoxPredictor(nn.Module):
    """forward(x: Tensor[R, D]) -> (class logits [R, K], class-specific box deltas [R, 4K])."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, num_classes * 4)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)
