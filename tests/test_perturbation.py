"""search.selection: perturbation (autofpn/search/perturbation.py): each op's importance is the
rise of the supernet's loss when that op is removed, on fixed batches; the decode reads it."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
import search as search_script  # noqa: E402
from test_search_run import _searcher, synthetic_root, tiny_opts  # noqa: E402,F401  (synthetic_root: a fixture)

from autofpn.config import ConfigError, load_config  # noqa: E402
from autofpn.models.genotype import load_genotype  # noqa: E402
from autofpn.models.operations import HEAD_OPS, NECK_OPS  # noqa: E402
from autofpn.search import perturbation  # noqa: E402
from autofpn.search.decode import decode_weights  # noqa: E402
from autofpn.search.differentiable import final_weights  # noqa: E402
from autofpn.search.perturbation import _mean_loss, fixed_batches, op_importance  # noqa: E402

DEMO = str(REPO / "configs" / "demo.yaml")


def _trained_searcher(tmp_path, synthetic_root, stage, steps=2):
    """A searcher whose supernet took a few weight steps (its ops differ from their init)."""
    cfg = load_config(DEMO, tiny_opts(synthetic_root, str(tmp_path), **{"model.neck.channels": 4,
                                                                        "model.neck.layers": 1,
                                                                        "model.head.channels": 4}))
    searcher, loader_a, _ = _searcher(cfg, stage, str(tmp_path))
    for _, (images, targets) in zip(range(steps), loader_a):
        searcher.weight_step(images, targets)
    return searcher


@pytest.mark.parametrize("stage", ["neck", "head"])
def test_importance_is_the_loss_rise_of_removing_each_op_and_leaves_the_model_as_it_was(tmp_path, synthetic_root,
                                                                                           stage):
    searcher = _trained_searcher(tmp_path, synthetic_root, stage)
    model = searcher.model
    batches = fixed_batches(searcher.loader_b, 1, torch.device("cpu"))
    searcher.set_train_mode()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    importance = op_importance(model, stage, batches, seed=5)
    ops = NECK_OPS if stage == "neck" else HEAD_OPS
    weights = (model.arch.neck_weights() if stage == "neck" else model.arch.head_weights()).detach()
    assert importance.shape == weights.shape and importance.shape[-1] == len(ops)
    assert torch.all(importance[..., 0] == 0)  # "none" adds nothing
    assert importance[..., 1:].abs().max() > 0  # removing an op of a trained supernet changes its loss
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "op_importance changed the model"
    # one entry recomputed by hand: the softmax with that op zeroed, the same batches and seed,
    # the backbone run again (not cached)
    g, r, o = 0, 1, 3
    masked = weights.clone()
    masked[g, r, o] = 0.0
    with torch.no_grad():
        torch.manual_seed(123)  # the global RNG is not what op_importance uses: it reseeds per batch
        base = _mean_loss(model, batches, 5, [])
        with model.arch.overridden(*((masked, None) if stage == "neck" else (None, masked))):
            removed = _mean_loss(model, batches, 5, [])
    assert importance[g, r, o].item() == pytest.approx(removed - base, abs=1e-5)
    # paired: the same call gives the same table
    assert torch.equal(op_importance(model, stage, batches, seed=5), importance)


def test_importance_leaves_the_global_rng_where_it_was(tmp_path, synthetic_root):
    searcher = _trained_searcher(tmp_path, synthetic_root, "head", steps=1)
    batches = fixed_batches(searcher.loader_b, 1, torch.device("cpu"))
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    op_importance(searcher.model, "head", batches)
    assert torch.equal(torch.rand(3), expected)


def test_the_decode_keeps_the_rules_links_and_picks_their_ops_by_importance():
    levels = [2, 3, 4, 5]
    weights = torch.full((1, 16, len(NECK_OPS)), 0.1)
    weights[0, :, 1] = 0.3  # identity wins every link by weight ...
    weights[0, 7, 0] = 0.5  # ... but "none" link 7 (P5 -> P3): argmax drops it
    scores = torch.zeros(1, 16, len(NECK_OPS))
    scores[0, :, 1:] = -0.2  # removing any op lowers the loss (the common shift) ...
    scores[0, 5, 6] = -0.1  # ... least for sep_conv_3x3 on link 5 (P3 -> P3)
    scores[0, 9, 1] = -0.15  # and for identity on link 9 (P3 -> P4)
    by_weights = decode_weights(weights, None, levels, "argmax")
    by_scores = decode_weights(weights, None, levels, "argmax", neck_scores=scores)
    ops = {(e["from"], e["to"]): e["op"] for e in by_scores["neck"]["layers"][0]}
    kept = lambda g: {(e["from"], e["to"]) for e in g["neck"]["layers"][0]}  # noqa: E731
    assert kept(by_scores) == kept(by_weights) and (5, 3) not in ops and len(ops) == 15  # "none" never picked
    assert ops[(3, 3)] == "sep_conv_3x3" and ops[(3, 4)] == "identity"
    assert ops[(2, 2)] == "identity"  # a tie: the first of the allowed ops
    # the head rules that leave identity out leave it out of the scored choice too
    head_w = torch.full((1, 14, len(HEAD_OPS)), 0.1)
    head_w[..., 2] = 0.3  # sep_conv_3x3 wins every edge by weight
    head_s = torch.full((1, 14, len(HEAD_OPS)), -2.0)
    head_s[..., 1] = 1.0  # identity would win every edge by importance
    head_s[..., 6] = -1.5  # conv_3x3 is the most important convolution
    geno = decode_weights(None, head_w, levels, "argmax_head_noidentity", head_scores=head_s)
    assert [e["op"] for e in geno["head"]["cells"][0]] == ["conv_3x3"] * 14
    with pytest.raises(ValueError, match="scores of shape"):
        decode_weights(None, head_w, levels, "argmax", head_scores=head_s[:, :3])


def test_a_search_with_perturbation_selection_decodes_its_importances_and_reads_them_back(tmp_path, synthetic_root,
                                                                                         monkeypatch):
    out = str(tmp_path / "search")
    opts = tiny_opts(synthetic_root, out, **{"search.max_iters": 2, "search.selection": "perturbation",
                                             "search.selection_batches": 1, "model.neck.channels": 4,
                                             "model.neck.layers": 1, "model.head.channels": 4})
    assert search_script.main(["--cfg", DEMO, "--opts", *opts]) == 0
    rule = load_config(DEMO, opts)["search"]["decode_rule"]
    for stage in ("neck", "head"):
        record = json.load(open(os.path.join(out, stage, "op_importance.json")))
        assert record["iter"] == 2 and record["batches"] == record["requested"] == 1
        assert record["ops"] == list(NECK_OPS if stage == "neck" else HEAD_OPS)
        scores, weights = torch.tensor(record["importance"]), final_weights(os.path.join(out, stage), stage)
        decoded = (decode_weights(weights, None, [2, 3, 4, 5], rule, neck_scores=scores) if stage == "neck"
                   else decode_weights(None, weights, rule=rule, head_scores=scores))
        assert load_genotype(os.path.join(out, stage, "genotype.json"))[stage] == decoded[stage]
    # a stage killed after its last step and run again reads its importances back, measuring nothing
    neck_geno = load_genotype(os.path.join(out, "neck", "genotype.json"))
    os.remove(os.path.join(out, "neck", "genotype.json"))

    def refuse(*args, **kwargs):
        raise AssertionError("measured the importances again")

    monkeypatch.setattr(perturbation, "op_importance", refuse)
    assert search_script.main(["--cfg", DEMO, "--opts", *opts]) == 0
    assert load_genotype(os.path.join(out, "neck", "genotype.json"))["neck"] == neck_geno["neck"]


def test_selection_settings_are_checked(synthetic_root, tmp_path):
    from autofpn.search import differentiable, evolution, snas
    cfg = load_config(DEMO, tiny_opts(synthetic_root, str(tmp_path), **{"search.selection": "perturbation",
                                                                         "search.ensemble": 2}))
    for strategy in (differentiable, snas):
        with pytest.raises(ConfigError, match="search.ensemble"):
            strategy.check_config(cfg)
    cfg["search"]["ensemble"] = 1
    differentiable.check_config(cfg)
    with pytest.raises(ConfigError, match="trains no supernet"):
        evolution.check_config(cfg)
    with pytest.raises(ConfigError, match="search.selection"):
        load_config(DEMO, tiny_opts(synthetic_root, str(tmp_path), **{"search.selection": "gradient"}))
    with pytest.raises(ConfigError, match="search.selection_batches"):
        load_config(DEMO, tiny_opts(synthetic_root, str(tmp_path), **{"search.selection_batches": 0}))
