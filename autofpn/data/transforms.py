"""Image decoding and the few transforms the data pipeline applies itself.

The pipeline hands the detector images at their ORIGINAL size as float tensors in [0, 1]; the
detector resizes (multi-scale in training), normalizes and pads on its own (torchvision's
GeneralizedRCNNTransform contract). So the only transforms here are:

- ``load_image``: decode with PIL, apply the EXIF orientation, convert grayscale / RGBA /
  palette / CMYK to RGB; a missing or corrupt file is an error naming the file.
- ``clip_boxes_to_image`` / ``drop_degenerate_boxes``: clean annotations once, at load time.
- ``hflip`` / ``hflip_boxes``: horizontal flip of an image with its boxes (training). The
  dataset flips the PIL image (``Image.transpose``) and the boxes in numpy: torch's element-wise
  ops on one small image are slow when loader processes compete for the cores.
"""
from typing import Dict, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageLoadError(RuntimeError):
    """An image file that is missing or cannot be decoded; the message names the file."""


def load_image(path: str) -> Image.Image:
    """Decode ``path`` into an upright RGB PIL image.

    EXIF orientation is applied (phone pictures are often stored rotated with a tag), and any
    mode (L, LA, RGBA, P, CMYK, I;16 ...) is converted to RGB. Transparent pixels keep their
    colour values (alpha is dropped, as torchvision and detectron2 do).
    """
    try:
        with Image.open(path) as img:
            img.load()  # decode now, inside the try, so truncated files fail here
            img = ImageOps.exif_transpose(img)
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # PIL warns when a transparent palette goes to RGB
            if img.mode in ("I;16", "I;16B", "I"):
                # 16/32-bit grayscale: rescale to 8 bit instead of clipping at 255
                arr = np.asarray(img, dtype=np.float64)
                peak = max(arr.max(), 1.0)
                img = Image.fromarray((arr * (255.0 / peak)).astype(np.uint8), mode="L")
            return img.convert("RGB")
    except FileNotFoundError as e:
        raise ImageLoadError(f"image file not found: {path}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageLoadError(f"cannot decode image {path}: {e}") from e


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float Tensor[3, H, W] in [0, 1]."""
    # in numpy: torch's intra-op threads make these tiny element-wise ops slow (and erratic)
    # when several loader processes share the cores
    arr = np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32, order="C")
    arr /= np.float32(255.0)  # same IEEE division as torchvision's to_tensor
    return torch.from_numpy(arr)


def clip_boxes_to_image(boxes: np.ndarray, height: int, width: int) -> Tuple[np.ndarray, int]:
    """Clip ``boxes: float[N, 4] xyxy`` to ``[0, width] x [0, height]``.

    Returns the clipped boxes and how many boxes were changed by the clipping.
    """
    if len(boxes) == 0:
        return boxes.reshape(0, 4).astype(np.float32), 0
    clipped = boxes.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    num_changed = int((np.abs(clipped - boxes) > 0).any(axis=1).sum())
    return clipped.astype(np.float32), num_changed


def nondegenerate_mask(boxes: np.ndarray) -> np.ndarray:
    """bool[N]: boxes with positive width and height (zero-area boxes break box regression)."""
    if len(boxes) == 0:
        return np.zeros((0,), dtype=bool)
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


def hflip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Mirror ``boxes: float[N, 4] xyxy`` in an image ``width`` wide: x1' = W - x2, x2' = W - x1
    (continuous pixel coordinates, so no -1)."""
    flipped = boxes.copy()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return flipped


def hflip(image: torch.Tensor, target: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, Dict]:
    """Flip ``image: Tensor[3, H, W]`` left-right and mirror ``target["boxes"]: [N, 4] xyxy``."""
    width = image.shape[-1]
    image = image.flip(-1)
    target = dict(target)
    boxes = target["boxes"].clone()
    # x1' = W - x2, x2' = W - x1 (continuous pixel coordinates, so no -1)
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    return image, target
