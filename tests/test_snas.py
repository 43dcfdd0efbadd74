"""search.strategy=snas (Xie et al. 2019): the soft Gumbel-softmax relaxation gives alpha / beta a
gradient through the sample, the exponential temperature schedule, seeded noise, two processes
keep alpha identical, search.py -> geno.json -> train.py, and the config check."""
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_search_run import _searcher, tiny_opts  # noqa: E402

import search as search_script  # noqa: E402
from autofpn.config import ConfigError, load_config  # noqa: E402
from autofpn.engine.checkpoint import load_checkpoint  # noqa: E402
from autofpn.engine.logging import read_metrics  # noqa: E402
from autofpn.models.genotype import load_genotype  # noqa: E402
from autofpn.search import get_strategy  # noqa: E402
from autofpn.search.snas import SNASSearcher, check_config, snas_tau  # noqa: E402

DEMO = str(REPO / "configs" / "demo.yaml")
SNAS = {"search.strategy": "snas", "search.tau": "[1.0,0.03]", "train.tensorboard": False}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def _arch_step_gradient(searcher, images, targets):
    """The gradient the architecture step hands to Adam (captured by a hook on the parameter)."""
    param = searcher.arch_params[0]
    captured = []
    hook = param.register_hook(lambda g: captured.append(g.detach().clone()))
    searcher.arch_step(images, targets)
    hook.remove()
    assert len(captured) == 1
    return captured[0]


@pytest.mark.parametrize("stage", ["neck", "head"])
def test_the_architecture_step_differentiates_through_the_soft_sample(tmp_path, synthetic_root, stage):
    """(a) One SNAS architecture step of a tiny supernet: alpha (neck) / beta (head) get a finite,
    non-zero gradient that is not the deterministic softmax search's (same supernet, same
    batch): the noise is used; every op ran, each weighted by a strictly positive sample."""
    cfg = load_config(DEMO, tiny_opts(synthetic_root, str(tmp_path), **SNAS))
    snas, _, loader_b = _searcher(cfg, stage, str(tmp_path), SNASSearcher)
    plain, _, _ = _searcher(load_config(DEMO, tiny_opts(synthetic_root, str(tmp_path))), stage, str(tmp_path))
    assert torch.equal(snas.arch_params[0], plain.arch_params[0])
    images, targets = next(iter(loader_b))

    drawn = []
    forward_weights = snas.model.arch.forward_weights
    snas.model.arch.forward_weights = lambda: drawn.append(forward_weights()) or drawn[-1]
    start = snas.arch_params[0].detach().clone()
    g_snas = _arch_step_gradient(snas, images, targets)
    g_plain = _arch_step_gradient(plain, images, targets)

    assert torch.isfinite(g_snas).all() and g_snas.abs().sum() > 0
    assert not torch.allclose(g_snas, g_plain, rtol=1e-3, atol=1e-7), "the SNAS gradient is the softmax search's"
    assert not torch.equal(snas.arch_params[0].detach(), start), "the architecture step did not move"
    # one soft sample of this stage's weights for the step's forward: every entry > 0, rows sum to 1
    weights = [w for w in drawn[0] if w is not None]
    assert len(drawn) == 1 and len(weights) == 1
    z = weights[0].detach()
    assert (z > 0).all() and torch.allclose(z.sum(-1), torch.ones(z.shape[:-1]))
    assert not torch.allclose(z, torch.softmax(start, -1), atol=1e-3)
    mixed = snas.model.neck if stage == "neck" else snas.model.roi_heads.box_head
    assert not any(getattr(m, "sampled", False) for m in mixed.modules()), "the supernet skips ops"


def test_temperature_anneals_exponentially_from_the_first_to_the_last_iteration(tmp_path, synthetic_root):
    """(b) tau(i) = start x (end / start) ^ (i / (max_iter - 1)), and the step's sample uses it."""
    cfg = load_config(DEMO, tiny_opts(synthetic_root, str(tmp_path), **SNAS))
    searcher, _, _ = _searcher(cfg, "neck", str(tmp_path), SNASSearcher)
    searcher.max_iter = 101
    for i, expected in ((0, 1.0), (50, math.sqrt(0.03)), (25, 0.03 ** 0.25), (100, 0.03)):
        searcher.iter = i
        assert searcher.tau() == pytest.approx(expected, rel=1e-12), i
        assert snas_tau(1.0, 0.03, i, 101) == pytest.approx(1.0 * (0.03 / 1.0) ** (i / 100), rel=1e-12)
        with searcher.path("arch"):
            assert searcher.model.arch._sampling == (pytest.approx(expected, rel=1e-12),
                                                     searcher.sample_seed("arch"), False)
    # a constant factor per iteration: geometric, not linear
    taus = [snas_tau(2.0, 0.5, i, 11) for i in range(11)]
    ratios = [b / a for a, b in zip(taus, taus[1:])]
    assert ratios == pytest.approx([0.25 ** 0.1] * 10) and taus[5] == pytest.approx(1.0)
    assert snas_tau(2.0, 0.5, 0, 1) == 2.0  # a one-iteration stage stays at the start


def test_the_sample_is_seeded_by_iteration_and_step_and_uses_the_log_probabilities(tmp_path, synthetic_root):
    """(c) Same seed and iteration -> the same soft sample; another iteration or step -> another;
    the sample is softmax((log softmax(alpha) + g) / tau) with g from the seed's generator."""
    cfg = load_config(DEMO, tiny_opts(synthetic_root, str(tmp_path), **SNAS))
    searcher, _, _ = _searcher(cfg, "neck", str(tmp_path), SNASSearcher)
    arch = searcher.model.arch

    def sample(iteration, step):
        searcher.iter = iteration
        with searcher.path(step):
            return arch.forward_weights()[0].detach()

    first = sample(3, "arch")
    assert torch.equal(first, sample(3, "arch"))
    assert not torch.equal(first, sample(4, "arch")) and not torch.equal(first, sample(3, "weight"))
    # a second searcher of the same config (another process, a resumed run) draws the same
    other, _, _ = _searcher(cfg, "neck", str(tmp_path), SNASSearcher)
    other.iter = 3
    with other.path("arch"):
        assert torch.equal(other.model.arch.forward_weights()[0].detach(), first)
    # the formula, with the noise drawn here from the seed
    searcher.iter = 3
    u = torch.rand(arch.alpha.shape, generator=torch.Generator().manual_seed(searcher.sample_seed("arch")),
                   dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    g = -torch.log(-torch.log(u))
    expected = torch.softmax((torch.log_softmax(arch.alpha.detach().double(), -1) + g) / searcher.tau(), -1)
    torch.testing.assert_close(first.double(), expected, rtol=1e-5, atol=1e-6)
    # soft, not one-hot: at tau 1.0 (iteration 0) every link mixes several ops
    at_start = sample(0, "arch")
    assert ((at_start > 1e-3).sum(-1) > 1).all(), at_start


def test_two_processes_keep_alpha_identical_under_snas(tmp_path, synthetic_root):
    """(d) torchrun, 2 CPU processes (gloo): after every step alpha and the weights are identical
    on both ranks, each rank drew the same soft samples, and the samples change step to step."""
    out = str(tmp_path / "dist")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         str(REPO / "tests" / "search_rank_check.py"), DEMO, str(tmp_path / "report.json"),
         *tiny_opts(synthetic_root, out, **SNAS, **{"search.max_iters": 4, "search.epochs": 4})],
        cwd=str(REPO), capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.load(open(tmp_path / "report.json"))
    assert report["steps"] == 4 and report["arch_steps"] == 3
    assert report["identical_after_every_step"] is True and report["alpha_moved"] is True
    assert report["sampled_paths"] == 7  # 4 weight + 3 architecture steps, each on its own sample
    assert report["same_paths_on_every_rank"] is True and report["paths_differ_between_steps"] is True


def test_snas_search_writes_a_genotype_that_train_py_trains(tmp_path, synthetic_root):
    """(e) search.py with search.strategy=snas: both stages, geno.json, heat maps, the logged
    temperature on its schedule, softmax(alpha) in the trajectory; train.py trains the genotype."""
    out = str(tmp_path / "search")
    assert search_script.main(["--cfg", DEMO, "--opts",
                               *tiny_opts(synthetic_root, out, **SNAS, **{"search.max_iters": 3})]) == 0
    for name in ("geno.json", "geno.png", "arch_heatmap_neck.png", "arch_heatmap_head.png", "config.yaml",
                 "neck/genotype.json", "head/genotype.json", "neck/checkpoints/ckpt_0000003.pth"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    geno = load_genotype(os.path.join(out, "geno.json"))
    assert geno["neck"] is not None and geno["head"] is not None and "snas" in geno["description"]
    for stage, key in (("neck", "alpha"), ("head", "beta")):
        records = read_metrics(os.path.join(out, stage, "metrics.jsonl"))
        taus = [r["tau"] for r in records if r["type"] == "search"]
        # the temperature of iterations 0, 1, 2 of max_iter 3: 1.0 -> 0.03 exponentially
        assert taus == pytest.approx([1.0, 0.03 ** 0.5, 0.03]), (stage, taus)
        final = load_checkpoint(os.path.join(out, stage, "checkpoints", "ckpt_0000003.pth"))["model"][f"arch.{key}"]
        trajectory = read_metrics(os.path.join(out, stage, "arch_trajectory.jsonl"))
        torch.testing.assert_close(torch.tensor(trajectory[-1][key]), torch.softmax(final, -1))

    train_out = str(tmp_path / "retrain")
    result = subprocess.run([sys.executable, "train.py", "--cfg", DEMO, "--genotype", os.path.join(out, "geno.json"),
                             "--opts", *tiny_opts(synthetic_root, out, **{"train.output_dir": train_out,
                                                                         "solver.max_iters": 2,
                                                                         "train.tensorboard": False})],
                            cwd=str(REPO), capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    final = load_checkpoint(os.path.join(train_out, "model_final.pth"))
    assert final["genotype"] == geno
    assert os.path.isfile(os.path.join(train_out, "checkpoints", "ckpt_0000002.pth"))  # 2 training iterations


def test_a_resumed_snas_stage_redraws_the_same_samples(tmp_path, synthetic_root, capsys):
    """A neck stage resumed from its iteration-2 checkpoint ends with the alpha and weights of the
    uninterrupted run: the soft samples come from (seed, stage, iteration, step), not from RNG
    state that a restart would lose."""
    import shutil
    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    opts = lambda out: ["--cfg", DEMO, "--opts", *tiny_opts(  # noqa: E731
        synthetic_root, out, **SNAS, **{"search.stage": "neck", "search.max_iters": 4, "search.epochs": 2,
                                        "train.checkpoint_period": 2})]
    assert search_script.main(opts(full)) == 0
    shutil.copytree(full, resumed)
    for name in ("geno.json", "neck/genotype.json", "neck/checkpoints/ckpt_0000004.pth"):
        os.remove(os.path.join(resumed, name))
    capsys.readouterr()
    assert search_script.main(opts(resumed)) == 0
    printed = capsys.readouterr().out
    assert "resumed from" in printed and "ckpt_0000002.pth at iteration 2" in printed, printed[-2000:]
    a = load_checkpoint(os.path.join(full, "neck", "checkpoints", "ckpt_0000004.pth"))["model"]
    b = load_checkpoint(os.path.join(resumed, "neck", "checkpoints", "ckpt_0000004.pth"))["model"]
    assert not torch.equal(a["arch.alpha"], load_checkpoint(os.path.join(
        full, "neck", "checkpoints", "ckpt_0000002.pth"))["model"]["arch.alpha"]), "alpha did not move after 2"
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed stage differs"
    assert load_genotype(os.path.join(full, "geno.json")) == load_genotype(os.path.join(resumed, "geno.json"))


def test_snas_is_registered_and_refuses_a_sampled_mode():
    assert get_strategy("snas").run_search is not None
    check_config(load_config(None, ["search.strategy=snas"]))
    with pytest.raises(ConfigError, match="search.mode"):
        check_config(load_config(None, ["search.strategy=snas", "search.mode=gdas"]))
