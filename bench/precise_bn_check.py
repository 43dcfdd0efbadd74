"""How far a trained checkpoint's BatchNorm running statistics are from its weights.

For a few training images, the neck's outputs in eval mode (running statistics) are compared with
its outputs under batch statistics (the neck's BN layers in train mode, running statistics left
alone), once as saved and once after ``recompute_bn_statistics`` (precise BN). Prints, per
level, ||eval - batch|| / ||batch||.

    python bench/precise_bn_check.py RUN/model_final.pth [--batches 32] [--images 4]
"""
import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autofpn.config import complete_config  # noqa: E402
from autofpn.data import build_dataset, build_loader  # noqa: E402
from autofpn.engine.trainer import recompute_bn_statistics  # noqa: E402
from autofpn.models.detector import build_detector  # noqa: E402


def neck_outputs(model, images):
    with torch.no_grad():
        batch, _, _ = model.transform(images)
        return model.neck(model.backbone(batch))


def with_batch_statistics(model):
    model = copy.deepcopy(model)
    for bn in model.neck.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            bn.train()
            bn.momentum = 0.0  # normalise with the batch, keep the running statistics
    return model


def relative_gaps(model, images):
    ours, reference = neck_outputs(model, images), neck_outputs(with_batch_statistics(model), images)
    return {k: ((ours[k] - reference[k]).norm() / reference[k].norm()).item() for k in ours}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--batches", type=int, default=32, help="training batches for the recomputation")
    parser.add_argument("--images", type=int, default=4, help="training images compared")
    args = parser.parse_args()
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    cfg = complete_config(state["cfg"], where=args.checkpoint)
    cfg["model"]["backbone"]["weights"] = "none"  # the checkpoint holds them
    model = build_detector(cfg, state.get("genotype"))
    model.load_state_dict(state["model"])
    model.eval()
    dataset = build_dataset(cfg, "train")
    images = [dataset[i][0] for i in range(args.images)]
    fmt = lambda gaps: "  ".join(f"{k} {v:.3f}" for k, v in gaps.items())  # noqa: E731
    print(f"as saved:             {fmt(relative_gaps(model, images))}")
    loader = build_loader(cfg, dataset, train=True, seed=int(cfg["train"]["seed"]))
    used = recompute_bn_statistics(model, loader, args.batches, torch.device("cpu"),
                                   epoch=int(cfg["solver"]["epochs"]) + 1)
    model.eval()
    print(f"recomputed ({used} batches): {fmt(relative_gaps(model, images))}")


if __name__ == "__main__":
    main()
