"""``model.neck.residual_ops`` and ``model.head.residual_ops``: each link's (edge's) convolution
op as a zero-initialised residual branch, ``x + op(x)``. A residual neck (head) starts as the
identity neck (head), its supernet at one-hot weights computes the decoded neck (head), the fused
supernet computes the reference's values and gradients, and a search with it moves only alpha
(beta) in an architecture step (tests/test_search_run.py)."""
import json

import pytest
import torch

from autofpn.models.auto_fusion import AutoFusionNeck
from autofpn.models.auto_head import EDGE_PAIRS, AutoHead
from autofpn.models.genotype import dense_identity_neck
from autofpn.models.operations import HEAD_OPS, NECK_OPS, MixedOp, set_recompute
from test_fused_mixed_op import _assert_same, _run, _weights
from test_search_space import (HEAD_CH, IN_CH, IN_STRIDES, NECK_CH, backbone_feats, one_hot_head, one_hot_neck,
                               random_genotype)


def _dense(op: str) -> dict:
    """The identity neck's 32 links, each with ``op``."""
    genotype = json.loads(json.dumps(dense_identity_neck([2, 3, 4, 5], 2)))
    for links in genotype["neck"]["layers"]:
        for link in links:
            link["op"] = op
    return genotype


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``module`` with every parameter drawn anew (the zero-initialised branches too)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


@pytest.mark.parametrize("norm", ["bn", "gn", "none"])
@pytest.mark.parametrize("op", ["sep_conv_3x3", "dil_conv_5x5_r3"])
def test_a_residual_neck_starts_as_the_identity_neck(op, norm):
    identity = AutoFusionNeck(IN_CH, IN_STRIDES, NECK_CH, genotype=dense_identity_neck([2, 3, 4, 5], 2), norm=norm)
    residual = AutoFusionNeck(IN_CH, IN_STRIDES, NECK_CH, genotype=_dense(op), norm=norm, residual_ops=True)
    plain = AutoFusionNeck(IN_CH, IN_STRIDES, NECK_CH, genotype=_dense(op), norm=norm)
    # the identity neck's parameters are the projections every neck has
    for neck in (residual, plain):
        assert not neck.load_state_dict(identity.state_dict(), strict=False).unexpected_keys
    feats = backbone_feats(batch=2)
    with torch.no_grad():
        want, got, other = identity(feats), residual(feats), plain(feats)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert any(not torch.allclose(other[name], want[name]) for name in want)
    # and it learns: every branch's parameters get a gradient
    loss = sum((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() for out in residual(feats).values())
    loss.backward()
    branches = [(n, p) for n, p in residual.named_parameters() if ".mixed.ops." in n]
    assert branches and all(p.grad is not None for _, p in branches)
    assert sum(p.grad.abs().sum() for _, p in branches) > 0


def _dense_head(op: str, cells: int = 2) -> dict:
    """A head whose every edge (14 per cell) is ``op``."""
    return {"cells": [[{"input": k, "node": n, "op": op} for k, n in EDGE_PAIRS] for _ in range(cells)]}


@pytest.mark.parametrize("norm", ["bn", "none"])
@pytest.mark.parametrize("op", ["sep_conv_3x3", "dil_conv_5x5_r2", "conv_3x3"])
def test_a_residual_head_starts_as_the_identity_head(op, norm):
    identity = AutoHead(NECK_CH, 7, HEAD_CH, genotype=_dense_head("identity"), norm=norm)
    residual = AutoHead(NECK_CH, 7, HEAD_CH, genotype=_dense_head(op), norm=norm, residual_ops=True)
    plain = AutoHead(NECK_CH, 7, HEAD_CH, genotype=_dense_head(op), norm=norm)
    for head in (residual, plain):  # the identity head's parameters are the cells' input projections
        assert not head.load_state_dict(identity.state_dict(), strict=False).unexpected_keys
    rois = torch.randn(6, NECK_CH, 7, 7)
    with torch.no_grad():
        want, got, other = identity(rois), residual(rois), plain(rois)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(other, want)
    # and it learns: every branch's parameters get a gradient
    (residual(rois) * torch.linspace(-1, 1, want.numel()).view_as(want)).sum().backward()
    branches = [p for n, p in residual.named_parameters() if ".edges." in n]
    assert branches and all(p.grad is not None for p in branches)
    assert sum(p.grad.abs().sum() for p in branches) > 0


def _residual_module(part: str, genotype: dict = None, residual: bool = True) -> torch.nn.Module:
    """The neck or head supernet (genotype None) or decoded module, residual or plain."""
    if part == "neck":
        return AutoFusionNeck(IN_CH, IN_STRIDES, NECK_CH, genotype=genotype, residual_ops=residual)
    return AutoHead(NECK_CH, 7, HEAD_CH, genotype=genotype, residual_ops=residual)


def _flat(out) -> torch.Tensor:
    """A neck's {level: tensor} or a head's tensor as one vector."""
    return torch.cat([v.flatten() for v in out.values()]) if isinstance(out, dict) else out.flatten()


@pytest.mark.parametrize("part", ["neck", "head"])
@pytest.mark.parametrize("seed", [0, 1])
def test_one_hot_residual_supernet_computes_the_decoded_module(part, seed):
    torch.manual_seed(seed)
    genotype = random_genotype(seed)
    kept = ([link["op"] for links in genotype["neck"]["layers"] for link in links] if part == "neck"
            else [edge["op"] for edges in genotype["head"]["cells"] for edge in edges])
    assert "identity" in kept and len(set(kept)) > 2, "the test should cover identity and convolution ops"
    supernet = _perturbed(_residual_module(part), seed)
    fixed, plain = _residual_module(part, genotype), _residual_module(part, genotype, residual=False)
    state = supernet.state_dict()
    fixed.load_state_dict({k: state[k] for k in fixed.state_dict()}, strict=True)
    plain.load_state_dict({k: state[k] for k in plain.state_dict()}, strict=True)
    if part == "neck":
        x, weights = backbone_feats(), one_hot_neck(genotype, supernet)
    else:
        x, weights = torch.randn(5, NECK_CH, 7, 7), one_hot_head(genotype, supernet)
    with torch.no_grad():
        out_sup, out_fixed, out_plain = _flat(supernet(x, weights)), _flat(fixed(x)), _flat(plain(x))
    torch.testing.assert_close(out_sup, out_fixed, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out_plain, out_fixed)


def _residual_case(seed: int = 0, table=NECK_OPS, **kwargs) -> tuple:
    torch.manual_seed(seed)
    op = _perturbed(MixedOp(6, table, residual=True, **kwargs).double(), seed)
    x = torch.randn(3, 6, 9, 11, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    return op, x


@pytest.mark.parametrize("weights", ["random", "one_hot", "pair"])
@pytest.mark.parametrize("table", [NECK_OPS, HEAD_OPS], ids=["neck", "head"])
def test_fused_residual_mixed_op_equals_the_reference(weights, table):
    op, x = _residual_case(table=table)
    w = _weights(weights, table, torch.Generator().manual_seed(2))
    fused, reference = _run(op, x, w, True), _run(op, x, w, False)
    _assert_same(fused, reference)
    # the reference by hand: sum over the held ops of w_k (x + op_k(x)), identity as x
    with torch.no_grad():
        by_hand = sum(w[table.index(n)] * (m(x) if n == "identity" else x + m(x)) for n, m in op.ops.items())
    torch.testing.assert_close(reference[0], by_hand, rtol=1e-10, atol=1e-12)
    assert fused[2].abs().sum() > 0  # alpha's gradient


def test_recomputed_and_sampled_residual_mixed_ops_equal_the_reference():
    op, x = _residual_case()
    w = _weights("random", NECK_OPS, torch.Generator().manual_seed(2))
    reference = _run(op, x, w, False)
    assert set_recompute(op) == 1
    _assert_same(_run(op, x, w, True), reference)
    sampled, x = _residual_case(sampled=True)
    for kind in ("one_hot", "pair", "random"):
        w = _weights(kind, NECK_OPS, torch.Generator().manual_seed(3))
        _assert_same(_run(sampled, x, w, True), _run(sampled, x, w, False))
