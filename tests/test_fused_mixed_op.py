"""The fused mixed op (``MixedOp.fused``: one shared ReLU, the weighted pointwise convolutions as
one, the weighted full convolutions as one, autofpn/ops/depthwise.py and pointwise.py) computes
the reference's values and gradients (every op run as built, then ``mixed_sum``), for the neck's
and the head's op tables, in both layouts, with the sampled and recomputed paths, and in a whole
supernet; with a norm inside the ops it is not used. Float64 unless stated, so that what is
compared is the arithmetic (1e-10), not float32 rounding."""
import contextlib
import copy
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import autofpn.ops.depthwise as depthwise_module
from autofpn.config import load_config
from autofpn.models import operations
from autofpn.models.auto_fusion import AutoFusionNeck
from autofpn.models.auto_head import AutoHead
from autofpn.models.detector import build_detector
from autofpn.models.operations import HEAD_OPS, NECK_OPS, MixedOp, set_fused, set_recompute
from autofpn.ops.depthwise import depthwise_conv2d
from autofpn.ops.layout import memory_format_of
from autofpn.ops.pointwise import concat_pointwise, depthwise_concat_pointwise
from autofpn.ops.weighted_convs import merged_kernel, weighted_convs
from test_memory_format import _batch as float64_batch  # two images, three boxes, float64

REPO = Path(__file__).resolve().parents[1]
TABLES = {"neck": NECK_OPS, "head": HEAD_OPS}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
needs_kernel = pytest.mark.skipif(not depthwise_module._CPU_KERNEL,
                                  reason="autofpn._C not built with the depthwise weight-gradient kernel")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
TOL = dict(rtol=1e-10, atol=1e-12)


def _weights(kind: str, table, gen) -> torch.Tensor:
    """Architecture weights over the whole table: "random" (a softmax), "one_hot" (one conv op),
    "pair" (two non-zero, the rest exactly 0)."""
    if kind == "random":
        return torch.softmax(torch.randn(len(table), generator=gen, dtype=torch.float64), 0)
    w = torch.zeros(len(table), dtype=torch.float64)
    if kind == "one_hot":
        w[table.index("sep_conv_5x5")] = 1.0
    else:
        w[table.index("identity")], w[table.index("dil_conv_3x3_r2")] = 0.3, 0.7
    return w


def _run(op: MixedOp, x: torch.Tensor, w: torch.Tensor, fused: bool, seed: int = 1):
    """Output and gradients (x, w, every parameter by name) of a fixed linear loss on op(x, w);
    ``fused=False``: the reference, every op and conv module run as built."""
    op.fused = fused
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    op.zero_grad(set_to_none=True)
    with contextlib.nullcontext() if fused else operations.ops_as_built():
        out = op(x, w)
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out)
    (out * probe).sum().backward()
    return out.detach(), x.grad, w.grad, {n: p.grad for n, p in op.named_parameters()}


def _assert_same(got, want, **tol):
    tol = tol or TOL
    out, gx, gw, gp = got
    ref_out, ref_gx, ref_gw, ref_gp = want
    torch.testing.assert_close(out, ref_out, **tol, msg=lambda m: f"output: {m}")
    torch.testing.assert_close(gx, ref_gx, **tol, msg=lambda m: f"grad x: {m}")
    torch.testing.assert_close(gw, ref_gw, **tol, msg=lambda m: f"grad w: {m}")
    assert gp.keys() == ref_gp.keys()
    for name, ref in ref_gp.items():
        if ref is None:  # an op with weight exactly 0 under a sampled path: no gradient either way
            assert gp[name] is None or not gp[name].any(), name
            continue
        torch.testing.assert_close(gp[name], ref, **tol, msg=lambda m: f"grad {name}: {m}")


def _case(table_name: str, layout: str, channels: int = 6, batch: int = 3, size=(9, 11), seed: int = 0):
    torch.manual_seed(seed)
    op = MixedOp(channels, TABLES[table_name]).double()
    x = torch.randn(batch, channels, *size, dtype=torch.float64).contiguous(memory_format=LAYOUTS[layout])
    return op, x


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("weights", ["random", "one_hot", "pair"])
@pytest.mark.parametrize("table_name", sorted(TABLES))
def test_fused_mixed_op_equals_the_reference(table_name, weights, layout):
    op, x = _case(table_name, layout)
    assert None not in op.kinds  # norm none: every op fusable
    w = _weights(weights, TABLES[table_name], torch.Generator().manual_seed(2))
    fused, reference = _run(op, x, w, True), _run(op, x, w, False)
    _assert_same(fused, reference)
    assert fused[0].is_contiguous(memory_format=LAYOUTS[layout])
    assert fused[2].abs().sum() > 0
    if weights == "random":  # every op's parameters learn
        assert all(g is not None and g.abs().sum() > 0 for g in fused[3].values())


@pytest.mark.parametrize("table_name", sorted(TABLES))
def test_fused_mixed_op_at_the_demo_shapes_in_float32(table_name):
    """The search's own dtype and layout, at the demo's neck P2 / head RoI shapes (32 channels)."""
    shape = (2, 32, 24, 32) if table_name == "neck" else (64, 32, 7, 7)
    torch.manual_seed(0)
    op = MixedOp(32, TABLES[table_name])
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    w = torch.softmax(torch.randn(8), 0)

    def run(fused):
        op.fused = fused
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        op.zero_grad(set_to_none=True)
        out = op(xx, ww)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), xx.grad, ww.grad, {n: p.grad for n, p in op.named_parameters()}
    # float32 sums of up to 25 * 2k products: relative errors of 1e-5
    _assert_same(run(True), run(False), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_with_a_norm_inside_the_ops_the_reference_runs(norm, monkeypatch):
    calls = []
    real = operations._fused_weighted_sum
    monkeypatch.setattr(operations, "_fused_weighted_sum", lambda *a: calls.append(1) or real(*a))
    for table in TABLES.values():
        torch.manual_seed(0)
        op = MixedOp(8, table, norm=norm).double()
        assert all(k is None for k, name in zip(op.kinds, op.ops) if name != "identity")
        x = torch.randn(3, 8, 9, 11, dtype=torch.float64)
        w = _weights("random", table, torch.Generator().manual_seed(2))
        fused, reference = _run(op, x, w, True), _run(op, x, w, False)
        assert torch.equal(fused[0], reference[0]) and torch.equal(fused[2], reference[2])
    assert not calls


@pytest.mark.parametrize("table_name", sorted(TABLES))
def test_sampled_paths_equal_the_reference(table_name, monkeypatch):
    """gdas: one active op runs on its own (nothing to fuse); two active ops (a sampled supernet's
    architecture step on soft weights) run fused over those two."""
    table = TABLES[table_name]
    torch.manual_seed(0)
    op = MixedOp(6, table, sampled=True).double()
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    calls = []
    real = operations._fused_weighted_sum
    monkeypatch.setattr(operations, "_fused_weighted_sum", lambda *a: calls.append(list(a[0])) or real(*a))
    one_hot = _weights("one_hot", table, None)
    _assert_same(_run(op, x, one_hot, True), _run(op, x, one_hot, False))
    assert not calls
    pair = _weights("pair", table, None)
    _assert_same(_run(op, x, pair, True), _run(op, x, pair, False))
    assert calls == [["identity", "dil"]]
    random = _weights("random", table, torch.Generator().manual_seed(3))
    _assert_same(_run(op, x, random, True), _run(op, x, random, False))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("table_name", sorted(TABLES))
def test_recomputed_fused_op_equals_the_reference(table_name, layout):
    op, x = _case(table_name, layout)
    w = _weights("random", TABLES[table_name], torch.Generator().manual_seed(2))
    reference = _run(op, x, w, False)
    assert set_recompute(op) == 1
    _assert_same(_run(op, x, w, True), reference)


@pytest.mark.parametrize("step", ["weight", "arch"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("table_name", sorted(TABLES))
def test_fused_op_under_bfloat16_autocast(table_name, layout, step, monkeypatch):
    """Same dtype as the reference (bfloat16 out, float32 gradient on w) and the same values to
    bfloat16's precision; in an architecture step (the ops' parameters frozen) the head's full
    convolutions run as ``weighted_convs`` under autocast too."""
    calls = []
    real = operations.weighted_convs
    monkeypatch.setattr(operations, "weighted_convs", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    op = MixedOp(8, TABLES[table_name]).requires_grad_(step == "weight")
    x = torch.randn(2, 8, 12, 12).contiguous(memory_format=LAYOUTS[layout])
    w = torch.softmax(torch.randn(8), 0)
    results = {}
    for fused in (True, False):
        op.fused = fused
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        op.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = op(xx, ww)
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
        assert ww.grad.dtype == torch.float32 and xx.grad.dtype == torch.float32
        results[fused] = (out.float(), xx.grad, ww.grad, {n: p.grad for n, p in op.named_parameters()})
    assert len(calls) == (step == "arch" and table_name == "head")
    out, gx, gw, gp = results[True]
    ref_out, ref_gx, ref_gw, ref_gp = results[False]
    torch.testing.assert_close(out, ref_out, rtol=0.05, atol=0.05)
    torch.testing.assert_close(gx, ref_gx, rtol=0.1, atol=0.02)
    torch.testing.assert_close(gw, ref_gw, rtol=0.1, atol=0.02)
    for name, ref in ref_gp.items():
        if step == "arch":
            assert ref is None and gp[name] is None
            continue
        assert torch.isfinite(gp[name]).all()
        torch.testing.assert_close(gp[name], ref, rtol=0.1, atol=0.05, msg=lambda m: f"grad {name}: {m}")


def test_state_dict_keys_are_unchanged():
    """Fusion reads the op modules' parameters: a mixed op's keys are those of the ops it holds,
    and a decoded op loads from the supernet's state dict as before."""
    op = MixedOp(4, NECK_OPS)
    expected = [f"ops.{name}.{i}.{p}" for name in ("dil_conv_3x3_r2", "dil_conv_3x3_r3", "dil_conv_5x5_r2",
                                                   "dil_conv_5x5_r3") for i, p in ((1, "weight"), (2, "weight"), (2, "bias"))]
    expected += [f"ops.{name}.{b}.{i}.{p}" for name in ("sep_conv_3x3", "sep_conv_5x5") for b in (0, 1)
                 for i, p in ((1, "weight"), (2, "weight"), (2, "bias"))]
    assert sorted(op.state_dict()) == sorted(expected)
    head = MixedOp(4, HEAD_OPS)
    assert {k for k in head.state_dict() if k.startswith("ops.conv_")} == {
        "ops.conv_3x3.1.weight", "ops.conv_3x3.1.bias", "ops.conv_5x5.1.weight", "ops.conv_5x5.1.bias"}
    neck = AutoFusionNeck({"c2": 8, "c3": 8, "c4": 8, "c5": 8}, {"c2": 4, "c3": 8, "c4": 16, "c5": 32}, 8)
    keys = list(neck.state_dict())
    assert set_fused(neck, False) == 32 and list(neck.state_dict()) == keys
    fixed = MixedOp(4, NECK_OPS, chosen=["dil_conv_5x5_r3"])
    fixed.load_state_dict({k: v for k, v in op.state_dict().items() if k.startswith("ops.dil_conv_5x5_r3.")})


@pytest.mark.parametrize("module", ["neck", "head"])
def test_supernet_modules_fused_and_not(module):
    """A whole Auto-fusion neck / Auto-head supernet: same outputs, parameter and alpha gradients."""
    torch.manual_seed(0)
    if module == "neck":
        strides = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
        net = AutoFusionNeck({"c2": 8, "c3": 12, "c4": 16, "c5": 24}, strides, 8).double()
        inputs = {k: torch.randn(2, c, 64 // strides[k], 80 // strides[k], dtype=torch.float64)
                  .contiguous(memory_format=torch.channels_last)
                  for k, c in {"c2": 8, "c3": 12, "c4": 16, "c5": 24}.items()}
    else:
        net = AutoHead(8, 7, 4, cells=2).double()
        inputs = torch.randn(6, 8, 7, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    alpha = torch.randn(*net.arch_shape, dtype=torch.float64, requires_grad=True)
    results = {}
    for fused in (True, False):
        set_fused(net, fused)
        net.zero_grad(set_to_none=True)
        alpha.grad = None
        with contextlib.nullcontext() if fused else operations.ops_as_built():
            out = net(inputs, torch.softmax(alpha, -1))
        outs = list(out.values()) if isinstance(out, dict) else [out]
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outs)
        loss.backward()
        results[fused] = (loss.detach(), alpha.grad.clone(), {n: p.grad for n, p in net.named_parameters()})
    torch.testing.assert_close(results[True][0], results[False][0], **TOL)
    torch.testing.assert_close(results[True][1], results[False][1], **TOL)
    for name, ref in results[False][2].items():
        torch.testing.assert_close(results[True][2][name], ref, **TOL, msg=lambda m: f"{name}: {m}")


TINY_DETECTOR = ["model.num_classes=4", "model.neck.channels=8", "model.head.channels=8", "model.head.mlp_dim=32",
                 "model.transform.min_size=[96]", "model.transform.test_min_size=96", "model.transform.max_size=128",
                 "model.rpn.batch_size_per_image=64", "model.roi.batch_size_per_image=16",
                 "model.rpn.pre_nms_top_n_train=100", "model.rpn.post_nms_top_n_train=50"]


@pytest.mark.parametrize("layout", ["auto", "contiguous"])
def test_whole_supernet_detector_same_loss_and_architecture_gradients(layout):
    """build_detector(demo config, search=True) at a tiny size, float64: the same losses and the
    same gradients on alpha, beta and every weight with fusion on and off."""
    torch.manual_seed(0)
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), TINY_DETECTOR + [f"model.memory_format={layout}"])
    model = build_detector(cfg, search=True).double().train()
    # every link of the neck (16 per layer), every edge of each head cell (14)
    assert set_fused(model, True) == 32 + 14 * cfg["model"]["head"]["cells"]
    images, targets = float64_batch()
    results = {}
    for fused in (True, False):
        set_fused(model, fused)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the RPN and RoI samplers draw the same indices
        with contextlib.nullcontext() if fused else operations.ops_as_built():
            losses = model(images, copy.deepcopy(targets))
        sum(losses.values()).backward()
        results[fused] = ({k: v.detach() for k, v in losses.items()},
                          {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    for name, value in results[False][0].items():
        torch.testing.assert_close(results[True][0][name], value, rtol=1e-9, atol=1e-12, msg=name)
    assert results[True][1].keys() == results[False][1].keys()
    assert {"arch.alpha", "arch.beta"} <= results[False][1].keys()
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, rtol=1e-7, atol=1e-10, msg=name)
    assert results[False][1]["arch.alpha"].abs().sum() > 0 and results[False][1]["arch.beta"].abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# Decoded modules: a training step runs their depthwise and 1x1 convs through the faster ops
# ------------------------------------------------------------------------------------------------
def _decoded_step(module, inputs, as_built: bool):
    """Output and parameter gradients of a fixed linear loss on module(inputs) in train mode;
    ``as_built``: every conv module run as built (the reference)."""
    module.zero_grad(set_to_none=True)
    with operations.ops_as_built() if as_built else contextlib.nullcontext():
        out = module(inputs)
    outs = list(out.values()) if isinstance(out, dict) else [out]
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum() for o in outs)
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("norm", ["none", "gn", "bn"])
def test_decoded_modules_train_through_the_faster_convs(norm, layout):
    """A decoded neck and head (random_genotype(0, 0): every op kind of both tables) in a training
    step run their blocks' depthwise convs as ``depthwise_conv2d`` and their 1x1 convs as
    ``pointwise`` (faster backward on the CPU): the same loss and parameter gradients as with
    every conv module as built (float64, BatchNorm in train mode included); the inputs' layout is
    kept; under no_grad the modules run as built (their forward hooks fire)."""
    from autofpn.search.random_sample import random_genotype
    genotype = random_genotype(0, 0)
    torch.manual_seed(0)
    strides = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
    neck = AutoFusionNeck({"c2": 8, "c3": 12, "c4": 16, "c5": 24}, strides, 8, genotype=genotype, norm=norm).double()
    head = AutoHead(8, 7, 8, cells=2, genotype=genotype, norm=norm).double()
    feats = {k: torch.randn(2, c, 64 // strides[k], 80 // strides[k], dtype=torch.float64)
             .contiguous(memory_format=LAYOUTS[layout]) for k, c in {"c2": 8, "c3": 12, "c4": 16, "c5": 24}.items()}
    rois = torch.randn(6, 8, 7, 7, dtype=torch.float64).contiguous(memory_format=LAYOUTS[layout])
    for module, inputs in ((neck, feats), (head, rois)):
        module.train()
        state = copy.deepcopy(module.state_dict())  # BatchNorm's running statistics move in each step
        fast = _decoded_step(module, inputs, as_built=False)
        module.load_state_dict(state)
        reference = _decoded_step(module, inputs, as_built=True)
        torch.testing.assert_close(fast[0], reference[0], rtol=1e-10, atol=1e-10)
        assert fast[1].keys() == reference[1].keys()
        for name, grad in reference[1].items():
            torch.testing.assert_close(fast[1][name], grad, rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")
    out = neck(feats)
    assert all(memory_format_of(p) == LAYOUTS[layout] for p in out.values() if p.shape[-1] > 1)
    ran = []
    hooks = [m.register_forward_hook(lambda mod, args, o: ran.append(mod)) for m in neck.modules()
             if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        neck(feats)
    for h in hooks:
        h.remove()
    assert len(ran) == len(hooks)


@needs_kernel
def test_a_decoded_neck_in_channels_last_runs_no_oneDNN_convolution_backward():
    """In channels-last on the CPU the backward of a decoded neck whose ops are depthwise-separable
    (every neck op but identity) calls no ``aten.convolution_backward``: its depthwise convs'
    input gradient is a forward convolution, their weight gradient the extension's kernel, its
    1x1 convs matrix products. With the conv modules as built it does."""
    from torch.utils.flop_counter import FlopCounterMode
    from autofpn.search.random_sample import random_genotype
    genotype = random_genotype(0, 0)
    torch.manual_seed(0)
    strides = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
    neck = AutoFusionNeck({k: 8 for k in strides}, strides, 8, genotype=genotype, norm="bn").train()
    feats = {k: torch.randn(2, 8, 64 // s, 80 // s).contiguous(memory_format=torch.channels_last)
             for k, s in strides.items()}
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in neck.modules())
    flops = {}  # of aten.convolution_backward
    for as_built in (False, True):
        counter = FlopCounterMode(display=False)
        with counter, operations.ops_as_built() if as_built else contextlib.nullcontext():
            sum(o.square().sum() for o in neck(feats).values()).backward()
        flops[as_built] = counter.get_flop_counts()["Global"].get(torch.ops.aten.convolution_backward, 0)
    assert flops[False] == 0
    assert flops[True] > 0 and convs > 20


# ------------------------------------------------------------------------------------------------
# The two building blocks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_kernel", [True, False])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kernel,dilation", [(3, 1), (5, 1), (3, 2), (3, 3), (5, 2), (5, 3)])
def test_depthwise_conv2d_equals_f_conv2d(kernel, dilation, layout, use_kernel, monkeypatch):
    if use_kernel and not depthwise_module._CPU_KERNEL:
        pytest.skip("autofpn._C not built with the depthwise weight-gradient kernel")
    monkeypatch.setattr(depthwise_module, "_CPU_KERNEL", use_kernel)
    gen = torch.Generator().manual_seed(kernel * 10 + dilation)
    x = torch.randn(3, 5, 7, 10, generator=gen, dtype=torch.float64).contiguous(memory_format=LAYOUTS[layout])
    weight = torch.randn(5, 1, kernel, kernel, generator=gen, dtype=torch.float64)
    padding = dilation * (kernel - 1) // 2
    grads = []
    for fn in (depthwise_conv2d, lambda a, b, p, d: F.conv2d(a, b, None, 1, p, d, a.shape[1])):
        xx, ww = x.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fn(xx, ww, padding, dilation)
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (out * probe).sum().backward()
        grads.append((out.detach(), xx.grad, ww.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, **TOL)
    assert torch.autograd.gradcheck(lambda a, b: depthwise_conv2d(a, b, padding, dilation),
                                    (x[:1, :2, :5, :6].clone().requires_grad_(),
                                     weight[:2].clone().requires_grad_()))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_no_cpu_convolution_runs_with_a_padding_onednn_is_slow_at(layout):
    """oneDNN's depthwise kernels take a padding of at most 4 (``ONEDNN_FAST_PADDING``); the
    neck's dil_conv_5x5_r3 needs 6. Every convolution of a neck mixed op, fused or as built,
    forward and backward, and of the decoded op in inference, gets an explicitly padded input."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Paddings(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.convolution.default:
                self.seen.append(max(args[4]))
            return func(*args, **(kwargs or {}))
    op, x = _case("neck", layout)
    w = _weights("random", NECK_OPS, torch.Generator().manual_seed(2))
    decoded = operations.build_op("dil_conv_5x5_r3", x.shape[1], "none").double().eval()
    with Paddings() as paddings:
        for as_built in (False, True):
            with operations.ops_as_built() if as_built else contextlib.nullcontext():
                op(x.clone().requires_grad_(), w.clone().requires_grad_()).sum().backward()
        with torch.no_grad():
            decoded(x)
    assert len(paddings.seen) > 20 and 0 in paddings.seen
    assert max(paddings.seen) <= depthwise_module.ONEDNN_FAST_PADDING


@needs_kernel
def test_depthwise_weight_gradient_kernel_dtypes_and_thread_count():
    """float32 / bfloat16 against the float64 sum; the same bits with 1 and 2 threads."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 33, 20, 24, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    g = torch.randn(4, 33, 20, 24, generator=gen, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.zeros(33, 1, 5, 5, dtype=torch.float64)
    ref = torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [6, 6], [3, 3], False, [0, 0], 33,
                                              [False, True, False])[1]
    for dtype, atol in ((torch.float64, 1e-10), (torch.float32, 1e-3), (torch.bfloat16, 2.0)):
        got = torch.ops.autofpn.depthwise_conv2d_weight_grad(g.to(dtype), x.to(dtype), 5, 6, 3)
        assert got.dtype == dtype and got.shape == (33, 1, 5, 5)
        torch.testing.assert_close(got.double(), ref, rtol=0.02 if dtype == torch.bfloat16 else 0, atol=atol)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.autofpn.depthwise_conv2d_weight_grad(g.float(), x.float(), 5, 6, 3)
        torch.set_num_threads(2)
        two = torch.ops.autofpn.depthwise_conv2d_weight_grad(g.float(), x.float(), 5, 6, 3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    with pytest.raises(RuntimeError, match="padding must be"):
        torch.ops.autofpn.depthwise_conv2d_weight_grad(g, x, 5, 2, 3)
    torch.library.opcheck(torch.ops.autofpn.depthwise_conv2d_weight_grad, (g[:1, :3], x[:1, :3], 3, 2, 2))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("parts", ["plain", "bias", "extra_residual", "all"])
def test_concat_pointwise_equals_conv_of_concat(parts, layout):
    gen = torch.Generator().manual_seed(0)
    fmt = LAYOUTS[layout]
    xs = [torch.randn(2, c, 5, 6, generator=gen, dtype=torch.float64).contiguous(memory_format=fmt) for c in (3, 4, 3)]
    weight = torch.randn(4, 10, 1, 1, generator=gen, dtype=torch.float64)
    bias = torch.randn(4, generator=gen, dtype=torch.float64) if parts in ("bias", "all") else None
    extra = residual = residual_weight = None
    if parts in ("extra_residual", "all"):
        extra = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64).contiguous(memory_format=fmt)
        residual = torch.randn(2, 4, 5, 6, generator=gen, dtype=torch.float64).contiguous(memory_format=fmt)
        residual_weight = torch.tensor(0.3, dtype=torch.float64)
    tensors = [t for t in [*xs, weight, bias, extra, residual, residual_weight] if t is not None]
    tensors = [t.clone().requires_grad_() for t in tensors]

    def unpack(ts):
        it = iter(ts)
        got = [next(it) for _ in xs], next(it)
        rest = [next(it) if t is not None else None for t in (bias, extra, residual, residual_weight)]
        return (*got, *rest)

    def fused(*ts):
        xs_, w_, b_, e_, r_, rw_ = unpack(ts)
        return concat_pointwise(xs_, w_, b_, e_, r_, rw_)

    def reference(*ts):
        xs_, w_, b_, e_, r_, rw_ = unpack(ts)
        out = F.conv2d(torch.cat(xs_, 1), w_, b_)
        if e_ is not None:
            out = out + e_ + rw_ * r_
        return out
    out = fused(*tensors)
    assert out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out, reference(*tensors), **TOL)
    assert torch.autograd.gradcheck(fused, tuple(tensors))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("weights", ["random", "pair"])
@pytest.mark.parametrize("table_name", sorted(TABLES))
def test_fused_mixed_op_in_an_architecture_step_equals_the_reference(table_name, weights, layout):
    """In an architecture step the ops' parameters need no gradient (Searcher.arch_step): the
    head's full convolutions then run on their own (``weighted_convs``); output and the gradients
    of x and w as the reference's, the parameters untouched."""
    op, x = _case(table_name, layout)
    op.requires_grad_(False)
    w = _weights(weights, TABLES[table_name], torch.Generator().manual_seed(2))
    fused, reference = _run(op, x, w, True), _run(op, x, w, False)
    _assert_same(fused, reference)
    assert all(g is None for g in fused[3].values())
    assert fused[2].abs().sum() > 0


def test_weighted_convs_gradcheck_and_no_weight_gradient_flops():
    """``weighted_convs``: values and the gradients of x and w (gradcheck) against the merged
    convolution; its backward computes the merged kernel's input gradient only, no weight
    gradient (FLOPs as torch's counter counts them)."""
    from torch.utils.flop_counter import FlopCounterMode
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 7, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.tensor([0.3, 0.6], dtype=torch.float64, requires_grad=True)
    kernels = [torch.randn(4, 3, k, k, generator=gen, dtype=torch.float64) for k in (3, 5)]
    biases = [torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(2)]
    out = weighted_convs(x, w, kernels, biases)
    want = F.conv2d(x, merged_kernel([v * wk for v, wk in zip(kernels, w)]), biases[0] * w[0] + biases[1] * w[1],
                    padding=2)
    torch.testing.assert_close(out, want, **TOL)
    assert torch.autograd.gradcheck(lambda x_, w_: weighted_convs(x_, w_, kernels, biases), (x, w))
    with FlopCounterMode(display=False) as counter:
        weighted_convs(x, w, kernels, biases).sum().backward()
    one_tap = 2 * 2 * 7 * 7 * 3 * 4  # 2 FLOPs per multiply-add, per output element and input channel
    assert counter.get_flop_counts()["Global"][torch.ops.aten.convolution] == (9 + 25) * one_tap
    assert counter.get_flop_counts()["Global"][torch.ops.aten.convolution_backward] == 25 * one_tap
    with pytest.raises(ValueError, match="no gradient to the kernels"):
        weighted_convs(x, w, [kernels[0].requires_grad_()], biases[:1])


def test_weighted_convs_in_float16_sums_the_architecture_gradient_without_overflow():
    """float16 maps with a float32 w (a GPU fp16 search): each product dL/dout * c_k is formed in
    w's dtype; in float16 these (300 x 340) would overflow to inf."""
    x = torch.full((1, 2, 6, 6), 10.0, dtype=torch.float16, requires_grad=True)
    kernels = [torch.ones(2, 2, k, k, dtype=torch.float16) for k in (3, 5)]
    biases = [torch.zeros(2, dtype=torch.float16)] * 2
    w = torch.tensor([0.5, 0.5], requires_grad=True)
    (weighted_convs(x, w, kernels, biases).float() * 300.0).sum().backward()
    assert w.grad.dtype == torch.float32
    want = torch.stack([300.0 * F.conv2d(x.detach().double(), v.double(), padding=v.shape[-1] // 2).sum()
                        for v in kernels]).float()
    torch.testing.assert_close(w.grad, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_depthwise_concat_pointwise_equals_the_composition(layout):
    """Depthwise convs (3x3 r2, 5x5, 3x3 r1 on a second input; the first input used twice, as a
    mixed op's shared ReLU output is), then concat_pointwise: values and every gradient."""
    gen = torch.Generator().manual_seed(0)
    fmt = LAYOUTS[layout]
    r, h = [torch.randn(1, 3, 7, 6, generator=gen, dtype=torch.float64).contiguous(memory_format=fmt)
            for _ in range(2)]
    specs = [(3, 2), (5, 1), (3, 1)]
    kernels = [torch.randn(3, 1, k, k, generator=gen, dtype=torch.float64) for k, _ in specs]
    weight = torch.randn(3, 9, 1, 1, generator=gen, dtype=torch.float64)
    bias = torch.randn(3, generator=gen, dtype=torch.float64)
    extra, residual = [torch.randn(1, 3, 7, 6, generator=gen, dtype=torch.float64).contiguous(memory_format=fmt)
                       for _ in range(2)]
    rw = torch.tensor(0.3, dtype=torch.float64)
    tensors = tuple(t.clone().requires_grad_() for t in (r, h, *kernels, weight, bias, extra, residual, rw))
    dilations = [d for _, d in specs]

    def fused(r_, h_, v0, v1, v2, w_, b_, e_, res_, rw_):
        return depthwise_concat_pointwise([r_, r_, h_], [v0, v1, v2], dilations, w_, b_, e_, res_, rw_)

    def reference(r_, h_, v0, v1, v2, w_, b_, e_, res_, rw_):
        ds = [F.conv2d(x, v, None, 1, d * (v.shape[-1] - 1) // 2, d, 3)
              for x, v, d in zip([r_, r_, h_], [v0, v1, v2], dilations)]
        return F.conv2d(torch.cat(ds, 1), w_, b_) + e_ + rw_ * res_
    out = fused(*tensors)
    assert out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out, reference(*tensors), **TOL)
    assert torch.autograd.gradcheck(fused, tensors, fast_mode=True)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_fused_neck_op_keeps_no_depthwise_output_for_the_backward(layout):
    """The fused op keeps its input, the shared ReLU output, the sep-convs'
    inner maps and the op's parameters, not the K depthwise outputs (nor their concatenation):
    what autograd saves is 6 maps of the input's size for the neck's table (x, relu(x), and
    two per sep-conv), against 12 when the depthwise outputs were kept."""
    op, x = _case("neck", layout)
    w = _weights("random", NECK_OPS, torch.Generator().manual_seed(0))
    params = {p.untyped_storage()._cdata for p in op.parameters()}
    saved = {}

    def pack(t):
        key = t.untyped_storage()._cdata
        if key not in params:
            saved[key] = t.untyped_storage().nbytes()
        return t
    op.fused = True
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        op(x.detach().requires_grad_(), w.detach().requires_grad_())
    maps = sum(saved.values()) / (x.numel() * x.element_size())
    assert maps < 6.2, f"{maps:.2f} input-sized maps saved for the backward"  # 0.2: the small weight tensors


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_concat_pointwise_under_autocast_keeps_the_residual_weight_gradient_in_float32(layout):
    gen = torch.Generator().manual_seed(0)
    fmt = LAYOUTS[layout]
    xs = [torch.randn(2, 4, 5, 6, generator=gen).contiguous(memory_format=fmt) for _ in range(2)]
    weight = torch.randn(4, 8, 1, 1, generator=gen)
    residual = torch.randn(2, 4, 5, 6, generator=gen).contiguous(memory_format=fmt)
    rw = torch.tensor(0.25, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = concat_pointwise(xs, weight, None, None, residual, rw)
    assert out.dtype == torch.bfloat16
    (out.float() * 300.0).sum().backward()  # a sum of 240 terms of 300: beyond bfloat16's 8 bits
    assert rw.grad.dtype == torch.float32
    torch.testing.assert_close(rw.grad, 300.0 * residual.bfloat16().float().sum(), rtol=1e-5, atol=1e-3)


@needs_cuda
@pytest.mark.parametrize("table_name", sorted(TABLES))
def test_fused_mixed_op_on_cuda_equals_the_reference(table_name):
    op, x = _case(table_name, "nchw")
    op, x = op.cuda(), x.cuda()
    w = _weights("random", TABLES[table_name], torch.Generator().manual_seed(2)).cuda()
    _assert_same(_run(op, x, w, True), _run(op, x, w, False), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_the_cost_counting_pass_sees_every_op(device):
    """count_cost (cost tables, the planner) counts FLOPs with forward hooks on the leaf modules:
    inside it (``ops_as_built``) a supernet runs its ops as built, fused or not, on any device;
    outside it the fused path runs, on "meta" too (the planner's saved-activation pass counts
    what the fused search holds: fewer saved bytes than the ops as built)."""
    from autofpn.search.cost import count_cost
    from autofpn.search.plan import SavedTensorMeter
    torch.manual_seed(0)
    strides = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}
    neck = AutoFusionNeck({k: 8 for k in strides}, strides, 8).to(device)
    feats = {k: torch.rand(1, 8, 64 // s, 64 // s, device=device) for k, s in strides.items()}
    weights = torch.rand(neck.arch_shape, device=device)
    head = AutoHead(8, 7, 4, cells=2).to(device)
    rois = torch.rand(6, 8, 7, 7, device=device)
    beta = torch.rand(head.arch_shape, device=device)
    counted, saved = {}, {}
    for fused in (True, False):
        set_fused(neck, fused)
        set_fused(head, fused)
        counted[fused] = (count_cost(neck, feats, weights), count_cost(head, rois, beta))
        with SavedTensorMeter(list(neck.parameters()) + list(head.parameters())) as meter:
            neck(feats, weights.requires_grad_())
            head(rois, beta.requires_grad_())
        saved[fused] = meter.nbytes
    assert counted[True] == counted[False]
    assert counted[True][0].flops > 0 and counted[True][1].flops > 0
    assert saved[True] < 0.8 * saved[False]
