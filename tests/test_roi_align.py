"""Our CPU RoIAlign kernel equals torchvision's, forward and backward."""
import pytest
import torch
import torchvision

from autofpn.ops import roi_align as ra

pytestmark = pytest.mark.skipif(not ra._CPU_KERNEL, reason="autofpn._C not built")


def _case(dtype, num_rois=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 5, 13, 17, generator=g, dtype=dtype)
    xy = torch.rand(num_rois, 2, generator=g, dtype=dtype) * torch.tensor([80.0, 60.0], dtype=dtype) - 8
    wh = torch.rand(num_rois, 2, generator=g, dtype=dtype) * 50
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[:3, 2:] = boxes[:3, :2] + 0.2  # tiny boxes (clamped to 1x1 when not aligned)
    boxes[3] = torch.tensor([100.0, 100.0, 120.0, 130.0], dtype=dtype)  # outside the map
    batch = torch.randint(0, 2, (num_rois, 1), generator=g).to(dtype)
    return feats, torch.cat([batch, boxes], 1)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("aligned", [False, True])
def test_matches_torchvision(dtype, tol, sampling_ratio, aligned):
    feats, rois = _case(dtype)
    a = feats.clone().requires_grad_()
    b = feats.clone().requires_grad_()
    ours = ra.roi_align(a, rois, (7, 6), 0.25, sampling_ratio, aligned)
    theirs = torchvision.ops.roi_align(b, rois, (7, 6), spatial_scale=0.25, sampling_ratio=sampling_ratio,
                                       aligned=aligned)
    torch.testing.assert_close(ours, theirs, atol=tol, rtol=tol)
    grad = torch.randn_like(ours)
    ours.backward(grad)
    theirs.backward(grad)
    torch.testing.assert_close(a.grad, b.grad, atol=tol, rtol=tol)


def test_gradcheck():
    feats, rois = _case(torch.float64, num_rois=6)
    feats = feats[:, :2, :8, :9].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda f: ra.roi_align(f, rois, (3, 3), 0.5, 2, False), (feats,))


def test_result_does_not_depend_on_thread_count():
    feats, rois = _case(torch.float32, num_rois=64)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            f = feats.clone().requires_grad_()
            ra.roi_align(f, rois, (7, 7), 0.25, 2, False).sum().backward()
            results.append(f.grad)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1])


def test_opcheck_and_empty_rois():
    feats, rois = _case(torch.float32, num_rois=5)
    torch.library.opcheck(torch.ops.autofpn.roi_align.default, (feats.requires_grad_(), rois, 0.25, 7, 7, 2, False))
    out = ra.roi_align(feats, rois[:0], (7, 7), 0.25, 2, False)
    assert out.shape == (0, 5, 7, 7)


def test_channels_last_input_gives_the_same_output_and_gradient():
    # the forward reads channels-last; an NCHW input is copied to it, a channels-last one is not
    feats, rois = _case(torch.float32, num_rois=30)
    a = feats.clone().requires_grad_()
    b = feats.contiguous(memory_format=torch.channels_last).requires_grad_()
    out_a = ra.roi_align(a, rois, (7, 7), 0.25, 2, False)
    out_b = ra.roi_align(b, rois, (7, 7), 0.25, 2, False)
    assert out_a.is_contiguous() and out_b.is_contiguous()
    assert torch.equal(out_a, out_b)
    grad = torch.randn_like(out_a)
    out_a.backward(grad)
    out_b.backward(grad)
    assert torch.equal(a.grad, b.grad)


def test_pyramid_pooling_matches_torchvision_and_a_nan_box_stays_zero():
    g = torch.Generator().manual_seed(1)
    names, strides = ["p2", "p3", "p4", "p5"], {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
    feats = {n: torch.randn(2, 8, 256 // s, 320 // s, generator=g) for n, s in strides.items()}
    boxes = []
    for _ in range(2):
        xy = torch.rand(25, 2, generator=g) * 150
        wh = torch.exp(torch.empty(25, 2).uniform_(2.0, 6.8, generator=g))  # 7-900 px: every level
        boxes.append(torch.cat([xy, xy + wh], 1))
    ours = ra.MultiLevelRoIAlign(names, strides, output_size=7, sampling_ratio=2)
    theirs = torchvision.ops.MultiScaleRoIAlign(names, 7, 2)
    image_sizes = [(256, 320), (256, 320)]
    feats_theirs = {n: f.clone().requires_grad_() for n, f in feats.items()}
    feats_ours = {n: f.clone().requires_grad_() for n, f in feats.items()}
    expected = theirs(feats_theirs, boxes, image_sizes)
    assert ours.assign_levels(torch.cat(boxes)).unique().numel() == 4, "the case covers every level"
    pooled = ours(feats_ours, boxes)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn(expected.shape, generator=g)
    expected.backward(grad)
    pooled.backward(grad)
    for name in names:  # the rows go back to their levels in the backward too
        torch.testing.assert_close(feats_ours[name].grad, feats_theirs[name].grad, atol=1e-5, rtol=1e-5)
    expected = expected.detach()
    with_nan = [torch.cat([boxes[0], torch.full((1, 4), float("nan"))]), boxes[1]]
    pooled = ours(feats, with_nan)
    assert torch.equal(pooled[25], torch.zeros_like(pooled[25]))
    torch.testing.assert_close(torch.cat([pooled[:25], pooled[26:]]), expected, atol=1e-5, rtol=1e-5)


def _pyramid_case(dtype, seed=2):
    g = torch.Generator().manual_seed(seed)
    strides = {"p2": 4, "p3": 8, "p4": 16, "p5": 32}
    feats = {n: torch.randn(2, 6, 128 // s, 192 // s, generator=g, dtype=dtype) for n, s in strides.items()}
    feats["p3"] = feats["p3"].contiguous(memory_format=torch.channels_last)  # layouts may differ per level
    boxes = []
    for _ in range(2):
        xy = torch.rand(30, 2, generator=g, dtype=dtype) * 100
        wh = torch.exp(torch.empty(30, 2, dtype=dtype).uniform_(1.5, 5.3, generator=g))  # 4-200 px: p2, p3
        boxes.append(torch.cat([xy, xy + wh], 1))
    boxes[0][:2] = torch.tensor([[10.0, 5.0, 260.0, 250.0], [0.0, 0.0, 300.0, 200.0]], dtype=dtype)  # p4
    boxes[1][7] = float("nan")  # no level: a zero row; p5 gets no RoI
    return strides, feats, boxes, g


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_one_multilevel_call_equals_a_call_per_level(dtype, monkeypatch):
    """torch.ops.autofpn.multilevel_roi_align gives the per-level path's output and feature
    gradients bit for bit, with a level that gets no RoI and a NaN box."""
    strides, feats, boxes, g = _pyramid_case(dtype)
    pooler = ra.MultiLevelRoIAlign(list(strides), strides, output_size=7, sampling_ratio=2)
    levels = pooler.assign_levels(torch.cat(boxes))
    assert (levels == 3).sum() == 0 and (levels == 0).any() and (levels == 2).any(), "the case: p5 gets no RoI"
    grad = torch.randn(60, 6, 7, 7, generator=g, dtype=dtype)
    results = []
    for one_call in (True, False):
        monkeypatch.setattr(ra.MultiLevelRoIAlign, "_one_kernel_call", staticmethod(lambda feats, v=one_call: v))
        leaves = {n: f.clone().requires_grad_() for n, f in feats.items()}
        out = pooler(leaves, boxes)
        out.backward(grad)
        results.append((out.detach(), {n: f.grad for n, f in leaves.items()}))
    (out_one, grads_one), (out_per_level, grads_per_level) = results
    assert torch.equal(out_one, out_per_level)
    assert torch.equal(out_one[37], torch.zeros_like(out_one[37]))
    for name in strides:
        assert torch.equal(grads_one[name], grads_per_level[name]), name
    assert torch.equal(grads_one["p5"], torch.zeros_like(grads_one["p5"]))


def test_multilevel_call_is_used_does_not_depend_on_threads_and_passes_opcheck():
    strides, feats, boxes, g = _pyramid_case(torch.float32)
    pooler = ra.MultiLevelRoIAlign(list(strides), strides, output_size=7, sampling_ratio=2)
    assert pooler._one_kernel_call(list(feats.values()))
    grad = torch.randn(60, 6, 7, 7, generator=g)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            leaves = {name: f.clone().requires_grad_() for name, f in feats.items()}
            out = pooler(leaves, boxes)
            assert out.grad_fn is not None and "multilevel_roi_align" in out.grad_fn.name()
            out.backward(grad)
            results.append([out.detach()] + [f.grad for f in leaves.values()])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))
    rois = ra.boxes_to_rois([b[:20] for b in boxes])
    levels = pooler.assign_levels(rois[:, 1:])
    torch.library.opcheck(torch.ops.autofpn.multilevel_roi_align.default,
                          ([f.clone().requires_grad_() for f in feats.values()], rois, levels, pooler.scales, 7, 7, 2,
                           False))
