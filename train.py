"""Train a detector: a searched one from a genotype, or a handcrafted baseline.

    torchrun --nproc_per_node N train.py --genotype out/geno.json [--cfg configs/coco.yaml] \
        [--opts solver.lr=0.01 model.transform.min_size=[480,512]] [--resume [CKPT]]
    python train.py --cfg configs/demo.yaml --neck fpn --head mlp       # baseline, one process

``--opts`` takes ``dotted.key=value`` overrides, the value parsed as YAML. The resolved config is
written to ``<train.output_dir>/config.yaml``. A run restarts from the newest checkpoint of its
output folder automatically (``train.auto_resume``); ``--resume`` insists on one (or names it).
Outputs: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``model_final.pth``,
``loss_curve.png``, ``map_curve.png``, ``eval/``, ``detections/`` (``eval.draw_images`` validation
images with the final model's detections drawn).
"""
import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default=None, help="YAML config (default: the built-in defaults)")
    p.add_argument("--genotype", default=None, help="genotype JSON of a searched neck/head")
    p.add_argument("--neck", choices=["fpn", "panet", "auto", "none"], default=None,
                   help="neck type (overrides model.neck.type; none: plain SSD, model.detector ssd only)")
    p.add_argument("--head", choices=["mlp", "conv", "auto"], default=None,
                   help="head type (overrides model.head.type)")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. solver.lr=0.01 data.images_per_batch=4")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="resume from CKPT, or (no value) from the output folder's newest one")
    p.add_argument("--force", action="store_true",
                   help="the output folder holds a run of another config: move it aside and start anew")
    return p.parse_args(argv)


def resolve_config(args):
    """(cfg, genotype). Without --cfg, a genotype written by search.py brings the config it was
    searched with (``config.yaml`` beside it)."""
    from autofpn.config import load_config
    from autofpn.models.detector import use_genotype
    genotype, cfg_path = None, args.cfg
    if args.genotype:
        from autofpn.models.genotype import load_genotype
        genotype = load_genotype(args.genotype)
        beside = os.path.join(os.path.dirname(os.path.abspath(args.genotype)), "config.yaml")
        if cfg_path is None and os.path.isfile(beside):
            cfg_path = beside
            print(f"config: {beside} (the config {args.genotype} was searched with; --cfg picks another)",
                  flush=True)
    cfg = load_config(cfg_path, args.opts)
    return use_genotype(cfg, genotype, args.neck, args.head), genotype


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg, genotype = resolve_config(args)

    import torch
    from autofpn.config import save_config
    from autofpn.data import build_dataset, build_loader, resolve_num_classes
    from autofpn.engine import distributed as du
    from autofpn.engine.runs import claim_folder
    from autofpn.engine.trainer import NonFiniteLossError, Trainer, seed_everything
    from autofpn.eval import evaluate_model
    from autofpn.models.detector import build_detector

    ctx = du.init_distributed(cfg["train"]["device"])
    out_dir = cfg["train"]["output_dir"]
    try:
        train_set = build_dataset(cfg, "train")
        resolve_num_classes(cfg, train_set)  # before the folder check: config.yaml records it
        claim_folder(out_dir, cfg, genotype, args.force, "training run", ctx, ignore=("search.",))
        if cfg["train"]["deterministic"]:
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed = int(cfg["train"]["seed"])
        seed_everything(seed)  # same initial weights on every rank
        model = build_detector(cfg, genotype)
        seed_everything(seed + ctx.rank)  # different augmentation streams per rank
        # order and flips are a function of (seed, epoch) only: resumable mid-epoch
        train_loader = build_loader(cfg, train_set, train=True, seed=seed)
        val_set = build_dataset(cfg, "val")
        val_loader = build_loader(cfg, val_set, train=False)

        def evaluate(net, eval_dir):
            return evaluate_model(net, val_loader, val_set, eval_dir, cfg["eval"]["metric"],
                                  ctx.device, max_images=int(cfg["eval"]["max_images"]))

        if ctx.is_main:
            save_config(cfg, os.path.join(out_dir, "config.yaml"))
            if genotype is not None:
                import json
                with open(os.path.join(out_dir, "genotype.json"), "w") as f:
                    json.dump(genotype, f, indent=2)
        trainer = Trainer(cfg, model, train_loader, ctx, evaluate=evaluate, genotype=genotype,
                          val_dataset=val_set)
        if args.resume is not None:
            trainer.resume(args.resume or None, required=True)
        elif cfg["train"]["auto_resume"]:
            trainer.resume()
        try:
            summary = trainer.train()
        except NonFiniteLossError as e:
            if ctx.is_main:
                print(f"ERROR: {e}", file=sys.stderr, flush=True)
            return 2
        if ctx.is_main and summary:
            keys = [k for k in ("AP", "AP50", "AP75") if k in summary]
            print("final evaluation: " + ", ".join(f"{k}={summary[k]:.4f}" for k in keys),
                  flush=True)
        return 0
    finally:
        du.cleanup_distributed()


if __name__ == "__main__":
    from autofpn.cli import run_command
    sys.exit(run_command(main))
