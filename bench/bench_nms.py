"""NMS on the CPU: torchvision's vs ours (``autofpn.ops.boxes``: torch.ops.autofpn.nms, its IoU test
vectorised; the same kept boxes, checked here).

Random boxes in a 480 x 320 image (sides up to a third of it), random scores, at the sizes of a
Faster R-CNN step at 320 px: one NMS of N boxes, and ``batched_nms`` as the RPN calls it (per image,
the top 2000 (train) or 1000 (test) boxes of each of 5 levels, threshold 0.7) and as the box head's
postprocess does (boxes of 20 classes, threshold 0.5). Interleaved, median of --reps, the ratio.

    python bench/bench_nms.py [--reps 15]
"""
import argparse
import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_detector import interleaved_median  # noqa: E402
from autofpn.ops import boxes as box_ops  # noqa: E402


def random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * torch.tensor([480.0, 320.0])
    wh = 4 + torch.rand(n, 2, generator=g) * torch.tensor([160.0, 107.0])
    return torch.cat([xy, xy + wh], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    if not box_ops._CPU_NMS:
        raise SystemExit("bench_nms: autofpn._C has no nms (build it: make ext)")
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, CPU, {torch.get_num_threads()} threads, "
          f"median of {args.reps} interleaved reps")
    g = torch.Generator().manual_seed(0)
    cases = []
    for n in (1000, 2000):
        b, s = random_boxes(n, g), torch.rand(n, generator=g)
        cases.append((f"nms, {n} boxes, 0.7", lambda b=b, s=s: torchvision.ops.nms(b, s, 0.7),
                      lambda b=b, s=s: box_ops.nms(b, s, 0.7)))
    for per_level, mode in ((2000, "train"), (1000, "test")):
        b, s = random_boxes(5 * per_level, g), torch.rand(5 * per_level, generator=g)
        levels = torch.arange(5).repeat_interleave(per_level)
        cases.append((f"RPN batched_nms, 5 x {per_level} ({mode})",
                      lambda b=b, s=s, i=levels: torchvision.ops.batched_nms(b, s, i, 0.7),
                      lambda b=b, s=s, i=levels: box_ops.batched_nms(b, s, i, 0.7)))
    b, s = random_boxes(4000, g), torch.rand(4000, generator=g)
    labels = torch.randint(1, 21, (4000,), generator=g)
    cases.append(("postprocess batched_nms, 4000 x 20 classes", lambda: torchvision.ops.batched_nms(b, s, labels, 0.5),
                  lambda: box_ops.batched_nms(b, s, labels, 0.5)))
    print(f"{'case':<46}{'torchvision (ms)':>17}{'ours (ms)':>11}{'ours / tv':>11}")
    for name, theirs, ours in cases:
        assert torch.equal(ours(), theirs()), name
        t = interleaved_median({"torchvision": theirs, "ours": ours}, args.reps)
        print(f"{name:<46}{1e3 * t['torchvision']:>17.2f}{1e3 * t['ours']:>11.2f}{t['ours'] / t['torchvision']:>11.3f}")


if __name__ == "__main__":
    main()
