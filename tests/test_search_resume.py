"""search.py killed with kill -9 and run again: the same genotype, architecture weights and model
as an uninterrupted search, for each search mode and for an ensemble of searches. Apart from
tests/test_search_run.py so that pytest-xdist (--dist loadfile) runs the two files' subprocess
searches on two workers."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from autofpn.engine.checkpoint import load_checkpoint  # noqa: E402
from autofpn.engine.logging import read_metrics  # noqa: E402
from autofpn.models.genotype import load_genotype  # noqa: E402
from test_search_run import synthetic_root, tiny_opts  # noqa: E402,F401  (synthetic_root: the fixture)


def _search_cmd(synthetic_root, out, mode="full"):
    return [sys.executable, "search.py", "--cfg", "configs/demo.yaml", "--opts",
            *tiny_opts(synthetic_root, out, **{"search.max_iters": 6, "search.epochs": 3, "train.checkpoint_period": 2,
                                               "search.mode": mode})]


def _kill9_at(cmd, env, target: str) -> None:
    """Start ``cmd`` and kill -9 it as soon as the file ``target`` (a checkpoint) exists."""
    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while not os.path.exists(target) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.exists(target), "the run ended before the checkpoint to kill at"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("mode", ["full", "gdas", "sampled_weights"])
def test_kill9_and_resume_gives_identical_genotype_and_alpha(tmp_path, synthetic_root, mode):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    result = subprocess.run(_search_cmd(synthetic_root, full, mode), cwd=str(REPO), env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    _kill9_at(_search_cmd(synthetic_root, killed, mode), env,
              os.path.join(killed, "head", "checkpoints", "ckpt_0000004.pth"))  # the head stage, mid-way
    assert not os.path.exists(os.path.join(killed, "geno.json"))
    result = subprocess.run(_search_cmd(synthetic_root, killed, mode), cwd=str(REPO), env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "search neck: already done" in result.stdout and "resumed from" in result.stdout
    # the times cover both stages and both processes: the neck's from its log, the head's with the
    # killed part
    times = json.loads(open(os.path.join(killed, "search_times.json")).read())
    head_time = [r for r in read_metrics(os.path.join(killed, "head", "metrics.jsonl")) if r["type"] == "time"][-1]
    assert set(times) == {"neck", "head"} and times["neck"] > 0
    assert times["head"] >= head_time["seconds"] > head_time["seconds_this_process"] > 0

    assert load_genotype(os.path.join(full, "geno.json")) == load_genotype(os.path.join(killed, "geno.json"))
    for stage, name in (("neck", "arch.alpha"), ("head", "arch.beta")):
        a = load_checkpoint(os.path.join(full, stage, "checkpoints", "ckpt_0000006.pth"))["model"]
        b = load_checkpoint(os.path.join(killed, stage, "checkpoints", "ckpt_0000006.pth"))["model"]
        assert torch.equal(a[name], b[name]), stage
        assert all(torch.equal(a[k], b[k]) for k in a), f"{stage}: weights differ after resume"


def _ensemble_cmd(synthetic_root, out, **extra):
    opts = {"search.stage": "neck", "search.max_iters": 6, "search.epochs": 3, "train.checkpoint_period": 2,
            "search.ensemble": 2, **extra}
    return [sys.executable, "search.py", "--cfg", "configs/demo.yaml", "--opts", *tiny_opts(synthetic_root, out, **opts)]


def test_ensemble_decodes_the_mean_of_lone_searches_and_resumes_after_kill9(tmp_path, synthetic_root):
    from autofpn.search.decode import decode_weights
    from autofpn.search.differentiable import final_weights
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full, killed, lone = str(tmp_path / "full"), str(tmp_path / "killed"), str(tmp_path / "lone_seed1")
    for cmd in (_ensemble_cmd(synthetic_root, full), _ensemble_cmd(synthetic_root, lone, **{"search.ensemble": 1,
                                                                                           "search.seed": 1})):
        result = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    # member seed 1 is exactly the search seed 1 runs alone; the two members differ
    ckpt = lambda d: load_checkpoint(os.path.join(d, "checkpoints", "ckpt_0000006.pth"))["model"]["arch.alpha"]  # noqa: E731
    assert torch.equal(ckpt(os.path.join(full, "neck", "seed_1")), ckpt(os.path.join(lone, "neck")))
    assert not torch.equal(ckpt(os.path.join(full, "neck", "seed_0")), ckpt(os.path.join(full, "neck", "seed_1")))
    # the stage is decoded from the mean of the members' final softmax weights
    members = [final_weights(os.path.join(full, "neck", f"seed_{s}"), "neck") for s in (0, 1)]
    assert torch.allclose(members[1], torch.softmax(ckpt(os.path.join(lone, "neck")), -1), atol=1e-6)
    expected = decode_weights(torch.stack(members).mean(0), None, rule="argmax")["neck"]
    assert load_genotype(os.path.join(full, "geno.json"))["neck"] == expected
    report = json.load(open(os.path.join(full, "neck", "ensemble.json")))
    assert report["seeds"] == [0, 1] and list(report["agreement"]) == ["seed_0 vs seed_1"]
    assert -1.0 <= report["mean_agreement"] <= 1.0 and len(report["member_decisiveness"]) == 2
    times = json.load(open(os.path.join(full, "search_times.json")))
    member_times = [[r for r in read_metrics(os.path.join(full, "neck", f"seed_{s}", "metrics.jsonl"))
                     if r["type"] == "time"][-1]["seconds"] for s in (0, 1)]
    assert times["neck"] == pytest.approx(sum(member_times))

    # kill -9 inside the second member: the rerun keeps the first, resumes the second, same result
    _kill9_at(_ensemble_cmd(synthetic_root, killed), env, os.path.join(killed, "neck", "seed_1", "checkpoints",
                                                                       "ckpt_0000004.pth"))
    assert not os.path.exists(os.path.join(killed, "neck", "genotype.json"))
    result = subprocess.run(_ensemble_cmd(synthetic_root, killed), cwd=str(REPO), env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "member seed 0 already done" in result.stdout and "resumed from" in result.stdout
    assert "decoded from the mean weights of 2 searches" in result.stdout
    assert load_genotype(os.path.join(killed, "geno.json")) == load_genotype(os.path.join(full, "geno.json"))
    for s in (0, 1):
        assert torch.equal(ckpt(os.path.join(killed, "neck", f"seed_{s}")), ckpt(os.path.join(full, "neck", f"seed_{s}")))
