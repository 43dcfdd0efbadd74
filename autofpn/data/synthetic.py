"""The embedded dataset: shapes drawn at many scales, written as COCO JSON + JPEGs.

Why: ``make demo`` and the tests need a detection dataset that exists on a fresh machine,
takes seconds to make, and where multi-scale fusion matters. Each image holds 3..14 objects of
10 classes of drawn shapes (circle, square, triangle, star, cross, ring, ellipse, diamond,
hexagon, arrow), each class with its own colour family (jittered per object) and fill style,
sizes log-uniform from 8 px to 60% of the short image side, random rotation, later objects
occluding earlier ones, on a varied background (linear gradient, smooth noise, stripes or
checkerboard). Unlabelled clutter (thin lines, dots, arcs: never one of the 10 shapes) is drawn
over everything so that not every coloured blob is an object.

Labels: the box of an object is the tight box of its VISIBLE pixels (modal box, like COCO);
an object whose visible area is below ``MIN_VISIBLE_FRACTION`` of its drawn area is not
labelled (it is mostly hidden; such leftovers are rare and small).

Determinism: image i of split s is drawn from ``numpy.random.default_rng([seed, s, i])``, so the
dataset depends only on (seed, num_train, num_val, image_size). ``ensure_synthetic`` writes
``manifest.json`` with these parameters and regenerates only when it is missing or differs.

Layout under ``root``: ``manifest.json``, ``annotations/{train,val}.json``,
``{train,val}/NNNNNN.jpg``.
"""
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

from autofpn.config import ConfigError

logger = logging.getLogger(__name__)

SYNTHETIC_VERSION = 1
SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "ellipse", "diamond",
                 "hexagon", "arrow")
# one colour family per class (RGB), jittered by +-JITTER per channel per object
CLASS_COLORS = ((220, 40, 40), (40, 160, 40), (40, 70, 220), (235, 200, 30), (200, 40, 200),
                (30, 200, 210), (240, 130, 20), (120, 60, 20), (250, 250, 250), (20, 20, 20))
COLOR_JITTER = 30
MIN_VISIBLE_FRACTION = 0.35
MIN_SIZE = 8.0
MAX_SIZE_FRACTION = 0.6
SPLIT_CODES = {"train": 0, "val": 1}


# ---- shapes: polygons in a unit frame, scaled / rotated / translated per object --------------
def _regular_polygon(n: int, phase: float = 0.0) -> np.ndarray:
    angles = phase + np.arange(n) * 2 * math.pi / n
    return np.stack([np.cos(angles), np.sin(angles)], 1) * 0.5


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points
    radius = np.where(np.arange(2 * points) % 2 == 0, 0.5, 0.5 * inner)
    return np.stack([np.cos(angles) * radius, np.sin(angles) * radius], 1)


_CROSS = np.array([[-.17, -.5], [.17, -.5], [.17, -.17], [.5, -.17], [.5, .17], [.17, .17],
                   [.17, .5], [-.17, .5], [-.17, .17], [-.5, .17], [-.5, -.17], [-.17, -.17]])
_ARROW = np.array([[-.5, -.14], [.1, -.14], [.1, -.36], [.5, 0], [.1, .36], [.1, .14],
                   [-.5, .14]])
UNIT_POLYGONS = {
    "square": np.array([[-.5, -.5], [.5, -.5], [.5, .5], [-.5, .5]]),
    "triangle": _regular_polygon(3, -math.pi / 2) * 1.15,
    "star": _star(),
    "cross": _CROSS,
    "diamond": np.array([[0, -.5], [.33, 0], [0, .5], [-.33, 0]]),
    "hexagon": _regular_polygon(6),
    "arrow": _ARROW,
}


def _draw_shape(draw: ImageDraw.ImageDraw, name: str, cx: float, cy: float, size: float,
                angle: float, fill, outline=None) -> None:
    """Draw class ``name`` of extent ~``size`` px centred at (cx, cy) on ``draw``."""
    r = size / 2
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline)
    elif name == "ring":
        width = max(2, int(round(size * 0.18)))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=width)
    elif name == "ellipse":
        # axis-aligned in a rotated frame is not supported by PIL: draw as a polygon
        t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        pts = np.stack([np.cos(t) * 0.5, np.sin(t) * 0.25], 1)
        _polygon(draw, pts, cx, cy, size, angle, fill, outline)
    else:
        _polygon(draw, UNIT_POLYGONS[name], cx, cy, size, angle, fill, outline)


def _polygon(draw, unit: np.ndarray, cx, cy, size, angle, fill, outline) -> None:
    c, s = math.cos(angle), math.sin(angle)
    rot = unit @ np.array([[c, s], [-s, c]]) * size
    draw.polygon([(float(x + cx), float(y + cy)) for x, y in rot], fill=fill, outline=outline)


# ---- backgrounds -------------------------------------------------------------------------------
def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8[H, W, 3]: gradient, smooth noise, stripes or checkerboard, plus pixel noise."""
    kind = rng.integers(4)
    yy, xx = np.ogrid[0:height, 0:width]
    yy, xx = yy.astype(np.float32), xx.astype(np.float32)
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    if kind == 0:  # linear gradient in a random direction
        theta = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(theta) + yy * math.sin(theta))
        t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    elif kind == 1:  # smooth noise: a coarse random grid upsampled bilinearly
        cells = int(rng.integers(3, 9))
        coarse = Image.fromarray((rng.uniform(0, 255, (cells, cells))).astype(np.uint8))
        t = np.asarray(coarse.resize((width, height), Image.BILINEAR), np.float32) / 255.0
    elif kind == 2:  # stripes of random period and orientation
        theta = rng.uniform(0, math.pi)
        period = rng.uniform(6, 40)
        t = 0.5 + 0.5 * np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi
                               / period)
    else:  # checkerboard
        cell = int(rng.integers(8, 48))
        t = ((xx // cell + yy // cell) % 2).astype(np.float32)
    # low-contrast backgrounds so the shapes stay visible
    mix = (c1 * 0.6 + c2 * 0.4).astype(np.float32)
    contrast = rng.uniform(0.15, 0.5)
    noise = rng.standard_normal((height, width), dtype=np.float32) * rng.uniform(2, 12)
    shade = (t.astype(np.float32) - 0.5) * np.float32(contrast)
    img = mix + (c2 - c1).astype(np.float32) * shade[..., None] + noise[..., None]
    return img.clip(0, 255).astype(np.uint8)


# ---- one image ---------------------------------------------------------------------------------
def _image_shape(rng: np.random.Generator, image_size: int) -> Tuple[int, int]:
    """(height, width): square, landscape or portrait (for aspect-ratio grouping)."""
    short = int(round(image_size * 0.75))
    return [(image_size, image_size), (short, image_size), (image_size, short)][rng.integers(3)]


def draw_image(rng: np.random.Generator, image_size: int) -> Tuple[Image.Image, List[Dict]]:
    """One synthetic image and its objects ``[{"label": 1..10, "box": [x1, y1, x2, y2]}]``."""
    height, width = _image_shape(rng, image_size)
    canvas = Image.fromarray(_background(rng, height, width))
    draw = ImageDraw.Draw(canvas)
    owner = np.zeros((height, width), np.int32)  # object index + 1 that owns each pixel
    drawn_area: List[int] = []
    classes: List[int] = []
    windows: List[Tuple[int, int, int, int]] = []  # (y0, x0, y1, x1) per object
    max_size = MAX_SIZE_FRACTION * min(height, width)
    for k in range(int(rng.integers(3, 15))):
        cls = int(rng.integers(len(SHAPE_CLASSES)))
        size = float(math.exp(rng.uniform(math.log(MIN_SIZE), math.log(max_size))))
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        angle = rng.uniform(0, 2 * math.pi)
        color = tuple(int(v) for v in np.clip(
            np.array(CLASS_COLORS[cls]) + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3),
            0, 255))
        outline = tuple(int(v * 0.5) for v in color) if rng.random() < 0.4 else None
        mask_img = Image.new("L", (width, height), 0)
        _draw_shape(ImageDraw.Draw(mask_img), SHAPE_CLASSES[cls], cx, cy, size, angle, 255)
        mask = np.asarray(mask_img) > 0
        if mask.sum() < 16:
            continue  # fell almost entirely outside the image
        _draw_shape(draw, SHAPE_CLASSES[cls], cx, cy, size, angle, color, outline)
        owner[mask] = len(classes) + 1
        drawn_area.append(int(mask.sum()))
        classes.append(cls + 1)
        # a window surely containing the shape (all unit shapes fit in radius 0.6 * size)
        windows.append((max(0, int(cy - 0.6 * size) - 1), max(0, int(cx - 0.6 * size) - 1),
                        int(cy + 0.6 * size) + 2, int(cx + 0.6 * size) + 2))
    # unlabelled clutter on top: lines, dots, arcs (occlude objects, never one of the shapes)
    clutter = Image.new("L", (width, height), 0)
    clutter_draw = ImageDraw.Draw(clutter)
    for _ in range(int(rng.integers(2, 10))):
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        kind = rng.integers(3)
        if kind == 0:
            pts = [(x0, y0), (x0 + rng.uniform(-80, 80), y0 + rng.uniform(-80, 80))]
            line_width = int(rng.integers(1, 4))
            draw.line(pts, fill=color, width=line_width)
            clutter_draw.line(pts, fill=255, width=line_width)
        elif kind == 1:
            r = rng.uniform(1, 3)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=color)
            clutter_draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=255)
        else:
            r = rng.uniform(6, 30)
            start = float(rng.uniform(0, 360))
            box = [x0 - r, y0 - r, x0 + r, y0 + r]
            draw.arc(box, start, start + 120, fill=color, width=2)
            clutter_draw.arc(box, start, start + 120, fill=255, width=2)
    owner[np.asarray(clutter) > 0] = 0
    objects = []
    for k, (cls, area, (y0, x0, y1, x1)) in enumerate(zip(classes, drawn_area, windows)):
        ys, xs = np.nonzero(owner[y0:y1, x0:x1] == k + 1)
        if len(xs) < MIN_VISIBLE_FRACTION * area:
            continue
        box = [float(x0 + xs.min()), float(y0 + ys.min()), float(x0 + xs.max() + 1),
               float(y0 + ys.max() + 1)]
        if box[2] - box[0] < 2 or box[3] - box[1] < 2:
            continue
        objects.append({"label": cls, "box": box})
    return canvas, objects


# ---- a split on disk ---------------------------------------------------------------------------
def _draw_and_save(out_dir: str, split: str, indices: range, image_size: int,
                   seed: int) -> List[Tuple[Dict, List[Dict]]]:
    """Draw and write images ``indices`` of a split; returns (image entry, objects) each."""
    out = []
    for i in indices:
        rng = np.random.default_rng([seed, SPLIT_CODES[split], i])
        canvas, objects = draw_image(rng, image_size)
        file_name = f"{split}/{i + 1:06d}.jpg"
        canvas.save(os.path.join(out_dir, file_name), quality=92)
        out.append(({"id": i + 1, "file_name": file_name, "height": canvas.height,
                     "width": canvas.width}, objects))
    return out


def generate_split(out_dir: str, split: str, num_images: int, image_size: int, seed: int,
                   processes: int = 1) -> Dict[str, Any]:
    """Draw ``num_images`` images into ``out_dir/split/`` and return the COCO dict.

    ``processes`` > 1 draws contiguous chunks in parallel; the output is identical because
    every image has its own random generator.
    """
    os.makedirs(os.path.join(out_dir, split), exist_ok=True)
    processes = max(1, min(processes, num_images // 16))  # small splits: not worth a fork
    chunk = -(-num_images // processes) if num_images else 0
    chunks = [range(start, min(start + chunk, num_images))
              for start in range(0, num_images, chunk or 1)]
    if processes > 1:
        context = multiprocessing.get_context("fork" if os.name == "posix" else "spawn")
        with context.Pool(processes) as pool:
            parts = pool.starmap(_draw_and_save, [(out_dir, split, c, image_size, seed)
                                                  for c in chunks])
    else:
        parts = [_draw_and_save(out_dir, split, c, image_size, seed) for c in chunks]
    images, annotations = [], []
    for image, objects in (item for part in parts for item in part):
        images.append(image)
        for obj in objects:
            x1, y1, x2, y2 = obj["box"]
            annotations.append({"id": len(annotations) + 1, "image_id": image["id"],
                                "category_id": obj["label"], "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    categories = [{"id": i + 1, "name": n, "supercategory": "shape"}
                  for i, n in enumerate(SHAPE_CLASSES)]
    return {"info": {"description": f"autofpn synthetic shapes v{SYNTHETIC_VERSION}",
                     "seed": seed}, "images": images, "annotations": annotations,
            "categories": categories}


def synthetic_manifest(params: Dict[str, Any]) -> Dict[str, Any]:
    return {"version": SYNTHETIC_VERSION, "num_train": int(params["num_train"]),
            "num_val": int(params["num_val"]), "image_size": int(params["image_size"]),
            "seed": int(params["seed"])}


def synthetic_paths(root: str) -> Dict[str, str]:
    return {"root": root, "manifest": os.path.join(root, "manifest.json"),
            "train_ann": os.path.join(root, "annotations", "train.json"),
            "val_ann": os.path.join(root, "annotations", "val.json")}


def ensure_synthetic(params: Dict[str, Any]) -> Dict[str, str]:
    """Generate the dataset under ``params["root"]`` unless an identical one is there.

    ``params`` is ``cfg["data"]["synthetic"]``: root, num_train, num_val, image_size, seed.
    Generation goes to a temporary folder renamed into place, so a crash or a concurrent
    process (several ranks) never leaves a half-written dataset behind a valid manifest.
    Returns the paths (``root``, ``train_ann``, ``val_ann``, ``manifest``).
    """
    root = os.path.abspath(params["root"])
    paths = synthetic_paths(root)
    wanted = synthetic_manifest(params)
    if _manifest_matches(paths["manifest"], wanted):
        return paths
    broken = _dangling_link(root)
    if broken:  # else makedirs below fails with a message about the temporary folder
        raise ConfigError(f"data.synthetic.root = {params['root']}: {broken} is a symbolic link to "
                          f"{os.readlink(broken)}, which does not exist")
    start = time.perf_counter()
    tmp = f"{root}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "annotations"))
    for split, count in (("train", wanted["num_train"]), ("val", wanted["num_val"])):
        coco = generate_split(tmp, split, count, wanted["image_size"], wanted["seed"],
                              processes=os.cpu_count() or 1)
        with open(os.path.join(tmp, "annotations", f"{split}.json"), "w") as f:
            json.dump(coco, f)
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(wanted, f, indent=1)
    if _manifest_matches(paths["manifest"], wanted):  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return paths
    if os.path.exists(root):
        shutil.rmtree(root)  # stale parameters
    os.makedirs(os.path.dirname(root), exist_ok=True)
    try:
        os.rename(tmp, root)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _manifest_matches(paths["manifest"], wanted):
            raise
    logger.info("synthetic dataset generated in %s (%d + %d images, %.1f s)", root,
                wanted["num_train"], wanted["num_val"], time.perf_counter() - start)
    return paths


def _dangling_link(path: str) -> Optional[str]:
    """``path`` or the nearest folder above it that is a symbolic link to nothing, or None."""
    while True:
        if os.path.islink(path) and not os.path.exists(path):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def _manifest_matches(path: str, wanted: Dict[str, Any]) -> bool:
    try:
        with open(path) as f:
            return json.load(f) == wanted
    except (OSError, ValueError):
        return False
