"""search.recompute: the supernets' mixed ops recomputed in the backward pass (torch.utils.checkpoint)
give the same outputs and gradients (weights and architecture weights) and keep far fewer
activations for the backward pass."""
import pytest
import torch
from torch import nn

from autofpn.models.auto_fusion import AutoFusionNeck
from autofpn.models.auto_head import AutoHead
from autofpn.models.operations import HEAD_OPS, NECK_OPS, MixedOp, set_recompute

IN_CH = {"c2": 8, "c3": 12, "c4": 16, "c5": 24}
IN_STRIDES = {"c2": 4, "c3": 8, "c4": 16, "c5": 32}


def _neck_case():
    torch.manual_seed(0)
    neck = AutoFusionNeck(IN_CH, IN_STRIDES, 8).double()
    feats = {k: torch.randn(2, c, 64 // IN_STRIDES[k], 80 // IN_STRIDES[k], dtype=torch.float64)
             for k, c in IN_CH.items()}
    alpha = torch.randn(*neck.arch_shape, dtype=torch.float64, requires_grad=True)

    def loss():
        out = neck(feats, torch.softmax(alpha, -1))
        return sum((v * torch.linspace(-1, 1, v.numel(), dtype=v.dtype).view_as(v)).sum() for v in out.values())
    return neck, alpha, loss


def _head_case():
    torch.manual_seed(0)
    head = AutoHead(8, 7, 4, cells=2).double()
    rois = torch.randn(6, 8, 7, 7, dtype=torch.float64)
    alpha = torch.randn(*head.arch_shape, dtype=torch.float64, requires_grad=True)

    def loss():
        out = head(rois, torch.softmax(alpha, -1))
        return (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
    return head, alpha, loss


def _gradients(module: nn.Module, alpha: torch.Tensor, loss) -> tuple:
    module.zero_grad(set_to_none=True)
    alpha.grad = None
    value = loss()
    value.backward()
    return value.detach(), alpha.grad.clone(), {n: p.grad.clone() for n, p in module.named_parameters()}


def _saved_bytes(loss) -> int:
    """Bytes autograd keeps for the backward pass of ``loss()`` (each storage once)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = loss()
    del value
    return sum(seen.values())


@pytest.mark.parametrize("case", [_neck_case, _head_case], ids=["neck", "head"])
def test_recomputed_supernet_has_the_same_loss_and_gradients(case):
    module, alpha, loss = case()
    plain = _gradients(module, alpha, loss)
    assert set_recompute(module) == (32 if case is _neck_case else 28)  # every link / edge of the supernet
    recomputed = _gradients(module, alpha, loss)
    assert torch.equal(plain[0], recomputed[0])
    torch.testing.assert_close(recomputed[1], plain[1], rtol=1e-12, atol=1e-12)
    assert plain[2].keys() == recomputed[2].keys()
    for name, grad in plain[2].items():
        torch.testing.assert_close(recomputed[2][name], grad, rtol=1e-12, atol=1e-12, msg=name)
    assert plain[1].abs().sum() > 0  # alpha does get a gradient


@pytest.mark.parametrize("case", [_neck_case, _head_case], ids=["neck", "head"])
def test_recomputation_keeps_a_fraction_of_the_activations(case):
    module, _, loss = case()
    plain = _saved_bytes(loss)
    set_recompute(module)
    recomputed = _saved_bytes(loss)
    assert recomputed < 0.35 * plain, (recomputed, plain)
    with torch.no_grad():  # evaluation: nothing to recompute, nothing saved either way
        loss()


def test_recomputation_is_refused_with_batchnorm_in_the_ops_and_leaves_fixed_ops_alone():
    bn = MixedOp(4, NECK_OPS, norm="bn")
    with pytest.raises(ValueError, match="searched_norm"):
        set_recompute(bn)
    assert set_recompute(MixedOp(4, NECK_OPS, norm="gn")) == 1
    fixed = MixedOp(4, HEAD_OPS, norm="bn", chosen=["sep_conv_3x3"])  # a decoded edge: one op, nothing to mix
    assert set_recompute(fixed) == 0 and not fixed.recompute


def test_a_search_step_with_recompute_equals_the_step_without(tmp_path):
    """One architecture step and one weight step of the neck search from the same start: the
    same alpha and weights after them with search.recompute on and off; and a BatchNorm inside
    the searched ops is one config error."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_search_run import tiny_opts
    from autofpn.config import ConfigError, load_config
    from autofpn.engine import distributed as du
    from autofpn.models.detector import build_detector
    from autofpn.search.differentiable import Searcher, build_search_loaders, stage_config

    demo = str(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml")
    ctx = du.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    after = {}
    for recompute in (False, True):
        cfg = load_config(demo, tiny_opts(str(tmp_path / "data"), str(tmp_path / "out"),
                                          **{"search.recompute": recompute}))
        stage_cfg = stage_config(cfg, "neck", None)
        torch.manual_seed(0)
        model = build_detector(stage_cfg, search="neck")
        loader_a, loader_b = build_search_loaders(stage_cfg, ctx)
        searcher = Searcher(stage_cfg, "neck", model, loader_a, loader_b, ctx, out_dir=str(tmp_path / "unused"))
        alpha_before = model.arch.alpha.detach().clone()
        torch.manual_seed(1)
        searcher.arch_step(*next(iter(loader_b)))
        searcher.weight_step(*next(iter(loader_a)))
        after[recompute] = {k: v.clone() for k, v in model.state_dict().items()}
    assert after[False].keys() == after[True].keys()
    for name, value in after[False].items():
        torch.testing.assert_close(after[True][name], value, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(after[True]["arch.alpha"], alpha_before)  # the architecture step did move alpha

    cfg = load_config(demo, tiny_opts(str(tmp_path / "data"), str(tmp_path / "out"),
                                      **{"search.recompute": True, "search.searched_norm": "bn"}))
    stage_cfg = stage_config(cfg, "neck", None)
    with pytest.raises(ConfigError, match="search.recompute"):
        Searcher(stage_cfg, "neck", build_detector(stage_cfg, search="neck"), loader_a, loader_b, ctx,
                 out_dir=str(tmp_path / "unused"))
