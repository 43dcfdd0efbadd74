"""Does a RetinaNet config give its classifier a signal to learn from? Prints, for a config
(default configs/retinanet_demo.yaml):

- the std of the class logits (bias left out) of a freshly built head on unit-variance features,
  with the project's initialisation (0.01 x sqrt(256 / channels)) and with torchvision's N(0, 0.01),
  at the config's neck width and at 256 channels;
- the sum of |d loss / d alpha| of the neck-search supernet at the start, on one batch of
  training images (the signal the architecture steps get from the detection loss), both inits;
- anchor coverage on training images: each ground-truth box's best IoU with any anchor, and the
  foreground anchors per image (IoU >= model.retinanet.fg_iou_thresh, plus each box's best).

    python bench/retinanet_signal.py [--cfg configs/retinanet_demo.yaml] [--images 4] [--opts k=v ...]
"""
import argparse
import os
import statistics
import sys

import torch
from torchvision.ops import box_iou

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchvision_init(head: torch.nn.Module) -> None:
    """torchvision's RetinaNet subnet init, N(0, 0.01) whatever the width (the bias kept)."""
    for conv in [*head.cls_convs, *head.box_convs, head.cls_logits, head.bbox_pred]:
        torch.nn.init.normal_(conv.weight, std=0.01)


def logit_std(channels: int, init_like_torchvision: bool) -> float:
    from autofpn.models.retinanet import RetinaNetHead
    torch.manual_seed(0)
    head = RetinaNetHead(channels, 9, 10)
    if init_like_torchvision:
        torchvision_init(head)
    x = torch.randn(1, channels, 16, 16)
    with torch.no_grad():
        for conv in head.cls_convs:
            x = torch.relu(conv(x))
        return (head.cls_logits(x) - head.cls_logits.bias.view(1, -1, 1, 1)).std().item()


def main() -> None:
    sys.path.insert(0, REPO)
    from autofpn.config import load_config
    from autofpn.data import build_dataset
    from autofpn.models.detector import build_detector
    from autofpn.search.differentiable import stage_config

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cfg", default=os.path.join(REPO, "configs", "retinanet_demo.yaml"))
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--opts", nargs="*", default=[])
    args = p.parse_args()
    cfg = load_config(args.cfg, args.opts)
    width = cfg["model"]["neck"]["channels"]
    for channels in sorted({width, 256}):
        ours, theirs = logit_std(channels, False), logit_std(channels, True)
        print(f"{channels:>4} channels: class-logit std at the start {ours:.2e} (this project's init), "
              f"{theirs:.2e} (N(0, 0.01))")

    train_set = build_dataset(cfg, "train")
    images, targets = zip(*[train_set[i] for i in range(args.images)])
    search_cfg = stage_config(cfg, "neck", None)
    for name, like_torchvision in (("this project's init", False), ("N(0, 0.01)", True)):
        torch.manual_seed(0)
        model = build_detector(search_cfg, search="neck").train()
        if like_torchvision:
            torchvision_init(model.head)
        sum(model(list(images), list(targets)).values()).backward()
        print(f"sum |d loss / d alpha| at the start, {name}: {model.arch.alpha.grad.abs().sum().item():.2e}")

    model = build_detector(cfg).train()
    captured = {}
    original = model.losses

    def keep(class_logits, deltas, anchors, matched, targets_):
        captured.update(anchors=anchors, matched=matched)
        return original(class_logits, deltas, anchors, matched, targets_)
    model.losses = keep
    with torch.no_grad():
        model(list(images), list(targets))
    best = [box_iou(t["boxes"], captured["anchors"]).max(1).values for t in targets]
    ious = torch.cat(best).tolist()
    print(f"anchors per image {captured['anchors'].shape[0]}; best IoU of each of {len(ious)} boxes with an "
          f"anchor: min {min(ious):.2f}, median {statistics.median(ious):.2f}, max {max(ious):.2f}; "
          f"foreground anchors per image: {[int((m >= 0).sum()) for m in captured['matched']]} "
          f"for {[len(t['boxes']) for t in targets]} boxes")


if __name__ == "__main__":
    main()
