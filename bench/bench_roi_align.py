"""The pyramid RoIAlign on the CPU: torchvision's ``MultiScaleRoIAlign`` vs ours
(``autofpn.ops.roi_align.MultiLevelRoIAlign``), as a Faster R-CNN at 320 px uses it.

Four 256-channel levels (P2-P5) of a 2-image batch padded to 320 x 480, random boxes of 4-260 px
(every level gets some); inference: 1000 boxes per image, forward only; training: 512 per image,
forward and backward. Ours in one extension call (``torch.ops.autofpn.multilevel_roi_align``) and,
as a second row, one call per level (the path before it); both give the same values (checked here
against each other bit for bit, and against torchvision's). Interleaved, median of --reps, the ratio
to torchvision's time.

    python bench/bench_roi_align.py [--reps 15]
"""
import argparse
import os
import sys

import torch
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_detector import interleaved_median  # noqa: E402
from autofpn.ops import roi_align as ra  # noqa: E402

STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
HEIGHT, WIDTH = 320, 480


def random_boxes(n: int, g: torch.Generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=g) * torch.tensor([WIDTH * 0.8, HEIGHT * 0.8])
    wh = torch.exp(torch.empty(n, 2).uniform_(1.4, 5.6, generator=g))
    return torch.cat([xy, (xy + wh).clamp(max=torch.tensor([float(WIDTH), float(HEIGHT)]))], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    if not ra._CPU_MULTILEVEL_KERNEL:
        raise SystemExit("bench_roi_align: autofpn._C has no multilevel_roi_align (build it: make ext)")
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, CPU, {torch.get_num_threads()} threads, "
          f"median of {args.reps} interleaved reps")
    g = torch.Generator().manual_seed(0)
    names = list(STRIDES)
    ours = ra.MultiLevelRoIAlign(names, STRIDES, output_size=7, sampling_ratio=2)
    theirs = torchvision.ops.MultiScaleRoIAlign(names, 7, 2)
    image_sizes = [(HEIGHT, WIDTH)] * 2
    one_call = ra.MultiLevelRoIAlign.__dict__["_one_kernel_call"]  # the staticmethod itself

    def ours_as(single_call: bool, fn):
        def run():
            ra.MultiLevelRoIAlign._one_kernel_call = one_call if single_call else staticmethod(lambda feats: False)
            try:
                return fn()
            finally:
                ra.MultiLevelRoIAlign._one_kernel_call = one_call
        return run

    print(f"{'':<36}{'torchvision (ms)':>17}{'ours (ms)':>11}{'ours / tv':>11}{'ours per level (ms)':>21}{'/ tv':>7}")
    for mode, per_image in (("inference", 1000), ("training", 512)):
        train = mode == "training"
        feats = {n: torch.randn(2, 256, HEIGHT // s, WIDTH // s, generator=g, requires_grad=train)
                 for n, s in STRIDES.items()}
        boxes = [random_boxes(per_image, g) for _ in range(2)]
        grad = torch.randn(2 * per_image, 256, 7, 7, generator=g)

        def step(pool):
            if not train:
                with torch.no_grad():
                    return pool()
            out = pool()
            out.backward(grad)
            return out.detach()
        fns = {"torchvision": lambda: step(lambda: theirs(feats, boxes, image_sizes)),
               "ours": ours_as(True, lambda: step(lambda: ours(feats, boxes))),
               "ours per level": ours_as(False, lambda: step(lambda: ours(feats, boxes)))}
        results = {name: fn() for name, fn in fns.items()}
        assert torch.equal(results["ours"], results["ours per level"])
        torch.testing.assert_close(results["ours"], results["torchvision"], atol=1e-4, rtol=1e-4)
        t = interleaved_median(fns, args.reps)
        label = f"{mode}, {2 * per_image} RoIs" + (" (fwd + bwd)" if train else "")
        print(f"{label:<36}{1e3 * t['torchvision']:>17.1f}{1e3 * t['ours']:>11.1f}{t['ours'] / t['torchvision']:>11.3f}"
              f"{1e3 * t['ours per level']:>21.1f}{t['ours per level'] / t['torchvision']:>7.3f}")


if __name__ == "__main__":
    main()
