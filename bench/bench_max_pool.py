"""The ResNet stem's max pool: torch's ``F.max_pool2d`` vs ``autofpn.ops.pooling.max_pool2d``.

The stem's 3x3 / stride-2 / padding-1 pool at the stems of bench_detector.py (2 images at 320 px,
batch padded to 320 x 480) and of the demo config (4 images up to 224 x 288), NCHW float32 with no
gradient (a frozen stem, inference), on the current threads; interleaved, median of --reps, and
the ratio. Both give the same values (checked here).

    python bench/bench_max_pool.py [--reps 15]
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_detector import interleaved_median  # noqa: E402
from autofpn.ops.pooling import max_pool2d  # noqa: E402

SHAPES = {"bench_detector (2 x 320 x 480)": (2, 64, 160, 240), "demo (4 x 224 x 288)": (4, 64, 112, 144)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads, median of {args.reps} interleaved reps")
    print(f"{'stem':<32}{'torch (ms)':>11}{'ours (ms)':>11}{'ours / torch':>14}")
    for name, shape in SHAPES.items():
        x = torch.randn(*shape)
        assert torch.equal(max_pool2d(x, 3, 2, 1), F.max_pool2d(x, 3, 2, 1))
        t = interleaved_median({"torch": lambda: F.max_pool2d(x, 3, 2, 1), "ours": lambda: max_pool2d(x, 3, 2, 1)},
                               args.reps)
        print(f"{name:<32}{1e3 * t['torch']:>11.2f}{1e3 * t['ours']:>11.2f}{t['ours'] / t['torch']:>14.2f}")


if __name__ == "__main__":
    main()
