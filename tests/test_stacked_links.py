"""Stacked neck links (``stacked_links``): a neck supernet computes the links that leave one source
level at once (one projection, one depthwise convolution per op, grouped pointwise ones: G
products at once, or one block-diagonal product), with the same values and gradients as the
links run one by one. Float64 where values are compared."""
import pytest
import torch
import torch.nn.functional as F

from autofpn.models import auto_fusion, operations
from autofpn.models.auto_fusion import AutoFusionNeck
from autofpn.models.operations import MixedOp, NECK_OPS, set_recompute, stackable
from autofpn.ops.pointwise import concat_pointwise, depthwise_concat_pointwise

TOL = dict(rtol=1e-10, atol=1e-11)
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
LEVELS = (2, 3, 4, 5)
# operations.MAX_BLOCK_DIAGONAL_CHANNELS forcing each form of the stacked pointwise products
FORMS = {"batched": 0, "block_diagonal": 2 ** 30}


def _neck(partial=1, residual=False, recompute=False, sampled=False, norm="none", dtype=torch.float64):
    torch.manual_seed(0)
    neck = AutoFusionNeck({f"c{lv}": 8 for lv in LEVELS}, {f"c{lv}": 2 ** lv for lv in LEVELS}, 16,
                          partial_channels=partial, residual_ops=residual, sampled=sampled, norm=norm).to(dtype)
    with torch.no_grad():  # random values everywhere (a residual op's last conv starts at zero)
        for p in neck.parameters():
            p.normal_(0, 0.3)
    if recompute:
        set_recompute(neck)
    return neck


def _feats(layout, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    return {f"c{lv}": torch.randn(2, 8, 24 >> (lv - 2), 16 >> (lv - 2), generator=gen, dtype=dtype)
            .contiguous(memory_format=LAYOUTS[layout]) for lv in LEVELS}


def _run(neck, feats, weights, stacked, monkeypatch, form=None):
    """Outputs, gradients (features, weights, parameters) and how many times ``stacked_links``
    ran, with stacking on (every level; the products in ``form``, a key of FORMS, or by the
    library's rule) or off."""
    monkeypatch.setattr(operations, "MAX_STACKED_MACS", 2 ** 40 if stacked else 0)
    if form is not None:
        monkeypatch.setattr(operations, "MAX_BLOCK_DIAGONAL_CHANNELS", FORMS[form])
    calls = []
    original = auto_fusion.stacked_links

    def counted(*args):
        calls.append(1)
        return original(*args)
    monkeypatch.setattr(auto_fusion, "stacked_links", counted)
    feats = {k: v.detach().clone().requires_grad_() for k, v in feats.items()}
    weights = weights.detach().clone().requires_grad_()
    neck.zero_grad(set_to_none=True)
    out = neck(feats, weights)
    gen = torch.Generator().manual_seed(3)
    sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device)).sum() for o in out.values()).backward()
    grads = [feats[k].grad for k in feats] + [weights.grad] + [p.grad for p in neck.parameters()]
    return out, grads, len(calls)


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("partial, variant", [(1, "plain"), (4, "plain"),
                                              (2, "residual"), (2, "recompute"), (2, "sampled")])
def test_stacked_links_equal_the_links_one_by_one(partial, layout, variant, form, monkeypatch):
    """Each source level's four links run as one (twice per level: two layers); outputs, their
    layout, and the gradients of the features, the architecture weights and every parameter
    equal those of the links run one by one, with the pointwise products in either form.
    "sampled": a sampled supernet's links with no zero weight (the architecture step of
    search.mode sampled_weights) stack too."""
    neck = _neck(partial, residual=variant == "residual", recompute=variant == "recompute",
                 sampled=variant == "sampled")
    feats = _feats(layout)
    weights = torch.randn(neck.arch_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weights = weights.softmax(-1)
    out, grads, calls = _run(neck, feats, weights, True, monkeypatch, form)
    ref_out, ref_grads, ref_calls = _run(neck, feats, weights, False, monkeypatch)
    assert (calls, ref_calls) == (2 * len(LEVELS), 0)
    for name in ref_out:
        torch.testing.assert_close(out[name], ref_out[name], **TOL)
        assert out[name].is_contiguous(memory_format=LAYOUTS[layout])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL)


def test_stacking_makes_one_depthwise_convolution_per_op_and_source_level(monkeypatch):
    """What it is for: 4x fewer depthwise convolution calls in a training step's forward (8 per
    source level and layer: 6 ops' final ones, 2 sep-convs' first ones; 4 links per level)."""
    neck = _neck(2, dtype=torch.float32)
    feats = _feats("channels_last", torch.float32)
    weights = torch.full(neck.arch_shape, 1.0 / len(NECK_OPS))
    counts = []
    for limit in (2 ** 40, 0):
        monkeypatch.setattr(operations, "MAX_STACKED_MACS", limit)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            neck(feats, weights)
        depthwise = [e for e in prof.events() if e.name == "aten::convolution"]
        counts.append(len(depthwise))
    assert counts == [2 * len(LEVELS) * 8, 2 * len(LEVELS) * 4 * 8]


@pytest.mark.parametrize("case", ["sampled", "gn", "as_built", "too_large"])
def test_links_that_do_not_stack_run_one_by_one(case, monkeypatch):
    """Sampled paths (each link its own op: gdas, the weight step of sampled_weights), a norm
    inside the links, the cost-counting pass
    (``ops_as_built``: its hooks must see each op) and products above ``MAX_STACKED_MACS`` run
    link by link."""
    neck = _neck(sampled=case == "sampled", norm="gn" if case == "gn" else "none", dtype=torch.float32)
    feats = _feats("nchw", torch.float32)
    weights = torch.full(neck.arch_shape, 1.0 / len(NECK_OPS))
    if case == "sampled":
        weights = torch.nn.functional.one_hot(torch.arange(neck.arch_shape[1]) % len(NECK_OPS),
                                              len(NECK_OPS)).float().expand(neck.arch_shape)
    calls = []
    original = auto_fusion.stacked_links
    monkeypatch.setattr(auto_fusion, "stacked_links", lambda *a: calls.append(1) or original(*a))
    if case == "too_large":  # 24 x 16 pixels x 2 images x (4 links x 16 channels)^2 > the limit
        monkeypatch.setattr(operations, "MAX_STACKED_MACS", 2 * 24 * 16 * 64 ** 2 - 1)
    if case == "as_built":
        with operations.ops_as_built():
            neck(feats, weights)
    else:
        neck(feats, weights)
    if case == "too_large":
        assert len(calls) == 2 * (len(LEVELS) - 1)  # every level but the largest
    else:
        assert calls == []


@pytest.mark.parametrize("limit, batched", [(63, True), (64, False)])
def test_the_stacked_products_form_follows_the_stacked_channels(limit, batched, monkeypatch):
    """4 links x 16 channels multiply as a batch (every pointwise product of a level one ``bmm``
    call) above ``MAX_BLOCK_DIAGONAL_CHANNELS``, as one block-diagonal product up to it."""
    monkeypatch.setattr(operations, "MAX_STACKED_MACS", 2 ** 40)
    monkeypatch.setattr(operations, "MAX_BLOCK_DIAGONAL_CHANNELS", limit)
    neck = _neck(dtype=torch.float32)
    feats = _feats("channels_last", torch.float32)
    weights = torch.full(neck.arch_shape, 1.0 / len(NECK_OPS))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        neck(feats, weights)
    bmm = [e for e in prof.events() if e.name in ("aten::bmm", "aten::baddbmm_")]
    # per level and layer: 2 sep-convs' first products, and the final one over 6 ops (1 + 5)
    assert len(bmm) == (2 * len(LEVELS) * (2 + 6) if batched else 0)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_grouped_pointwise_products_equal_a_grouped_convolution(layout):
    """``groups``: output group g reads group g of every input (the stacked links' products):
    values and every gradient against ``F.conv2d(..., groups=G)`` on the inputs' groups
    regrouped, for ``depthwise_concat_pointwise`` (with a per-channel residual weight) and
    ``concat_pointwise``."""
    gen = torch.Generator().manual_seed(0)
    fmt = LAYOUTS[layout]
    groups, c = 3, 2

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    r, h, residual = [randn(2, groups * c, 5, 4).contiguous(memory_format=fmt) for _ in range(3)]
    specs = [(3, 2), (5, 1), (3, 1)]
    kernels = [randn(groups * c, 1, k, k) for k, _ in specs]
    dilations = [d for _, d in specs]
    tensors = tuple(t.clone().requires_grad_() for t in (r, h, *kernels, randn(groups * c, 3 * c, 1, 1),
                                                         randn(groups * c), residual, randn(groups * c, 1, 1)))

    def grouped(r_, h_, v0, v1, v2, w_, b_, res_, rw_):
        return depthwise_concat_pointwise([r_, r_, h_], [v0, v1, v2], dilations, w_, b_, None, res_, rw_, groups)

    def reference(r_, h_, v0, v1, v2, w_, b_, res_, rw_):
        ds = [F.conv2d(x, v, None, 1, d * (v.shape[-1] - 1) // 2, d, groups * c)
              for x, v, d in zip([r_, r_, h_], [v0, v1, v2], dilations)]
        regrouped = torch.cat([d_k[:, g * c:(g + 1) * c] for g in range(groups) for d_k in ds], 1)
        return F.conv2d(regrouped, w_, b_, groups=groups) + rw_ * res_
    out = grouped(*tensors)
    assert out.is_contiguous(memory_format=fmt)
    torch.testing.assert_close(out, reference(*tensors), **TOL)
    assert torch.autograd.gradcheck(grouped, tensors, fast_mode=True)

    x, weight, bias = (t.clone().requires_grad_() for t in (r, randn(groups * c, c, 1, 1), randn(groups * c)))
    torch.testing.assert_close(concat_pointwise([x], weight, bias, groups=groups),
                               F.conv2d(x, weight, bias, groups=groups), **TOL)
    assert torch.autograd.gradcheck(lambda *t: concat_pointwise([t[0]], t[1], t[2], groups=groups),
                                    (x, weight, bias), fast_mode=True)
    with pytest.raises(ValueError, match="groups > 1 takes one input"):
        concat_pointwise([x, x], weight, bias, groups=groups)


def test_stackable_counts_the_block_diagonal_products_multiply_adds():
    mixed = [MixedOp(8, NECK_OPS, partial=2) for _ in range(4)]  # 4 links x 4 op channels
    assert stackable(mixed, operations.MAX_STACKED_MACS // 16 ** 2)
    assert not stackable(mixed, operations.MAX_STACKED_MACS // 16 ** 2 + 1)
    assert not stackable(mixed[:1], 1)  # one link: nothing to stack
    assert not stackable(mixed[:2] + [MixedOp(8, NECK_OPS, partial=4)], 1)  # other widths


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_depthwise_concat_pointwise_with_one_residual_weight_per_channel(layout):
    """The stacked identity: ``residual_weight`` [C, 1, 1] (one architecture weight per link,
    repeated over its channels); values and every gradient against the composition."""
    gen = torch.Generator().manual_seed(0)
    fmt = LAYOUTS[layout]
    h = torch.randn(1, 4, 6, 5, generator=gen, dtype=torch.float64).contiguous(memory_format=fmt)
    kernel = torch.randn(4, 1, 3, 3, generator=gen, dtype=torch.float64)
    weight = torch.randn(4, 4, 1, 1, generator=gen, dtype=torch.float64)
    residual = torch.randn(1, 4, 6, 5, generator=gen, dtype=torch.float64).contiguous(memory_format=fmt)
    rw = torch.randn(4, 1, 1, generator=gen, dtype=torch.float64)
    tensors = tuple(t.clone().requires_grad_() for t in (h, kernel, weight, residual, rw))

    def fused(h_, v_, w_, res_, rw_):
        return depthwise_concat_pointwise([h_], [v_], [2], w_, None, None, res_, rw_)
    want = torch.nn.functional.conv2d(torch.nn.functional.conv2d(h, kernel, None, 1, 2, 2, 4), weight) + rw * residual
    torch.testing.assert_close(fused(*tensors), want, **TOL)
    assert torch.autograd.gradcheck(fused, tensors, fast_mode=True)


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_stacked_links_under_bfloat16_autocast(layout, form, monkeypatch):
    """search.amp: the stacked neck computes in bfloat16 like the links one by one (close to
    them), and the architecture weights' gradient stays float32 and finite."""
    monkeypatch.setattr(operations, "MAX_BLOCK_DIAGONAL_CHANNELS", FORMS[form])
    neck = _neck(2, residual=True, dtype=torch.float32)
    feats = _feats(layout, torch.float32)
    weights = torch.randn(neck.arch_shape, generator=torch.Generator().manual_seed(2)).softmax(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads, calls = _run(neck, feats, weights, True, monkeypatch)
        ref_out, ref_grads, _ = _run(neck, feats, weights, False, monkeypatch)
    assert calls == 2 * len(LEVELS)
    for name in ref_out:
        assert out[name].dtype == torch.bfloat16
        scale = ref_out[name].float().abs().max().item()  # bfloat16 rounds to 2^-8 of the values
        torch.testing.assert_close(out[name].float(), ref_out[name].float(), rtol=0.05, atol=0.02 * scale)
    w_grad, ref_w_grad = grads[len(LEVELS)], ref_grads[len(LEVELS)]
    assert w_grad.dtype == torch.float32 and torch.isfinite(w_grad).all()
    torch.testing.assert_close(w_grad, ref_w_grad, rtol=0.05, atol=0.05 * ref_w_grad.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("partial", [1, 4])
def test_stacked_links_on_cuda_equal_the_links_one_by_one(partial, form, monkeypatch):
    neck = _neck(partial).cuda()
    feats = {k: v.cuda() for k, v in _feats("nchw").items()}
    weights = torch.randn(neck.arch_shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weights = weights.softmax(-1).cuda()
    out, grads, calls = _run(neck, feats, weights, True, monkeypatch, form)
    ref_out, ref_grads, _ = _run(neck, feats, weights, False, monkeypatch)
    assert calls == 2 * len(LEVELS)
    for name in ref_out:
        torch.testing.assert_close(out[name], ref_out[name], rtol=1e-9, atol=1e-10)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
