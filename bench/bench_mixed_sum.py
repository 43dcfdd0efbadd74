"""Fused mixed sum (autofpn.ops.mixed_sum) vs the naive Python weighted sum ``sum(w[k] * xs[k])``.

At the search's real shapes (K = 7 non-"none" candidate ops): forward + backward wall time
(median of interleaved repeats, both variants in this one run) and peak memory, with ratios.

Peak memory method: each (variant, shape) runs in a fresh subprocess that allocates the inputs
and grad_out, resets the kernel's resident-set high-water mark (``echo 5 > /proc/self/clear_refs``),
reads the current RSS (VmRSS), runs one forward + backward (after a tiny warm-up step), and reads the high-water mark
(VmHWM, /proc/self/status). The difference is the extra peak resident memory of that step
(output, gradients, temporaries). tracemalloc cannot see torch's allocations and torch keeps no
CPU allocator statistics, hence RSS; ru_maxrss alone cannot be reset, and importing torch
leaves it above what a small step needs, which would hide the step's peak.

The copy bandwidth of this machine is measured too (into an existing buffer, and into a fresh
allocation whose pages fault in on first touch), to put the fused kernel's bytes/s in context.

Usage:
    .venv/bin/python bench/bench_mixed_sum.py [--repeats 5] [--num-inputs 7]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from autofpn.ops.mixed_sum import backend_name, mixed_sum
from peak_memory import peak_growth_mib

SEARCH_SHAPES = [(2, 64, 80, 80), (2, 256, 100, 168), (512, 512, 7, 7)]


def naive_mixed_sum(xs: Sequence[torch.Tensor], w: torch.Tensor) -> torch.Tensor:
    """What a DARTS mixed op writes without the fused op."""
    return sum(w[k] * x for k, x in enumerate(xs))


VARIANTS: Dict[str, Callable] = {"naive": naive_mixed_sum, "fused": mixed_sum}


def make_inputs(shape: Tuple[int, ...], num_inputs: int, seed: int = 0):
    """xs: K leaf tensors [shape] float32 requiring grad, w: softmaxed Tensor[K] leaf, grad_out."""
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=gen).requires_grad_() for _ in range(num_inputs)]
    w = torch.softmax(torch.randn(num_inputs, generator=gen), 0).requires_grad_()
    grad_out = torch.randn(shape, generator=gen)
    return xs, w, grad_out


def forward_backward(fn: Callable, xs, w, grad_out) -> Tuple[float, float]:
    """One training-style step; returns (forward seconds, forward + backward seconds)."""
    for x in xs:
        x.grad = None
    w.grad = None
    start = time.perf_counter()
    out = fn(xs, w)
    forward_done = time.perf_counter()
    out.backward(grad_out)
    end = time.perf_counter()
    return forward_done - start, end - start


def time_variants(shape, num_inputs: int, repeats: int) -> Dict[str, Dict[str, float]]:
    """Median forward and forward+backward seconds per variant, repeats interleaved so that
    background load hits both variants alike."""
    xs, w, grad_out = make_inputs(shape, num_inputs)
    samples: Dict[str, Dict[str, List[float]]] = {name: {"fwd": [], "fwd_bwd": []} for name in VARIANTS}
    for name, fn in VARIANTS.items():  # warm-up (allocator, thread pool)
        forward_backward(fn, xs, w, grad_out)
    for _ in range(repeats):
        for name, fn in VARIANTS.items():
            fwd, fwd_bwd = forward_backward(fn, xs, w, grad_out)
            samples[name]["fwd"].append(fwd)
            samples[name]["fwd_bwd"].append(fwd_bwd)
    return {name: {key: statistics.median(values) for key, values in timing.items()}
            for name, timing in samples.items()}


def measure_peak_in_this_process(variant: str, shape, num_inputs: int) -> float:
    """Extra peak resident MB of one forward + backward (inputs already resident)."""
    # A tiny step first, so one-off costs (autograd engine threads, code paged in on first use)
    # do not count as the step's memory.
    forward_backward(VARIANTS[variant], *make_inputs((2, 3, 4, 5), num_inputs))
    xs, w, grad_out = make_inputs(shape, num_inputs)
    return peak_growth_mib(lambda: forward_backward(VARIANTS[variant], xs, w, grad_out))


def peak_memory_mb(variant: str, shape, num_inputs: int, threads: int) -> float:
    command = [sys.executable, __file__, "--peak-of", variant, "--shape", ",".join(map(str, shape)),
               "--num-inputs", str(num_inputs), "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mb"]


def copy_bandwidth_gbs(numel: int, repeats: int = 5) -> Tuple[float, float]:
    """(GB/s copying into an existing buffer, GB/s copying into a fresh allocation)."""
    source = torch.randn(numel)
    target = torch.empty(numel)
    target.copy_(source)
    bytes_moved = 2 * numel * source.element_size()
    steady, fresh = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        steady.append(time.perf_counter() - start)
        start = time.perf_counter()
        clone = source.clone()
        fresh.append(time.perf_counter() - start)
        del clone
    return bytes_moved / min(steady) / 1e9, bytes_moved / min(fresh) / 1e9


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-inputs", type=int, default=7, help="K, the number of non-none ops")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--shape", type=str, default=None, help="one shape, e.g. 2,64,80,80")
    parser.add_argument("--peak-of", choices=sorted(VARIANTS), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in args.shape.split(","))] if args.shape else SEARCH_SHAPES

    if args.peak_of is not None:  # subprocess mode
        print(json.dumps({"peak_mb": measure_peak_in_this_process(args.peak_of, shapes[0], args.num_inputs)}))
        return

    K = args.num_inputs
    print(f"mixed_sum backend: {backend_name()}; torch {torch.__version__}; {args.threads} threads; "
          f"K = {K}; float32; median of {args.repeats} interleaved repeats")
    print()
    print("| shape | naive fwd ms | fused fwd ms | naive fwd+bwd ms | fused fwd+bwd ms | speed-up fwd+bwd "
          "| naive peak MB | fused peak MB | fused/naive peak | K grads + out MB | fused GB/s | copy GB/s (existing / fresh buffer) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in shapes:
        numel = 1
        for size in shape:
            numel *= size
        timing = time_variants(shape, K, args.repeats)
        peaks = {name: peak_memory_mb(name, shape, K, args.threads) for name in VARIANTS}
        steady_gbs, fresh_gbs = copy_bandwidth_gbs(numel)
        # Fused traffic: forward reads K, writes 1; backward reads grad_out + K, writes K.
        fused_bytes = (3 * K + 2) * numel * 4
        fused_gbs = fused_bytes / timing["fused"]["fwd_bwd"] / 1e9
        speedup = timing["naive"]["fwd_bwd"] / timing["fused"]["fwd_bwd"]
        print(f"| {list(shape)} | {timing['naive']['fwd'] * 1e3:.1f} | {timing['fused']['fwd'] * 1e3:.1f} "
              f"| {timing['naive']['fwd_bwd'] * 1e3:.1f} | {timing['fused']['fwd_bwd'] * 1e3:.1f} | {speedup:.2f}x "
              f"| {peaks['naive']:.0f} | {peaks['fused']:.0f} | {peaks['fused'] / peaks['naive']:.2f} "
              f"| {(K + 1) * numel * 4 / 2**20:.0f} | {fused_gbs:.1f} | {steady_gbs:.1f} / {fresh_gbs:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
