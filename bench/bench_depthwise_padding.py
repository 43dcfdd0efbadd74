"""oneDNN's depthwise convolution with its own padding vs ``depthwise_same_conv`` (autofpn/ops/depthwise.py).

For each kernel / dilation of the search spaces' depthwise ops (and a few beyond), at the demo
neck's level shapes: the forward ``F.conv2d(x, w, padding=p, dilation=d, groups=C)`` against
``depthwise_same_conv`` (``F.pad`` first when p > ONEDNN_FAST_PADDING), median of --reps, and
the ratio. Both give the same values (checked here).

    python bench/bench_depthwise_padding.py [--layout channels_last] [--reps 7]
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from autofpn.ops.depthwise import ONEDNN_FAST_PADDING, depthwise_same_conv  # noqa: E402

SPECS = [(3, 1), (3, 2), (3, 3), (5, 1), (5, 2), (5, 3), (3, 5), (7, 2)]  # (kernel, dilation)
SHAPES = [(4, 32, 56, 72), (4, 32, 28, 36), (4, 32, 14, 18)]  # the demo neck's P2-P4 at 224 x 288


def median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layout", choices=("channels_last", "contiguous"), default="channels_last")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    fmt = torch.channels_last if args.layout == "channels_last" else torch.contiguous_format
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), layout {args.layout}, "
          f"explicit padding above {ONEDNN_FAST_PADDING}")
    print(f"{'shape':<18}{'kernel':>7}{'dil':>4}{'pad':>4}{'oneDNN pad (ms)':>17}{'ours (ms)':>11}{'oneDNN / ours':>15}")
    gen = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        x = torch.randn(shape, generator=gen).contiguous(memory_format=fmt)
        for kernel, dilation in SPECS:
            weight = torch.randn(shape[1], 1, kernel, kernel, generator=gen)
            padding = dilation * (kernel - 1) // 2
            theirs = lambda: F.conv2d(x, weight, None, 1, padding, dilation, shape[1])  # noqa: E731
            ours = lambda: depthwise_same_conv(x, weight, padding, dilation)  # noqa: E731
            torch.testing.assert_close(ours(), theirs())
            a, b = median_ms(theirs, args.reps), median_ms(ours, args.reps)
            print(f"{str(list(shape[2:])):<18}{kernel:>7}{dilation:>4}{padding:>4}{a:>17.2f}{b:>11.2f}{a / b:>15.2f}")


if __name__ == "__main__":
    main()
