"""One train step's fingerprint, to tell a numerics change from a rounding change between two
checkouts: the losses and the gradient norm of every trainable parameter of our Faster R-CNN
(bench_detector's model and batch: ResNet-18-FPN, torchvision's initialisation, 2 images at 320
px), written to a file; ``--compare`` prints the largest relative difference of two such files.

    PYTHONPATH=. python bench/step_fingerprint.py --dtype float64 --out /tmp/new.pt   # in each checkout
    PYTHONPATH=. python bench/step_fingerprint.py --compare /tmp/old.pt /tmp/new.pt

A change that only rounds float32 differently (reordered sums, fused multiply-adds) differs in
float32 and gives 0 in float64 where the float64 arithmetic is unchanged; a change of the math
differs in both.
"""
import argparse
import sys

import torch

from bench_detector import make_batch, our_model, torchvision_model


def fingerprint(dtype: torch.dtype, size: int = 320) -> dict:
    torch.manual_seed(0)
    model = our_model("resnet18", size, torchvision_model("resnet18", size)).to(dtype).train()
    images, targets = make_batch(size)
    images = [im.to(dtype) for im in images]
    targets = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items()} for t in targets]
    torch.manual_seed(1)  # the samplers' draws
    losses = model(images, targets)
    sum(losses.values()).backward()
    result = {name: value.item() for name, value in losses.items()}
    result.update({name: p.grad.norm().item() for name, p in model.named_parameters() if p.grad is not None})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--out", help="file to write the fingerprint to")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two fingerprint files")
    args = parser.parse_args()
    if args.compare:
        a, b = (torch.load(path) for path in args.compare)
        if a.keys() != b.keys():
            sys.exit(f"step_fingerprint: {args.compare[0]} and {args.compare[1]} hold different entries")
        relative = {k: abs(a[k] - b[k]) / max(abs(a[k]), 1e-30) for k in a}
        losses = [k for k in a if k.startswith("loss")]
        print(f"{len(a)} entries; largest relative difference: losses "
              f"{max(relative[k] for k in losses):.2e}, gradient norms "
              f"{max(v for k, v in relative.items() if k not in losses):.2e} "
              f"({max(relative, key=relative.get)})")
        return
    if not args.out:
        parser.error("--out or --compare is needed")
    torch.save(fingerprint(getattr(torch, args.dtype)), args.out)
    print(f"fingerprint of one {args.dtype} train step written to {args.out}")


if __name__ == "__main__":
    main()
