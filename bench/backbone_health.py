"""Does a detector's training keep its backbone's top level alive? Trains a run's detector for a
few iterations and prints, per iteration, the share of the top backbone level's activations
that sit on a ReLU / ReLU6 bound (exactly 0 or 6), their spatial spread (std over H x W,
averaged over channels and images: 0 = one value per channel, a constant map), and the gradient
norm reaching the backbone; then recomputes the BatchNorm statistics, names the BN layers fed a
constant input (``collapsed_bn_layers``) and evaluates.

The check behind docs/STUDY.md, section 17: with a BatchNorm Auto-fusion neck, MobileNetV2's C5
saturated within ~100 iterations on coco128 `person` while the backbone's gradient grew 40x;
with GroupNorm it did not.

    python bench/backbone_health.py --cfg RUN/config.yaml [--genotype RUN/genotype.json] \
        --iters 200 [--opts model.neck.norm=gn ...]

Training starts from the config's initial weights (ImageNet backbone as configured), seed 0.
"""
import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from autofpn.config import load_config  # noqa: E402
from autofpn.data import build_dataset, build_loader, resolve_num_classes  # noqa: E402
from autofpn.engine import distributed as du  # noqa: E402
from autofpn.engine.trainer import Trainer, collapsed_bn_layers, seed_everything  # noqa: E402
from autofpn.eval import evaluate_model  # noqa: E402
from autofpn.models.detector import build_detector  # noqa: E402
from autofpn.models.genotype import load_genotype  # noqa: E402


def top_level_health(features: torch.Tensor) -> tuple:
    """(share of activations at 0 or 6, mean spatial std) of ``features`` [N, C, H, W]."""
    bound = ((features == 0) | (features == 6)).float().mean().item()
    return bound, features.std(dim=(2, 3)).mean().item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cfg", required=True)
    p.add_argument("--genotype", default=None)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--opts", nargs="*", default=[])
    p.add_argument("--no-eval", action="store_true")
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="backbone_health_")
    cfg = load_config(args.cfg, [*args.opts, f"train.output_dir={work}", f"solver.max_iters={args.iters}",
                                 "train.device=cpu"])
    genotype = load_genotype(args.genotype) if args.genotype else None
    ctx = du.init_distributed("cpu")
    train_set = build_dataset(cfg, "train")
    resolve_num_classes(cfg, train_set)
    seed_everything(0)
    model = build_detector(cfg, genotype)
    loader = build_loader(cfg, train_set, train=True, seed=0)
    trainer = Trainer(cfg, model, loader, ctx)
    top = {}
    model.backbone.register_forward_hook(lambda m, i, out: top.update(x=list(out.values())[-1].detach()))
    print(f"{'iter':>5} {'loss':>7} {'at 0/6':>7} {'spatial std':>11} {'backbone grad':>13} {'lr':>8}")
    epoch = 0
    while trainer.iter < args.iters:
        loader.batch_sampler.set_epoch(epoch)
        for images, targets in loader:
            model.train()
            losses = trainer.run_step(images, targets)
            grads = [p.grad for name, p in model.named_parameters() if name.startswith("backbone") and p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item() if grads else 0.0
            bound, spread = top_level_health(top["x"])
            print(f"{trainer.iter:5d} {losses['loss']:7.3f} {bound:7.3f} {spread:11.4f} {grad_norm:13.2f} "
                  f"{trainer.optimizer.param_groups[0]['lr']:8.4f}", flush=True)
            trainer.iter += 1
            if trainer.iter >= args.iters:
                break
        epoch += 1
    trainer.precise_bn()
    collapsed = collapsed_bn_layers(model)
    print(f"BN layers fed a constant input: {len(collapsed)} {collapsed[:6]}")
    if not args.no_eval:
        val = build_dataset(cfg, "val")
        summary = evaluate_model(model.eval(), build_loader(cfg, val, train=False), val, os.path.join(work, "eval"),
                                 "coco", torch.device("cpu"))
        print(f"after {args.iters} iterations: AP {summary['AP']:.2f}, AP50 {summary['AP50']:.2f}, "
              f"{int(summary['num_detections'])} detections")


if __name__ == "__main__":
    main()
