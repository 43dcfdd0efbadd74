"""torch.ops.autofpn.nms (cuda_ext/nms_cpu.cpp) and autofpn.ops.boxes' NMS keep exactly the boxes
torchvision's keep: same indices, same order."""
import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

import autofpn.ops.boxes as box_ops

pytestmark = pytest.mark.skipif(not box_ops._CPU_NMS, reason="autofpn._C not built")


def random_boxes(n: int, generator: torch.Generator, dtype=torch.float32, scale: float = 400.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * scale
    wh = torch.rand(n, 2, generator=generator) * scale / 3
    return torch.cat([xy, xy + wh], 1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("threshold", [0.7, 0.5, 1 / 3, 0.1, 0.95])
def test_nms_keeps_what_torchvision_keeps(dtype, threshold):
    g = torch.Generator().manual_seed(int(threshold * 1000))
    for trial in range(12):
        n = [0, 1, 2, 37, 500, 2100][trial % 6]
        boxes, scores = random_boxes(n, g, dtype), torch.rand(n, generator=g).to(dtype)
        if trial % 2:
            scores = (scores * 8).round() / 8  # ties: torchvision's order among them is stable
        if n > 4:
            boxes[:3] = boxes[3]  # identical boxes (IoU 1)
            boxes[4, 2:] = boxes[4, :2]  # a zero-area box (IoU 0 / 0 with itself)
        ours, theirs = torch.ops.autofpn.nms(boxes, scores, threshold), torchvision.ops.nms(boxes, scores, threshold)
        assert ours.dtype == torch.int64 and torch.equal(ours, theirs), (n, trial)


def test_nms_threshold_exactly_at_an_iou():
    """Two boxes with IoU exactly 1/2 in float32: kept at threshold 0.5 (not above), suppressed
    just below it, as torchvision compares the float IoU with the double threshold."""
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    scores = torch.tensor([0.9, 0.8])
    for threshold in (0.5, 0.4999999, 0.49999999999):
        assert torch.equal(torch.ops.autofpn.nms(boxes, scores, threshold), torchvision.ops.nms(boxes, scores, threshold))


def test_nms_with_nan_boxes_and_scores():
    g = torch.Generator().manual_seed(3)
    boxes, scores = random_boxes(300, g), torch.rand(300, generator=g)
    boxes[5, 0] = float("nan")
    boxes[17] = float("nan")
    scores[40] = float("nan")
    assert torch.equal(torch.ops.autofpn.nms(boxes, scores, 0.5), torchvision.ops.nms(boxes, scores, 0.5))


def test_nms_rejects_bad_shapes_with_one_line():
    with pytest.raises(RuntimeError, match=r"boxes must be \[N, 4\]"):
        torch.ops.autofpn.nms(torch.zeros(3, 5), torch.zeros(3), 0.5)
    with pytest.raises(RuntimeError, match=r"scores must be \[N\]"):
        torch.ops.autofpn.nms(torch.zeros(3, 4), torch.zeros(2), 0.5)


@pytest.mark.parametrize("n", [0, 300, 1000, 1001, 3000])  # both of batched_nms's strategies
def test_batched_nms_equals_torchvision(n):
    g = torch.Generator().manual_seed(n)
    boxes, scores = random_boxes(n, g, scale=300.0), torch.rand(n, generator=g)
    idxs = torch.randint(0, 5, (n,), generator=g)
    assert torch.equal(box_ops.batched_nms(boxes, scores, idxs, 0.7),
                       torchvision.ops.batched_nms(boxes, scores, idxs, 0.7))


class _Namespaces(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(f"{func.namespace}::{func.overloadpacket.__name__}")
        return func(*args, **(kwargs or {}))


def test_the_detectors_cpu_nms_is_ours():
    g = torch.Generator().manual_seed(0)
    boxes, scores = random_boxes(2000, g), torch.rand(2000, generator=g)
    with _Namespaces() as seen:
        box_ops.batched_nms(boxes, scores, torch.randint(0, 4, (2000,), generator=g), 0.7)
    assert "autofpn::nms" in seen.ops and "torchvision::nms" not in seen.ops
