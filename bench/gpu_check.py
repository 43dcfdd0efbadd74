"""``make gpu-check``: the project's CUDA paths on a GPU, in one run.

1. The CUDA-only tests (``pytest tests -k cuda``: the fused mixed sum's CUDA kernel against a
   float64 ground truth, float32 weights with half inputs, gradcheck / opcheck on the device).
2. Time per step (median of --reps, synchronised) and peak GPU memory (``max_memory_allocated``)
   of an FPN training step and of a neck and a head search iteration on the config (default the
   demo's; also with ``search.mode=gdas`` and with ``search.partial_channels=4``, and the neck
   ones with the links of a source level run one by one, not stacked, and the full neck with
   every level stacked), once in
   float32 and once with ``search.amp`` (bfloat16 where the GPU has it, else
   float16), printed as a table with the ratio to the FPN step.
3. A short search (``search.py``, both stages) and a short training of its genotype
   (``train.py``) on the device, end to end, as a user runs them.

    python bench/gpu_check.py [--cfg configs/demo.yaml] [--reps 5] [--iters 20] [--out out/gpu_check]
                              [--skip-tests] [--steps-only] [--variants fpn neck head] [--opts k=v ...]

``--steps-only`` times the steps (2.) and nothing else: for a config whose data is not on the
machine, with ``--opts data.train.type=synthetic ...`` (the paper-size check in docs/BENCHMARKS.md).

Without CUDA it stops with one line saying so; ``--device cpu`` runs the same steps on the CPU
(what the test suite does, at a tiny size, to keep this script working where no GPU is).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

# the default rows: the paper's full mixed op, and the two cheaper ways of searching (one sampled op
# per link / edge; the ops on a quarter of the channels); the neck rows again with the links of a
# source level one by one ("@0": not stacked) and the full neck with every level stacked ("@2^40";
# the stacking rule, MAX_STACKED_MACS and MAX_BLOCK_DIAGONAL_CHANNELS, was measured on a CPU
# only); --variants takes any of bench_search's
ALL_STACKED = 2 ** 40
VARIANTS = ("fpn", "neck", "head", "neck_gdas", "head_gdas", "neck_pc4", "head_pc4", "neck@0", "neck_pc4@0",
            f"neck@{ALL_STACKED}")
LABELS = {"fpn": "FPN training step", "neck": "neck search iteration", "head": "head search iteration",
          "neck_recompute": "neck search, recompute", "head_recompute": "head search, recompute",
          "neck_gdas": "neck search, gdas", "head_gdas": "head search, gdas",
          "neck_pc4": "neck search, 1/4 ch.", "head_pc4": "head search, 1/4 ch."}


def label(variant: str) -> str:
    """The row's name: "neck@0" (bench_search's stack-limit suffix) -> "neck search iteration, 1 by 1";
    "neck@1099511627776" (2^40 and above) -> "neck search iteration, all stacked"."""
    name, _, limit = variant.partition("@")
    suffix = ("" if not limit else ", 1 by 1" if int(limit) == 0 else ", all stacked" if int(limit) >= ALL_STACKED
              else f", stack {limit}")
    return LABELS.get(name, name) + suffix


def amp_dtype_for(device: str) -> str:
    """The search.amp the device runs best: bfloat16 where supported (Ampere and later, CPUs),
    else float16 (V100)."""
    if device == "cuda" and not torch.cuda.is_bf16_supported():
        return "float16"
    return "bfloat16"


def time_step(step: Callable[[], None], device: str, reps: int) -> Dict[str, float]:
    """Median seconds of ``step`` over ``reps`` (after one warm-up) and, on CUDA, the peak memory
    allocated during those steps in MiB (NaN on the CPU)."""
    from bench_detector import synchronizer
    sync = synchronizer(device)
    step()
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else float("nan")
    return {"seconds": statistics.median(times), "peak_mib": peak}


def step_table(cfg_path: str, opts: List[str], device: str, reps: int,
               variants: Sequence[str] = VARIANTS) -> List[Dict]:
    """One row per (variant, precision): seconds, peak MiB. ``variants``: names of
    bench_search.build_variant, "fpn" first (the ratios' denominator)."""
    from autofpn.config import load_config
    from bench_search import build_variant
    rows = []
    for precision in ("none", amp_dtype_for(device)):
        cfg = load_config(cfg_path, opts + [f"search.amp={precision}", f"train.device={device}"])
        for name in variants:
            step = build_variant(name, cfg, device=device)
            rows.append({"variant": name, "amp": precision if name != "fpn" else "none",
                         **time_step(step, device, reps)})
            del step
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


def format_table(rows: List[Dict]) -> str:
    fpn = next(r["seconds"] for r in rows if r["variant"] == "fpn")
    lines = [f"{'':<32}{'search.amp':>11}{'time (s)':>10}{'x FPN step':>12}{'peak MiB':>10}"]
    seen = set()
    for r in rows:
        key = (r["variant"], r["amp"])
        if key in seen:  # the FPN step is timed in both passes; print it once
            continue
        seen.add(key)
        lines.append(f"{label(r['variant']):<32}{r['amp']:>11}{r['seconds']:>10.3f}{r['seconds'] / fpn:>12.2f}"
                     f"{r['peak_mib']:>10.0f}")
    return "\n".join(lines)


def run(cmd: List[str]) -> float:
    """Runs a user-facing script; raises SystemExit naming it when it fails. Returns seconds."""
    print("$ " + " ".join(cmd), flush=True)
    start = time.perf_counter()
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise SystemExit(f"gpu-check: {os.path.basename(cmd[1])} failed (command above)")
    return time.perf_counter() - start


def end_to_end(cfg_path: str, opts: List[str], device: str, iters: int, out: str) -> Dict[str, float]:
    """search.py (both stages, ``iters`` iterations each, architecture steps in the second half)
    then train.py on its genotype for ``iters`` iterations, on ``device``."""
    py = sys.executable
    search_out, train_out = os.path.join(out, "search"), os.path.join(out, "train")
    common = [f"train.device={device}", *opts]
    search = run([py, os.path.join(REPO, "search.py"), "--cfg", cfg_path, "--force", "--opts", *common,
                  f"search.max_iters={iters}", "search.arch_start_epoch_fraction=0.5",
                  f"search.amp={amp_dtype_for(device)}", f"search.output_dir={search_out}"])
    train = run([py, os.path.join(REPO, "train.py"), "--cfg", cfg_path, "--genotype",
                 os.path.join(search_out, "geno.json"), "--opts", *common, f"solver.max_iters={iters}",
                 "train.precise_bn_batches=0", "train.auto_resume=false", f"train.output_dir={train_out}"])
    return {"search": search, "train": train}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cfg", default=os.path.join(REPO, "configs", "demo.yaml"))
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20, help="iterations of the short search stages and training")
    parser.add_argument("--out", default=os.path.join(REPO, "out", "gpu_check"))
    parser.add_argument("--skip-tests", action="store_true", help="skip the CUDA-only tests (step 1)")
    parser.add_argument("--steps-only", action="store_true",
                        help="time the steps (2.) only: no CUDA tests, no end-to-end search and training")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS),
                        help="the steps timed (bench_search.build_variant's names, 'fpn' first): "
                             "e.g. fpn neck_recompute head_recompute")
    parser.add_argument("--opts", nargs="*", default=[], help="config overrides for every step")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); it checks the GPU paths "
              "on a machine with one (--device cpu runs the same steps on the CPU)", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"gpu-check on {name}: torch {torch.__version__}, config {args.cfg}", flush=True)
    if not (args.skip_tests or args.steps_only):
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", os.path.join(REPO, "tests"), "-k", "cuda"],
                               cwd=REPO)
        if tests.returncode not in (0, 5):  # 5: nothing collected
            raise SystemExit("gpu-check: the CUDA tests failed (output above)")
    if args.variants[0] != "fpn":
        parser.error("--variants: 'fpn' comes first (every ratio is to the FPN training step)")
    rows = step_table(args.cfg, args.opts, args.device, args.reps, args.variants)
    seconds = None if args.steps_only else end_to_end(args.cfg, args.opts, args.device, args.iters, args.out)
    print(f"\nper step on {name} (median of {args.reps}; peak = max_memory_allocated):")
    print(format_table(rows))
    if seconds is not None:
        print(f"end to end: search.py ({args.iters} iterations per stage) {seconds['search']:.0f} s, "
              f"train.py ({args.iters} iterations) {seconds['train']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
