"""The Auto-fusion neck search of an SSD (model.detector: ssd, search.stage: neck): alpha gets
gradients through the supernet inside ``SSDNeck``, the searcher's steps move what they should, the
decoded SSD at one-hot alpha computes the supernet's output, and search.py -> train.py --genotype ->
evaluate.py runs end to end on tiny synthetic images (CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate as evaluate_script  # noqa: E402
import search as search_script  # noqa: E402
from test_search_run import tiny_opts as search_run_tiny_opts  # noqa: E402

from autofpn.config import ConfigError, load_config  # noqa: E402
from autofpn.engine import distributed as du  # noqa: E402
from autofpn.engine.checkpoint import load_checkpoint  # noqa: E402
from autofpn.models.auto_fusion import AutoFusionNeck  # noqa: E402
from autofpn.models.detector import build_detector  # noqa: E402
from autofpn.models.genotype import load_genotype  # noqa: E402
from autofpn.models.operations import NECK_OPS  # noqa: E402
from autofpn.models.ssd import SSDNeck  # noqa: E402
from autofpn.search.decode import decode_weights  # noqa: E402
from autofpn.search.differentiable import (Searcher, build_search_loaders, search_image_size,  # noqa: E402
                                           search_resource_cost, searched_neck, stage_config, stages_to_run)

CONFIG = str(REPO / "configs" / "ssd_demo.yaml")
LEVELS = (3, 4, 5)  # conv4_3, fc7, conv8_2 (ssd_demo.yaml); conv9_2 and conv10_2 stay SSD's


def tiny_opts(synthetic_root: str, out_dir: str, **extra) -> list:
    """test_search_run's CPU-fast search (8 train images in 2 halves of 4, 2 per batch, an
    8-channel neck) with the images warped to 64 or 96 px squares (VGG16's cost)."""
    return search_run_tiny_opts(synthetic_root, out_dir, **{"model.transform.min_size": "[64,96]",
                                                            "model.transform.test_min_size": 64, **extra})


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def unit_cfg(*extra):
    """ssd_demo.yaml's SSD without data: 5 classes, 8-channel neck without norm, 64 px."""
    return load_config(CONFIG, ["model.num_classes=5", "model.neck.channels=8", "model.neck.norm=none",
                                "model.transform.min_size=[64]", "model.transform.test_min_size=64", *extra])


def _images_and_targets():
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 64, 80, generator=g), torch.rand(3, 72, 64, generator=g)]
    targets = [{"boxes": torch.tensor([[5.0, 6.0, 40.0, 50.0], [30.0, 20.0, 78.0, 60.0]]), "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[5.0, 20.0, 50.0, 70.0]]), "labels": torch.tensor([4])}]
    return images, targets


def test_supernet_sits_inside_the_ssd_neck_and_gradients_reach_alpha():
    torch.manual_seed(0)
    cfg = unit_cfg()
    model = build_detector(cfg, search="neck").train()
    assert isinstance(model.neck, SSDNeck) and isinstance(model.neck.base, AutoFusionNeck)
    assert searched_neck(model) is model.neck.base and model.neck.base.is_supernet
    assert model.neck.base.levels == list(LEVELS)
    assert tuple(model.arch.alpha.shape) == model.neck.base.arch_shape == (2, len(LEVELS) ** 2, len(NECK_OPS))
    assert model.arch.beta is None and model.searched
    assert not {id(p) for p in model.arch_parameters()} & {id(p) for p in model.weight_parameters()}

    losses = model(*_images_and_targets())
    assert set(losses) == {"loss_cls", "loss_box"}
    sum(losses.values()).backward()
    grad = model.arch.alpha.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0, "no detection-loss gradient on alpha"
    assert all(p.grad is not None for p in model.neck.extra.parameters())  # fc6 / fc7 / extra layers train

    # the penalty counts the supernet only, at the square the images are warped to
    assert search_image_size(cfg) == (64, 64)
    model.zero_grad()
    cost = search_resource_cost(cfg, searched_neck(model), None)
    assert tuple(cost.neck_table.shape[:-1]) == tuple(model.arch.alpha.shape)
    cost.expected_cost(model.arch.neck_weights()).backward()
    assert (model.arch.alpha.grad[..., NECK_OPS.index("none")] < 0).all()  # "none" is free


def test_head_stage_and_head_supernet_are_refused_naming_search_stage():
    assert stages_to_run(unit_cfg()) == ["neck"]  # search.stage: neck in configs/ssd_demo.yaml
    assert stages_to_run(unit_cfg("search.stage=both")) == ["neck"]
    with pytest.raises(ConfigError, match="'search.stage' = 'head': model.detector 'ssd' has no RoI head"):
        stages_to_run(unit_cfg("search.stage=head"))


def test_decoded_ssd_at_one_hot_alpha_computes_the_supernet():
    """The SSD retrained from a genotype, given the supernet's weights, has the supernet's levels,
    head outputs and losses when alpha selects the genotype's ops ("none" elsewhere)."""
    g = torch.Generator().manual_seed(0)
    genotype = decode_weights(torch.softmax(2 * torch.randn(2, len(LEVELS) ** 2, len(NECK_OPS), generator=g), -1),
                              None, LEVELS, "argmax")
    assert sum(len(LEVELS) ** 2 - len(links) for links in genotype["neck"]["layers"]) > 0, "cover dropped links"
    torch.manual_seed(0)
    supernet = build_detector(unit_cfg(), search="neck")
    decoded = build_detector(unit_cfg("model.neck.type=auto"), genotype)
    assert decoded.arch is None and decoded.arch_parameters() == []
    state = supernet.state_dict()
    decoded.load_state_dict({k: state[k] for k in decoded.state_dict()}, strict=True)
    one_hot = torch.zeros(supernet.arch.alpha.shape)
    one_hot[..., NECK_OPS.index("none")] = 1.0
    for k, links in enumerate(genotype["neck"]["layers"]):
        for link in links:
            idx = supernet.neck.base.link_pairs.index((link["from"], link["to"]))
            one_hot[k, idx] = 0.0
            one_hot[k, idx, NECK_OPS.index(link["op"])] = 1.0
    with torch.no_grad():
        supernet.arch.alpha.copy_(1e4 * one_hot)  # its softmax is exactly one_hot in float32
    assert torch.equal(supernet.arch.neck_weights(), one_hot)

    images, targets = _images_and_targets()
    supernet.eval()
    decoded.eval()
    with torch.no_grad():
        batch = torch.rand(2, 3, 64, 64, generator=g)
        sup_levels = supernet.neck(supernet.backbone(batch), supernet.arch.neck_weights())
        dec_levels = decoded.neck(decoded.backbone(batch))
        assert sorted(dec_levels) == [f"p{lv}" for lv in range(3, 8)]
        for name in dec_levels:
            torch.testing.assert_close(sup_levels[name], dec_levels[name], rtol=1e-5, atol=1e-6)
        ordered = lambda feats: [feats[f"p{lv}"] for lv in range(3, 8)]  # noqa: E731
        for sup_out, dec_out in zip(supernet.head(ordered(sup_levels)), decoded.head(ordered(dec_levels))):
            for s, d in zip(sup_out, dec_out):
                torch.testing.assert_close(s, d, rtol=1e-5, atol=1e-6)
        supernet.train()
        decoded.train()
        sup_losses, dec_losses = supernet(images, targets), decoded(images, targets)
    for name in dec_losses:
        torch.testing.assert_close(sup_losses[name], dec_losses[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["full", "gdas"])
def test_arch_step_moves_only_alpha_and_weight_step_only_weights(tmp_path, synthetic_root, mode):
    cfg = load_config(CONFIG, tiny_opts(synthetic_root, str(tmp_path), **{"search.mode": mode}))
    ctx = du.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    torch.manual_seed(0)
    stage_cfg = stage_config(cfg, "neck", None)
    loader_a, loader_b = build_search_loaders(stage_cfg, ctx)
    searcher = Searcher(stage_cfg, "neck", build_detector(stage_cfg, search="neck"), loader_a, loader_b, ctx,
                        str(tmp_path))
    assert searcher.link_pairs() == [(s, t) for t in LEVELS for s in LEVELS]
    model = searcher.model

    def snapshot():
        return {k: v.clone() for k, v in model.state_dict().items()}

    before = snapshot()
    searcher.arch_step(*next(iter(loader_b)))
    after_arch = snapshot()
    assert not torch.equal(before["arch.alpha"], after_arch["arch.alpha"])
    moved = [k for k in before if k != "arch.alpha" and not torch.equal(before[k], after_arch[k])]
    assert moved == [], f"the architecture step changed weights: {moved[:5]}"

    searcher.weight_step(*next(iter(loader_a)))
    after_weights = snapshot()
    assert torch.equal(after_arch["arch.alpha"], after_weights["arch.alpha"])
    for part in ("neck.base.", "neck.extra.", "head."):
        assert any(not torch.equal(after_arch[k], after_weights[k]) for k in after_arch if k.startswith(part)), part
    # search.freeze_backbone: the VGG16 trunk stays (SSD's fc6 / fc7 and extra layers are in the neck)
    assert all(torch.equal(after_arch[k], after_weights[k]) for k in after_arch if k.startswith("backbone."))
    genotype = searcher.decode()
    assert genotype["head"] is None and genotype["neck"]["levels"] == list(LEVELS)


def test_search_then_train_then_evaluate(tmp_path, synthetic_root, capsys):
    """search.stage=both on an SSD searches the neck only (said once); geno.json has the neck and no
    head; train.py --genotype retrains it with model.neck.type auto; evaluate.py evaluates that."""
    out = str(tmp_path / "search")
    assert search_script.main(["--cfg", CONFIG, "--opts", *tiny_opts(
        synthetic_root, out, **{"search.max_iters": 2, "search.stage": "both"})]) == 0
    log = capsys.readouterr().out
    assert log.count("has no RoI head: search.stage=both searches the neck only") == 1
    for name in ("geno.json", "neck/genotype.json", "neck/arch_trajectory.jsonl"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert not os.path.exists(os.path.join(out, "head"))
    geno = load_genotype(os.path.join(out, "geno.json"))
    assert geno["head"] is None and geno["neck"]["levels"] == list(LEVELS) and len(geno["neck"]["layers"]) == 2

    train_out = str(tmp_path / "retrain")
    result = subprocess.run([sys.executable, "train.py", "--cfg", CONFIG, "--genotype", os.path.join(out, "geno.json"),
                             "--opts", *tiny_opts(synthetic_root, out, **{"train.output_dir": train_out,
                                                                         "solver.max_iters": 2,
                                                                         "train.precise_bn_batches": 2,
                                                                         "eval.draw_images": 0})],
                            cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    final = load_checkpoint(os.path.join(train_out, "model_final.pth"))
    assert final["cfg"]["model"]["detector"] == "ssd" and final["cfg"]["model"]["neck"]["type"] == "auto"
    assert final["genotype"] == geno
    assert any(k.startswith("neck.base.layers.") for k in final["model"]) and "arch.alpha" not in final["model"]

    eval_out = str(tmp_path / "eval")
    assert evaluate_script.main(["--ckpt", os.path.join(train_out, "model_final.pth"), "--out", eval_out]) == 0
    with open(os.path.join(eval_out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["params"]["neck"] > 0 and metrics["flops"]["head"] > 0 and metrics["flops_image_size"] == 64


def test_dry_run_plans_the_neck_stage_and_the_decoded_ssd():
    from autofpn.search.plan import plan_search
    plan = plan_search(unit_cfg("search.stage=both"))
    assert list(plan["stages"]) == ["search: neck", "decoded"] and plan["num_rois"] == 0
    assert plan["image_size"] == (64, 64)
    searching, decoded = plan["stages"]["search: neck"], plan["stages"]["decoded"]
    for p in (searching, decoded):
        assert p["params"]["rpn"] == p["flops"]["rpn"] == 0
        assert min(p["flops"]["head"], p["params"]["head"]) > 0
    assert searching["params"]["arch"] == 2 * len(LEVELS) ** 2 * len(NECK_OPS) and decoded["params"]["arch"] == 0
    assert searching["flops"]["neck"] > decoded["flops"]["neck"]  # every op of every link against one
