"""Evaluate a trained detector, or a saved detections file.

    python evaluate.py --cfg cfg.yaml --ckpt model.pth [--genotype geno.json] [--opts k=v ...]
    torchrun --nproc_per_node N evaluate.py --cfg cfg.yaml --ckpt model.pth
    python evaluate.py --results dets.json --ann gt.json [--metric both] [--voc-boxes devkit]

Model mode runs inference on ``data.val`` (the genotype is taken from ``--genotype``, else from
the checkpoint; its parts build the searched neck / head; the backbone weights come from the
checkpoint, no ImageNet file needed), writes ``detections.json`` (COCO results),
``ground_truth.json`` (the COCO ground truth of the evaluated images they were scored against)
and ``metrics.json`` to ``--out`` (default ``eval.output_dir``, else ``eval_<checkpoint name>/``
next to the checkpoint), says where, and prints the 12 COCO
numbers, VOC AP50 (11-point and area, difficult ignored) with ``--metric voc|both``, a
per-class AP table, the parameters of backbone / neck / RPN / head / total and the FLOPs of one
forward pass at the evaluation size. Results mode prints the same tables for a saved file,
boxes taken as they are; ``--results detections.json --ann ground_truth.json`` of a model-mode
folder reproduces its numbers. VOC AP50 reads boxes as the devkit's inclusive pixels (+1) or
as continuous boxes: ``--voc-boxes``, default the ground truth's ``info.box_convention``, else
devkit (docs/DATA.md, "Box conventions in evaluation").
"""
import argparse
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", default=None, help="YAML config (default: the checkpoint's config)")
    p.add_argument("--ckpt", default=None, help="checkpoint with a 'model' state dict")
    p.add_argument("--genotype", default=None, help="genotype JSON of a searched neck/head")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides, e.g. eval.max_images=50")
    p.add_argument("--results", default=None, help="COCO results JSON to evaluate (no model)")
    p.add_argument("--ann", default=None, help="COCO instances JSON (with --results)")
    p.add_argument("--metric", choices=["coco", "voc", "both"], default=None,
                   help="default: eval.metric (model mode), both (results mode)")
    p.add_argument("--voc-boxes", choices=["devkit", "continuous"], default=None,
                   help="results mode, VOC AP50: 'devkit' = boxes (GT and detections) are VOC "
                        "inclusive pixel indices, widths / heights / intersections get +1 as in "
                        "the official devkit (use for VOC XML numbers converted as they are); "
                        "'continuous' = plain IoU (the ground_truth.json this tool writes). "
                        "Default: the --ann file's info.box_convention, else devkit")
    p.add_argument("--out", default=None,
                   help="output folder: detections.json / ground_truth.json / metrics.json "
                        "(model mode), metrics.json (results mode)")
    args = p.parse_args(argv)
    if args.results or args.ann:
        if not (args.results and args.ann):
            p.error("--results and --ann go together")
    elif args.voc_boxes:
        p.error("--voc-boxes is for --results mode (model mode evaluates continuous boxes)")
    elif not args.ckpt:
        p.error("give --ckpt (model mode) or --results and --ann")
    return args


def _fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def run_results_mode(args) -> int:
    from autofpn.eval import evaluate_results_file
    evaluate_results_file(args.results, args.ann, metric=args.metric or "both", out_dir=args.out,
                          voc_pixel_convention=args.voc_boxes)
    return 0


def run_model_mode(args) -> int:
    from torch.utils.data import Subset

    from autofpn.config import load_config
    from autofpn.data import build_dataset, build_loader, resolve_num_classes
    from autofpn.engine import distributed as du
    from autofpn.eval import evaluate_model
    from autofpn.eval.inference import write_metrics
    from autofpn.models.detector import build_detector, count_flops, parameter_breakdown, use_genotype

    from autofpn.engine.checkpoint import load_checkpoint
    checkpoint = load_checkpoint(args.ckpt)
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise SystemExit(f"{args.ckpt}: no 'model' entry (keys: {sorted(checkpoint)})")
    if args.cfg:
        cfg = load_config(args.cfg, args.opts)
    elif isinstance(checkpoint.get("cfg"), dict):
        from autofpn.config import complete_config
        cfg = complete_config(checkpoint["cfg"], args.opts, where=f"{args.ckpt} (its config)")
    else:
        raise SystemExit(f"{args.ckpt} has no config: pass --cfg")
    genotype = checkpoint.get("genotype")
    if args.genotype:
        from autofpn.models.genotype import load_genotype
        genotype = load_genotype(args.genotype)
    if args.cfg:
        use_genotype(cfg, genotype)
    else:  # the checkpoint's config names the neck / head types it was trained with (--head mlp too)
        use_genotype(cfg, genotype, cfg["model"]["neck"]["type"], cfg["model"]["head"]["type"])
    cfg["model"]["backbone"]["weights"] = "none"  # the checkpoint holds them: no ImageNet file needed
    metric = args.metric or cfg["eval"]["metric"]
    # next to the checkpoint (never into another run's folder named by the config)
    out_dir = args.out or cfg["eval"].get("output_dir") or os.path.join(
        os.path.dirname(os.path.abspath(args.ckpt)), f"eval_{os.path.splitext(os.path.basename(args.ckpt))[0]}")

    ctx = du.init_distributed(cfg["train"]["device"])
    try:
        dataset = build_dataset(cfg, "val")
        resolve_num_classes(cfg, dataset)
        model = build_detector(cfg, genotype)
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError as e:  # usually a config / genotype that is not the trained one
            raise SystemExit(f"{args.ckpt} does not fit the model built from the config "
                             f"(model.* keys or genotype differ from training?): {e}") from e
        model.to(ctx.device).eval()
        max_images = int(cfg["eval"].get("max_images", 0))
        # the first max_images images, sharded over the ranks (same images for any world size)
        subset = Subset(dataset, range(min(max_images, len(dataset)))) if max_images else dataset
        loader = build_loader(cfg, subset, train=False, rank=ctx.rank,
                              world_size=ctx.world_size)
        summary = evaluate_model(model, loader, dataset, out_dir, metric, ctx.device)
        if ctx.is_main:
            params = parameter_breakdown(model)
            size = int(cfg["model"]["transform"]["test_min_size"])
            flops = count_flops(model.cpu(), size, size)
            print("parameters: " + "  ".join(f"{k} {_fmt_count(v)}" for k, v in params.items()))
            print(f"FLOPs at {size}x{size}: " +
                  "  ".join(f"{k} {_fmt_count(v)}" for k, v in flops.items()))
            summary.update(params={k: int(v) for k, v in params.items()},
                           flops={k: int(v) for k, v in flops.items()}, flops_image_size=size)
            write_metrics(summary, os.path.join(out_dir, "metrics.json"))
            print(f"wrote {os.path.join(out_dir, 'detections.json')}, "
                  f"{os.path.join(out_dir, 'ground_truth.json')} and {os.path.join(out_dir, 'metrics.json')}",
                  flush=True)
        return 0
    finally:
        du.cleanup_distributed()


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_results_mode(args) if args.results else run_model_mode(args)


if __name__ == "__main__":
    from autofpn.cli import run_command
    sys.exit(run_command(main))
