"""Do the op importances of search.selection: perturbation rank a link's ops the same on other data?

For a finished neck search folder (its config.yaml and newest neck checkpoint), measures the
importances (autofpn/search/perturbation.py) on two disjoint sets of batches of half B (the
first 2N batches of epoch 0: N and N) and prints, with each link's importances centred (the
shift common to a link's ops does not change which op it picks):

- the correlation of the two sets' centred importances (non-none ops);
- on how many links the two sets pick the same non-none op (chance: 1 in 7), and how often each
  picks the op the softmax weights pick.

    python bench/importance_stability.py SEARCH_DIR [--batches N]
"""
import argparse
import glob
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    sys.path.insert(0, REPO)
    from autofpn.config import load_config
    from autofpn.engine import distributed as du
    from autofpn.engine.checkpoint import load_checkpoint
    from autofpn.models.detector import build_detector
    from autofpn.search.differentiable import Searcher, build_search_loaders, search_seed, stage_config
    from autofpn.search.perturbation import fixed_batches, op_importance

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("search_dir")
    parser.add_argument("--batches", type=int, default=8, help="batches per set")
    args = parser.parse_args()
    checkpoints = sorted(glob.glob(os.path.join(args.search_dir, "neck", "checkpoints", "ckpt_*.pth")))
    if not checkpoints:
        raise SystemExit(f"no neck checkpoint in {args.search_dir}/neck/checkpoints")
    cfg = load_config(os.path.join(args.search_dir, "config.yaml"), ["train.device=cpu"])
    ctx = du.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    loader_a, loader_b = build_search_loaders(cfg, ctx)
    stage_cfg = stage_config(cfg, "neck", None)
    model = build_detector(stage_cfg, search="neck")
    model.load_state_dict(load_checkpoint(checkpoints[-1])["model"])
    searcher = Searcher(stage_cfg, "neck", model, loader_a, loader_b, ctx, "/tmp/unused")
    searcher.set_train_mode()
    batches = fixed_batches(loader_b, 2 * args.batches, ctx.device)
    if len(batches) < 2 * args.batches:
        raise SystemExit(f"half B has {len(batches)} batches, fewer than 2 x {args.batches}")
    seed = search_seed(cfg)
    sets = [op_importance(model, "neck", batches[:args.batches], seed, progress=True),
            op_importance(model, "neck", batches[args.batches:], seed + args.batches, progress=True)]
    centred = [s[..., 1:] - s[..., 1:].mean(-1, keepdim=True) for s in sets]
    r = float(torch.corrcoef(torch.stack([c.flatten() for c in centred]))[0, 1])
    picks = [s[..., 1:].argmax(-1) for s in sets]
    by_weights = model.arch.neck_weights().detach()[..., 1:].argmax(-1)
    links = picks[0].numel()
    print(f"{args.search_dir} ({checkpoints[-1]}), {args.batches} + {args.batches} batches of half B:")
    print(f"  correlation of the two sets' centred importances: {r:+.3f}")
    print(f"  same op picked on {int((picks[0] == picks[1]).sum())} of {links} links (chance about {links / 7:.1f})")
    for name, pick in zip(("first", "second"), picks):
        print(f"  {name} set picks the weights' op on {int((pick == by_weights).sum())} of {links} links")
    print(f"  mean importance per op (first set): "
          + ", ".join(f"{v:+.4f}" for v in sets[0].mean(dim=(0, 1)).tolist()))


if __name__ == "__main__":
    main()
