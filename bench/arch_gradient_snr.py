"""How consistent is the architecture gradient of a trained neck supernet, and do two supernets agree?

For each neck-search folder given (its newest checkpoint), computes the detection-loss gradient
on alpha (full mixed op, weights fixed, no resource penalty) on every batch of half B, centred
per link (a per-link constant does not change the softmax), and prints:

- per coordinate |mean| / std over the batches (the signal-to-noise ratio of one batch), and the
  split-half agreement of the mean gradient (even vs odd batches);
- for every pair of folders: the correlation of their mean gradients, split into the op-type
  effect (the mean over links of each op) and the per-link rest, and on how many links the
  steepest-descent op is the same.

    python bench/arch_gradient_snr.py SEARCH_DIR SEARCH_DIR [--cfg configs/demo.yaml] [--opts k=v ...]
"""
import argparse
import glob
import itertools
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gradients(search_dir: str, cfg_path: str, opts) -> torch.Tensor:
    """Tensor[batches, layers, links, ops]: centred alpha gradients on every batch of half B."""
    from autofpn.config import load_config
    from autofpn.engine import distributed as du
    from autofpn.engine.checkpoint import load_checkpoint
    from autofpn.models.detector import build_detector
    from autofpn.search.differentiable import build_search_loaders, stage_config
    checkpoints = sorted(glob.glob(os.path.join(search_dir, "neck", "checkpoints", "ckpt_*.pth")))
    if not checkpoints:
        raise FileNotFoundError(f"no neck checkpoint in {search_dir}/neck/checkpoints")
    cfg = stage_config(load_config(cfg_path, [*opts, "search.mode=full"]), "neck", None)
    model = build_detector(cfg, search="neck")
    model.load_state_dict(load_checkpoint(checkpoints[-1])["model"])
    model.train()
    model.backbone.eval()  # frozen in the search
    for p in model.weight_parameters():
        p.requires_grad_(False)
    ctx = du.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    _, loader_b = build_search_loaders(cfg, ctx)
    out = []
    for images, targets in loader_b:
        grad, = torch.autograd.grad(sum(model(images, targets).values()), [model.arch.alpha])
        out.append(grad - grad.mean(-1, keepdim=True))
    return torch.stack(out).double()


def corr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1])


def main() -> None:
    sys.path.insert(0, REPO)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("searches", nargs="+")
    parser.add_argument("--cfg", default=os.path.join(REPO, "configs", "demo.yaml"))
    parser.add_argument("--opts", nargs="*", default=[], help="e.g. model.backbone.weights=<the search's>")
    args = parser.parse_args()
    means = {}
    for d in args.searches:
        g = gradients(d, args.cfg, args.opts)
        snr = (g.mean(0).abs() / g.std(0).clamp(min=1e-12)).flatten()
        means[d] = g.mean(0)
        print(f"{d}: {len(g)} batches; |mean|/std per coordinate: median {snr.median():.2f}, 90th percentile "
              f"{snr.quantile(0.9):.2f}; split-half agreement of the mean {corr(g[0::2].mean(0), g[1::2].mean(0)):+.3f}")
    for a, b in itertools.combinations(args.searches, 2):
        op_a, op_b = means[a].mean((0, 1)), means[b].mean((0, 1))
        same = int((means[a].argmin(-1) == means[b].argmin(-1)).sum())
        print(f"{a} vs {b}: mean gradients {corr(means[a], means[b]):+.3f}; op-type effect {corr(op_a, op_b):+.3f}; "
              f"per-link rest {corr(means[a] - op_a, means[b] - op_b):+.3f}; same steepest-descent op on {same} of "
              f"{means[a].shape[0] * means[a].shape[1]} links (chance 1 in {means[a].shape[-1]})")


if __name__ == "__main__":
    main()
