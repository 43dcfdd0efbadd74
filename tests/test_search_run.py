"""search.py end to end on the embedded data at tiny sizes (CPU): which step moves what, the
resource constraint, search -> train.py, two processes keep alpha identical (kill -9 + resume and
the ensemble: tests/test_search_resume.py)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import search as search_script  # noqa: E402

from autofpn.config import load_config  # noqa: E402
from autofpn.engine import distributed as du  # noqa: E402
from autofpn.engine.checkpoint import load_checkpoint  # noqa: E402
from autofpn.search.differentiable import Searcher, build_search_loaders, split_halves, stage_config  # noqa: E402
from autofpn.models.detector import build_detector  # noqa: E402
from autofpn.models.genotype import load_genotype  # noqa: E402


def tiny_opts(synthetic_root: str, out_dir: str, **extra) -> list:
    """A CPU-fast search: 128 px synthetic images, 8 train images (2 halves of 4), 2 per batch."""
    opts = {
        "search.output_dir": out_dir, "train.output_dir": out_dir + "_train", "train.device": "cpu",
        "train.log_period": 1, "train.checkpoint_period": 0, "train.eval_period": 0,
        "data.synthetic.root": synthetic_root, "data.synthetic.num_train": 8,
        "data.synthetic.num_val": 4, "data.synthetic.image_size": 128,
        "data.images_per_batch": 2, "data.num_workers": 0,
        "model.transform.min_size": "[96,128]", "model.transform.max_size": 160,
        "model.transform.test_min_size": 128,
        "model.neck.channels": 8, "model.head.mlp_dim": 32, "model.head.channels": 8,
        "model.rpn.pre_nms_top_n_train": 100, "model.rpn.post_nms_top_n_train": 50,
        "model.rpn.pre_nms_top_n_test": 50, "model.rpn.post_nms_top_n_test": 30,
        "model.rpn.batch_size_per_image": 32, "model.roi.batch_size_per_image": 16,
        "model.roi.detections_per_img": 20,
        "search.epochs": 2, "search.max_iters": 0, "search.arch_start_epoch_fraction": 0.25,
        "solver.epochs": 1, "solver.warmup_iters": 1, "solver.steps": "[1]",
    }
    opts.update(extra)
    return [f"{k}={v}" for k, v in opts.items()]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def _searcher(cfg, stage="neck", out_dir="/tmp/unused", searcher_class=Searcher):
    """A ``searcher_class`` of ``stage`` built from seed 0 (the same supernet and alpha for any
    class), with the loaders of its two data halves."""
    ctx = du.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    torch.manual_seed(0)
    stage_cfg = stage_config(cfg, stage, None)
    model = build_detector(stage_cfg, search=stage)
    loader_a, loader_b = build_search_loaders(stage_cfg, ctx)
    return searcher_class(stage_cfg, stage, model, loader_a, loader_b, ctx, out_dir), loader_a, loader_b


def test_search_seed_defaults_to_the_training_seed_and_sets_the_data_order(synthetic_root, tmp_path):
    from autofpn.search.differentiable import search_seed
    demo = str(REPO / "configs" / "demo.yaml")
    cfg = lambda **o: load_config(demo, tiny_opts(synthetic_root, str(tmp_path), **o))  # noqa: E731
    assert search_seed(cfg(**{"train.seed": 3})) == 3
    assert search_seed(cfg(**{"train.seed": 3, "search.seed": 1})) == 1
    ctx = du.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    order = lambda c: [int(t["image_id"]) for _, targets in build_search_loaders(c, ctx)[0] for t in targets]  # noqa: E731
    assert order(cfg(**{"search.seed": 1})) == order(cfg(**{"train.seed": 1}))
    assert order(cfg(**{"search.seed": 1})) != order(cfg(**{"search.seed": 2}))


def test_split_is_disjoint_seeded_and_complete():
    a, b = split_halves(11, seed=3)
    assert sorted(a + b) == list(range(11)) and not set(a) & set(b) and len(a) == 5
    assert (a, b) == split_halves(11, seed=3) and (a, b) != split_halves(11, seed=4)


@pytest.mark.parametrize("stage, mode, residual, partial", [
    ("neck", "full", False, 1), ("head", "full", False, 1), ("neck", "gdas", False, 1), ("head", "gdas", False, 1),
    ("head", "sampled_weights", False, 1), ("neck", "full", True, 1), ("head", "full", True, 1),
    ("neck", "full", False, 4), ("head", "gdas", True, 2)])
def test_arch_step_moves_only_alpha_and_weight_step_only_weights(tmp_path, synthetic_root, stage, mode, residual,
                                                                 partial):
    cfg = load_config(str(REPO / "configs" / "demo.yaml"),
                      tiny_opts(synthetic_root, str(tmp_path), **{"search.mode": mode,
                                                                  "model.neck.residual_ops": residual,
                                                                  "model.head.residual_ops": residual,
                                                                  "search.partial_channels": partial}))
    searcher, loader_a, loader_b = _searcher(cfg, stage, str(tmp_path))
    images_a, targets_a = next(iter(loader_a))
    images_b, targets_b = next(iter(loader_b))
    model = searcher.model
    arch_name = "arch.alpha" if stage == "neck" else "arch.beta"

    def snapshot():
        return {k: v.clone() for k, v in model.state_dict().items()}

    before = snapshot()
    searcher.arch_step(images_b, targets_b)
    after_arch = snapshot()
    assert not torch.equal(before[arch_name], after_arch[arch_name])
    moved = [k for k in before if k != arch_name and not torch.equal(before[k], after_arch[k])]
    assert moved == [], f"the architecture step changed weights: {moved[:5]}"

    searcher.weight_step(images_a, targets_a)
    after_weights = snapshot()
    assert torch.equal(after_arch[arch_name], after_weights[arch_name])
    searched = "neck." if stage == "neck" else "roi_heads.box_head."
    assert any(not torch.equal(after_arch[k], after_weights[k]) for k in after_arch if k.startswith(searched))
    # the backbone is frozen during the search (search.freeze_backbone)
    assert all(torch.equal(after_arch[k], after_weights[k]) for k in after_arch if k.startswith("backbone."))


@pytest.mark.parametrize("amp", ["bfloat16", "float16"])
def test_a_mixed_precision_search_steps_and_keeps_its_scalers_in_the_checkpoint(tmp_path, synthetic_root, amp):
    """search.amp: both steps run their forward under autocast (the supernet's convolutions in
    half precision), alpha and the weights move and stay float32; float16 scales each
    optimizer's loss and the scalers' state goes into the checkpoint."""
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), tiny_opts(synthetic_root, str(tmp_path), **{"search.amp": amp}))
    searcher, loader_a, loader_b = _searcher(cfg, "neck", str(tmp_path))
    dtypes = set()
    # every pyramid level the supernet neck computes (its convs run through ops of their own)
    hooks = [searcher.model.neck.register_forward_hook(lambda mod, args, out: dtypes.update(o.dtype for o in out.values()))]
    alpha = searcher.model.arch.alpha.detach().clone()
    conv = next(p for n, p in searcher.model.neck.named_parameters() if n.endswith("weight"))
    weight = conv.detach().clone()
    arch_out = searcher.arch_step(*next(iter(loader_b)))
    weight_out = searcher.weight_step(*next(iter(loader_a)))
    for h in hooks:
        h.remove()
    assert dtypes == {getattr(torch, amp)}
    assert all(math.isfinite(v) for v in {**arch_out, **weight_out}.values())
    assert searcher.model.arch.alpha.dtype == torch.float32 and not torch.equal(searcher.model.arch.alpha, alpha)
    assert not torch.equal(conv, weight)
    state = searcher.state_dict()
    assert state["w_scaler"]["scale"] > 1 if amp == "float16" else state["w_scaler"] == {}
    fresh, _, _ = _searcher(cfg, "neck", str(tmp_path))
    torch.save(state, tmp_path / "state.pth")
    assert fresh.resume(str(tmp_path / "state.pth"))
    assert fresh.w_scaler.state_dict() == searcher.w_scaler.state_dict()
    assert fresh.a_scaler.state_dict() == searcher.a_scaler.state_dict()


def test_head_stage_trains_the_head_supernet_on_fewer_rois_and_keeps_the_penalty(tmp_path, synthetic_root):
    """search.head_rois_per_image: each step's head supernet sees at most that many RoIs per image
    (the retrained detector's 16 otherwise); the penalty stays the one at the retrained RoI batch."""
    searchers = {}
    for k in (0, 4):
        cfg = load_config(str(REPO / "configs" / "demo.yaml"),
                          tiny_opts(synthetic_root, str(tmp_path), **{"search.head_rois_per_image": k}))
        searchers[k], loader_a, loader_b = _searcher(cfg, "head", str(tmp_path))
    searcher = searchers[4]
    assert searchers[0].model.roi_heads.sampler.batch_size_per_image == 16
    assert torch.equal(searchers[0].cost.head_table, searcher.cost.head_table)
    assert torch.equal(searchers[0].expected_cost(), searcher.expected_cost())
    seen = []
    hook = searcher.model.roi_heads.box_head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    images_a, targets_a = next(iter(loader_a))
    images_b, targets_b = next(iter(loader_b))
    searcher.arch_step(images_b, targets_b)
    searcher.weight_step(images_a, targets_a)
    hook.remove()
    assert len(seen) == 2 and all(0 < n <= 4 * len(images_a) for n in seen), seen


def test_head_stage_can_search_a_narrower_head_supernet(tmp_path, synthetic_root):
    """search.head_channels: the head stage's supernet at that width takes its steps and decodes a
    genotype that a detector at model.head.channels builds."""
    from autofpn.models.genotype import validate_genotype
    cfg = load_config(str(REPO / "configs" / "demo.yaml"),
                      tiny_opts(synthetic_root, str(tmp_path), **{"search.head_channels": 4}))
    searcher, loader_a, loader_b = _searcher(cfg, "head", str(tmp_path))
    head = searcher.model.roi_heads.box_head
    assert cfg["model"]["head"]["channels"] != 4 and head.channels == 4
    images_a, targets_a = next(iter(loader_a))
    images_b, targets_b = next(iter(loader_b))
    searcher.arch_step(images_b, targets_b)
    searcher.weight_step(images_a, targets_a)
    genotype = searcher.decode()
    validate_genotype(genotype)
    retrained = build_detector({**cfg, "model": {**cfg["model"], "head": {**cfg["model"]["head"], "type": "auto"}}},
                               genotype=genotype)
    assert retrained.roi_heads.box_head.channels == cfg["model"]["head"]["channels"]


def test_search_runs_at_its_own_input_sizes(tmp_path, synthetic_root):
    """search.min_size / max_size: both stages' detectors resize to the search's sizes, not the
    retrain's (model.transform); unset, they keep the retrain's."""
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), tiny_opts(synthetic_root, str(tmp_path)))
    assert stage_config(cfg, "neck", None)["model"]["transform"] == cfg["model"]["transform"]
    cfg = load_config(str(REPO / "configs" / "demo.yaml"),
                      tiny_opts(synthetic_root, str(tmp_path), **{"search.min_size": 64, "search.max_size": 96}))
    for stage in ("neck", "head"):
        searcher, loader_a, _ = _searcher(cfg, stage, str(tmp_path))
        transform = searcher.model.transform
        assert (transform.min_size, transform.max_size) == ([64], 96)
        images, _ = next(iter(loader_a))
        assert max(max(im.shape[-2:]) for im in images) == 128  # the data keep their size
        _, sizes, _ = transform(images, None)
        assert max(max(size) for size in sizes) <= 96
    assert cfg["model"]["transform"]["min_size"] == [96, 128]  # the retrain's sizes are untouched
    with pytest.raises(ValueError, match="search.min_size"):
        stage_config(load_config(None, ["search.min_size=[0]"]), "neck", None)


def test_resource_constraint_lowers_expected_cost(tmp_path, synthetic_root):
    costs = {}
    for lam in (0, "small"):
        cfg = load_config(str(REPO / "configs" / "demo.yaml"),
                          tiny_opts(synthetic_root, str(tmp_path), **{"search.resource_lambda": lam,
                                                                     "search.arch_lr": 0.05}))
        searcher, _, loader_b = _searcher(cfg, "neck", str(tmp_path))
        start = float(searcher.expected_cost().detach())
        for epoch in range(2):  # 2 batches per epoch in half B
            loader_b.batch_sampler.set_epoch(epoch)
            for images, targets in loader_b:
                searcher.arch_step(images, targets)
        costs[lam] = (start, float(searcher.expected_cost().detach()))
    assert costs[0][0] == costs["small"][0]  # same seed, same start
    assert costs["small"][1] < costs["small"][0]
    assert costs["small"][1] < costs[0][1] - 0.01, costs


def test_search_writes_a_genotype_that_train_py_trains(tmp_path, synthetic_root):
    out = str(tmp_path / "search")
    assert search_script.main(["--cfg", str(REPO / "configs" / "demo.yaml"), "--opts",
                               *tiny_opts(synthetic_root, out, **{"search.max_iters": 3})]) == 0
    for name in ("geno.json", "geno.png", "geno.svg", "arch_heatmap_neck.png", "arch_heatmap_head.png",
                 "config.yaml", "neck/genotype.json", "head/genotype.json", "neck/arch_trajectory.jsonl"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    geno = load_genotype(os.path.join(out, "geno.json"))
    assert geno["neck"] is not None and geno["head"] is not None
    assert "RoI feats 3x3" in open(os.path.join(out, "geno.svg")).read()  # the demo's model.head.cell_size
    trajectory = [json.loads(l) for l in open(os.path.join(out, "neck", "arch_trajectory.jsonl"))]
    assert [r["iter"] for r in trajectory] == [0, 1, 2, 3] and len(trajectory[-1]["alpha"]) == 2
    # how decided the search is: logged with every architecture record and written per stage
    assert 0.0 < trajectory[-1]["entropy"] <= 1.0 and 0.0 <= trajectory[-1]["margin"] < 1.0
    for stage in ("neck", "head"):
        d = json.load(open(os.path.join(out, stage, "decisiveness.json")))
        assert set(d) == {"entropy", "margin", "min_margin", "parameter_free", "none"}, stage
        # TensorBoard: losses, decisiveness and every op weight per iteration, the heat map image
        board = _read_events(os.path.join(out, stage, "tensorboard"))
        group = "layer1/P3 -> P4" if stage == "neck" else "cell0/node 2 <- 0"
        for tag in ("search/loss", "search/cost", "arch/margin", "arch/entropy", "arch/parameter_free",
                    f"{stage}_weights/{group}/none", f"{stage}_weights/{group}/identity"):
            assert [e.step for e in board.Scalars(tag)] == ([1, 2, 3] if tag.startswith("search") else [0, 1, 2, 3]), tag
        weights = torch.tensor(trajectory[-1]["alpha"]) if stage == "neck" else None
        if weights is not None:  # the tags hold the logged softmax weights
            assert board.Scalars("neck_weights/layer2/P5 -> P2/dil_conv_3x3_r2")[-1].value == pytest.approx(
                float(weights[1, 3, 2]), abs=1e-6)
        assert [e.step for e in board.Images(f"{stage}_heatmap")] == [2, 3]  # each checkpoint: epoch end, last

    train_out = str(tmp_path / "retrain")
    result = subprocess.run([sys.executable, "train.py", "--cfg", "configs/demo.yaml", "--genotype",
                             os.path.join(out, "geno.json"), "--opts",
                             *tiny_opts(synthetic_root, out, **{"train.output_dir": train_out,
                                                                "solver.max_iters": 2})],
                            cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    final = load_checkpoint(os.path.join(train_out, "model_final.pth"))
    assert final["cfg"]["model"]["neck"]["type"] == "auto" and final["cfg"]["model"]["head"]["type"] == "auto"
    assert final["genotype"] == geno


@pytest.mark.parametrize("mode", ["full", "gdas", "sampled_weights"])
def test_two_processes_keep_alpha_identical(tmp_path, synthetic_root, mode):
    out = str(tmp_path / "dist")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         str(REPO / "tests" / "search_rank_check.py"), str(REPO / "configs" / "demo.yaml"),
         str(tmp_path / "report.json"),
         *tiny_opts(synthetic_root, out, **{"search.max_iters": 4, "search.epochs": 4, "search.mode": mode})],
        cwd=str(REPO), capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(tmp_path / "report.json"))
    assert report["steps"] == 4 and report["arch_steps"] == 3
    assert report["identical_after_every_step"] is True
    assert report["alpha_moved"] is True
    if mode != "full":  # 4 weight steps (+ 3 architecture steps for gdas), each on one sampled path
        assert report["sampled_paths"] == (7 if mode == "gdas" else 4)
        assert report["paths_differ_between_steps"] is True and report["same_paths_on_every_rank"] is True
    else:
        assert report["sampled_paths"] == 0


def _read_events(folder: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(folder, size_guidance={"scalars": 0, "images": 0})
    board.Reload()
    return board


def test_a_head_search_on_a_given_neck_records_it_and_refuses_another(tmp_path, synthetic_root):
    """search.stage=head with --neck-genotype (= search.neck_genotype): the head supernet runs on
    that neck, geno.json keeps it, the folder's config.yaml records it (its path) and
    neck_genotype.json (its content), and the same folder with another neck (another path, or
    the same path rewritten) is refused instead of resumed; with a neck-searching stage it is an
    error."""
    import yaml
    from autofpn.config import ConfigError
    from autofpn.engine.runs import FolderInUseError
    from autofpn.search.random_sample import random_genotype
    cfg = str(REPO / "configs" / "demo.yaml")
    necks = []
    for seed in (1, 2):
        path = tmp_path / f"neck{seed}.json"
        path.write_text(json.dumps(random_genotype(seed, 0)))
        necks.append(path)
    out = str(tmp_path / "search")
    opts = tiny_opts(synthetic_root, out, **{"search.max_iters": 2, "search.stage": "head"})
    assert search_script.main(["--cfg", cfg, "--neck-genotype", str(necks[0]), "--opts", *opts]) == 0
    assert load_genotype(os.path.join(out, "geno.json"))["neck"] == load_genotype(str(necks[0]))["neck"]
    saved = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert saved["search"]["neck_genotype"] == str(necks[0])
    with pytest.raises(FolderInUseError, match="search.neck_genotype"):
        search_script.main(["--cfg", cfg, "--neck-genotype", str(necks[1]), "--opts", *opts])
    # the same path with another neck written into it: refused by the neck the folder recorded
    # (the config's path alone would let it resume on the new neck)
    assert json.load(open(os.path.join(out, "neck_genotype.json"))) == {"neck": load_genotype(str(necks[0]))["neck"]}
    first_neck = necks[0].read_text()
    necks[0].write_text(necks[1].read_text())
    with pytest.raises(FolderInUseError, match=r"search.neck_genotype \(the neck in that file\)"):
        search_script.main(["--cfg", cfg, "--neck-genotype", str(necks[0]), "--opts", *opts])
    necks[0].write_text(first_neck)  # the neck it was searched on: resumed (here: found done)
    assert search_script.main(["--cfg", cfg, "--neck-genotype", str(necks[0]), "--opts", *opts]) == 0
    with pytest.raises(ConfigError, match="search.stage is 'both'"):
        search_script.main(["--cfg", cfg, "--opts", *tiny_opts(synthetic_root, str(tmp_path / "both")),
                            f"search.neck_genotype={necks[0]}"])
