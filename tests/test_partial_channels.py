"""Partial channel connections (``search.partial_channels``, PC-DARTS): a supernet's mixed op runs
its ops on the first 1 / K of its channels, the others pass by, and PC-DARTS's channel shuffle
interleaves the two; the resource penalty still counts the decoded (full-width) ops; a search
runs with it. Float64 where values are compared."""
import contextlib

import pytest
import torch

from autofpn.config import ConfigError, load_config
from autofpn.models import operations
from autofpn.models.detector import build_detector
from autofpn.models.operations import HEAD_OPS, NECK_OPS, MixedOp, set_recompute, shuffle_partial
from autofpn.search.differentiable import supernet_cost_tables
from test_memory_format import _batch as float64_batch  # two images, three boxes, float64

TABLES = {"neck": NECK_OPS, "head": HEAD_OPS}
TOL = dict(rtol=1e-10, atol=1e-12)


def pc_darts_reference(op: MixedOp, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """PC-DARTS's MixedOp.forward, written as its paper's code is: the weighted sum of the ops on
    x[:, :C/K], concatenated with x[:, C/K:], then channel_shuffle(., K) (view, transpose)."""
    k, c = op.partial, x.shape[1] // op.partial
    part, rest = x[:, :c], x[:, c:]
    with operations.ops_as_built():
        y = sum(w[op.op_table.index(name)] * module(part) for name, module in op.ops.items())
    cat = torch.cat([y, rest], 1)
    n, channels, h, wd = cat.shape
    return cat.view(n, k, channels // k, h, wd).transpose(1, 2).contiguous().view(n, channels, h, wd)


def _grads(fn, x, w, op):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    op.zero_grad(set_to_none=True)
    out = fn(x, w)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    (out * probe).sum().backward()
    return out.detach(), x.grad, w.grad, {n: p.grad.clone() for n, p in op.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("table_name", ["neck", "head"])
@pytest.mark.parametrize("partial", [2, 4])
@pytest.mark.parametrize("path", ["fused", "as_built", "recompute"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_partial_mixed_op_is_pc_darts(table_name, partial, path, layout):
    """Output, input, weight and parameter gradients equal PC-DARTS's formulation, on every path
    the search runs (fused, as built, recomputed) and in both layouts; the ops are C / K wide."""
    gen = torch.Generator().manual_seed(0)
    op = MixedOp(8, TABLES[table_name], partial=partial).double()
    assert all(p.shape[0] in (8 // partial, 1) or p.dim() == 1 for p in op.parameters())
    assert op.ops["sep_conv_3x3"][0][2].in_channels == 8 // partial
    x = torch.randn(2, 8, 9, 11, generator=gen, dtype=torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.softmax(torch.randn(len(op.op_table), generator=gen, dtype=torch.float64), 0)
    if path == "recompute":
        set_recompute(op)
    with operations.ops_as_built() if path == "as_built" else contextlib.nullcontext():
        got = _grads(lambda x, w: op(x, w), x, w, op)
    want = _grads(lambda x, w: pc_darts_reference(op, x, w), x, w, op)
    for a, b in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, b, **TOL)
    assert got[3].keys() == want[3].keys()
    for name in want[3]:
        torch.testing.assert_close(got[3][name], want[3][name], **TOL, msg=lambda m: f"{name}: {m}")
    if layout == "channels_last":  # the shuffle keeps the layout the convolutions run in
        assert got[0].is_contiguous(memory_format=torch.channels_last)


def test_a_sampled_none_still_passes_the_other_channels():
    """gdas with partial channels: a sampled "none" zeroes the op part only; the other channels
    go on in their shuffled places (PC-DARTS: "none" is one op of the part)."""
    op = MixedOp(6, NECK_OPS, sampled=True, partial=3).double()
    x = torch.randn(1, 6, 4, 5, dtype=torch.float64)
    w = torch.zeros(len(NECK_OPS), dtype=torch.float64)
    w[NECK_OPS.index("none")] = 1.0
    out = op(x, w)
    assert torch.equal(out[:, 0::3], torch.zeros_like(out[:, 0::3]))
    assert torch.equal(out[:, 1::3], x[:, 2:4]) and torch.equal(out[:, 2::3], x[:, 4:6])


def test_shuffle_partial_is_the_channel_shuffle_of_the_concatenation():
    y, rest = torch.randn(2, 3, 4, 4), torch.randn(2, 9, 4, 4)
    cat = torch.cat([y, rest], 1)
    want = cat.view(2, 4, 3, 4, 4).transpose(1, 2).reshape(2, 12, 4, 4)
    assert torch.equal(shuffle_partial(y, rest, 4), want)


def test_a_decoded_op_is_never_partial():
    with pytest.raises(ValueError, match="full width"):
        MixedOp(8, NECK_OPS, chosen=["sep_conv_3x3"], partial=2)
    with pytest.raises(ValueError, match="do not split"):
        MixedOp(6, NECK_OPS, partial=4)


TINY = ["model.backbone.name=resnet18", "model.backbone.weights=none", "model.num_classes=4",
        "model.neck.channels=16", "model.neck.layers=1", "model.head.channels=8", "model.head.cells=1",
        "model.roi.batch_size_per_image=16", "model.rpn.pre_nms_top_n_train=50",
        "model.rpn.post_nms_top_n_train=20", "model.transform.min_size=[96]", "model.transform.max_size=160",
        "model.neck.type=auto", "model.head.type=auto"]


def test_the_penalty_counts_the_decoded_full_width_ops():
    """The cost tables of a partial-channel supernet equal the full supernet's: the penalty
    constrains the detector that will be retrained, not the 1 / K the search computes."""
    full = supernet_cost_tables(load_config(None, TINY))
    partial = supernet_cost_tables(load_config(None, TINY + ["search.partial_channels=4"]))
    torch.testing.assert_close(partial.neck_table, full.neck_table, rtol=0, atol=0)
    torch.testing.assert_close(partial.head_table, full.head_table, rtol=0, atol=0)
    assert full.neck_table.sum() > 0 and full.head_table.sum() > 0


@pytest.mark.parametrize("mode", ["full", "gdas"])
def test_a_partial_supernet_detector_trains_alpha_and_beta(mode):
    """A whole supernet detector (neck and head) with partial channels gives finite losses and
    gradients to alpha, beta and the ops, and fewer op parameters than the full supernet."""
    torch.manual_seed(0)
    cfg = load_config(None, TINY + ["search.partial_channels=2", f"search.mode={mode}"])
    model = build_detector(cfg, search=True).double().train()
    images, targets = float64_batch()
    arch = model.arch_parameters()
    context = model.arch.sampled(1.0, 0) if mode == "gdas" else contextlib.nullcontext()
    with context:
        losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0 for a in arch)
    full = build_detector(load_config(None, TINY), search=True)
    count = lambda m: sum(p.numel() for n, p in m.named_parameters() if ".ops." in n)
    assert count(model) < 0.6 * count(full)


@pytest.mark.parametrize("value", [3, 0, "two"])
def test_partial_channels_that_do_not_divide_the_width_name_the_key(value):
    with pytest.raises(ConfigError, match=r"search\.partial_channels"):
        build_detector(load_config(None, TINY + [f"search.partial_channels={value}"]), search=True)


def test_search_checks_partial_channels_against_each_searched_width_before_it_starts():
    """check_config (search.py runs it before claiming its folder): the neck's width, and the
    head supernet's (search.head_channels when set) for a head stage."""
    from autofpn.search.differentiable import check_config
    check_config(load_config(None, TINY + ["search.partial_channels=8"]))  # 16 and 8 channels
    with pytest.raises(ConfigError, match=r"search\.partial_channels.*head supernet's 12 channels"):
        check_config(load_config(None, TINY + ["search.partial_channels=8", "search.head_channels=12"]))
    # a neck-only search does not build the head supernet
    check_config(load_config(None, TINY + ["search.partial_channels=8", "search.head_channels=12",
                                           "search.stage=neck"]))


def test_a_partial_supernet_runs_under_bfloat16_autocast_in_channels_last():
    """search.amp with partial channels: the shuffle takes the ops' bfloat16 output and the
    float32 channels that passed by; the losses and alpha / beta's gradients are finite."""
    torch.manual_seed(0)
    cfg = load_config(None, TINY + ["search.partial_channels=2", "model.memory_format=channels_last"])
    model = build_detector(cfg, search=True).train()
    images, targets = float64_batch()
    images = [i.float() for i in images]
    targets = [{**t, "boxes": t["boxes"].float()} for t in targets]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0 for a in model.arch_parameters())
