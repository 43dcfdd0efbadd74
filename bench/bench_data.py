"""Embedded dataset: generation time, and one training epoch of loading with 0 vs N workers.

    python bench/bench_data.py [--num-train 300] [--num-val 100] [--image-size 256] [--workers 2]

Generates the synthetic dataset into a fresh temporary folder (timed), calls ``ensure_synthetic``
again (cached: should be ~0), then iterates one epoch of the training loader (decode, flip,
to-tensor, grouping, collate) in the main process and with worker processes, and prints the
ratio of the two.
"""
import argparse
import shutil
import tempfile
import time

from autofpn.config import load_config
from autofpn.data import build_dataset, build_loader, ensure_synthetic


def one_epoch(cfg, dataset) -> float:
    loader = build_loader(cfg, dataset, train=True, seed=0)
    loader.batch_sampler.set_epoch(0)
    start = time.perf_counter()
    num_images = sum(len(images) for images, _ in loader)
    assert num_images == len(dataset)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--num-train", type=int, default=300)
    p.add_argument("--num-val", type=int, default=100)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="autofpn_bench_")
    try:
        root = f"{tmp}/synthetic"
        params = {"root": root, "num_train": args.num_train, "num_val": args.num_val,
                  "image_size": args.image_size, "seed": 0}
        start = time.perf_counter()
        ensure_synthetic(params)
        generate = time.perf_counter() - start
        start = time.perf_counter()
        ensure_synthetic(params)
        cached = time.perf_counter() - start
        total = args.num_train + args.num_val
        print(f"generate {total} images at {args.image_size}px: {generate:.2f} s "
              f"({1000 * generate / total:.1f} ms/image); cached call: {1000 * cached:.2f} ms")
        base = [f"data.synthetic.root={root}", f"data.synthetic.num_train={args.num_train}",
                f"data.synthetic.num_val={args.num_val}",
                f"data.synthetic.image_size={args.image_size}",
                f"data.images_per_batch={args.batch}"]
        cfg0 = load_config(None, base + ["data.num_workers=0"])
        cfgn = load_config(None, base + [f"data.num_workers={args.workers}"])
        dataset = build_dataset(cfg0, "train")
        t0 = one_epoch(cfg0, dataset)
        tn = one_epoch(cfgn, dataset)
        n = len(dataset)
        print(f"one epoch, {n} images, batch {args.batch}: 0 workers {t0:.2f} s "
              f"({n / t0:.0f} img/s); {args.workers} workers {tn:.2f} s ({n / tn:.0f} img/s, "
              f"incl. worker start); ratio 0/{args.workers} workers = {t0 / tn:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
