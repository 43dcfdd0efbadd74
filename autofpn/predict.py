"""Run a trained detector on any images: each image with its detections drawn, and one COCO
results file.

    python -m autofpn.predict --ckpt out/voc/model_final.pth photo1.jpg photo2.png --out out/pred
    python -m autofpn.predict --ckpt out/voc --dir FOLDER --out out/pred [--score 0.5] \\
        [--ann instances.json] [--batch-size 4] [--device auto|cpu|cuda]

``--ckpt``: a ``model_final.pth``, any training checkpoint, or a run folder (its
``model_final.pth``). The checkpoint holds its config and genotype, so an FPN baseline and a
searched detector rebuild themselves (``autofpn.engine.runs.load_trained_model``). Images: the
paths given and the .jpg / .jpeg / .png / .bmp files of ``--dir`` (sorted by name, not
recursive), run ``--batch-size`` at a time through the detector's own transform (each image
resized at its own aspect ratio; a batch pads them to a common size, which moves the numbers a
little: the demo study's FPN run gave 16.26 AP on its 100 validation images with
``--batch-size 1``, its final evaluation's figure, and 16.09 with 4). A file that is missing or
does not decode is skipped with one warning line naming it, and the count is reported at the end.

Written to ``--out``:

- each image under its own file name, with its detections scoring ``--score`` or more drawn
  (class name and score, one colour per class);
- ``detections.json``: COCO results ``[{"image_id", "category_id", "bbox": [x, y, w, h],
  "score"}]`` in pixels of the image as decoded (EXIF rotation applied), with every detection
  the model keeps (``model.roi.score_thresh`` of its config, not ``--score``: AP needs the low
  scores too);
- ``images.json``: ``{file name: image_id}``.

image_id: with ``--ann`` (a COCO instances file that holds these images) the file's ids,
matched by file name, so ``python evaluate.py --results OUT/detections.json --ann FILE`` scores
the predictions; else 1..N in the order above. Classes: the names and the dataset's category
ids the checkpoint records (``"classes"``, written by training runs made since this command
exists). A checkpoint without them takes the categories of ``--ann`` when their number fits
the model, in id order (the order the COCO reader numbers labels; not so for a run trained with
``data.categories`` in another order); otherwise ``category_id`` is the model's label k and the
pictures say "class k".
"""
import argparse
import logging
import os
import sys
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image

from autofpn.engine.logging import Progress

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def list_images(paths: Sequence[str], folder: Optional[str]) -> List[str]:
    """The images to run: ``paths`` as given, then the image files of ``folder`` sorted by name.
    Two with the same file name would write the same picture: a ValueError naming them."""
    found = list(paths)
    if folder is not None:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--dir {folder}: not a folder")
        found += [os.path.join(folder, name) for name in sorted(os.listdir(folder))
                  if name.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(folder, name))]
    by_name: Dict[str, List[str]] = {}
    for path in found:
        by_name.setdefault(os.path.basename(path), []).append(path)
    clashes = [same for same in by_name.values() if len(same) > 1]
    if clashes:
        raise ValueError("images with the same file name would overwrite each other's picture in --out: "
                         + "; ".join(" and ".join(same) for same in clashes[:3]))
    return found


def image_ids_from_annotations(paths: Sequence[str], ann_path: str) -> Tuple[Dict[str, int], List[Dict]]:
    """({path: image id}, categories) of a COCO instances file. An image matches the entry of its
    file name; among several entries of that name, the one whose ``file_name`` the path ends
    with. An image the file does not hold is an error naming it, unless it cannot be read
    anyway (it is skipped then, with the other unreadable files)."""
    from autofpn.data.base import AnnotationError
    from autofpn.data.coco import check_coco_dict, load_json
    from autofpn.data.image_check import image_problem
    data = load_json(ann_path)
    check_coco_dict(data, ann_path)
    entries: Dict[str, List[Dict]] = {}
    for entry in data["images"]:
        entries.setdefault(os.path.basename(str(entry["file_name"])), []).append(entry)
    ids, unknown = {}, []
    for path in paths:
        candidates = entries.get(os.path.basename(path), [])
        if len(candidates) > 1:
            whole = os.path.abspath(path).replace(os.sep, "/")
            candidates = [e for e in candidates if whole.endswith("/" + str(e["file_name"]).lstrip("/"))]
        if len(candidates) == 1:
            ids[path] = int(candidates[0]["id"])
        elif image_problem(path) is None:
            unknown.append(path)
    if unknown:
        raise AnnotationError(f"{ann_path}: {len(unknown)} of the images are not in this file (matched by file "
                              f"name), e.g. {', '.join(unknown[:3])}")
    return ids, data["categories"]


def class_table(checkpoint: Dict[str, Any], num_classes: int,
                ann_categories: Optional[List[Dict]]) -> Tuple[List[str], List[int]]:
    """(class names, label -> category id), index 0 = background, for labels 0..num_classes-1:
    the checkpoint's record, else ``--ann``'s categories in id order when their number fits,
    else "class k" and the label itself (see the module docstring)."""
    recorded = checkpoint.get("classes")
    if recorded and len(recorded["names"]) == num_classes - 1:
        return ["__background__", *recorded["names"]], [0, *recorded["category_ids"]]
    if ann_categories is not None and len(ann_categories) == num_classes - 1:
        categories = sorted(ann_categories, key=lambda c: c["id"])
        logger.info("the checkpoint records no class names: taking the %d categories of --ann in id order",
                    len(categories))
        return ["__background__", *(str(c["name"]) for c in categories)], [0, *(int(c["id"]) for c in categories)]
    logger.info("the checkpoint records no class names%s: detections are named 'class k' and written with "
                "category_id = k", "" if ann_categories is None else
                f" and --ann has {len(ann_categories)} categories for {num_classes - 1} classes")
    return ["__background__", *(f"class {k}" for k in range(1, num_classes))], list(range(num_classes))


def read_batches(paths: Sequence[str], batch_size: int, skipped: List[Tuple[str, str]]
                 ) -> Iterator[List[Tuple[str, Image.Image]]]:
    """Batches of (path, RGB image) of ``paths``, in order; a file that cannot be used is
    reported on one line, appended to ``skipped`` as (path, why) and left out."""
    from autofpn.data.image_check import image_problem
    from autofpn.data.transforms import ImageLoadError, load_image
    batch: List[Tuple[str, Image.Image]] = []
    for path in paths:
        why = image_problem(path)  # also catches a truncated JPEG that PIL would half-decode
        if why is None:
            try:
                batch.append((path, load_image(path)))
            except ImageLoadError as e:
                why = str(e)
        if why is not None:
            print(f"warning: skipped {path}: {why}", file=sys.stderr, flush=True)
            skipped.append((path, why))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="*", help="image files")
    p.add_argument("--ckpt", required=True, help="model_final.pth, a training checkpoint, or a run folder")
    p.add_argument("--dir", default=None, help="a folder of images (.jpg .jpeg .png .bmp, not recursive)")
    p.add_argument("--out", required=True, help="output folder: the pictures, detections.json, images.json")
    p.add_argument("--score", type=float, default=0.5, help="draw detections scoring this or more (default 0.5)")
    p.add_argument("--ann", default=None,
                   help="COCO instances file holding these images: its image ids (and, for a checkpoint "
                        "without class names, its categories) go into detections.json")
    p.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = p.parse_args(argv)
    if not args.images and args.dir is None:
        p.error("give image files or --dir FOLDER")
    if args.batch_size < 1:
        p.error("--batch-size must be 1 or more")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available (use auto or cpu)")
    try:
        args.paths = list_images(args.images, args.dir)
    except ValueError as e:
        p.error(str(e))
    if os.path.realpath(args.out) in {os.path.realpath(os.path.dirname(os.path.abspath(x))) for x in args.paths}:
        p.error(f"--out {args.out} holds the images: the pictures (same file names) would overwrite them")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from autofpn.data.transforms import ImageLoadError, pil_to_tensor
    from autofpn.engine.distributed import resolve_device
    from autofpn.engine.runs import load_trained_model
    from autofpn.eval.inference import coco_results, write_json
    from autofpn.viz.detections import save_detections

    paths = args.paths
    if not paths:
        raise ImageLoadError(f"--dir {args.dir}: no {' / '.join(IMAGE_SUFFIXES)} files in it")
    ann_ids, ann_categories = image_ids_from_annotations(paths, args.ann) if args.ann else ({}, None)
    checkpoint, cfg, model = load_trained_model(args.ckpt)
    device = resolve_device(args.device)
    model.to(device)
    class_names, label_to_category_id = class_table(checkpoint, int(cfg["model"]["num_classes"]), ann_categories)
    os.makedirs(args.out, exist_ok=True)

    results: List[Dict[str, Any]] = []
    image_ids: Dict[str, int] = {}
    skipped: List[Tuple[str, str]] = []
    drawn = 0
    progress = Progress(len(paths), desc="predict")  # counted in images, skipped ones included
    try:
        for batch in read_batches(paths, args.batch_size, skipped):
            started = time.perf_counter()
            with torch.inference_mode():
                outputs = model([pil_to_tensor(image).to(device) for _, image in batch])
            for (path, image), output in zip(batch, outputs):
                output = {k: v.cpu() for k, v in output.items()}
                image_id = ann_ids.get(path, len(image_ids) + 1)
                image_ids[os.path.basename(path)] = image_id
                results.extend(coco_results(output, image_id, label_to_category_id))
                save_detections(os.path.join(args.out, os.path.basename(path)), image, output["boxes"],
                                 output["labels"], output["scores"], class_names, score_thresh=args.score)
                drawn += int((output["scores"] >= args.score).sum())
            images_per_s = len(batch) / max(time.perf_counter() - started, 1e-9)
            progress.advance(len(image_ids) + len(skipped) - progress.n,
                             {"img_s": f"{images_per_s:.1f}", "drawn": str(drawn)})
        if progress.n < len(paths):  # the last files were skipped
            progress.advance(len(paths) - progress.n, {"drawn": str(drawn)})
    finally:
        progress.close()
    if not image_ids:
        raise ImageLoadError(f"none of the {len(paths)} images could be read (see the warnings above)")
    write_json(results, os.path.join(args.out, "detections.json"))
    write_json(image_ids, os.path.join(args.out, "images.json"))
    print(f"wrote {len(image_ids)} pictures ({drawn} detections with score >= {args.score} drawn), "
          f"{os.path.join(args.out, 'detections.json')} ({len(results)} detections) and "
          f"{os.path.join(args.out, 'images.json')}", flush=True)
    if skipped:
        print(f"{len(skipped)} of {len(paths)} images skipped: they cannot be read (warnings above)", flush=True)
    if args.ann:
        print(f"score them: python evaluate.py --results {os.path.join(args.out, 'detections.json')} "
              f"--ann {args.ann}", flush=True)
    return 0


if __name__ == "__main__":
    from autofpn.cli import run_command
    sys.exit(run_command(main))
