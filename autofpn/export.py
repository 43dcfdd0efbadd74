"""Export a trained detector to ONNX, and check the file against the PyTorch model.

    python -m autofpn.export --ckpt out/voc/model_final.pth --out out/voc/model.onnx
    python -m autofpn.export --ckpt out/voc --out model.onnx [--opset 17] [--check 3] [--size 480 640]

``--ckpt``: a ``model_final.pth``, any training checkpoint, or a run folder, as for
``autofpn.predict``: an FPN baseline and a searched detector (its decoded neck and head) rebuild
themselves from the checkpoint.

The graph is the detector's whole eval forward, as torchvision's detectors export it: resize,
normalise and pad, backbone, neck, RPN (top-k per level, NMS), RoIAlign over the pyramid, box
head, class-wise NMS, boxes mapped back to the input image. Signature::

    image   float32[3, H, W]   RGB in [0, 1], any H and W
    boxes   float32[D, 4]      xyxy, pixels of the input image
    labels  int64[D]           1 .. K-1 (the model's labels; names in the metadata)
    scores  float32[D]

One image per call (batching would pad images to a common size, which changes the numbers a
little, see ``autofpn.predict``). The file's metadata hold ``classes`` (JSON: the names and
dataset category ids of labels 1..K-1, when the checkpoint records them), ``neck``, ``head`` and
``genotype``. Written with the TorchScript-based exporter (``torch.onnx.export(dynamo=False)``,
default opset 17); ONNX operators beyond the plain ones: Resize, TopK, NonMaxSuppression,
RoiAlign, ScatterElements. A supernet (a search checkpoint) is not exported: decode it and train
the found detector first.

``--check N`` (default 3) runs the file with onnxruntime on N seeded random images of different
sizes (or on the files given with ``--images``) beside the PyTorch model and prints how far they are apart (detections matched by label and
box); exit code 1 when they disagree beyond 1e-3 px / 1e-4 in score.
"""
import argparse
import json
import os
import sys
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

DEFAULT_OPSET = 17
BOX_TOLERANCE = 1e-3  # pixels
SCORE_TOLERANCE = 1e-4


class SingleImageDetector(nn.Module):
    """The exported signature: ``forward(image [3, H, W]) -> (boxes [D, 4], labels int64[D],
    scores [D])`` around a detector's ``model([image])[0]``."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        detections = self.detector([image])[0]
        return detections["boxes"], detections["labels"], detections["scores"]


def export_onnx(model: nn.Module, path: str, opset: int = DEFAULT_OPSET, example_size: Tuple[int, int] = (480, 640),
                metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``model`` (a detector in eval mode) to ``path`` (atomically: a crash leaves no
    half-written file) with dynamic image height / width and number of detections."""
    import onnx
    if getattr(model, "arch", None) is not None:
        raise ValueError("this is a supernet (a search checkpoint): decode its genotype and train the found "
                         "detector, then export that")
    model = SingleImageDetector(model).eval()
    example = torch.rand(3, *example_size, generator=torch.Generator().manual_seed(0))
    tmp = f"{path}.tmp"
    with warnings.catch_warnings(), torch.no_grad():
        # the tracer's notes on shape checks and constants it keeps: the model's code marks where
        # a traced value must stay symbolic (torch.jit.is_tracing()), the rest is meant
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch.onnx")
        torch.onnx.export(model, (example,), tmp, dynamo=False, opset_version=opset, input_names=["image"],
                          output_names=["boxes", "labels", "scores"],
                          dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "detections"},
                                        "labels": {0: "detections"}, "scores": {0: "detections"}})
    proto = onnx.load(tmp)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, tmp)
    os.replace(tmp, path)


def match_detections(reference: Dict[str, Tensor], other: Dict[str, Tensor]) -> Dict[str, Any]:
    """Pair each reference detection with the other's detection of the same label whose box is
    nearest (max coordinate difference), greedily by decreasing reference score.

    Returns {"reference": D_ref, "other": D_other, "matched": pairs, "box_error": max px
    difference over the pairs, "score_error": max score difference}."""
    order = torch.argsort(reference["scores"], descending=True)
    free = torch.ones(len(other["scores"]), dtype=torch.bool)
    box_error = score_error = 0.0
    matched = 0
    for i in order.tolist():
        candidates = torch.where(free & (other["labels"] == reference["labels"][i]))[0]
        if len(candidates) == 0:
            continue
        distance = (other["boxes"][candidates] - reference["boxes"][i]).abs().amax(dim=1)
        j = int(candidates[int(distance.argmin())])
        free[j] = False
        matched += 1
        box_error = max(box_error, float(distance.min()))
        score_error = max(score_error, float((other["scores"][j] - reference["scores"][i]).abs()))
    return {"reference": len(reference["scores"]), "other": len(other["scores"]), "matched": matched,
            "box_error": box_error, "score_error": score_error}


def check_with_onnxruntime(model: nn.Module, path: str, images: Sequence[Tensor]) -> List[Dict[str, Any]]:
    """Run ``path`` with onnxruntime and ``model`` on each image Tensor[3, h, w] (RGB in [0, 1]);
    per image the ``match_detections`` record (plus "size" and "ok": same detections, boxes
    within BOX_TOLERANCE px, scores within SCORE_TOLERANCE)."""
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    records = []
    for image in images:
        with torch.no_grad():
            reference = model.eval()([image])[0]
        boxes, labels, scores = session.run(None, {"image": image.numpy()})
        other = {"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(labels),
                 "scores": torch.from_numpy(scores)}
        record = {"size": tuple(image.shape[-2:]), **match_detections(reference, other)}
        record["ok"] = (record["reference"] == record["other"] == record["matched"]
                        and record["box_error"] <= BOX_TOLERANCE and record["score_error"] <= SCORE_TOLERANCE)
        records.append(record)
    return records


def random_images(sizes: Sequence[Tuple[int, int]], seed: int = 0) -> List[Tensor]:
    """One seeded uniform-noise image Tensor[3, h, w] per (h, w)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=generator) for h, w in sizes]


def check_sizes(count: int, example_size: Tuple[int, int]) -> List[Tuple[int, int]]:
    """``count`` image sizes unlike the traced one (portrait, landscape, odd sides)."""
    h, w = example_size
    shapes = [(h * 3 // 4 + 1, w + 37), (w - 13, h + 5), (h // 2 + 7, w // 2 + 3), (h + 11, h + 11)]
    return [shapes[i % len(shapes)] for i in range(count)]


def model_metadata(state: Dict[str, Any], cfg: Dict[str, Any]) -> Dict[str, str]:
    genotype = state.get("genotype")
    metadata = {"neck": cfg["model"]["neck"]["type"], "head": cfg["model"]["head"]["type"],
                "genotype": json.dumps(genotype) if genotype else ""}
    if state.get("classes"):
        metadata["classes"] = json.dumps(state["classes"])
    return metadata


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="model_final.pth, a training checkpoint, or a run folder")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help="ONNX opset (11 or newer)")
    p.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"),
                   help="the example image traced (any size works afterwards)")
    p.add_argument("--check", type=int, default=3, metavar="N",
                   help="random images of other sizes to compare with onnxruntime after exporting (0: none)")
    p.add_argument("--images", nargs="+", default=[], metavar="IMAGE",
                   help="compare on these image files instead (a trained detector finds nothing in noise)")
    args = p.parse_args(argv)
    if args.opset < 11:
        p.error("--opset must be 11 or newer (NonMaxSuppression, TopK with a dynamic k)")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    from autofpn.engine.runs import load_trained_model
    from autofpn.data.transforms import load_image, pil_to_tensor
    images = [pil_to_tensor(load_image(path)) for path in args.images]  # a bad file stops us before writing
    images = images or random_images(check_sizes(args.check, tuple(args.size)))
    state, cfg, model = load_trained_model(args.ckpt)
    if cfg["model"]["detector"] != "faster_rcnn":  # RetinaNet's / SSD's top-k / NMS are not written for tracing yet
        from autofpn.config import ConfigError
        raise ConfigError(f"{args.ckpt}: model.detector is {cfg['model']['detector']!r}; the ONNX export covers "
                          f"faster_rcnn only")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    export_onnx(model, args.out, args.opset, tuple(args.size), model_metadata(state, cfg))
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB, opset {args.opset}; neck "
          f"{cfg['model']['neck']['type']}, head {cfg['model']['head']['type']})", flush=True)
    if args.check <= 0 and not args.images:
        return 0
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        print("onnxruntime is not installed: the file was not checked (pip install onnxruntime)")
        return 0
    records = check_with_onnxruntime(model, args.out, images)
    failed = 0
    for r in records:
        failed += not r["ok"]
        print(f"  {r['size'][0]}x{r['size'][1]}: {r['matched']} of {r['reference']} detections matched "
              f"({r['other']} from onnxruntime), max box difference {r['box_error']:.2e} px, max score "
              f"difference {r['score_error']:.2e}  {'ok' if r['ok'] else 'DIFFERENT'}", flush=True)
    if failed:
        print(f"onnxruntime and PyTorch disagree on {failed} image(s) beyond {BOX_TOLERANCE} px / "
              f"{SCORE_TOLERANCE} in score", file=sys.stderr)
        return 1
    if not any(r["reference"] for r in records):
        print("note: the model detected nothing on these images, so the check compared no boxes; "
              "give it real ones with --images", flush=True)
    return 0


if __name__ == "__main__":
    from autofpn.cli import run_command
    sys.exit(run_command(main))
