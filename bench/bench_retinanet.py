"""Train step and inference: our RetinaNet vs torchvision's, side by side in one run.

Both get the same backbone (ResNet-18 or ResNet-50 with frozen BatchNorm and torchvision's
trainable layers, FPN over C3-C5, P6 / P7 convolutions on P5), the same weights (torchvision's
copied into ours with ``torchvision_retinanet_state_dict_to_ours``), the same image size and
anchors, the same batch (bench_detector's). One difference, by design: torchvision's classifier
has ``num_classes`` outputs per anchor, ours ``num_classes - 1`` (no background column; the
last conv is ~5 % smaller at 21 classes). Repetitions interleaved, the median reported; peak
memory = extra peak resident memory of one train step in a fresh process (bench/peak_memory.py).

    python bench/bench_retinanet.py [--backbones resnet18 resnet50] [--reps 5] [--size 320]
"""
import argparse

import torch
import torchvision
from torchvision.models.detection import RetinaNet as TVRetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from autofpn.config import load_config
from autofpn.models.detector import build_detector
from autofpn.models.retinanet import torchvision_retinanet_state_dict_to_ours
from bench_detector import NUM_CLASSES, IMAGES_PER_BATCH, infer_fn, interleaved_median, make_batch, train_step_fn
from peak_memory import peak_in_fresh_process


def torchvision_model(backbone: str, size: int) -> torch.nn.Module:
    body = resnet_fpn_backbone(backbone_name=backbone, weights=None, norm_layer=FrozenBatchNorm2d,
                               trainable_layers=3, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    return TVRetinaNet(body, num_classes=NUM_CLASSES, min_size=size, max_size=int(size * 1333 / 800))


def our_model(backbone: str, size: int, theirs: torch.nn.Module) -> torch.nn.Module:
    cfg = load_config(None, ["model.detector=retinanet", f"model.num_classes={NUM_CLASSES}",
                             f"model.backbone.name={backbone}", "model.backbone.weights=none",
                             "model.neck.levels=[3,4,5]", "model.neck.extra_pool_level=false",
                             f"model.transform.min_size=[{size}]", f"model.transform.test_min_size={size}",
                             f"model.transform.max_size={int(size * 1333 / 800)}"])
    ours = build_detector(cfg)
    ours.load_state_dict(torchvision_retinanet_state_dict_to_ours(theirs.state_dict()), strict=True)
    mine = {n for n, p in ours.named_parameters() if p.requires_grad}
    theirs_trainable = set(torchvision_retinanet_state_dict_to_ours(
        {n: p for n, p in theirs.named_parameters() if p.requires_grad}))
    assert mine == theirs_trainable, f"trainable sets differ: {sorted(mine ^ theirs_trainable)[:5]}"
    return ours


def train_step_for(which: str, backbone: str, size: int):
    """One train step of "ours" or "torchvision" (fresh model and optimizer), for the memory probe."""
    torch.manual_seed(0)
    theirs = torchvision_model(backbone, size)
    model = (theirs if which == "torchvision" else our_model(backbone, size, theirs)).train()
    images, targets = make_batch(size)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    return train_step_fn(model, optimizer, images, targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["resnet18"], choices=("resnet18", "resnet50"))
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, threads {torch.get_num_threads()}, "
          f"{IMAGES_PER_BATCH} images/batch at min size {args.size}, median of {args.reps} interleaved reps")
    rows = []
    for backbone in args.backbones:
        torch.manual_seed(0)
        theirs = torchvision_model(backbone, args.size)
        ours = our_model(backbone, args.size, theirs)
        images, targets = make_batch(args.size)
        optimizers = {name: torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
                      for name, m in (("ours", ours), ("torchvision", theirs))}
        for model in (ours, theirs):
            model.train()
        train = interleaved_median({"ours": train_step_fn(ours, optimizers["ours"], images, targets),
                                    "torchvision": train_step_fn(theirs, optimizers["torchvision"], images, targets)},
                                   args.reps)
        for model in (ours, theirs):
            model.eval()
        infer = interleaved_median({"ours": infer_fn(ours, images), "torchvision": infer_fn(theirs, images)}, args.reps)
        rows += [(backbone, "train step", train["ours"], train["torchvision"]),
                 (backbone, "inference", infer["ours"], infer["torchvision"])]
        if not args.no_memory:
            mem = {w: peak_in_fresh_process(train_step_for, w, backbone, args.size) for w in ("ours", "torchvision")}
            rows.append((backbone, "peak MiB", mem["ours"], mem["torchvision"]))
    print(f"{'backbone':<12}{'mode':<12}{'ours':>10}{'torchvision':>13}{'ours / torchvision':>20}")
    for backbone, mode, a, b in rows:
        print(f"{backbone:<12}{mode:<12}{a:>10.3f}{b:>13.3f}{a / b:>20.2f}")


if __name__ == "__main__":
    main()
