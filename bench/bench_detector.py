"""Train step and inference: our Faster R-CNN vs torchvision's, side by side in one run.

Both detectors get the same backbone (ResNet-18-FPN or MobileNetV2-FPN with frozen BN, the same
trainable stages), the same weights (copied from torchvision's model into ours), the same
image size, proposal and sampling numbers. Ours runs as its config runs it (``model.memory_format:
auto``: NCHW for this FPN detector), and once more in channels-last, whose time is printed beside
(``ours CL``). Repetitions are interleaved (ours, theirs, ours, ...) and the median is reported,
with each side's interquartile range in % of its median (``IQR %``: ratios closer to 1 than that
are noise). Peak memory is the extra peak resident memory of one train step
(bench/peak_memory.py), in a fresh subprocess per detector.

The distance to the physical limit: the FLOPs of one train step and one inference of each
(``torch.utils.flop_counter``: convolutions and matrix products, forward and backward, a
multiply-add = 2 FLOPs; element-wise ops, RoIAlign and NMS not counted), the achieved GFLOP/s at
the median time, and that as a share of this machine's single-precision matrix-multiply peak,
measured in the same run (best of 5 float32 products of two 2048 x 2048 matrices on the same threads).

With ``--device cuda`` both run on the GPU: every timed call is synchronised, the peak memory is
the extra ``torch.cuda.max_memory_allocated`` of one train step (in this process: what is
allocated before it is left out), and the matmul peak is measured on the GPU (8192 x 8192) in the
precision cuDNN runs the float32 convolutions in (TF32 under torch's default
``torch.backends.cudnn.allow_tf32``).

    python bench/bench_detector.py [--backbones resnet18 mobilenet_v2] [--reps 7] [--size 320] [--profile] [--device cuda]
"""
import argparse
import statistics
import time
from typing import Callable, Dict, List, Tuple

import torch
import torchvision
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from autofpn.config import load_config
from peak_memory import peak_in_fresh_process, profile_table
from autofpn.models.detector import build_detector, torchvision_state_dict_to_ours

NUM_CLASSES = 21
IMAGES_PER_BATCH = 2


def torchvision_model(backbone: str, size: int) -> torch.nn.Module:
    if backbone == "resnet18":
        body = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d,
                                   trainable_layers=3)
    else:  # MobileNetV2 cut at the same four stages as ours, FPN over all four
        features = torchvision.models.mobilenet_v2(weights=None, norm_layer=FrozenBatchNorm2d).features
        for idx in range(0, 4):  # stem + first stage frozen, as frozen_stages=1 in ours
            features[idx].requires_grad_(False)
        body = BackboneWithFPN(features, {"3": "0", "6": "1", "13": "2", "18": "3"}, [24, 32, 96, 1280],
                               256, extra_blocks=LastLevelMaxPool())
    return TVFasterRCNN(body, num_classes=NUM_CLASSES, min_size=size, max_size=int(size * 1333 / 800))


def our_model(backbone: str, size: int, theirs: torch.nn.Module, memory_format: str = "auto") -> torch.nn.Module:
    cfg = load_config(None, [f"model.memory_format={memory_format}",
                             f"model.num_classes={NUM_CLASSES}", f"model.backbone.name={backbone}",
                             "model.backbone.weights=none", f"model.transform.min_size=[{size}]",
                             f"model.transform.test_min_size={size}",
                             f"model.transform.max_size={int(size * 1333 / 800)}"])
    ours = build_detector(cfg)
    ours.load_state_dict(torchvision_state_dict_to_ours(theirs.state_dict()), strict=True)
    mine = {n for n, p in ours.named_parameters() if p.requires_grad}
    theirs_trainable = {n for n, p in torchvision_state_dict_to_ours(
        {n: p for n, p in theirs.named_parameters() if p.requires_grad}).items()}
    assert mine == theirs_trainable, f"trainable sets differ: {sorted(mine ^ theirs_trainable)[:5]}"
    return ours


def make_batch(size: int, seed: int = 0) -> Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for i in range(IMAGES_PER_BATCH):
        h, w = size, int(size * (1.25 if i % 2 == 0 else 1.5))
        images.append(torch.rand(3, h, w, generator=g))
        xy = torch.rand(6, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 16 + torch.rand(6, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        targets.append({"boxes": torch.cat([xy, xy + wh], 1),
                        "labels": torch.randint(1, NUM_CLASSES, (6,), generator=g)})
    return images, targets


def train_step_fn(model, optimizer, images, targets) -> Callable[[], None]:
    def step():
        losses = model(images, targets)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
    return step


def infer_fn(model, images) -> Callable[[], None]:
    def infer():
        with torch.no_grad():
            model(images)
    return infer


def synchronizer(device: str) -> Callable[[], None]:
    """What makes a timed call's end its kernels' end: CUDA's synchronize, nothing on the CPU."""
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


def matmul_peak_gflops(n: int = 2048, reps: int = 5, device: str = "cpu") -> float:
    """The float32 matrix-multiply throughput of ``device`` in GFLOP/s: the best of ``reps``
    products of two n x n matrices (2 n^3 FLOPs each), on the current threads for the CPU."""
    sync = synchronizer(device)
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    torch.mm(a, b)  # warm-up: thread pool and packing buffers, CUDA's handles
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def counted_flops(fn: Callable[[], None]) -> float:
    """FLOPs of one call of ``fn`` as ``torch.utils.flop_counter`` counts them (convolutions and
    matrix products, forward and backward; a multiply-add = 2)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def interleaved_times(fns: Dict[str, Callable[[], None]], reps: int, warmup: int = 2,
                      sync: Callable[[], None] = lambda: None) -> Dict[str, List[float]]:
    """Seconds of each of ``reps`` calls of every function, the functions taking turns."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def interleaved_median(fns: Dict[str, Callable[[], None]], reps: int, warmup: int = 2,
                       sync: Callable[[], None] = lambda: None) -> Dict[str, float]:
    return {name: statistics.median(t) for name, t in interleaved_times(fns, reps, warmup, sync).items()}


def iqr_percent(times: List[float]) -> float:
    """The interquartile range of repeated timings in % of their median: how far apart two
    repetitions of the same call land on this machine (ratios closer to 1 than that say nothing)."""
    if len(times) < 2:
        return float("nan")
    q1, _, q3 = statistics.quantiles(times, n=4)
    return 100 * (q3 - q1) / statistics.median(times)


def train_step_for(which: str, backbone: str, size: int) -> Callable[[], None]:
    """One train step of "ours" or "torchvision" (fresh model and optimizer)."""
    torch.manual_seed(0)
    theirs = torchvision_model(backbone, size)
    model = theirs if which == "torchvision" else our_model(backbone, size, theirs)
    model.train()
    images, targets = make_batch(size)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    return train_step_fn(model, optimizer, images, targets)


def cuda_peak_mib(step: Callable[[], None]) -> float:
    """The extra CUDA memory one call of ``step`` allocates at its peak, MiB: what is allocated
    before it (every model, optimizer state and batch resident in this process) is left out, as
    the CPU's measure leaves out what a fresh process holds before the step."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--profile", action="store_true", help="also print a profile of one train step of each")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_detector: --device cuda asked for, but torch.cuda.is_available() is False")
    device, sync = torch.device(args.device), synchronizer(args.device)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {where}, "
          f"{IMAGES_PER_BATCH} images/batch at min size {args.size}, median of {args.reps} interleaved reps")
    header = (f"{'backbone':<14}{'mode':<11}{'ours (s)':>10}{'torchvision (s)':>17}{'ratio':>8}"
              f"{'IQR % ours / tv':>17}{'ours CL (s)':>13}{'CL / ours':>11}")
    rows = []
    layout_ratio, cl_time = {}, {}
    flops: Dict[Tuple[str, str, str], float] = {}  # (backbone, mode, who) -> FLOPs of one call
    seconds: Dict[Tuple[str, str, str], float] = {}
    for backbone in args.backbones:
        torch.manual_seed(0)
        theirs = torchvision_model(backbone, args.size)
        ours = our_model(backbone, args.size, theirs)
        ours_cl = our_model(backbone, args.size, theirs, "channels_last")
        images, targets = make_batch(args.size)
        images = [im.to(device) for im in images]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        for model in (ours, theirs, ours_cl):
            model.to(device).train()
        opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        opt_theirs = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        opt_cl = torch.optim.SGD([p for p in ours_cl.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
        train_fns = {"ours": train_step_fn(ours, opt_ours, images, targets),
                     "torchvision": train_step_fn(theirs, opt_theirs, images, targets),
                     "ours_cl": train_step_fn(ours_cl, opt_cl, images, targets)}
        train_times = interleaved_times(train_fns, args.reps, sync=sync)
        train = {who: statistics.median(t) for who, t in train_times.items()}
        cuda_mem = ({w: cuda_peak_mib(train_fns[w]) for w in ("ours", "torchvision")}
                    if args.device == "cuda" and not args.no_memory else None)
        for who in ("ours", "torchvision"):
            flops[backbone, "train step", who] = counted_flops(train_fns[who])
            seconds[backbone, "train step", who] = train[who]
        for model in (ours, theirs, ours_cl):
            model.eval()
        infer_fns = {"ours": infer_fn(ours, images), "torchvision": infer_fn(theirs, images),
                     "ours_cl": infer_fn(ours_cl, images)}
        infer_times = interleaved_times(infer_fns, args.reps, sync=sync)
        infer = {who: statistics.median(t) for who, t in infer_times.items()}
        for who in ("ours", "torchvision"):
            flops[backbone, "inference", who] = counted_flops(infer_fns[who])
            seconds[backbone, "inference", who] = infer[who]
        layout_ratio[backbone] = {"train step": train["ours_cl"] / train["ours"],
                                  "inference": infer["ours_cl"] / infer["ours"]}
        cl_time[backbone] = {"train step": train["ours_cl"], "inference": infer["ours_cl"]}
        rows.append((backbone, "train step", train["ours"], train["torchvision"],
                     iqr_percent(train_times["ours"]), iqr_percent(train_times["torchvision"])))
        if args.profile:
            for name, model, opt in (("ours", ours, opt_ours), ("torchvision", theirs, opt_theirs)):
                print(f"profile of one {backbone} train step, {name}:")
                model.train()
                print(profile_table(train_step_fn(model, opt, images, targets)))
        rows.append((backbone, "inference", infer["ours"], infer["torchvision"],
                     iqr_percent(infer_times["ours"]), iqr_percent(infer_times["torchvision"])))
        if cuda_mem is not None:  # measured above, while the models were in train mode
            rows.append((backbone, "peak MiB", cuda_mem["ours"], cuda_mem["torchvision"], None, None))
        elif not args.no_memory:
            mem = {w: peak_in_fresh_process(train_step_for, w, backbone, args.size) for w in ("ours", "torchvision")}
            rows.append((backbone, "peak MiB", mem["ours"], mem["torchvision"], None, None))
    print(header)
    for backbone, mode, a, b, spread_a, spread_b in rows:
        spread = f"{spread_a:>11.0f} / {spread_b:<3.0f}" if spread_a is not None else f"{'':>17}"
        cl = (f"{cl_time[backbone][mode]:>13.3f}{layout_ratio[backbone][mode]:>11.2f}"
              if mode in layout_ratio[backbone] else "")
        print(f"{backbone:<14}{mode:<11}{a:>10.3f}{b:>17.3f}{a / b:>8.2f}{spread}{cl}")
    if args.device == "cuda":
        # cuDNN runs float32 convolutions in TF32 by default (torch.backends.cudnn.allow_tf32), and
        # they are most of a step's FLOPs: the peak to compare with is the matmul's in that precision
        tf32, matmul_tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            peak = matmul_peak_gflops(n=8192, device="cuda")
        finally:
            torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        print(f"\n{where}'s matmul peak in the convolutions' precision: {peak:.1f} GFLOP/s (8192^3, "
              f"{'TF32: torch.backends.cudnn.allow_tf32 is on' if tf32 else 'float32'})")
    else:
        peak = matmul_peak_gflops()
        print(f"\nthis machine's float32 matmul peak: {peak:.1f} GFLOP/s (2048^3, {torch.get_num_threads()} threads)")
    print(f"{'backbone':<14}{'mode':<11}{'who':<13}{'GFLOP':>8}{'GFLOP/s':>9}{'% of peak':>11}")
    for (backbone, mode, who), f in flops.items():
        rate = f / seconds[backbone, mode, who] / 1e9
        print(f"{backbone:<14}{mode:<11}{who:<13}{f / 1e9:>8.2f}{rate:>9.1f}{100 * rate / peak:>10.1f}%")


if __name__ == "__main__":
    main()
