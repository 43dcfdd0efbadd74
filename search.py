"""Search the neck (Auto-fusion) and the RCNN head (Auto-head) of a detector on your data.

    torchrun --nproc_per_node N search.py --cfg configs/voc.yaml [--opts search.epochs=12 ...]
    python search.py --cfg configs/demo.yaml                 # one process
    python search.py --cfg configs/coco.yaml --dry-run      # params / FLOPs / memory plan only

Stages (``search.stage``: neck | head | both): the neck first with the standard 2-MLP head, then
the head with the searched neck (a RetinaNet or an SSD, ``model.detector: retinanet | ssd``, has no
RoI head: ``both`` searches its neck only). A run restarts where it stopped: finished stages are kept,
an interrupted stage resumes from its newest checkpoint. Outputs in ``search.output_dir``:
``geno.json`` (neck + head), ``neck/`` and ``head/`` (stage genotype, checkpoints,
``metrics.jsonl``, ``arch_trajectory.jsonl``), ``arch_heatmap_<stage>.png``, ``geno.png/.svg``,
``config.yaml`` (and ``neck_genotype.json``, the neck a head-only search keeps). With
``search.ensemble=K`` each stage is K searches (seeds search.seed .. +K-1) in ``<stage>/seed_<s>/``,
decoded from their mean weights (``<stage>/ensemble.json``).
``search.strategy=evolution`` runs regularized evolution instead: ``candidates/<i>/`` (genotype,
training run, result), ``history.json``, ``geno.json`` (the fittest candidate); no heat maps;
``--jobs J`` trains up to J candidates of a round at once (``search.evolution.round_size``) and
``--shard i/n`` shares the candidates between invocations on one folder (several machines).
``search.strategy=snas`` runs the same stages and outputs as the default, each op weighted by a
soft Gumbel-softmax sample of alpha / beta (SNAS; ``search.tau=[1.0,0.03]`` is the paper's).
Then: ``torchrun train.py --cfg ... --genotype <output_dir>/geno.json``.
"""
import argparse
import os
import sys

KEPT_NECK_FILE = "neck_genotype.json"  # in a head-only search's folder: the neck it was searched on


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default=None, help="YAML config (default: the built-in defaults)")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. search.resource_lambda=small search.stage=neck")
    p.add_argument("--neck-genotype", default=None,
                   help="genotype JSON whose neck the head stage uses (when search.stage=head); the same as "
                        "--opts search.neck_genotype=PATH")
    p.add_argument("--force", action="store_true",
                   help="the output folder holds a search of another config: move it aside and start anew")
    p.add_argument("--dry-run", action="store_true",
                   help="print params, FLOPs and activation memory per stage and for the decoded model")
    p.add_argument("--train-images", type=int, default=None,
                   help="--dry-run: the training set's size (default: counted when the data is read), for the "
                        "whole search's compute and GPU-days")
    p.add_argument("--jobs", type=_positive_int, default=1,
                   help="search.strategy=evolution: candidates trained at once, each in its own process "
                        "(at most search.evolution.round_size children of a round)")
    p.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                   help="search.strategy=evolution: train only the candidates whose index is I modulo N, "
                        "waiting for the other shards' results in the shared output folder")
    p.add_argument("--gpu-utilization", type=float, default=None,
                   help="--dry-run: assumed fraction of a GPU's dense fp32 peak (default: autofpn.search.plan's)")
    return p.parse_args(argv)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return int(text)


def _shard(text: str):
    """``"i/n"`` -> (i, n) with 0 <= i < n (argparse's error on anything else)."""
    from autofpn.engine.runs import parse_shard
    try:
        return parse_shard(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def draw_search(result, out_dir: str, cfg) -> None:
    """The pictures of a search: ``arch_heatmap_<stage>.png`` (final op weights of each stage
    run now) and ``geno.png`` / ``geno.svg`` (the found cells, the head's input RoI size from
    ``cfg``)."""
    from autofpn.viz.arch_heatmap import plot_arch_heatmap
    from autofpn.viz.genotype_diagram import draw_genotype, head_roi_size
    for stage, weights in result.stage_weights.items():
        d = result.decisiveness[stage]
        note = (f"entropy {d['entropy']:.3f} of uniform, mean best-second margin {d['margin']:.3f}, "
                f"argmax parameter-free on {100 * d['parameter_free']:.0f} % of rows")
        if stage in result.ensemble:
            e = result.ensemble[stage]
            note = (f"mean of {len(e['seeds'])} searches (members agree {e['mean_agreement']:+.3f}): " + note)
        plot_arch_heatmap(weights, stage, os.path.join(out_dir, f"arch_heatmap_{stage}.png"),
                          link_names=result.link_pairs if stage == "neck" else None, note=note)
    for ext in ("png", "svg"):
        draw_genotype(result.genotype, os.path.join(out_dir, f"geno.{ext}"), title="Auto-FPN (searched)",
                      roi_size=head_roi_size(cfg))


def main(argv=None) -> int:
    args = parse_args(argv)
    from autofpn.config import load_config, save_config
    # the kept neck is a setting of the search: its folder's config.yaml records it, so a search
    # resumed on another neck is refused like one of another config
    opts = args.opts + ([f"search.neck_genotype={os.path.abspath(args.neck_genotype)}"] if args.neck_genotype else [])
    cfg = load_config(args.cfg, opts)
    neck_genotype = None
    if cfg["search"]["neck_genotype"]:
        from autofpn.config import ConfigError
        from autofpn.models.genotype import load_genotype
        if cfg["search"]["stage"] != "head":
            raise ConfigError(f"search.neck_genotype: the neck a head-only search keeps; search.stage is "
                              f"{cfg['search']['stage']!r}, which searches the neck (use search.stage=head)")
        if not cfg["search"]["head_with_searched_neck"]:
            raise ConfigError("search.neck_genotype: search.head_with_searched_neck is false, so the head would be "
                              "searched on the config's handcrafted neck, not on this one; set one or the other")
        neck_genotype = load_genotype(cfg["search"]["neck_genotype"])

    train_set = None
    if cfg["model"]["num_classes"] is None:  # taken from the data, before the folder check and the plan
        from autofpn.data import build_dataset, resolve_num_classes
        train_set = build_dataset(cfg, "train")
        resolve_num_classes(cfg, train_set)

    if args.dry_run:
        from autofpn.search.plan import plan_report
        train_images = args.train_images or (len(train_set) if train_set is not None else None)
        print(plan_report(cfg, neck_genotype, train_images, args.gpu_utilization))
        return 0

    import torch
    from autofpn.engine import distributed as du
    from autofpn.engine.runs import claim_folder
    from autofpn.engine.trainer import NonFiniteLossError
    from autofpn.search import get_strategy
    strategy = get_strategy(cfg["search"]["strategy"])
    if hasattr(strategy, "check_config"):  # a bad setting fails before the folder is claimed
        strategy.check_config(cfg)
    run_search = strategy.run_search
    options = {}
    if args.jobs > 1 or args.shard:
        from autofpn.config import ConfigError
        if cfg["search"]["strategy"] != "evolution":
            raise ConfigError(f"--jobs / --shard: search.strategy {cfg['search']['strategy']!r} trains one supernet; "
                              "only search.strategy=evolution trains candidates apart")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("--jobs / --shard: under torchrun every rank trains each candidate together; "
                              "use torchrun or --jobs / --shard, not both")
        shard, shards = args.shard or (0, 1)
        options["parallel"] = strategy.Parallel(args.jobs, shard, shards)

    ctx = du.init_distributed(cfg["train"]["device"])
    out_dir = cfg["search"]["output_dir"]
    try:
        if cfg["train"]["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # the kept neck's content too, not only its path: a file rewritten in place is another neck
        kept_neck = None if neck_genotype is None else {"neck": neck_genotype["neck"]}
        claim_folder(out_dir, cfg, kept_neck, args.force, "search", ctx, genotype_file=KEPT_NECK_FILE,
                     genotype_label="search.neck_genotype (the neck in that file)")
        if ctx.is_main:
            save_config(cfg, os.path.join(out_dir, "config.yaml"))
            if kept_neck is not None:
                from autofpn.engine.checkpoint import atomic_write_json
                atomic_write_json(kept_neck, os.path.join(out_dir, KEPT_NECK_FILE))
        try:
            result = run_search(cfg, ctx, out_dir, neck_genotype, dataset=train_set, **options)
        except NonFiniteLossError as e:
            if ctx.is_main:
                print(f"ERROR: {e}", file=sys.stderr, flush=True)
            return 2
        if ctx.is_main:
            draw_search(result, out_dir, cfg)
            path = os.path.join(out_dir, "geno.json")
            print(f"genotype written to {path}; diagram {os.path.join(out_dir, 'geno.png')}")
            print(f"retrain: torchrun train.py --cfg {args.cfg or '<cfg>'} --genotype {path}", flush=True)
        return 0
    finally:
        du.cleanup_distributed()


if __name__ == "__main__":
    from autofpn.cli import run_command
    sys.exit(run_command(main))
