"""The Auto-fusion neck search of a RetinaNet (model.detector: retinanet, search.stage: neck): alpha
gets gradients through the supernet inside ``ConvExtraLevels``, the searcher's steps move what
they should, the decoded RetinaNet at one-hot alpha computes the supernet's output, and
search.py -> train.py --genotype runs end to end on tiny synthetic images (CPU)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import search as search_script  # noqa: E402
from test_search_run import tiny_opts as search_run_tiny_opts  # noqa: E402

from autofpn.config import ConfigError, load_config  # noqa: E402
from autofpn.engine import distributed as du  # noqa: E402
from autofpn.engine.checkpoint import load_checkpoint  # noqa: E402
from autofpn.models.auto_fusion import AutoFusionNeck  # noqa: E402
from autofpn.models.detector import build_detector  # noqa: E402
from autofpn.models.genotype import load_genotype  # noqa: E402
from autofpn.models.necks import ConvExtraLevels  # noqa: E402
from autofpn.models.operations import NECK_OPS  # noqa: E402
from autofpn.search.decode import decode_weights  # noqa: E402
from autofpn.search.differentiable import (Searcher, build_search_loaders, search_resource_cost,  # noqa: E402
                                           searched_neck, stage_config, stages_to_run)

CONFIG = str(REPO / "configs" / "retinanet_demo.yaml")
LEVELS = (3, 4, 5)


def tiny_opts(synthetic_root: str, out_dir: str, **extra) -> list:
    """test_search_run's CPU-fast search (96-128 px synthetic images, 8 train images in 2 halves
    of 4, 2 per batch, an 8-channel neck) at a 128 px long side."""
    return search_run_tiny_opts(synthetic_root, out_dir, **{"model.transform.max_size": 128, **extra})


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def unit_cfg(*extra):
    """A RetinaNet over P3-P5 (+ conv P6, P7) without data: 5 classes, 8-channel neck, no norm in
    the neck (the supernet's search.searched_norm and the decoded neck alike)."""
    return load_config(CONFIG, ["model.num_classes=5", "model.neck.channels=8", "model.neck.norm=none",
                                "model.transform.min_size=[96]", "model.transform.max_size=128",
                                "model.transform.test_min_size=96", *extra])


def _images_and_targets():
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 96, 120, generator=g), torch.rand(3, 110, 96, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [50.0, 20.0, 110.0, 90.0]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.tensor([[5.0, 30.0, 80.0, 100.0]]), "labels": torch.tensor([4])}]
    return images, targets


def test_supernet_sits_inside_the_extra_levels_and_gradients_reach_alpha():
    torch.manual_seed(0)
    cfg = unit_cfg()
    model = build_detector(cfg, search="neck").train()
    assert isinstance(model.neck, ConvExtraLevels) and isinstance(model.neck.base, AutoFusionNeck)
    assert searched_neck(model) is model.neck.base and model.neck.base.is_supernet
    assert tuple(model.arch.alpha.shape) == model.neck.base.arch_shape == (2, len(LEVELS) ** 2, len(NECK_OPS))
    assert model.arch.beta is None
    arch_ids = {id(p) for p in model.arch_parameters()}
    assert arch_ids == {id(model.arch.alpha)}
    assert not arch_ids & {id(p) for p in model.weight_parameters()}

    losses = model(*_images_and_targets())
    assert set(losses) == {"loss_cls", "loss_box"}
    sum(losses.values()).backward()
    grad = model.arch.alpha.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0, "no detection-loss gradient on alpha"
    assert all(p.grad is not None for p in model.neck.extra.parameters())  # P6 / P7 train with the rest

    # the penalty counts the supernet only (the P6 / P7 convolutions are fixed): one entry per alpha
    model.zero_grad()
    cost = search_resource_cost(cfg, searched_neck(model), None)
    assert tuple(cost.neck_table.shape[:-1]) == tuple(model.arch.alpha.shape)
    cost.expected_cost(model.arch.neck_weights()).backward()
    assert (model.arch.alpha.grad[..., NECK_OPS.index("none")] < 0).all()  # "none" is free


def test_head_stage_and_head_supernet_are_refused_naming_search_stage():
    cfg = unit_cfg()
    assert stages_to_run(cfg) == ["neck"]  # search.stage: neck in configs/retinanet_demo.yaml
    assert stages_to_run(unit_cfg("search.stage=both")) == ["neck"]
    with pytest.raises(ConfigError, match="'search.stage' = 'head': model.detector 'retinanet' has no RoI head"):
        stages_to_run(unit_cfg("search.stage=head"))
    with pytest.raises(ConfigError, match="search.stage: model.detector 'retinanet' has no RoI head"):
        build_detector(cfg, search="head")
    assert build_detector(cfg, search=True).arch.beta is None  # every searchable part: the neck


@pytest.mark.parametrize("seed", [0, 1])
def test_decoded_retinanet_at_one_hot_alpha_computes_the_supernet(seed):
    """As tests/test_search_space.py's one-hot test for the bare neck, through the whole detector:
    the RetinaNet retrained from a genotype, given the supernet's weights, has the supernet's
    P3-P7, subnet outputs and losses when alpha selects the genotype's ops ("none" elsewhere)."""
    g = torch.Generator().manual_seed(seed)
    genotype = decode_weights(torch.softmax(2 * torch.randn(2, len(LEVELS) ** 2, len(NECK_OPS), generator=g), -1),
                              None, LEVELS, "argmax")
    assert sum(len(LEVELS) ** 2 - len(links) for links in genotype["neck"]["layers"]) > 0, "cover dropped links"
    torch.manual_seed(seed)
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
    batch = torch.stack([torch.nn.functional.pad(im, (0, 128 - im.shape[2], 0, 128 - im.shape[1])) for im in images])
    with torch.no_grad():
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
    assert all(torch.equal(after_arch[k], after_weights[k]) for k in after_arch if k.startswith("backbone."))
    genotype = searcher.decode()
    assert genotype["head"] is None and genotype["neck"]["levels"] == list(LEVELS)


def test_search_writes_a_neck_genotype_that_train_py_retrains(tmp_path, synthetic_root, capsys):
    """search.stage=both on a RetinaNet searches the neck only (said once in the log); geno.json
    has the neck and no head, and train.py --genotype retrains it with model.neck.type auto."""
    out = str(tmp_path / "search")
    assert search_script.main(["--cfg", CONFIG, "--opts", *tiny_opts(
        synthetic_root, out, **{"search.max_iters": 2, "search.stage": "both"})]) == 0
    log = capsys.readouterr().out
    assert log.count("has no RoI head: search.stage=both searches the neck only") == 1
    for name in ("geno.json", "geno.png", "arch_heatmap_neck.png", "neck/genotype.json", "neck/arch_trajectory.jsonl"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert not os.path.exists(os.path.join(out, "head"))
    geno = load_genotype(os.path.join(out, "geno.json"))
    assert geno["head"] is None and geno["neck"]["levels"] == list(LEVELS) and len(geno["neck"]["layers"]) == 2

    train_out = str(tmp_path / "retrain")
    result = subprocess.run([sys.executable, "train.py", "--cfg", CONFIG, "--genotype", os.path.join(out, "geno.json"),
                             "--opts", *tiny_opts(synthetic_root, out, **{"train.output_dir": train_out,
                                                                         "solver.max_iters": 2})],
                            cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    final = load_checkpoint(os.path.join(train_out, "model_final.pth"))
    assert final["cfg"]["model"]["detector"] == "retinanet" and final["cfg"]["model"]["neck"]["type"] == "auto"
    assert final["genotype"] == geno
    assert any(k.startswith("neck.base.layers.") for k in final["model"]) and "arch.alpha" not in final["model"]


def test_dry_run_plans_the_neck_stage_and_the_decoded_retinanet(capsys):
    from autofpn.search.plan import format_plan, gradient_search_compute, plan_search
    cfg = unit_cfg("search.stage=both")
    plan = plan_search(cfg)
    assert list(plan["stages"]) == ["search: neck", "decoded"] and plan["num_rois"] == 0
    for stage, p in plan["stages"].items():
        assert p["params"]["rpn"] == p["flops"]["rpn"] == p["activation_bytes"]["rpn"] == 0, stage
        assert min(p["flops"]["head"], p["activation_bytes"]["head"], p["params"]["head"]) > 0, stage
    searching, decoded = plan["stages"]["search: neck"], plan["stages"]["decoded"]
    assert searching["params"]["arch"] == 2 * len(LEVELS) ** 2 * len(NECK_OPS) and decoded["params"]["arch"] == 0
    assert searching["flops"]["neck"] > decoded["flops"]["neck"]  # every op of every link against one
    assert searching["params"]["head"] == decoded["params"]["head"]  # the subnets are not searched
    assert "a dense head on every level" in format_plan(plan)
    compute = gradient_search_compute(cfg, plan, train_images=100)
    assert list(compute["images"]) == ["search: neck"]

    assert search_script.main(["--cfg", CONFIG, "--dry-run", "--opts", "model.num_classes=5"]) == 0
    assert "| search: neck |" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="'search.stage' = 'head'"):
        plan_search(unit_cfg("search.stage=head"))
