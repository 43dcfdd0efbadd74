"""Does glibc's allocator setting shorten a training step? Interleaved processes of the demo
config's training step (FPN, or the detector of --genotype), each run with the default
environment or with MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ set so that large freed
blocks stay in the heap (no munmap + page faults on the next step's activations); prints wall
time, system time and minor page faults per step, the ratio, and the last loss of each (the
setting must not change a number).

    OMP_NUM_THREADS=2 .venv/bin/python bench/bench_malloc_env.py --rounds 4 [--genotype GENO.json]
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEEP_HEAP = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str((1 << 31) - 1)}


def one_process(genotype, iters: int, warmup: int) -> dict:
    """Time ``iters`` training steps after ``warmup`` in this process (run as the child)."""
    sys.path.insert(0, REPO)
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from train import resolve_config
    from autofpn.data import build_dataset, build_loader, resolve_num_classes
    from autofpn.engine.solver import build_optimizer
    from autofpn.engine.trainer import seed_everything
    from autofpn.models.detector import build_detector
    args = argparse.Namespace(cfg=os.path.join(REPO, "configs", "demo.yaml"), genotype=genotype,
                              neck=None if genotype else "fpn", head=None if genotype else "mlp", opts=[])
    cfg, geno = resolve_config(args)
    dataset = build_dataset(cfg, "train")
    resolve_num_classes(cfg, dataset)
    seed_everything(0)
    model = build_detector(cfg, geno)
    model.train()
    batches = iter(build_loader(cfg, dataset, train=True, seed=0))
    optimizer = build_optimizer(cfg["solver"], model)

    def step() -> float:
        images, targets = next(batches)
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    for _ in range(warmup):
        step()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    losses = [step() for _ in range(iters)]
    after, seconds = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - start
    return {"wall": seconds / iters, "sys": (after.ru_stime - before.ru_stime) / iters,
            "minflt": (after.ru_minflt - before.ru_minflt) / iters, "loss": losses[-1]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--genotype", default=None, help="time this decoded detector's step instead of FPN's")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--iters", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(one_process(args.genotype, args.iters, args.warmup)))
        return 0
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--iters", str(args.iters), "--warmup",
           str(args.warmup)] + (["--genotype", args.genotype] if args.genotype else [])
    results = {"default": [], "keep heap": []}
    for _ in range(args.rounds):
        for name, extra in (("default", {}), ("keep heap", KEEP_HEAP)):
            env = {k: v for k, v in os.environ.items() if k not in KEEP_HEAP}
            out = subprocess.run(cmd, env={**env, **extra}, capture_output=True, text=True, check=True).stdout
            results[name].append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'':10s} {'wall s/step (median)':>21s} {'sys s/step':>11s} {'minor faults':>13s}  last loss")
    for name, runs in results.items():
        walls = " / ".join(f"{r['wall']:.3f}" for r in runs)
        print(f"{name:10s} {statistics.median(r['wall'] for r in runs):21.3f} "
              f"{statistics.median(r['sys'] for r in runs):11.3f} {statistics.median(r['minflt'] for r in runs):13.0f}"
              f"  {runs[-1]['loss']:.6f}   (walls: {walls})")
    ratio = statistics.median(r["wall"] for r in results["keep heap"]) / statistics.median(
        r["wall"] for r in results["default"])
    print(f"keep heap / default, wall per step: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
