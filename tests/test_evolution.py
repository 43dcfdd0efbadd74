"""search.strategy=evolution (regularized evolution): mutation, fitness on the training halves,
search -> train.py, kill -9 + resume to the same children, the folder guard, config errors."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_search_resume import _kill9_at  # noqa: E402
from test_search_run import tiny_opts  # noqa: E402

from autofpn.config import ConfigError, load_config  # noqa: E402
from autofpn.models.genotype import load_genotype, validate_genotype  # noqa: E402
from autofpn.search.differentiable import resource_lambda  # noqa: E402
from autofpn.search.evolution import breed, evolution_settings, mutate  # noqa: E402
from autofpn.search.random_sample import random_genotype  # noqa: E402

DEMO = str(REPO / "configs" / "demo.yaml")
# 4 candidates (2 random, 2 children), 2 training iterations each on half A (4 of the 9 training
# images), scored on half B (the other 5; the validation set has 6)
EVOLUTION = {"search.strategy": "evolution", "search.stage": "both", "search.evolution.population": 2,
             "search.evolution.sample_size": 2, "search.evolution.candidates": 4,
             "search.evolution.candidate_epochs": 1, "search.evolution.max_iters": 2,
             "train.precise_bn_batches": 1, "train.tensorboard": False,
             "data.synthetic.num_train": 9, "data.synthetic.num_val": 6}


def _genotype(index: int, parts) -> dict:
    g = random_genotype(7, index)
    return {**g, "neck": g["neck"] if "neck" in parts else None, "head": g["head"] if "head" in parts else None}


def _slots(genotype: dict) -> dict:
    """Every (part, layer/cell, source, target) -> op of a genotype ("none" left out)."""
    out = {}
    if genotype["neck"]:
        for k, links in enumerate(genotype["neck"]["layers"]):
            out.update({("neck", k, l["from"], l["to"]): l["op"] for l in links})
    if genotype["head"]:
        for m, edges in enumerate(genotype["head"]["cells"]):
            out.update({("head", m, e["input"], e["node"]): e["op"] for e in edges})
    return out


@pytest.mark.parametrize("parts", [("neck",), ("head",), ("neck", "head")])
def test_mutation_gives_a_valid_different_genotype_one_change_away(parts):
    changed_parts = set()
    for index in range(400):
        parent = _genotype(index, parts)
        before = json.dumps(parent, sort_keys=True)
        child, change = mutate(parent, random.Random(index), parts)
        assert json.dumps(parent, sort_keys=True) == before, "the parent was modified"
        validate_genotype(child)  # every level / node keeps an input
        assert child != parent, change
        a, b = _slots(parent), _slots(child)
        diff = {k for k in set(a) | set(b) if a.get(k) != b.get(k)}
        # one op changed / a link appeared or vanished (1 slot), or one link moved (2 slots, same target, same op)
        assert 1 <= len(diff) <= 2, (change, diff)
        if len(diff) == 2:
            (old, new) = sorted(diff, key=lambda k: k in b)
            assert old not in b and new not in a and old[:2] == new[:2] and old[3] == new[3], change
            assert a[old] == b[new], change
        changed_parts |= {k[0] for k in diff}
        # only the searched parts change; the others stay as they were (a kept neck included)
        for part in ("neck", "head"):
            if part not in parts:
                assert child[part] == parent[part]
        # a function of (parent, rng) only
        assert mutate(parent, random.Random(index), parts) == (child, change)
    assert changed_parts == set(parts)


def test_a_kept_neck_is_never_mutated_in_a_head_evolution():
    g = random_genotype(3, 0)  # a neck given to a head-only search
    for index in range(100):
        child, _ = mutate(g, random.Random(index), ("head",))
        assert child["neck"] == g["neck"] and child["head"] != g["head"]


def test_tournament_mutates_the_fittest_of_the_drawn_members_of_the_youngest_population():
    cfg = load_config(DEMO, ["search.evolution.population=3", "search.evolution.sample_size=3",
                             "search.evolution.candidates=9", "search.evolution.seed=5"])
    settings = evolution_settings(cfg)
    history = [{"index": i, "fitness": f, "genotype": _genotype(i, ("neck", "head"))}
               for i, f in enumerate([0.9, 0.1, 0.2, 0.3, 0.05])]
    # candidate 5: the population is candidates 2, 3, 4 (0, the fittest ever, has aged out)
    child, origin = breed(settings, 5, history, ("neck", "head"))
    assert sorted(origin["tournament"]) == [2, 3, 4] and origin["parent"] == 3
    assert child != history[3]["genotype"]
    assert breed(settings, 5, history, ("neck", "head")) == (child, origin)  # (seed, index, history) only


def test_normalized_cost_is_the_penalty_at_one_hot_weights():
    """C of a decoded genotype = the gradient search's expected cost at its one-hot weights =
    its exact decoded cost without the constants, each metric over the penalty's normaliser."""
    from autofpn.models.detector import build_detector
    from autofpn.search.cost import METRICS
    from autofpn.search.differentiable import search_resource_cost
    cfg = load_config(DEMO)
    supernet = build_detector(cfg, search=True)
    cost = search_resource_cost(cfg, supernet.neck, supernet.roi_heads.box_head)
    g = random_genotype(1, 2, cells=cfg["model"]["head"]["cells"])
    exact = cost.decoded_cost(g)
    neck = (torch.tensor(exact["neck"].as_list(), dtype=torch.float64)
            - torch.tensor(cost.neck_const.as_list(), dtype=torch.float64)) / cost.neck_norm
    used = [c for m, edges in enumerate(g["head"]["cells"]) for k, c in enumerate(cost.head_pre[m])
            if c is not None and k in {e["input"] for e in edges}]
    head_const = torch.tensor([sum(c.as_list()[i] for c in used) for i in range(len(METRICS))], dtype=torch.float64)
    head_const += torch.tensor(cost.head_const.as_list(), dtype=torch.float64)  # the fc readout
    head = (torch.tensor(exact["head"].as_list(), dtype=torch.float64) - head_const) / cost.head_norm
    assert cost.normalized_cost(g) == pytest.approx(float(neck.sum() + head.sum()), rel=1e-9)
    assert cost.normalized_cost({**g, "head": None}) == pytest.approx(float(neck.sum()), rel=1e-9)
    # more links and heavier ops, more cost
    levels = g["neck"]["levels"]
    dense = {"levels": levels, "layers": [[{"from": s, "to": t, "op": "sep_conv_5x5"} for t in levels
                                           for s in levels]] * 2}
    thin = {"levels": levels, "layers": [[{"from": t, "to": t, "op": "identity"} for t in levels]] * 2}
    assert cost.normalized_cost({**g, "head": None, "neck": dense}) > cost.normalized_cost({**g, "head": None,
                                                                                            "neck": thin})


# ------------------------------------------------------------------------------ config errors

@pytest.mark.parametrize("override, key", [
    ("search.evolution.sample_size=3", "search.evolution.sample_size"),  # population is 2
    ("search.evolution.candidates=1", "search.evolution.candidates"),
    ("search.evolution.population=0", "search.evolution.population"),
    ("search.evolution.candidate_epochs=1.5", "search.evolution.candidate_epochs"),
    ("search.evolution.popsize=4", "search.evolution.popsize"),
])
def test_a_bad_evolution_key_is_one_error_line_naming_it(tmp_path, override, key):
    out = str(tmp_path / "evo")
    opts = tiny_opts(str(tmp_path / "synthetic"), out, **EVOLUTION) + [override]
    result = subprocess.run([sys.executable, "search.py", "--cfg", DEMO, "--opts", *opts], cwd=str(REPO),
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and f"'{key}'" in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(out, "candidates")), "nothing may be trained"


def test_check_config_raises_config_error():
    from autofpn.search.evolution import check_config
    with pytest.raises(ConfigError, match="search.evolution.sample_size"):
        check_config(load_config(DEMO, ["search.evolution.population=2", "search.evolution.sample_size=3"]))


# ------------------------------------------------------------------------------ the tiny run

def _search_cmd(synthetic_root: str, out: str, **extra) -> list:
    return [sys.executable, "search.py", "--cfg", DEMO, "--opts",
            *tiny_opts(synthetic_root, out, **{**EVOLUTION, **extra})]


def _run(cmd, timeout=300):
    result = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True, timeout=timeout,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, synthetic_root):
    """(output folder, stdout) of an uninterrupted tiny evolution."""
    out = str(tmp_path_factory.mktemp("evolution") / "full")
    return out, _run(_search_cmd(synthetic_root, out)).stdout


def test_tiny_evolution_writes_candidates_history_and_the_fittest_genotype(finished):
    out, stdout = finished
    demo_lambda = resource_lambda(load_config(DEMO)["search"])  # "middle": 0.02
    history = json.load(open(os.path.join(out, "history.json")))
    assert [r["index"] for r in history] == [0, 1, 2, 3]
    assert [r["origin"] for r in history] == ["random", "random", "mutation", "mutation"]
    for r in history:
        cand = os.path.join(out, "candidates", f"{r['index']:04d}")
        assert load_genotype(os.path.join(cand, "genotype.json")) == r["genotype"]
        result = json.load(open(os.path.join(cand, "result.json")))
        assert result["iterations"] == 2 and result["seconds"] > 0
        assert result["fitness"] == pytest.approx(result["AP"] / 100 - result["lambda"] * result["cost"])
        assert 0 < result["cost"] <= 6 and result["lambda"] == pytest.approx(demo_lambda)  # the config's preset
        # the candidate was trained on half A (2 iterations of 2 images) and scored on half B, not data.val
        gt = json.load(open(os.path.join(cand, "train", "eval", "iter_0000002", "metrics.json")))
        assert gt["num_images"] == 5
        # cleaned: no checkpoint, no weights left
        assert not os.path.exists(os.path.join(cand, "train", "checkpoints"))
        assert not os.path.exists(os.path.join(cand, "train", "model_final.pth"))
        assert r["genotype"]["neck"] is not None and r["genotype"]["head"] is not None
    # each child is a mutation of the fittest of its tournament, drawn from the last 2 candidates
    for r in history[2:]:
        assert set(r["tournament"]) == {r["index"] - 2, r["index"] - 1}
        assert r["parent"] == max((history[i] for i in r["tournament"]), key=lambda h: h["fitness"])["index"]
        assert r["genotype"] != history[r["parent"]]["genotype"]
    best = max(history, key=lambda h: h["fitness"])
    geno = load_genotype(os.path.join(out, "geno.json"))
    assert (geno["neck"], geno["head"]) == (best["genotype"]["neck"], best["genotype"]["head"])
    assert os.path.getsize(os.path.join(out, "geno.png")) > 0
    lines = [l for l in stdout.splitlines() if l.startswith("evolution candidate")]
    assert len(lines) == 4 and "fitness" in lines[0] and "AP" in lines[0] and "cost" in lines[0]


def test_candidates_are_scored_on_training_half_b_without_flips(finished):
    """9 training images: half A (training) has 4, half B 5, the validation set 6; the scored
    images are half B's, seen without the training flip."""
    from torch.utils.data import Subset
    from autofpn.search.differentiable import search_halves
    from autofpn.search.evolution import unaugmented
    out, _ = finished
    for index in range(4):
        metrics = json.load(open(os.path.join(out, "candidates", f"{index:04d}", "train", "eval", "iter_0000002",
                                              "metrics.json")))
        assert metrics["num_images"] == 5
    cfg = load_config(os.path.join(out, "config.yaml"))
    half_a, half_b = search_halves(cfg)
    assert (len(half_a), len(half_b)) == (4, 5) and not set(half_a.indices) & set(half_b.indices)
    view = unaugmented(half_b)
    assert isinstance(view, Subset) and view.indices == half_b.indices and view.dataset.hflip_prob == 0.0
    assert half_b.dataset.hflip_prob > 0  # the training set itself keeps its flips
    assert all(torch.equal(view[i][0], view[i][0]) for i in range(len(view)))


def test_evolution_genotype_trains_with_train_py(finished, synthetic_root, tmp_path):
    out, _ = finished
    train_out = str(tmp_path / "retrain")
    _run([sys.executable, "train.py", "--cfg", DEMO, "--genotype", os.path.join(out, "geno.json"), "--opts",
          *tiny_opts(synthetic_root, out, **{"train.output_dir": train_out, "solver.max_iters": 2, "data.synthetic.num_train": 9,
                                             "data.synthetic.num_val": 6,
                                             "train.precise_bn_batches": 1})])
    from autofpn.engine.checkpoint import load_checkpoint
    final = load_checkpoint(os.path.join(train_out, "model_final.pth"))
    assert final["cfg"]["model"]["neck"]["type"] == "auto" and final["cfg"]["model"]["head"]["type"] == "auto"


def test_kill9_resumes_without_retraining_and_breeds_the_same_children(finished, synthetic_root, tmp_path):
    full, _ = finished
    killed = str(tmp_path / "killed")
    first_result = os.path.join(killed, "candidates", "0000", "result.json")
    # checkpoints every iteration, so the kill lands in candidate 1's training, after a checkpoint
    cmd = _search_cmd(synthetic_root, killed, **{"train.checkpoint_period": 1})
    _kill9_at(cmd, dict(os.environ, OMP_NUM_THREADS="1"),
              os.path.join(killed, "candidates", "0001", "train", "checkpoints", "ckpt_0000001.pth"))
    assert os.path.isfile(first_result) and not os.path.exists(os.path.join(killed, "geno.json"))
    assert not os.path.exists(os.path.join(killed, "candidates", "0001", "result.json"))
    mtime = os.stat(first_result).st_mtime_ns

    stdout = _run(cmd).stdout
    assert os.stat(first_result).st_mtime_ns == mtime, "a finished candidate was trained again"
    assert "resumed from" in stdout and "at iteration 1" in stdout  # candidate 1 continued from its checkpoint
    assert stdout.count("resumed from") == 1
    a = json.load(open(os.path.join(full, "history.json")))
    b = json.load(open(os.path.join(killed, "history.json")))
    assert [r["genotype"] for r in a] == [r["genotype"] for r in b]
    assert [(r.get("parent"), r.get("tournament"), r.get("mutation")) for r in a] == \
        [(r.get("parent"), r.get("tournament"), r.get("mutation")) for r in b]
    assert [r["AP"] for r in a] == pytest.approx([r["AP"] for r in b])  # the CPU resume is exact
    assert load_genotype(os.path.join(full, "geno.json")) == load_genotype(os.path.join(killed, "geno.json"))

    # a finished evolution run again trains nothing
    stdout = _run(cmd).stdout
    assert "resumed from" not in stdout and os.stat(first_result).st_mtime_ns == mtime


def test_a_folder_of_another_evolution_is_refused(finished, synthetic_root):
    full, _ = finished
    result = subprocess.run(_search_cmd(synthetic_root, full, **{"search.evolution.seed": 9}), cwd=str(REPO),
                            capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "search.evolution.seed" in lines[0] and "Traceback" not in result.stderr


def test_head_evolution_keeps_the_given_neck(tmp_path, synthetic_root):
    neck = random_genotype(11, 0)
    neck_path = tmp_path / "neck.json"
    neck_path.write_text(json.dumps(neck))
    out = str(tmp_path / "head")
    cmd = _search_cmd(synthetic_root, out, **{"search.stage": "head", "search.evolution.candidates": 3,
                                              "search.evolution.max_iters": 1})
    _run(cmd + ["--neck-genotype", str(neck_path)])
    history = json.load(open(os.path.join(out, "history.json")))
    assert all(r["genotype"]["neck"] == neck["neck"] and r["genotype"]["head"] is not None for r in history)
    # the same folder with another kept neck is refused: the config records the neck's file
    # (search.neck_genotype), the folder's neck_genotype.json its content (the same file rewritten)
    other = tmp_path / "other.json"
    other.write_text(json.dumps(random_genotype(12, 0)))
    result = subprocess.run(cmd + ["--neck-genotype", str(other)], cwd=str(REPO), capture_output=True, text=True,
                            timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2 and "search.neck_genotype" in result.stderr, result.stderr[-2000:]
    neck_path.write_text(json.dumps(random_genotype(12, 0)))
    result = subprocess.run(cmd + ["--neck-genotype", str(neck_path)], cwd=str(REPO), capture_output=True,
                            text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2 and "search.neck_genotype (the neck in that file)" in result.stderr, \
        result.stderr[-2000:]


def test_a_candidate_trains_on_the_retrain_schedule_scaled_to_its_epochs():
    """lr steps and warm-up shrink with the candidate's share of the retrain's epochs (the demo's
    50 warm-up iterations would outlast a one-epoch candidate); the model and lr stay the retrain's."""
    from autofpn.config import load_config
    from autofpn.search.evolution import candidate_config, evolution_settings
    cfg = load_config(os.path.join(REPO, "configs", "demo.yaml"),
                      ["search.evolution.candidate_epochs=1", "search.evolution.population=2",
                       "search.evolution.sample_size=2", "search.evolution.candidates=2"])
    settings = evolution_settings(cfg)
    c = candidate_config(cfg, _genotype(0, ("neck",)), settings, "/tmp/unused")
    assert c["solver"]["epochs"] == 1 and c["solver"]["lr"] == cfg["solver"]["lr"]
    assert c["solver"]["steps"] == [0.75]  # demo: step at epoch 3 of 4
    assert c["solver"]["warmup_iters"] == 12  # demo: 50 of 4 epochs -> 12.5, rounded to even
    assert c["model"]["neck"]["type"] == "auto" and c["model"]["head"]["type"] == "mlp"


# ------------------------------------------------------------------------- rounds, --jobs, --shard

def test_rounds_cover_every_candidate_once_the_initial_population_first():
    from autofpn.search.evolution import candidate_round, rounds
    cfg = load_config(DEMO, ["search.evolution.population=3", "search.evolution.sample_size=2",
                             "search.evolution.candidates=10", "search.evolution.round_size=3"])
    settings = evolution_settings(cfg)
    assert [list(r) for r in rounds(settings)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert all(index in candidate_round(settings, index) for index in range(10))
    one = evolution_settings(load_config(DEMO, ["search.evolution.population=3", "search.evolution.sample_size=2",
                                                 "search.evolution.candidates=5"]))
    assert [list(r) for r in rounds(one)] == [[0, 1, 2], [3], [4]]  # round_size 1: one child at a time


def test_a_round_is_bred_from_the_population_before_it():
    """Children of one round never see each other: their tournaments draw from the `population`
    candidates before the round, so they can train at once; with round_size 1 that is the
    `population` candidates before each child (plain aging evolution)."""
    cfg = load_config(DEMO, ["search.evolution.population=3", "search.evolution.sample_size=3",
                             "search.evolution.candidates=9", "search.evolution.round_size=3"])
    settings = evolution_settings(cfg)
    history = [{"index": i, "fitness": float(i % 4), "genotype": _genotype(i, ("neck", "head"))} for i in range(9)]
    for index in (3, 4, 5):
        _, origin = breed(settings, index, history[:3], ("neck", "head"))
        assert sorted(origin["tournament"]) == [0, 1, 2] and origin["parent"] == 2
    for index in (6, 7, 8):  # the records of round 3-5 exist, of 6-8 not yet: the full history changes nothing
        assert breed(settings, index, history[:6], ("neck", "head")) == breed(settings, index, history, ("neck", "head"))
        assert sorted(breed(settings, index, history, ("neck", "head"))[1]["tournament"]) == [3, 4, 5]
    sequential = evolution_settings(load_config(DEMO, ["search.evolution.population=3", "search.evolution.sample_size=3",
                                                       "search.evolution.candidates=9"]))
    assert sorted(breed(sequential, 5, history[:5], ("neck", "head"))[1]["tournament"]) == [2, 3, 4]


def _history(out: str) -> list:
    return json.load(open(os.path.join(out, "history.json")))


def _popen(cmd, log: Path):
    """Start ``cmd`` with its output in ``log`` (pipes could fill and block a shard that the other waits for)."""
    return subprocess.Popen(cmd, cwd=str(REPO), stdout=open(log, "w"), stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_jobs_and_shards_train_each_candidate_once_and_find_what_one_process_finds(synthetic_root, tmp_path):
    """The same evolution (rounds of 2 children) run in one process, with --jobs 2 (worker
    subprocesses, a log per candidate) and as two shards started at once on one folder: the same
    candidates, tournaments, scores and genotype; every candidate trained exactly once."""
    rounds2 = {"search.evolution.round_size": 2}
    alone = str(tmp_path / "alone")
    _run(_search_cmd(synthetic_root, alone, **rounds2))
    reference = _history(alone)
    assert [r["origin"] for r in reference] == ["random", "random", "mutation", "mutation"]
    assert sorted(reference[2]["tournament"]) == sorted(reference[3]["tournament"]) == [0, 1]

    jobs = str(tmp_path / "jobs")
    stdout = _run(_search_cmd(synthetic_root, jobs, **rounds2) + ["--jobs", "2"]).stdout
    assert "2 at a time" in stdout
    sharded = str(tmp_path / "shards")
    logs = [tmp_path / f"shard_{i}.log" for i in range(2)]
    processes = [_popen(_search_cmd(synthetic_root, sharded, **rounds2) + ["--shard", f"{i}/2"], logs[i])
                 for i in range(2)]
    codes = [p.wait(timeout=300) for p in processes]
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], [out[-2000:] for out in outputs]

    for out in (jobs, sharded):
        history = _history(out)
        assert [(r["genotype"], r.get("tournament"), r.get("parent")) for r in history] == \
            [(r["genotype"], r.get("tournament"), r.get("parent")) for r in reference]
        assert [r["AP"] for r in history] == pytest.approx([r["AP"] for r in reference])
        assert load_genotype(os.path.join(out, "geno.json")) == load_genotype(os.path.join(alone, "geno.json"))
        for r in history:  # trained once: 2 iterations logged, not 4
            metrics = os.path.join(out, "candidates", f"{r['index']:04d}", "train", "metrics.jsonl")
            iterations = [r["iter"] for r in map(json.loads, open(metrics)) if r["type"] == "train"]
            assert iterations == [1, 2], (out, r["index"], iterations)
    for index in range(4):  # the workers' output went to the candidates' logs
        assert os.path.getsize(os.path.join(jobs, "candidates", f"{index:04d}", "log.txt")) > 0
    # each shard trained its own candidates (index modulo 2) and waited for the other's
    for shard, output in enumerate(outputs):
        assert output.count("evolution candidate") == 4


def test_jobs_are_refused_for_a_strategy_that_trains_one_supernet(synthetic_root, tmp_path):
    result = subprocess.run([sys.executable, "search.py", "--cfg", DEMO, "--jobs", "2", "--opts",
                             *tiny_opts(synthetic_root, str(tmp_path / "x"))], cwd=str(REPO), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "--jobs" in lines[0] and "evolution" in lines[0]
    result = subprocess.run([sys.executable, "search.py", "--cfg", DEMO, "--shard", "2/2"], cwd=str(REPO),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "I must be in 0..N-1" in result.stderr
