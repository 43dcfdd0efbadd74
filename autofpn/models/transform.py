"""The detector's input transform: normalize, resize, pad into one batch; and the way back."""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _float_tensor(size) -> Tensor:
    """A side length (an int, or a 0-dim tensor when traced: kept as a graph value) as float32."""
    return size.to(torch.float32) if isinstance(size, Tensor) else torch.tensor(size, dtype=torch.float32)


def resize_boxes(boxes: Tensor, from_size: Tuple[int, int], to_size: Tuple[int, int]) -> Tensor:
    """Scale xyxy boxes Tensor[N, 4] from an image of ``from_size`` (H, W) to ``to_size``."""
    ratio_h = _float_tensor(to_size[0]) / _float_tensor(from_size[0])
    ratio_w = _float_tensor(to_size[1]) / _float_tensor(from_size[1])
    scale = torch.stack((ratio_w, ratio_h, ratio_w, ratio_h)).to(boxes)
    return boxes * scale


class ImageTransform(nn.Module):
    """Turns a list of images of any sizes into one padded, normalized batch.

    Each image is resized so its short side is ``min_size`` (in training a random choice from
    the list: multi-scale training) unless its long side would exceed ``max_size``; then all
    are padded to a common size divisible by ``size_divisible``. Target boxes follow the resize.
    """

    def __init__(self, min_size: Sequence[int], max_size: int, test_min_size: int,
                 image_mean: Sequence[float], image_std: Sequence[float], size_divisible: int = 32):
        super().__init__()
        self.min_size = list(min_size)
        self.max_size = max_size
        self.test_min_size = test_min_size
        self.size_divisible = size_divisible
        self.register_buffer("mean", torch.tensor(image_mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std).view(3, 1, 1), persistent=False)

    def _choose_min_size(self) -> int:
        if not self.training:
            return self.test_min_size
        # torch's RNG (not python's) so seeded runs and resumed runs draw the same sizes
        index = int(torch.empty(1).uniform_(0.0, float(len(self.min_size))).item())
        return self.min_size[index]

    def resize(self, image: Tensor, min_size: int) -> Tensor:
        h, w = image.shape[-2:]
        if torch.jit.is_tracing():
            # h, w are 0-dim tensors: the same arithmetic (in float64, as Python's floats
            # below) as graph ops, so an exported model resizes every input size as eager does
            # (tensor / tensor: the exporter would compute a Python number / tensor in float32)
            size = torch.stack([h, w]).to(torch.float64)
            limits = torch.tensor([min_size, self.max_size], dtype=torch.float64)
            scale = (limits / torch.stack([size.min(), size.max()])).min()
            out = (size * scale).floor().to(torch.int64)
            return F.interpolate(image[None], size=(out[0], out[1]), mode="bilinear", align_corners=False)[0]
        scale = min(min_size / min(h, w), self.max_size / max(h, w))
        return F.interpolate(image[None], scale_factor=scale, mode="bilinear",
                             recompute_scale_factor=True, align_corners=False)[0]

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
                ) -> Tuple[Tensor, List[Tuple[int, int]], Optional[List[Dict[str, Tensor]]]]:
        """images: List[Tensor[3, H_i, W_i]] in [0, 1] -> (batch Tensor[N, 3, H, W],
        resized sizes [(h_i, w_i)], targets with resized boxes (copies; inputs untouched))."""
        resized = []
        out_targets = [] if targets is not None else None
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"image {i}: expected a Tensor[3, H, W], got shape {tuple(image.shape)}")
            if not image.is_floating_point():
                raise TypeError(f"image {i}: expected a float tensor in [0, 1], got {image.dtype}")
            size = image.shape[-2:]
            image = self.resize((image - self.mean) / self.std, self._choose_min_size())
            resized.append(image)
            if targets is not None:
                target = dict(targets[i])
                target["boxes"] = resize_boxes(target["boxes"], size, image.shape[-2:])
                out_targets.append(target)
        image_sizes = [tuple(im.shape[-2:]) for im in resized]  # ints (0-dim tensors when traced)
        return self.batch(resized), image_sizes, out_targets

    def batch(self, images: List[Tensor]) -> Tensor:
        stride = self.size_divisible
        if torch.jit.is_tracing():  # zero padding as graph ops of the (symbolic) image sizes
            sizes = torch.stack([torch.stack(list(im.shape[-2:])) for im in images])
            padded = (torch.ceil(sizes.amax(0).to(torch.float64) / stride) * stride).to(torch.int64)
            return torch.stack([F.pad(im, (0, padded[1] - im.shape[-1], 0, padded[0] - im.shape[-2]))
                                for im in images])
        max_h = int(math.ceil(max(im.shape[-2] for im in images) / stride) * stride)
        max_w = int(math.ceil(max(im.shape[-1] for im in images) / stride) * stride)
        batch = images[0].new_zeros((len(images), 3, max_h, max_w))
        for im, slot in zip(images, batch):
            slot[:, : im.shape[-2], : im.shape[-1]].copy_(im)
        return batch

    @staticmethod
    def postprocess(detections: List[Dict[str, Tensor]], image_sizes: List[Tuple[int, int]],
                    original_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """Map detection boxes from the resized images back to the input images."""
        for det, size, orig in zip(detections, image_sizes, original_sizes):
            det["boxes"] = resize_boxes(det["boxes"], size, orig)
        return detections
