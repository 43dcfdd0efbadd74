"""Detections (or ground truth) drawn on an image: boxes, class names and scores.

``draw_detections`` returns a PIL image; ``save_detections`` writes PNG or JPEG (by suffix).
"""
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# a fixed palette, cycled by label, so a class keeps its colour across images
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
           (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
           (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128))


def _to_pil(image: Union[torch.Tensor, np.ndarray, Image.Image]) -> Image.Image:
    """Tensor[3, H, W] in [0, 1], uint8 array [H, W, 3] or a PIL image -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        array = (image.detach().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        return Image.fromarray(array)
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")


def draw_detections(image, boxes, labels, scores=None,
                    class_names: Optional[Sequence[str]] = None, score_thresh: float = 0.0,
                    line_width: int = 2) -> Image.Image:
    """Draw ``boxes: [N, 4] xyxy`` with ``labels: [N]`` (and ``scores: [N]``) on ``image``.

    Boxes scoring below ``score_thresh`` are skipped. Labels are written as the class name
    (``class_names[label]``, index 0 = background) followed by the score.
    """
    canvas = _to_pil(image).copy()
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    boxes = np.asarray(torch.as_tensor(boxes).detach().cpu(), dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(torch.as_tensor(labels).detach().cpu()).reshape(-1)
    if scores is not None:
        scores = np.asarray(torch.as_tensor(scores).detach().cpu(), dtype=np.float32).reshape(-1)
    for i, (box, label) in enumerate(zip(boxes, labels)):
        score = None if scores is None else float(scores[i])
        if score is not None and score < score_thresh:
            continue
        color = PALETTE[int(label) % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) for v in box)
        draw.rectangle([x1, y1, x2, y2], outline=color, width=line_width)
        name = class_names[int(label)] if class_names is not None and \
            int(label) < len(class_names) else str(int(label))
        text = name if score is None else f"{name} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 2 if y1 - th - 2 >= 0 else y1  # above the box when it fits
        draw.rectangle([x1, ty, x1 + tw + 2, ty + th + 2], fill=color)
        luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        draw.text((x1 + 1, ty), text, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255),
                  font=font)
    return canvas


def save_detections(path: str, image, boxes, labels, scores=None,
                    class_names: Optional[Sequence[str]] = None,
                    score_thresh: float = 0.0) -> str:
    """``draw_detections`` then save to ``path`` (.png, .jpg or .jpeg); returns the path."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".png", ".jpg", ".jpeg"):
        raise ValueError(f"{path}: use a .png, .jpg or .jpeg file name")
    canvas = draw_detections(image, boxes, labels, scores, class_names, score_thresh)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path, quality=92) if suffix != ".png" else canvas.save(path)
    return path
