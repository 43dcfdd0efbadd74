"""Run under torchrun by tests/test_search_run.py and tests/test_snas.py: a neck search
(search.strategy differentiable or snas) on 2 processes, checking after
every architecture and weight step that alpha and the weights are identical on all ranks
(while each rank sees different images). Writes a JSON report on rank 0.

    torchrun --nproc_per_node 2 tests/search_rank_check.py CFG REPORT.json [KEY=VALUE ...]
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's autofpn, not an installed one
import torch  # noqa: E402

from autofpn.config import load_config  # noqa: E402
from autofpn.engine import distributed as du  # noqa: E402
from autofpn.search.differentiable import Searcher, build_search_loaders, stage_config  # noqa: E402
from autofpn.search.snas import SNASSearcher  # noqa: E402
from autofpn.engine.trainer import seed_everything  # noqa: E402
from autofpn.models.detector import build_detector  # noqa: E402


def main() -> None:
    cfg_path, report_path, *opts = sys.argv[1:]
    cfg = stage_config(load_config(cfg_path, opts), "neck", None)
    ctx = du.init_distributed("cpu")
    seed_everything(int(cfg["train"]["seed"]))
    model = build_detector(cfg, search="neck")
    loader_a, loader_b = build_search_loaders(cfg, ctx)
    searcher_class = SNASSearcher if cfg["search"]["strategy"] == "snas" else Searcher
    searcher = searcher_class(cfg, "neck", model, loader_a, loader_b, ctx, cfg["search"]["output_dir"])
    alpha_start = model.arch.alpha.detach().clone()
    counts = {"steps": 0, "arch_steps": 0}
    identical = []
    seen_images = []

    def check() -> None:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        gathered = du.all_gather_object(state)
        identical.append(all(torch.equal(g[k], gathered[0][k]) for g in gathered for k in state))

    losses = searcher._losses

    def recording_losses(images, targets):
        seen_images.append(sorted(int(t["image_id"]) for t in targets))
        return losses(images, targets)

    arch_step, weight_step = searcher.arch_step, searcher.weight_step

    def checked_arch_step(*args):
        out = arch_step(*args)
        counts["arch_steps"] += 1
        check()
        return out

    def checked_weight_step(*args):
        out = weight_step(*args)
        counts["steps"] += 1
        check()
        return out

    # search.mode gdas: the one-hot path each forward drew; snas: the soft sample (the same on every rank)
    paths = []
    forward_weights = model.arch.forward_weights

    def recording_forward_weights():
        weights = forward_weights()
        if model.arch._sampling is not None:
            paths.append(weights[0].detach().tolist())
        return weights

    model.arch.forward_weights = recording_forward_weights
    searcher._losses = recording_losses
    searcher.arch_step, searcher.weight_step = checked_arch_step, checked_weight_step
    searcher.search()
    images_per_rank = du.all_gather_object(seen_images)
    paths_per_rank = du.all_gather_object(paths)
    if ctx.is_main:
        report = {**counts, "identical_after_every_step": all(identical) and len(identical) > 0,
                  "alpha_moved": not torch.equal(alpha_start, model.arch.alpha.detach()),
                  "ranks_saw_different_images": images_per_rank[0] != images_per_rank[1],
                  "sampled_paths": len(paths), "same_paths_on_every_rank": paths_per_rank[0] == paths_per_rank[1],
                  "paths_differ_between_steps": len({str(p) for p in paths}) > 1}
        assert report["ranks_saw_different_images"], images_per_rank
        with open(report_path, "w") as f:
            json.dump(report, f)
    du.cleanup_distributed()


if __name__ == "__main__":
    main()
