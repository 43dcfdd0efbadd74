"""The supernet's overhead: time per search iteration vs time per FPN training step.

On one config (default configs/demo.yaml) and the same batches, measures
  - FPN training step (forward + backward + SGD) of the baseline detector,
  - neck-search iteration (architecture step on a batch of half B + weight step on half A),
  - head-search iteration (same, head supernet with an FPN neck, on the retrained detector's
    RoI batch ``model.roi.batch_size_per_image``),
  - the same two with ``search.mode=gdas`` (one Gumbel-sampled op per link/edge; a new path
    every iteration),
  - with ``--sampled-weights``: both with ``search.mode=sampled_weights`` (the weight step on a
    sampled op per link/edge, the architecture step on the full mixed ops),
  - with ``--head-rois K ...``: the head-search iteration with ``search.head_rois_per_image=K``
    (the head supernet trains on K RoIs per image),
  - with ``--recompute``: both search iterations with ``search.recompute`` (every mixed op
    recomputed in the backward pass instead of keeping its ops' activations),
  - with ``--partial K ...``: both search iterations with ``search.partial_channels=K`` (PC-DARTS:
    every mixed op runs its ops on 1 / K of its channels),
  - with ``--genotype G``: a training step of the detector decoded from G (what train.py
    retrains after the search),
  - with ``--unstacked``: every neck-search variant a second time with the links of a source
    level run one by one (``MAX_STACKED_MACS`` 0; otherwise they run stacked where
    autofpn/models/operations.py's rule allows, or up to ``--stack-limit``), and the time ratio
    one by one / stacked,
  - with ``--block-diagonal``: every neck-search variant a second time with every stacked
    pointwise product block-diagonal (``MAX_BLOCK_DIAGONAL_CHANNELS`` unbounded; otherwise the
    larger ones run as G products at once), and the time ratio block-diagonal / the library's,
  - with ``--unfused``: every search variant (and the decoded step) a second time as built, the
    reference: the supernet's mixed ops unfused (every op run as built, then the weighted sum)
    and every depthwise and 1x1 conv of the ops run as its module (``ops_as_built``; outside it a
    training step runs them through the faster-backward ops, autofpn/models/operations.py), and
    the time ratio as built / fused,
interleaved, median of --reps and its interquartile range in % of it (``--cpu-time``: also the process's CPU time, all threads; on a machine
shared with other jobs it counts this process's work, not the time it waited for a core); and, in a fresh subprocess per variant, the peak memory of one
iteration (bench/peak_memory.py; Linux only). With ``--layouts contiguous channels_last`` every
variant runs in each memory layout (``model.memory_format``) and the ratio of the two is printed;
without it, in the config's.

    python bench/bench_search.py [--cfg configs/demo.yaml] [--reps 5] [--profile] [--sampled-weights] [--head-rois 16 32] [--recompute] [--partial 2 4]
                                 [--layouts contiguous channels_last] [--unfused] [--unstacked] [--block-diagonal] [--stack-limit M]
                                 [--cpu-time] [--no-memory]
                                 [--opts k=v ...]
"""
import argparse
import os
import random
import statistics
import sys
import time
from typing import Callable, Dict, Optional

import torch
from bench_detector import iqr_percent, train_step_fn
from peak_memory import peak_in_fresh_process, profile_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_variant(name: str, cfg, genotype_path: str = None, device: str = "cpu", fused: bool = True,
                  stack_limit: Optional[int] = None, block_diagonal: bool = False) -> Callable[[], None]:
    """A closure running one iteration of ``name`` ("fpn", "decoded" (a training step of the
    detector decoded from ``genotype_path``), "neck", "head", "neck_gdas", "head_gdas",
    "neck_sampled_weights", "head_sampled_weights", "head_rois<K>", "neck_recompute",
    "head_recompute", "neck_pc<K>", "head_pc<K>"; "<name>@<M>": with ``stack_limit`` M, e.g.
    "neck@0" the neck links one by one) on fixed batches, on ``device`` (the search
    variants with the config's ``search.amp``; ``fused=False``: the reference, every
    op and conv module run as built: the supernet's mixed ops unfused, the ops' depthwise and 1x1
    convs as their modules, ``ops_as_built``; ``stack_limit``: the neck supernet's links stacked
    up to that ``MAX_STACKED_MACS``, 0: one by one; None: the library's limit; ``block_diagonal``:
    every stacked pointwise product block-diagonal)."""
    name, _, limit = name.partition("@")
    stack_limit = int(limit) if limit else stack_limit
    step = _variant_step(name, cfg, genotype_path, device, fused)
    if stack_limit is not None or block_diagonal:
        from autofpn.models import operations
        settings = {"MAX_STACKED_MACS": stack_limit, "MAX_BLOCK_DIAGONAL_CHANNELS": 2 ** 40 if block_diagonal else None}
        settings = {key: value for key, value in settings.items() if value is not None}

        def with_settings():
            library = {key: getattr(operations, key) for key in settings}
            for key, value in settings.items():
                setattr(operations, key, value)
            try:
                step()
            finally:
                for key, value in library.items():
                    setattr(operations, key, value)
        return with_settings
    if fused:
        return step
    from autofpn.models.operations import ops_as_built

    def as_built():
        with ops_as_built():
            step()
    return as_built


def _variant_step(name: str, cfg, genotype_path: str, device: str, fused: bool) -> Callable[[], None]:
    from autofpn.data import build_dataset
    from autofpn.data.loader import build_loader
    from autofpn.engine import distributed as du
    from autofpn.search.differentiable import Searcher, build_search_loaders, stage_config
    from autofpn.models.detector import build_detector
    from autofpn.models.operations import set_fused

    torch.manual_seed(0)
    ctx = du.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device(device))
    if name in ("fpn", "decoded"):
        fpn_cfg = stage_config(cfg, "neck", None)  # the training sizes, the search's data half
        genotype = None
        if name == "fpn":
            fpn_cfg["model"]["neck"]["type"], fpn_cfg["model"]["head"]["type"] = "fpn", "mlp"
        else:
            from autofpn.models.detector import use_genotype
            from autofpn.models.genotype import load_genotype
            genotype = load_genotype(genotype_path)
            fpn_cfg = use_genotype(fpn_cfg, genotype)
        from autofpn.engine.trainer import move_to_device
        model = build_detector(fpn_cfg, genotype).to(device).train()
        images, targets = next(iter(build_loader(fpn_cfg, build_dataset(fpn_cfg, "train"), train=True)))
        images, targets = move_to_device(images, targets, torch.device(device))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
        return train_step_fn(model, optimizer, images, targets)
    stage, _, variant = name.partition("_")
    stage_cfg = stage_config(cfg, stage, None)
    stage_cfg["search"]["mode"] = variant if variant in ("gdas", "sampled_weights") else "full"
    # "head": the retrained detector's RoI batch (whatever the config's search uses); "head_rois<K>": K
    stage_cfg["search"]["head_rois_per_image"] = int(variant[len("rois"):]) if variant.startswith("rois") else 0
    stage_cfg["search"]["recompute"] = variant == "recompute"
    if variant.startswith("pc"):  # "neck_pc<K>": partial channels, 1 / K of each mixed op's
        stage_cfg["search"]["partial_channels"] = int(variant[len("pc"):])
    model = build_detector(stage_cfg, search=stage)
    set_fused(model, fused)
    loader_a, loader_b = build_search_loaders(stage_cfg, ctx)
    searcher = Searcher(stage_cfg, stage, model, loader_a, loader_b, ctx, out_dir="/tmp/unused")
    batch_a, batch_b = next(iter(loader_a)), next(iter(loader_b))

    def step():
        searcher.arch_step(*batch_b)
        searcher.weight_step(*batch_a)
        searcher.iter += 1  # gdas: the next iteration draws other paths
    return step


def main() -> None:
    sys.path.insert(0, REPO)
    from autofpn.config import load_config
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cfg", default=os.path.join(REPO, "configs", "demo.yaml"))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--opts", nargs="*", default=[])
    parser.add_argument("--sampled-weights", action="store_true",
                        help="also time both search iterations with search.mode=sampled_weights")
    parser.add_argument("--head-rois", nargs="*", type=int, default=[],
                        help="also time the head-search iteration at these search.head_rois_per_image")
    parser.add_argument("--recompute", action="store_true",
                        help="also time both search iterations with search.recompute (ops recomputed in the backward)")
    parser.add_argument("--partial", nargs="*", type=int, default=[],
                        help="also time both search iterations at these search.partial_channels (PC-DARTS)")
    parser.add_argument("--profile", action="store_true", help="also print a profile of one neck search iteration")
    parser.add_argument("--genotype", default=None, help="also time a training step of the detector decoded from it")
    parser.add_argument("--layouts", nargs="*", choices=("contiguous", "channels_last"), default=[],
                        help="run every variant in each of these memory layouts (default: the config's)")
    parser.add_argument("--unfused", action="store_true",
                        help="also time every search variant and the decoded step as built (the reference: mixed ops "
                             "unfused, every conv module as built), and the ratio")
    parser.add_argument("--unstacked", action="store_true",
                        help="also time every neck-search variant with the links of a source level run one by one "
                             "(not stacked), and the ratio")
    parser.add_argument("--block-diagonal", action="store_true",
                        help="also time every neck-search variant with every stacked pointwise product "
                             "block-diagonal, and the ratio")
    parser.add_argument("--stack-limit", type=int, default=None,
                        help="stack the neck links of a level up to this pixels x (links x op channels)^2 "
                             "(autofpn.models.operations.MAX_STACKED_MACS; default: the library's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--cpu-time", action="store_true",
                        help="also print the median process CPU time (all threads) of each variant")
    args = parser.parse_args()
    cfg = load_config(args.cfg, args.opts)
    t = cfg["model"]["transform"]
    print(f"config {args.cfg}: {cfg['data']['images_per_batch']} images/batch, min_size {t['min_size']}, "
          f"neck {cfg['model']['neck']['channels']} ch, Auto-head {cfg['model']['head']['channels']} ch, "
          f"{cfg['model']['roi']['batch_size_per_image']} RoIs/image, layout {cfg['model']['memory_format']}, "
          f"threads {torch.get_num_threads()}")
    variants = (("fpn",) + (("decoded",) if args.genotype else ()) + ("neck", "head", "neck_gdas", "head_gdas")
                + (("neck_sampled_weights", "head_sampled_weights") if args.sampled_weights else ())
                + tuple(f"head_rois{k}" for k in args.head_rois)
                + (("neck_recompute", "head_recompute") if args.recompute else ())
                + tuple(f"{stage}_pc{k}" for k in args.partial for stage in ("neck", "head")))
    layouts = args.layouts or [cfg["model"]["memory_format"]]
    layout_cfgs = {layout: load_config(args.cfg, args.opts + [f"model.memory_format={layout}"]) for layout in layouts}
    searched = [name for name in variants if name != "fpn"]  # and "decoded": what runs otherwise as built
    necks = [name for name in variants if name.startswith("neck")]
    # (variant, layout, fused, stacking): stacking "library" (the library's rule, or --stack-limit),
    # "one_by_one", "block_diagonal"
    runs = [(name, layout, True, "library") for layout in layouts for name in variants]
    runs += [(name, layout, False, "library") for layout in layouts for name in searched] if args.unfused else []
    runs += [(name, layout, True, "one_by_one") for layout in layouts for name in necks] if args.unstacked else []
    runs += [(name, layout, True, "block_diagonal") for layout in layouts for name in necks] if args.block_diagonal else []
    stackings = {"library": (args.stack_limit, False), "one_by_one": (0, False),
                 "block_diagonal": (args.stack_limit, True)}
    steps: Dict[tuple, Callable[[], None]] = {
        run: build_variant(run[0], layout_cfgs[run[1]], args.genotype, fused=run[2], stack_limit=stackings[run[3]][0],
                           block_diagonal=stackings[run[3]][1])
        for run in runs}
    for step in steps.values():
        step()
    times = {run: [] for run in steps}
    cpu_times = {run: [] for run in steps}
    for rep in range(args.reps):  # each repetition in its own order: no variant always runs after the same one
        order = list(steps.items())
        random.Random(rep).shuffle(order)
        for run, step in order:
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            times[run].append(time.perf_counter() - start)
            cpu_times[run].append(time.process_time() - cpu_start)
    median = {run: statistics.median(v) for run, v in times.items()}
    spread = {run: iqr_percent(v) for run, v in times.items()}
    cpu = {run: statistics.median(v) for run, v in cpu_times.items()}
    if args.profile:
        print("profile of one neck search iteration:")
        print(profile_table(steps[("neck", layouts[0], True, "library")]))
    memory = {run: float("nan") if args.no_memory else
              peak_in_fresh_process(build_variant, run[0], layout_cfgs[run[1]], args.genotype, "cpu", run[2],
                                    *stackings[run[3]])
              for run in steps}
    labels = {"fpn": "FPN training step", "decoded": "decoded training step", "neck": "neck search iteration", "head": "head search iteration",
              "neck_gdas": "neck search iter., gdas", "head_gdas": "head search iter., gdas",
              "neck_sampled_weights": "neck search, sampled_w.", "head_sampled_weights": "head search, sampled_w.",
              **{f"head_rois{k}": f"head search, {k} RoIs/im" for k in args.head_rois},
              "neck_recompute": "neck search, recompute", "head_recompute": "head search, recompute",
              **{f"{stage}_pc{k}": f"{stage} search, 1/{k} channels" for k in args.partial for stage in ("neck", "head")}}
    tables = [(True, "library", variants)] + ([(False, "library", ("fpn", *searched))] if args.unfused else [])
    tables += [(True, "one_by_one", ("fpn", *necks))] if args.unstacked else []
    tables += [(True, "block_diagonal", ("fpn", *necks))] if args.block_diagonal else []
    stacking_titles = {"library": "neck links stacked", "one_by_one": "neck links one by one",
                       "block_diagonal": "neck links stacked, every product block-diagonal"}
    for fused, stacking, names in tables:
        for layout in layouts:
            title = [f"layout {layout}"] if len(layouts) > 1 else []
            title += ["fused / faster convs" if fused else "as built (the reference)"] if args.unfused else []
            title += [stacking_titles[stacking]] if args.unstacked or args.block_diagonal else []
            if title:
                print(", ".join(title) + ":")
            print(f"{'':<24}{'time (s)':>10}{'IQR %':>7}{'x FPN step':>12}{'peak MiB':>10}{'x FPN':>8}"
                  + (f"{'CPU (s)':>10}{'x FPN':>8}" if args.cpu_time else ""))
            for name in names:
                fpn = ("fpn", layout, True, "library")
                run = (name, layout, fused, stacking) if name != "fpn" else fpn
                print(f"{labels[name]:<24}{median[run]:>10.3f}{spread[run]:>7.0f}{median[run] / median[fpn]:>12.2f}"
                      f"{memory[run]:>10.0f}{memory[run] / memory[fpn]:>8.2f}"
                      + (f"{cpu[run]:>10.3f}{cpu[run] / cpu[fpn]:>8.2f}" if args.cpu_time else ""))
    comparisons = [("as built / fused", "ours is faster", searched, (False, "library"))] if args.unfused else []
    comparisons += [("one by one / stacked", "stacked is faster", necks, (True, "one_by_one"))] if args.unstacked else []
    comparisons += ([("block-diagonal / the library's", "the library's forms are faster", necks,
                      (True, "block_diagonal"))] if args.block_diagonal else [])
    for what, meaning, names, other in comparisons:
        for layout in layouts:
            def ratios(values):
                return ", ".join(f"{name} {values[(name, layout, *other)] / values[(name, layout, True, 'library')]:.2f}"
                                 for name in names)
            print(f"time {what}{f' ({layout})' if len(layouts) > 1 else ''} (> 1: {meaning}): {ratios(median)}"
                  + (f"; CPU time: {ratios(cpu)}" if args.cpu_time else ""))
    if len(layouts) > 1:
        first, *others = layouts
        for other in others:
            print(f"time {first} / {other} (> 1: {other} is faster): " + ", ".join(
                f"{name} {median[(name, first, True, 'library')] / median[(name, other, True, 'library')]:.2f}" for name in variants))


if __name__ == "__main__":
    main()
