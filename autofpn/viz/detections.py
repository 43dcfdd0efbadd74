"""Detections (or ground truth) drawn on an image: boxes, class names and scores.

``draw_detections`` returns a PIL image; ``save_detections`` writes PNG, JPEG or BMP (by
suffix); ``save_dataset_detections`` draws a model's detections on the first images of a
dataset (the demo's and a training run's pictures).
"""
import os
from typing import List, Optional, Sequence, Union

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
    """``draw_detections`` then save to ``path`` (.png, .jpg, .jpeg or .bmp); returns the path."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".png", ".jpg", ".jpeg", ".bmp"):
        raise ValueError(f"{path}: use a .png, .jpg, .jpeg or .bmp file name")
    canvas = draw_detections(image, boxes, labels, scores, class_names, score_thresh)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path, quality=92) if suffix in (".jpg", ".jpeg") else canvas.save(path)
    return path


def save_dataset_detections(model: torch.nn.Module, dataset, out_dir: str, count: int = 3,
                            prefix: str = "detections", score_thresh: float = 0.5) -> List[str]:
    """The first ``count`` images of ``dataset`` (``dataset[i] = (Tensor[3, H, W], target)``,
    with ``class_names``) with ``model``'s detections scoring ``score_thresh`` or more drawn,
    written as ``out_dir/{prefix}_{i}.jpg``. The model runs in eval mode on its own device
    (its train / eval mode is restored). Returns the paths."""
    device = next(model.parameters()).device
    names = getattr(dataset, "class_names", None)
    was_training = model.training
    model.eval()
    written = []
    try:
        for i in range(min(count, len(dataset))):
            image, _ = dataset[i]
            with torch.no_grad():
                det = model([image.to(device)])[0]
            written.append(save_detections(os.path.join(out_dir, f"{prefix}_{i}.jpg"), image, det["boxes"],
                                           det["labels"], det["scores"], class_names=names,
                                           score_thresh=score_thresh))
    finally:
        model.train(was_training)
    return written
