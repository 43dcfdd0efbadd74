"""python -m autofpn.study at tiny sizes: the table, JSON and plot; a rerun trains nothing; a study
killed with kill -9 in the middle of a unit ends, once rerun, with the numbers (and weights) of
one that was not interrupted; random genotypes are valid, reproducible and distinct; shards."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import yaml

from autofpn.config import ConfigError, load_config
from autofpn.models.detector import build_detector
from autofpn.models.genotype import load_genotype, validate_genotype
from autofpn.search.differentiable import supernet_cost_tables
from autofpn.search.random_sample import (NECK_CONV_OPS, identity_neck_with_convs, random_genotype,
                                          random_genotype_within, random_genotypes, random_genotypes_within)
from autofpn.study import (SearchVariant, StudyError, budget_random_cost, check_study_config, format_report,
                           make_units, plan_entries, shard_units, verdict)

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")


def tiny_opts(synthetic_root: str) -> list:
    """4 training iterations per epoch at 128 px (8 images, 2 per batch), a checkpoint every
    iteration, a 2-epoch search."""
    opts = {
        "train.device": "cpu", "train.log_period": 1, "train.checkpoint_period": 1, "train.eval_period": 0,
        "data.synthetic.root": synthetic_root, "data.synthetic.num_train": 8, "data.synthetic.num_val": 4,
        "data.synthetic.image_size": 128, "data.images_per_batch": 2, "data.num_workers": 0,
        "model.transform.min_size": "[96,128]", "model.transform.max_size": 160,
        "model.transform.test_min_size": 128, "model.neck.channels": 8, "model.head.mlp_dim": 32,
        "model.head.channels": 8, "model.rpn.pre_nms_top_n_train": 100, "model.rpn.post_nms_top_n_train": 50,
        "model.rpn.pre_nms_top_n_test": 50, "model.rpn.post_nms_top_n_test": 30,
        "model.rpn.batch_size_per_image": 32, "model.roi.batch_size_per_image": 16,
        "model.roi.detections_per_img": 20, "search.epochs": 2, "search.max_iters": 0,
        "search.arch_start_epoch_fraction": 0.25, "solver.epochs": 2, "solver.warmup_iters": 1,
        "solver.steps": "[1]",
    }
    return [f"{k}={v}" for k, v in opts.items()]


def study_cmd(out, synthetic_root, *extra):
    return [sys.executable, "-m", "autofpn.study", "--cfg", DEMO, "--out", str(out), "--seeds", "1",
            "--baselines", "fpn", *extra, "--opts", *tiny_opts(synthetic_root)]


def run_study(out, synthetic_root, *extra):
    result = subprocess.run(study_cmd(out, synthetic_root, *extra), cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, synthetic_root):
    """FPN, 2 random architectures, 1 searched (middle lambda), 1 seed, run to the end."""
    out = tmp_path_factory.mktemp("study") / "tiny"
    stdout = run_study(out, synthetic_root, "--random", "2", "--lambdas", "middle")
    return out, stdout


def test_random_genotypes_valid_reproducible_distinct():
    drawn = random_genotypes(20, seed=3)
    for g in drawn:
        validate_genotype(g)  # every level and every head node has an input
        assert len(g["neck"]["layers"]) == 2 and len(g["head"]["cells"]) == 2
    assert drawn == random_genotypes(20, seed=3)
    assert drawn[:5] == random_genotypes(5, seed=3)  # the i-th draw does not depend on the count
    keys = {json.dumps([g["neck"], g["head"]]) for g in drawn}
    assert len(keys) == 20
    assert random_genotypes(5, seed=4) != drawn[:5]
    ops = {link["op"] for g in drawn for layer in g["neck"]["layers"] for link in layer}
    assert {"identity", "sep_conv_3x3", "dil_conv_5x5_r3"} <= ops  # the whole table is drawn
    # "none" is drawn too: some links are missing (16 links per layer on 4 levels)
    assert any(len(layer) < 16 for g in drawn for layer in g["neck"]["layers"])
    other = random_genotype(0, 0, levels=(3, 4, 5, 6, 7), layers=3, cells=1)
    assert other["neck"]["levels"] == [3, 4, 5, 6, 7] and len(other["neck"]["layers"]) == 3


def test_random_genotypes_within_a_budget_are_uniform_over_it():
    """On a space small enough to enumerate (one layer over levels 2 and 3: 4 links, no head) with
    a toy cost (the number of convolutions, at most 1), the walk's draws follow the uniform
    distribution over the valid genotypes within the budget: 9 without a convolution, 144 with
    one (36 per link); a walk too short to leave its start would give the identity neck."""
    import itertools
    from autofpn.models.operations import NECK_OPS
    convs = lambda g: sum(link["op"] not in ("none", "identity") for layer in g["neck"]["layers"]  # noqa: E731
                          for link in layer)
    links = [(s, t) for t in (2, 3) for s in (2, 3)]
    states = [ops for ops in itertools.product(NECK_OPS, repeat=4)
              if all(any(op != "none" for (s, t), op in zip(links, ops) if t == target) for target in (2, 3))
              and sum(op not in ("none", "identity") for op in ops) <= 1]
    assert len(states) == 153
    draws = [random_genotype_within(0, i, convs, 1, levels=(2, 3), layers=1, cells=0) for i in range(1500)]
    assert all(convs(g) <= 1 and g["head"] is None for g in draws)
    counts = {}
    for g in draws:
        validate_genotype(g)
        conv_link = [(link["from"], link["to"]) for link in g["neck"]["layers"][0]
                     if link["op"] not in ("none", "identity")]
        counts[tuple(conv_link)] = counts.get(tuple(conv_link), 0) + 1
    for key, p in [((), 9 / 153)] + [(((s, t),), 36 / 153) for s, t in links]:
        sd = (1500 * p * (1 - p)) ** 0.5
        assert abs(counts.get(key, 0) - 1500 * p) < 5 * sd, (key, counts, 1500 * p)
    assert random_genotype_within(0, 7, convs, 1, levels=(2, 3), layers=1, cells=0) == draws[7]  # (seed, index)
    with pytest.raises(ValueError, match="below the cheapest"):
        random_genotype_within(0, 0, lambda g: 1.0 + convs(g), 0.5, levels=(2, 3), layers=1, cells=0)


def test_budget_random_entries_cost_no_more_than_the_budget(tmp_path):
    """--budget-random N --budget-of G: neck + head genotypes within the FLOPs of G (the search
    penalty's tables), reproducible, trained as full Auto-FPNs; a budget that is not a neck +
    head genotype, or no such file, is one clear error."""
    cfg = load_config(DEMO)
    reference = tmp_path / "ref.json"  # a cheap genotype: the identity neck with a 3-edge head
    cells = cfg["model"]["head"]["cells"]
    reference.write_text(json.dumps({**random_genotype(0, 0, cells=cells), "neck": {
        "levels": [2, 3, 4, 5], "layers": [[{"from": t, "to": t, "op": "identity"} for t in (2, 3, 4, 5)]] * 2},
        "head": {"cells": [[{"node": n, "input": 0, "op": "sep_conv_3x3" if n < 5 else "identity"}
                            for n in range(2, 6)]] * cells}}))
    flops, budget = budget_random_cost(cfg, [str(reference)])
    assert budget == flops(json.loads(reference.read_text()))
    assert budget < min(flops(random_genotype(0, i, cells=cells)) for i in range(20))  # out of uniform reach
    entries = plan_entries(str(tmp_path / "study"), ["fpn"], 1, [], 0, cfg, budget_random=3,
                           budget_of=[str(reference)])
    drawn = [e for e in entries if e.kind == "budget_random"]
    assert [e.name for e in drawn] == ["budget_random_00", "budget_random_01", "budget_random_02"]
    genotypes = [json.loads(Path(e.genotype_path).read_text()) for e in drawn]
    for entry, genotype in zip(drawn, genotypes):
        validate_genotype(genotype)
        assert entry.train_args()[:4] == ["--neck", "auto", "--head", "auto"]
        assert flops(genotype) <= budget and len(genotype["head"]["cells"]) == cells
    assert len({json.dumps([g["neck"], g["head"]]) for g in genotypes}) == 3
    again = plan_entries(str(tmp_path / "study"), [], 0, [], 0, cfg, budget_random=2, budget_of=[str(reference)])
    assert [json.loads(Path(e.genotype_path).read_text()) for e in again] == genotypes[:2]
    with pytest.raises(StudyError, match="no such genotype"):
        plan_entries(str(tmp_path / "x"), [], 0, [], 0, cfg, budget_random=1, budget_of=[str(tmp_path / "no.json")])
    with pytest.raises(StudyError, match="no head"):
        plan_entries(str(tmp_path / "x"), [], 0, [], 0, cfg, budget_random=1,
                     budget_of=[str(REPO / "configs/genotypes/fpn.json")])


def test_the_committed_studys_budget_draws_are_drawn_again_identically():
    """docs/study/demo_head_cs3_fc drew its random architectures within the searches' FLOPs before
    the cost tables counted the fc readout (a constant): the draws, whose stream is keyed by the
    budget, must come out the same, or the folder could not be resumed or collected."""
    folder = REPO / "docs" / "study" / "demo_head_cs3_fc"
    if not (folder / "genotypes" / "budget_random_00.json").is_file():
        pytest.skip("the study folder is not in this checkout")
    opts = json.loads((folder / "study_config.json").read_text())["opts"]
    cfg = load_config(DEMO, opts)
    searches = [str(folder / "searches" / s / "geno.json") for s in ("middle", "seed1/middle", "seed2/middle")]
    flops, budget = budget_random_cost(cfg, searches)
    tables = supernet_cost_tables(cfg)
    cost = tables.decoded_cost(load_genotype(searches[0]))
    assert flops(load_genotype(searches[0])) == cost["neck"].flops + cost["head"].flops - tables.head_const.flops
    stored = sorted((folder / "genotypes").glob("budget_random_*.json"))
    drawn = random_genotypes_within(len(stored), flops, budget, 0, cfg["model"]["neck"]["levels"],
                                    cfg["model"]["neck"]["layers"], cfg["model"]["head"]["cells"])
    assert drawn == [json.loads(p.read_text()) for p in stored]


def test_verdict_ranks_the_searches_against_each_pool_of_random_architectures():
    def entry(name, kind, ap):
        return {"name": name, "kind": kind, "runs": [{"seed": 0, "metrics": {"AP": ap}}], "mean": {"AP": ap},
                "std": {"AP": None}, "params": None, "flops": None, "flops_parts": None, "failed_seeds": [],
                "search_seconds": None}
    study = {"entries": [entry("random_00", "random", 20.0), entry("random_01", "random", 24.0),
                         entry("budget_random_00", "budget_random", 15.0),
                         entry("budget_random_01", "budget_random", 19.0),
                         entry("budget_random_02", "budget_random", 22.0), entry("searched_middle", "searched", 21.0)]}
    v = verdict(study)
    assert v["random_AP"]["best"] == 24.0 and v["budget_random_AP"]["median"] == 19.0
    s = v["searched"]["searched_middle"]
    assert (s["rank_among_random"], s["random_beaten"]) == (2, 1)
    assert (s["rank_among_budget_random"], s["budget_random_beaten"]) == (2, 2)
    study.update(config="c.yaml", seeds=[0], jobs=1, threads_per_unit=1, machine="m", verdict=v)
    report = format_report(study)
    assert "- Random architectures within the budget (3): mean AP 18.67" in report
    assert ("rank 2 of 3 against the random architectures (better than 1 of 2); rank 2 of 4 against the random "
            "architectures within the budget (better than 2 of 3).") in report


def test_verdict_ranks_on_the_seeds_both_finished():
    """A random architecture given more seeds (--only) is ranked against a searched entry on the
    searched entry's seeds, and enters the random pool's summary on the pool's shared seeds: its
    runs of the other seeds are not part of either."""
    def entry(name, kind, aps):
        mean = sum(aps.values()) / len(aps)
        return {"name": name, "kind": kind, "runs": [{"seed": s, "metrics": {"AP": ap}} for s, ap in aps.items()],
                "mean": {"AP": mean}, "std": {"AP": None}, "params": None, "flops": None, "flops_parts": None,
                "failed_seeds": [], "search_seconds": None}
    lucky = entry("random_00", "random", {0: 23.0, 1: 22.0, 2: 22.0, 3: 16.0, 4: 17.0})  # 20.0 over all five
    study = {"entries": [lucky, entry("random_01", "random", {0: 15.0}),
                         entry("searched_middle", "searched", {0: 21.0, 1: 21.0, 2: 21.0})]}
    v = verdict(study)
    s = v["searched"]["searched_middle"]
    assert (s["rank_among_random"], s["random_beaten"]) == (2, 1)  # 21 < 22.33 on seeds 0-2
    # the pool's summary on the seed both random entries finished (0): 23 and 15, not 20 and 15
    assert (v["random_AP"]["best"], v["random_AP"]["median"]) == (23.0, 19.0)
    study["entries"][2]["runs"] += [{"seed": 3, "metrics": {"AP": 21.0}}, {"seed": 4, "metrics": {"AP": 21.0}}]
    assert verdict(study)["searched"]["searched_middle"]["rank_among_random"] == 1  # 21 > 20 on seeds 0-4


def test_random_genotype_builds_a_detector():
    cfg = load_config(DEMO, ["model.neck.type=auto", "model.head.type=auto"])
    model = build_detector(cfg, random_genotype(0, 1, cells=cfg["model"]["head"]["cells"]))
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 96, 128)])
    assert out[0]["boxes"].shape[1] == 4


def test_tiny_study_writes_table_json_plot(finished_study):
    out, stdout = finished_study
    study = json.loads((out / "study.json").read_text())
    assert [e["name"] for e in study["entries"]] == ["fpn", "random_00", "random_01", "searched_middle"]
    assert [e["kind"] for e in study["entries"]] == ["baseline", "random", "random", "searched"]
    assert study["seeds"] == [0]
    for e in study["entries"]:
        assert len(e["runs"]) == 1 and e["runs"][0]["seed"] == 0, e["name"]
        assert set(e["params"]) == {"neck", "head", "total"} and e["params"]["neck"] > 0
        assert e["flops"] > 0 and e["runs"][0]["train_seconds"] > 0
        assert e["mean"]["AP"] == e["runs"][0]["metrics"]["AP"]
        assert e["genotype"] is None if e["name"] == "fpn" else e["genotype"]["version"] == 1
    searched = study["entries"][-1]
    assert searched["search_seconds"] > 0
    assert searched["genotype"] == json.loads((out / "searches" / "middle" / "geno.json").read_text())
    v = study["verdict"]["searched"]["searched_middle"]
    assert v["AP_minus_fpn"] == pytest.approx(searched["mean"]["AP"] - study["entries"][0]["mean"]["AP"])
    assert 1 <= v["rank_among_random"] <= 3
    table = (out / "study.md").read_text()
    assert "| fpn | baseline |" in table and "## Verdict" in table and "searched_middle" in table
    assert (out / "pareto.png").stat().st_size > 5000
    # the searches borrow the fpn run's backbone (the demo config has no pretrained one)
    assert (out / "searches" / "backbone.pth").is_file()
    assert not (out / "units" / "fpn" / "seed_0" / "run" / "checkpoints").exists()  # cleaned once done
    assert (out / "units" / "fpn" / "seed_0" / "run" / "model_final.pth").is_file()


def test_verdict_pairs_the_searched_runs_with_fpn_by_training_seed():
    """Seed 2 of the search has no FPN run and FPN's seed 3 no searched run: the paired
    difference is over seeds 0 and 1 only; the unpaired one over every run."""
    def entry(name, kind, aps):
        runs = [{"seed": s, "metrics": {"AP": ap}} for s, ap in aps.items()]
        mean = sum(aps.values()) / len(aps)
        std = (sum((a - mean) ** 2 for a in aps.values()) / (len(aps) - 1)) ** 0.5
        return {"name": name, "kind": kind, "runs": runs, "mean": {"AP": mean}, "std": {"AP": std},
                "params": None, "flops": None, "flops_parts": None, "failed_seeds": [], "search_seconds": None}
    study = {"entries": [entry("fpn", "baseline", {0: 8.0, 1: 13.0, 3: 6.0}),
                         entry("searched_middle", "searched", {0: 11.0, 1: 12.0, 2: 9.0})]}
    v = verdict(study)["searched"]["searched_middle"]
    assert v["AP_minus_fpn"] == pytest.approx(32.0 / 3 - 9.0)
    p = v["AP_minus_fpn_paired"]  # differences +3 and -1
    assert p["n"] == 2 and p["above"] == 1
    assert p["mean"] == pytest.approx(1.0) and p["se"] == pytest.approx(2.0)  # std 2.83 / sqrt(2)
    study.update(config="c.yaml", seeds=[0, 1, 2, 3], jobs=1, threads_per_unit=1, machine="m", verdict=verdict(study))
    assert "paired by training seed +1.00 ± 2.00 (1 of 2 seeds above FPN's)" in format_report(study)
    study["entries"][0]["runs"] = [{"seed": 3, "metrics": {"AP": 6.0}}]  # no seed in common
    assert "AP_minus_fpn_paired" not in verdict(study)["searched"]["searched_middle"]


def test_rerun_trains_nothing(finished_study, synthetic_root):
    out, _ = finished_study
    before = (out / "study.json").read_text()
    logs = {p: p.stat().st_mtime for p in out.glob("units/*/seed_*/log.txt")}
    stdout = run_study(out, synthetic_root, "--random", "2", "--lambdas", "middle")
    assert "0 to run" in stdout and "study: start" not in stdout
    assert {p: p.stat().st_mtime for p in out.glob("units/*/seed_*/log.txt")} == logs
    after = json.loads((out / "study.json").read_text())
    assert after["entries"] == json.loads(before)["entries"]
    # the report keeps the wall time of the invocation that trained, not this one's few seconds
    assert after["wall_seconds"] == json.loads(before)["wall_seconds"] > 5
    assert f"ran units {after['wall_seconds'] / 60:.1f} min" in (out / "study.md").read_text()
    # so does a --collect with other --jobs: the command and threads are those the units ran with
    run_study(out, synthetic_root, "--random", "2", "--lambdas", "middle", "--jobs", "2", "--collect")
    collected = json.loads((out / "study.json").read_text())
    assert {k: collected[k] for k in ("command", "jobs", "threads_per_unit", "wall_seconds")} == \
        {k: after[k] for k in ("command", "jobs", "threads_per_unit", "wall_seconds")}
    assert "--collect" not in collected["command"] and collected["jobs"] == 1
    assert f"Command: `{after['command']}`" in (out / "study.md").read_text()


def test_a_search_variant_reuses_the_trained_units(finished_study, synthetic_root):
    """--tag/--search-opts add a way of searching: only its search and retraining run, the
    baselines and random architectures are reused, and the table holds both variants."""
    out, _ = finished_study
    stdout = run_study(out, synthetic_root, "--random", "2", "--lambdas", "middle", "--tag", "fastarch",
                       "--search-opts", "search.arch_lr=0.1")
    started = [l.split()[2] for l in stdout.splitlines() if l.startswith("study: start")]
    assert started == ["search/fastarch/middle", "searched_middle_fastarch/seed_0"]
    study = json.loads((out / "study.json").read_text())
    names = [e["name"] for e in study["entries"]]
    assert names == ["fpn", "random_00", "random_01", "searched_middle", "searched_middle_fastarch"]
    fast = study["entries"][-1]
    assert fast["search_opts"] == ["search.arch_lr=0.1"] and len(fast["runs"]) == 1
    config = yaml.safe_load((out / "searches" / "fastarch" / "middle" / "config.yaml").read_text())
    assert config["search"]["arch_lr"] == 0.1
    assert "searched_middle_fastarch" in study["verdict"]["searched"]


def test_killed_study_resumes_to_the_same_numbers(finished_study, synthetic_root, tmp_path):
    """kill -9 while the fpn unit is between checkpoints; the rerun resumes it (not from
    scratch) and ends with the uninterrupted study's numbers and weights."""
    reference, _ = finished_study
    out = tmp_path / "killed"
    proc = subprocess.Popen(study_cmd(out, synthetic_root, "--random", "1", "--lambdas"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = out / "units" / "fpn" / "seed_0" / "run" / "checkpoints" / "last_checkpoint"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the study ended before the first checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)
    assert not (out / "units" / "fpn" / "seed_0" / "result.json").exists()
    # the unit's train.py died with the study (no orphan still writing into the folder)
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out) not in ps
    stdout = run_study(out, synthetic_root, "--random", "1", "--lambdas")
    assert "start fpn/seed_0 (resuming)" in stdout
    log = (out / "units" / "fpn" / "seed_0" / "log.txt").read_text()
    assert "resumed from" in log
    study = {e["name"]: e for e in json.loads((out / "study.json").read_text())["entries"]}
    ref = {e["name"]: e for e in json.loads((reference / "study.json").read_text())["entries"]}
    for name in ("fpn", "random_00"):
        assert study[name]["runs"][0]["metrics"] == ref[name]["runs"][0]["metrics"], name
    ours = torch.load(out / "units/fpn/seed_0/run/model_final.pth", weights_only=True)["model"]
    theirs = torch.load(reference / "units/fpn/seed_0/run/model_final.pth", weights_only=True)["model"]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_folder_of_another_config_is_refused(tmp_path):
    variants = check_study_config(str(tmp_path), DEMO, [], 0, lambdas=["middle"])
    assert [(v.tag, v.lambdas) for v in variants] == [("", ["middle"])]
    assert check_study_config(str(tmp_path), DEMO, [], 0, lambdas=["middle"]) == variants  # same: fine
    with pytest.raises(StudyError, match="solver.epochs"):
        check_study_config(str(tmp_path), DEMO, ["solver.epochs=9"], 0)
    with pytest.raises(StudyError, match="random-seed"):
        check_study_config(str(tmp_path), DEMO, [], 1)
    # the kind of random architectures is the folder's once it holds some, before that anyone's
    drawn = str(tmp_path / "drawn")
    check_study_config(drawn, DEMO, [], 0, lambdas=["middle"])
    check_study_config(drawn, DEMO, [], 0, random_parts="head")
    plan_entries(drawn, [], 1, [], 0, load_config(DEMO), "head")  # the study draws its random heads
    check_study_config(drawn, DEMO, [], 0, random_parts="head")
    with pytest.raises(StudyError, match="random-parts"):
        check_study_config(drawn, DEMO, [], 0, random_parts="both")
    # search settings do not touch the trained units, but a variant keeps its own
    with pytest.raises(StudyError, match="search.arch_lr"):
        check_study_config(str(tmp_path), DEMO, ["search.arch_lr=0.1"], 0, lambdas=["middle"])
    variants = check_study_config(str(tmp_path), DEMO, [], 0, "fast", ["search.arch_lr=0.1"], ["small", "large"])
    assert [(v.tag, v.search_opts, v.lambdas) for v in variants] == [
        ("", [], ["middle"]), ("fast", ["search.arch_lr=0.1"], ["small", "large"])]
    assert [v.entry_name("small") for v in variants] == ["searched_small", "searched_small_fast"]
    with pytest.raises(StudyError, match="search.arch_lr"):
        check_study_config(str(tmp_path), DEMO, [], 0, "fast", ["search.arch_lr=0.2"], ["small"])


def test_refused_folder_is_one_error_line_from_the_command_line(tmp_path):
    """``python -m autofpn.study`` runs the module as __main__; its StudyError must still be
    reported as a user's mistake (one line, exit code 2), not a traceback."""
    check_study_config(str(tmp_path), DEMO, [], 0, lambdas=["middle"])
    result = subprocess.run([sys.executable, "-m", "autofpn.study", "--cfg", DEMO, "--out", str(tmp_path),
                             "--opts", "solver.epochs=9", "--collect"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path} holds a study made with another config")


def test_shards_are_disjoint_and_cover_the_study(tmp_path):
    cfg = load_config(DEMO)
    args = Namespace(out=str(tmp_path), cfg=DEMO, opts=[], launcher=None, keep_checkpoints=False, jobs=1)
    entries = plan_entries(str(tmp_path), ["fpn", "panet"], 3, [SearchVariant("", [], ["small", "large"])], 0, cfg)
    units = make_units(args, entries, [0, 1], cfg)
    keys = [u.key for u in units]
    assert keys[:3] == ["fpn/seed_0", "search/small", "search/large"]  # the backbone donor first
    assert len(keys) == len(set(keys)) == 2 + 7 * 2 + 0  # 2 searches + 7 entries x 2 seeds
    shards = [[u.key for u in shard_units(units, f"{i}/3")] for i in range(3)]
    assert sorted(k for s in shards for k in s) == sorted(keys)
    assert not set(shards[0]) & set(shards[1])
    with pytest.raises(StudyError):
        shard_units(units, "3/3")
    searched = [u for u in units if u.key == "searched_small/seed_1"][0]
    assert searched.deps == ["search/small"]


def test_a_finished_backbone_lender_whose_model_is_gone_trains_again(tmp_path):
    """A study folder kept in git holds the FPN seed-0 run's result but not its model (a fresh
    clone): a search still to run needs that model as its backbone, so the run trains again
    (and says why); once the searches are done, or their exported backbone is there, it does not."""
    from autofpn.study import run_units
    cfg = load_config(DEMO)
    args = Namespace(out=str(tmp_path), cfg=DEMO, opts=[], launcher=None, keep_checkpoints=False, jobs=1)
    entries = plan_entries(str(tmp_path), ["fpn"], 0, [SearchVariant("", [], ["large"])], 0, cfg)
    lender = tmp_path / "units" / "fpn" / "seed_0"
    model = lender / "run" / "model_final.pth"
    (lender / "run").mkdir(parents=True)
    (lender / "result.json").write_text('{"metrics": {"AP": 1.0}}')

    def lender_unit():
        return next(u for u in make_units(args, entries, [0], cfg) if u.key == "fpn/seed_0")

    assert not lender_unit().is_done()
    model.write_bytes(b"")
    assert lender_unit().is_done()
    model.unlink()
    search = tmp_path / "searches" / "large"
    search.mkdir(parents=True)
    (search / "result.json").write_text("{}")
    assert lender_unit().is_done()  # nothing left to search: no reason to train it again
    (search / "result.json").unlink()
    (tmp_path / "searches" / "backbone.pth").write_bytes(b"")
    assert lender_unit().is_done()  # the searches read the exported backbone, not the run
    (tmp_path / "searches" / "backbone.pth").unlink()

    unit = lender_unit()  # run with stand-ins for train.py (leaves the model) and its metrics
    unit.command = lambda: [sys.executable, "-c", f"open({str(model)!r}, 'wb').close()"]
    unit.finish = lambda seconds: (lender / "result.json").write_text('{"metrics": {"AP": 2.0}}')
    said = []
    status = run_units([unit], jobs=1, threads_per_job=1, say=said.append)
    assert status == {"fpn/seed_0": "done"} and model.is_file(), (status, said)
    assert json.loads((lender / "result.json").read_text())["metrics"]["AP"] == 2.0
    assert any("start fpn/seed_0 (again: run/model_final.pth is gone" in line for line in said), said
    assert json.loads((lender / "result.replaced.json").read_text())["metrics"]["AP"] == 1.0


def test_a_neck_only_search_variant_retrains_with_the_mlp_head(tmp_path):
    """search.stage=neck decodes no head: its entry trains the searched neck with FPN's 2-MLP
    head (an Auto-head without a genotype would not build); a head-only variant on a searched
    neck is refused."""
    cfg = load_config(DEMO)
    variants = [SearchVariant("", [], ["large"]), SearchVariant("neck", ["search.stage=neck"], ["large"])]
    entries = {e.name: e for e in plan_entries(str(tmp_path), ["fpn"], 0, variants, 0, cfg)}
    assert entries["searched_large"].train_args()[:4] == ["--neck", "auto", "--head", "auto"]
    neck_only = entries["searched_large_neck"].train_args()
    assert neck_only[:4] == ["--neck", "auto", "--head", "mlp"] and neck_only[-1].endswith("neck/large/geno.json")
    with pytest.raises(StudyError, match="search.stage=head"):
        plan_entries(str(tmp_path), ["fpn"], 0, [SearchVariant("h", ["search.stage=head"], ["large"])], 0, cfg)


def test_the_plain_baseline_is_an_ssd_without_a_fusion_neck(tmp_path):
    """--baselines plain (the paper's Table 6 baseline): train.py --neck none, which builds plain
    SSD (SSD's own levels into the predictors); a Faster R-CNN has no such neck and says so."""
    sys.path.insert(0, str(REPO))
    from train import parse_args, resolve_config
    cfg = load_config(str(REPO / "configs" / "ssd_demo.yaml"))
    entries = {e.name: e for e in plan_entries(str(tmp_path), ["fpn", "plain"], 0, [], 0, cfg)}
    assert entries["plain"].train_args() == ["--neck", "none", "--head", "mlp"]
    opts = ["--opts", "model.num_classes=5", "model.neck.type=fpn"]  # the entry's --neck wins over the config
    plain, _ = resolve_config(parse_args(["--cfg", str(REPO / "configs" / "ssd_demo.yaml"), *entries["plain"].train_args(), *opts]))
    assert build_detector(plain).neck.base is None
    fpn, _ = resolve_config(parse_args(["--cfg", str(REPO / "configs" / "ssd_demo.yaml"), *entries["fpn"].train_args(), *opts]))
    assert build_detector(fpn).neck.base is not None
    with pytest.raises(ConfigError, match="'model.neck.type' = 'none'"):
        build_detector(load_config(DEMO, ["model.neck.type=none"]))


def assert_the_same_draws_in_part(entries, both, part, train_args):
    """Each ``random_<part>_NN`` entry holds the ``part`` of the NN-th full random draw of
    ``both`` (and nothing of the other part) and trains with ``train_args``."""
    other = {"neck": "head", "head": "neck"}[part]
    for i, drawn in enumerate(e for e in both if e.kind == "random"):
        mine = entries[f"random_{part}_{i:02d}"]
        assert mine.train_args()[:4] == train_args
        genotype = json.loads(Path(mine.genotype_path).read_text())
        assert genotype[other] is None and genotype[part] == json.loads(Path(drawn.genotype_path).read_text())[part]


def test_a_head_only_variant_and_random_heads_keep_the_handcrafted_neck(tmp_path):
    """search.stage=head with search.head_with_searched_neck=false searches the Auto-head on the
    config's neck: its entry retrains that neck with the searched head; --random-parts head draws
    the same heads as --random-parts both, without their necks, on that neck too."""
    cfg = load_config(DEMO)
    head_only = SearchVariant("h", ["search.stage=head", "search.head_with_searched_neck=false"], ["large"])
    entries = {e.name: e for e in plan_entries(str(tmp_path), ["fpn", "conv"], 2, [head_only], 0, cfg, "head")}
    assert entries["searched_large_h"].train_args()[:4] == ["--neck", "fpn", "--head", "auto"]
    assert entries["conv"].train_args() == ["--neck", "fpn", "--head", "conv"]  # the handcrafted control
    assert_the_same_draws_in_part(entries, plan_entries(str(tmp_path / "both"), ["fpn"], 2, [], 0, cfg),
                                  "head", ["--neck", "fpn", "--head", "auto"])
    with pytest.raises(StudyError, match="handcrafted"):
        plan_entries(str(tmp_path), ["fpn"], 0, [head_only], 0, load_config(DEMO, ["model.neck.type=auto"]))
    # a head searched on a given neck (search.neck_genotype) retrains with the search's geno.json,
    # which holds that neck; without the neck the variant is refused
    on_neck = SearchVariant("on", ["search.stage=head", "search.neck_genotype=/x/geno.json"], ["large"])
    entry = plan_entries(str(tmp_path), ["fpn"], 0, [on_neck], 0, cfg)[-1]
    assert entry.train_args() == ["--neck", "auto", "--head", "auto", "--genotype",
                                  str(tmp_path / "searches" / "on" / "large" / "geno.json")]
    with pytest.raises(StudyError, match="search.neck_genotype"):
        plan_entries(str(tmp_path), ["fpn"], 0, [SearchVariant("x", ["search.stage=head"], ["large"])], 0, cfg)


def test_random_necks_and_the_identity_neck_keep_the_mlp_head(tmp_path):
    """--random-parts neck draws the same necks as --random-parts both, without their heads, and
    retrains them with FPN's 2-MLP head, as a neck-only search's entry; --baselines identity is the
    Auto-fusion neck over the config's levels with every link identity (nothing searched)."""
    sys.path.insert(0, str(REPO))
    from train import parse_args, resolve_config
    cfg = load_config(DEMO)
    neck_only = SearchVariant("n", ["search.stage=neck"], ["large"])
    entries = {e.name: e for e in plan_entries(str(tmp_path), ["fpn", "identity"], 2, [neck_only], 0, cfg, "neck")}
    assert_the_same_draws_in_part(entries, plan_entries(str(tmp_path / "both"), ["fpn"], 2, [], 0, cfg),
                                  "neck", ["--neck", "auto", "--head", "mlp"])
    identity = entries["identity"]
    assert identity.kind == "baseline" and identity.train_args()[:4] == ["--neck", "auto", "--head", "mlp"]
    genotype = json.loads(Path(identity.genotype_path).read_text())
    levels, layers = cfg["model"]["neck"]["levels"], cfg["model"]["neck"]["layers"]
    assert genotype["head"] is None and genotype["neck"]["levels"] == list(levels)
    links = [(link["from"], link["to"], link["op"]) for layer in genotype["neck"]["layers"] for link in layer]
    assert sorted(links) == sorted((s, t, "identity") for _ in range(layers) for s in levels for t in levels)

    def built(entry):
        train_cfg, genotype = resolve_config(parse_args(["--cfg", DEMO, *entry.train_args()]))
        return build_detector(train_cfg, genotype)
    fpn, dense = built(entries["fpn"]), built(identity)
    head_params = lambda m: sorted((k, tuple(v.shape)) for k, v in m.roi_heads.state_dict().items())  # noqa: E731
    assert head_params(dense) == head_params(fpn)  # FPN's 2-MLP head, not an Auto-head
    assert dense.neck.state_dict().keys() != fpn.neck.state_dict().keys()
    check_study_config(str(tmp_path / "study"), DEMO, [], 0, random_parts="neck")
    plan_entries(str(tmp_path / "study"), [], 1, [], 0, cfg, "neck")
    with pytest.raises(StudyError, match="random-parts"):  # a folder of random necks draws no full architectures
        check_study_config(str(tmp_path / "study"), DEMO, [], 0, random_parts="both")
    with pytest.raises(StudyError, match="random-convs"):  # nor necks of another kind
        check_study_config(str(tmp_path / "study"), DEMO, [], 0, random_parts="neck", random_convs=3)


def test_random_convolutions_on_the_identity_neck(tmp_path):
    """--random-parts neck --random-convs K: the dense identity neck (every link kept) with K links,
    drawn uniformly over both layers, made convolutions of the neck's op set; reproducible, the
    i-th draw independent of the count, distinct draws; retrained with the 2-MLP head; a folder
    that drew none yet (a study of searches and baselines) takes them, one that did keeps them."""
    cfg = load_config(DEMO)
    levels, layers = cfg["model"]["neck"]["levels"], cfg["model"]["neck"]["layers"]
    links = sorted((s, t) for s in levels for t in levels)
    dense = json.loads(Path(plan_entries(str(tmp_path / "identity"), ["identity"], 0, [], 0, cfg)[0].genotype_path)
                       .read_text())
    entries = plan_entries(str(tmp_path), ["fpn"], 6, [], 0, cfg, "neck", random_convs=5)
    drawn = [e for e in entries if e.kind == "random"]
    assert [e.name for e in drawn] == [f"random_conv5_{i:02d}" for i in range(6)]
    genotypes = [json.loads(Path(e.genotype_path).read_text()) for e in drawn]
    conv_links = set()
    for entry, genotype in zip(drawn, genotypes):
        assert entry.train_args()[:4] == ["--neck", "auto", "--head", "mlp"] and genotype["head"] is None
        ops = [(i, link["from"], link["to"], link["op"]) for i, layer in enumerate(genotype["neck"]["layers"])
               for link in layer]
        assert all(sorted((s, t) for i, s, t, _ in ops if i == layer) == links for layer in range(layers))
        convs = [op for op in ops if op[3] != "identity"]
        assert len(convs) == 5 and all(op[3] in NECK_CONV_OPS for op in convs)
        conv_links |= {op[:3] for op in convs}
    assert len({json.dumps(g["neck"]) for g in genotypes}) == 6
    assert {i for i, _, _ in conv_links} == set(range(layers))  # both layers drawn from
    again = plan_entries(str(tmp_path / "again"), [], 2, [], 0, cfg, "neck", random_convs=5)
    assert [json.loads(Path(e.genotype_path).read_text()) for e in again] == genotypes[:2]
    assert identity_neck_with_convs(1, 0, 5, levels, layers)["neck"] != genotypes[0]["neck"]  # another stream
    depthwise = lambda genotype: sum(  # noqa: E731
        1 for m in build_detector(load_config(DEMO, ["model.neck.type=auto"]), genotype).neck.modules()
        if isinstance(m, torch.nn.Conv2d) and m.groups > 1)
    assert depthwise(genotypes[0]) >= 5 and depthwise({**genotypes[0], "neck": dense["neck"]}) == 0
    with pytest.raises(StudyError, match="links"):
        plan_entries(str(tmp_path), [], 1, [], 0, cfg, "neck", random_convs=layers * len(levels) ** 2 + 1)
    with pytest.raises(StudyError, match="random-parts neck"):
        plan_entries(str(tmp_path), [], 1, [], 0, cfg, "both", random_convs=5)
    folder = str(tmp_path / "study")
    check_study_config(folder, DEMO, [], 0, lambdas=["large"])  # searches and baselines, no random draw
    check_study_config(folder, DEMO, [], 0, random_parts="neck", random_convs=5)
    plan_entries(folder, [], 1, [], 0, cfg, "neck", random_convs=5)
    assert json.loads(Path(folder, "study_config.json").read_text())["random_convs"] == 5
    with pytest.raises(StudyError, match="random-convs"):
        check_study_config(folder, DEMO, [], 0, random_parts="neck", random_convs=9)


def test_a_neck_only_variant_searches_and_retrains(finished_study, synthetic_root):
    """End to end: the neck-only search writes a genotype without a head, and its entry's run
    retrains that neck with the 2-MLP head (FPN's head parameters, not an Auto-head's)."""
    out, _ = finished_study
    run_study(out, synthetic_root, "--random", "2", "--lambdas", "middle", "--tag", "neckonly",
              "--search-opts", "search.stage=neck")
    genotype = json.loads((out / "searches" / "neckonly" / "middle" / "geno.json").read_text())
    assert genotype["neck"] and not genotype.get("head")
    study = {e["name"]: e for e in json.loads((out / "study.json").read_text())["entries"]}
    neck_only, fpn = study["searched_middle_neckonly"], study["fpn"]
    assert len(neck_only["runs"]) == 1 and neck_only["params"]["head"] == fpn["params"]["head"]


def test_a_head_only_variant_searches_and_retrains_on_fpn(finished_study, synthetic_root):
    """End to end: the head search on FPN's neck writes a genotype without a neck, and its entry's
    run retrains FPN's neck (its parameters, not an Auto-fusion neck's) with the searched head."""
    out, _ = finished_study
    run_study(out, synthetic_root, "--random", "2", "--lambdas", "middle", "--tag", "headonly",
              "--search-opts", "search.stage=head", "search.head_with_searched_neck=false")
    genotype = json.loads((out / "searches" / "headonly" / "middle" / "geno.json").read_text())
    assert genotype["head"] and not genotype.get("neck")
    study = {e["name"]: e for e in json.loads((out / "study.json").read_text())["entries"]}
    head_only, fpn = study["searched_middle_headonly"], study["fpn"]
    assert len(head_only["runs"]) == 1 and head_only["params"]["neck"] == fpn["params"]["neck"]
    assert head_only["params"]["head"] != fpn["params"]["head"]


def test_an_evolution_search_unit_takes_round_size_of_the_jobs(tmp_path):
    """An evolution with rounds of 2 children runs as a search unit with --jobs 2 that occupies 2
    of the study's jobs: it does not start beside another unit at --jobs 2."""
    from autofpn.study import Unit, run_units
    cfg = load_config(DEMO)
    args = Namespace(out=str(tmp_path), cfg=DEMO, opts=[], launcher=None, keep_checkpoints=False, jobs=2)
    evolution = SearchVariant("evo", ["search.strategy=evolution", "search.evolution.round_size=2"], ["large"])
    entries = plan_entries(str(tmp_path), ["fpn"], 0, [SearchVariant("", [], ["large"]), evolution], 0, cfg)
    (tmp_path / "searches").mkdir()
    (tmp_path / "searches" / "backbone.pth").write_bytes(b"")  # as if exported: command() does not export
    units = {u.key: u for u in make_units(args, entries, [0], cfg)}
    assert units["search/large"].slots == 1 and "--jobs" not in units["search/large"].command()
    search = units["search/evo/large"]
    assert search.slots == 2 and search.command()[-2:] == ["--jobs", "2"]
    args.jobs = 1  # never more than the study's jobs
    assert {u.key: u for u in make_units(args, entries, [0], cfg)}["search/evo/large"].slots == 1

    log = tmp_path / "order.txt"

    def unit(name, slots):
        folder = str(tmp_path / name)
        script = (f"import time; open({str(log)!r}, 'a').write('start {name}\\n'); time.sleep(0.5); "
                  f"open({str(log)!r}, 'a').write('end {name}\\n')")
        return Unit(name, folder, lambda: [sys.executable, "-c", script], slots=slots,
                    finish=lambda seconds, folder=folder: open(os.path.join(folder, "result.json"), "w").write("{}"))

    status = run_units([unit("one", 1), unit("two", 2), unit("three", 1)], jobs=2, threads_per_job=1, say=lambda _: None)
    assert set(status.values()) == {"done"}
    order = log.read_text().split("\n")[:-1]
    # "two" waits for "one" and runs alone; "three" waits for "two" (the scan keeps the study's order)
    assert order.index("start two") > order.index("end one") and order.index("start three") > order.index("end two")


def test_study_folder_made_before_a_config_key_was_added_still_resumes(tmp_path):
    check_study_config(str(tmp_path), DEMO, [], 0, lambdas=["middle"])
    path = tmp_path / "study_config.json"
    record = json.loads(path.read_text())
    del record["training"]["model"]["detector"], record["variants"][0]["search"]["strategy"]  # as written before
    path.write_text(json.dumps(record))
    assert [v.tag for v in check_study_config(str(tmp_path), DEMO, [], 0, lambdas=["middle"])] == [""]


def test_a_unit_another_study_process_runs_is_not_run_twice(tmp_path):
    """Two study invocations on one folder (a second --tag started while the first runs) list the
    same units: a unit whose lock another process holds is left to it. Nothing here needs it: this
    process does not wait for it. A unit here needs it: this process waits, and runs the dependent
    once that process has finished it (the lock of a finished unit is released)."""
    from autofpn.engine.runs import lock_folder
    from autofpn.study import Unit, run_units
    marker = tmp_path / "ran.txt"

    def unit(name):
        folder = str(tmp_path / name)
        return Unit(name, folder, lambda: [sys.executable, "-c",
                                           f"open({str(marker)!r}, 'a').write({name!r} + '\\n')"],
                    finish=lambda seconds, folder=folder: open(os.path.join(folder, "result.json"), "w").write("{}"))

    busy, free, after_busy = unit("busy"), unit("free"), unit("after_busy")
    after_busy.deps = ["busy"]
    held = lock_folder(busy.folder)  # "another study process" runs busy
    assert held is not None and lock_folder(busy.folder) is None
    said = []
    status = run_units([busy, free], jobs=2, threads_per_job=1, say=said.append)
    assert status == {"busy": "waiting", "free": "done"}, (status, said)
    assert any("busy runs in another study process" in line for line in said), said

    def other_process_finishes_busy():
        (tmp_path / "busy" / "result.json").write_text("{}")
        held.close()

    timer = threading.Timer(1.5, other_process_finishes_busy)
    timer.start()
    try:
        status = run_units([busy, free, after_busy], jobs=1, threads_per_job=1, say=said.append)
    finally:
        timer.join()
    assert status == {"busy": "done", "free": "done", "after_busy": "done"}, (status, said)
    assert marker.read_text().split() == ["free", "after_busy"]  # busy ran in the other process only
    assert any("busy was finished in another study process" in line for line in said), said
    lock = lock_folder(after_busy.folder)  # released when its unit finished
    assert lock is not None
    lock.close()


def test_a_unit_whose_other_study_process_died_is_run_here(tmp_path):
    """The process that held a unit dies before finishing it (the OS drops its lock): a process
    waiting for it runs it, then what needs it."""
    from autofpn.engine.runs import lock_folder
    from autofpn.study import Unit, run_units
    marker = tmp_path / "ran.txt"

    def unit(name, deps=()):
        folder = str(tmp_path / name)
        return Unit(name, folder, lambda: [sys.executable, "-c",
                                           f"open({str(marker)!r}, 'a').write({name!r} + '\\n')"],
                    deps=list(deps),
                    finish=lambda seconds, folder=folder: open(os.path.join(folder, "result.json"), "w").write("{}"))

    crashed, after = unit("crashed"), unit("after", deps=["crashed"])
    held = lock_folder(crashed.folder)
    timer = threading.Timer(1.0, held.close)  # dies: lock gone, no result.json
    timer.start()
    try:
        status = run_units([crashed, after], jobs=1, threads_per_job=1, say=lambda _: None)
    finally:
        timer.join()
    assert status == {"crashed": "done", "after": "done"}, status
    assert marker.read_text().split() == ["crashed", "after"]


def test_a_failed_unit_runs_again_only_with_retry_failed(tmp_path):
    """A unit that failed keeps its error.txt and blocks what needs it; --retry-failed runs it
    again (its error.txt gone once it starts), then what needs it."""
    from autofpn.study import Unit, run_units
    marker = tmp_path / "ran.txt"

    def unit(name, deps=()):
        folder = tmp_path / name
        folder.mkdir()
        return Unit(name, str(folder), lambda: [sys.executable, "-c",
                                                f"open({str(marker)!r}, 'a').write({name!r} + '\\n')"],
                    deps=list(deps), finish=lambda seconds: (folder / "result.json").write_text("{}"))

    failed, after = unit("failed"), unit("after", deps=["failed"])
    Path(failed.error_path).write_text("exit code 1")
    status = run_units([failed, after], jobs=1, threads_per_job=1, say=lambda _: None)
    assert status == {"failed": "failed", "after": "blocked"} and not marker.exists()
    assert failed.has_failed()
    status = run_units([failed, after], jobs=1, threads_per_job=1, retry_failed=True, say=lambda _: None)
    assert status == {"failed": "done", "after": "done"}, status
    assert marker.read_text().split() == ["failed", "after"] and not failed.has_failed()


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="no CPU affinity on this platform")
def test_units_share_the_cpus_the_study_may_use_not_the_whole_machine():
    """Under ``taskset -c 1`` a study on a 2-CPU box gives its one unit 1 thread, not 2 (two
    threads on one CPU wait for each other in every parallel region)."""
    code = "from autofpn.engine.runs import threads_per_job; print(threads_per_job(1), threads_per_job(2))"
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True)
    if pinned.returncode != 0 and "taskset" in pinned.stderr:
        pytest.skip("taskset is not available")
    assert pinned.stdout.split() == ["1", "1"], pinned.stderr
    free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    cpus = len(os.sched_getaffinity(0))
    assert free.stdout.split() == [str(cpus), str(max(1, cpus // 2))]


def test_ap_against_flops_over_study_folders_draws_a_shared_unit_once(tmp_path):
    """The committed demo studies: demo_head and demo_head16 share their fpn units (same runs,
    the same AP); FPN's 2-MLP head at 128 and 256 wide are two points of its curve."""
    from autofpn.viz.study_plot import flops_points, load_studies, main
    docs = REPO / "docs" / "study"
    folders = [str(docs / name) for name in ("demo_head", "demo_head16", "demo_mlp256")]
    points = flops_points(load_studies(folders))
    fpn = sorted((p["gflops"], p["study"]) for p in points if p["name"] == "fpn")
    assert [s for _, s in fpn] == ["demo_head", "demo_mlp256"]  # demo_head16's fpn is demo_head's
    assert fpn[0][0] == pytest.approx(0.235, abs=1e-3) and fpn[1][0] > 1.5 * fpn[0][0]
    assert {p["study"] for p in points if p["kind"] == "searched"} == {"demo_head", "demo_head16"}
    out = tmp_path / "curve.png"
    assert main(folders + ["--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="study_plot: .*nowhere/study.json not found"):
        main([str(tmp_path / "nowhere"), "--out", str(out)])


def test_only_runs_the_named_entries_and_what_they_wait_for(tmp_path):
    """--only: more seeds for a few entries without training the others again; a searched entry
    brings its search and the FPN run lending it the backbone while they are not done."""
    from autofpn.study import select_units
    cfg = load_config(DEMO)
    args = Namespace(out=str(tmp_path), cfg=DEMO, opts=[], launcher=None, keep_checkpoints=False, jobs=1)
    entries = plan_entries(str(tmp_path), ["fpn", "panet"], 2, [SearchVariant("", [], ["small", "large"])], 0, cfg)
    units = make_units(args, entries, [0, 1], cfg)
    keys = lambda selected: [u.key for u in selected]  # noqa: E731
    assert keys(select_units(units, entries, [])) == keys(units)
    assert keys(select_units(units, entries, ["random_01", "panet"])) == [
        "panet/seed_0", "random_01/seed_0", "panet/seed_1", "random_01/seed_1"]
    assert keys(select_units(units, entries, ["searched_large"])) == [
        "fpn/seed_0", "search/large", "searched_large/seed_0", "searched_large/seed_1"]
    # once the search is done it is not run again, nor the lender it needed
    done = tmp_path / "searches" / "large"
    done.mkdir(parents=True)
    (done / "result.json").write_text("{}")
    assert keys(select_units(units, entries, ["searched_large"])) == ["searched_large/seed_0", "searched_large/seed_1"]
    with pytest.raises(StudyError, match="--only searched_middle: no such entry"):
        select_units(units, entries, ["searched_middle"])


def test_study_compare_pairs_runs_by_seed(tmp_path):
    """python -m autofpn.study_compare: AP per seed, paired differences to the first entry over
    the seeds both finished, restricted to --seeds; an unknown entry is one error line."""
    from autofpn.study_compare import compare, format_comparison
    runs = lambda aps: [{"seed": s, "metrics": {"AP": ap}} for s, ap in aps.items()]  # noqa: E731
    study = {"entries": [{"name": "fpn", "runs": runs({0: 10.0, 1: 12.0, 3: 11.0})},
                         {"name": "random_02", "runs": runs({0: 13.0, 1: 12.5, 3: 10.0, 4: 9.0})}]}
    result = compare(study, ["fpn", "random_02"])
    assert result["seeds"] == [0, 1, 3, 4]
    diff = result["entries"][1]["vs_first"]
    assert diff["n"] == 3 and diff["above"] == 2
    assert diff["mean"] == pytest.approx((3.0 + 0.5 - 1.0) / 3)
    assert diff["se"] == pytest.approx(torch.tensor([3.0, 0.5, -1.0]).std().item() / 3 ** 0.5)
    held_out = compare(study, ["fpn", "random_02"], seeds=[3, 4])
    assert held_out["entries"][1]["ap"] == {3: 10.0, 4: 9.0} and held_out["entries"][1]["vs_first"]["n"] == 1
    assert held_out["entries"][1]["vs_first"]["se"] is None
    table = format_comparison(held_out)
    assert "| random_02 | 10.00 | 9.00 | 2 | 9.50 ± 0.71 | -1.00 (0 of 1 above) |" in table
    # "a+b" pools the runs of two entries, each paired with the reference's run of its seed
    pooled = compare(study, ["fpn", "random_02+fpn"])["entries"][1]
    assert pooled["runs"] == 7 and pooled["ap"][0] == pytest.approx(11.5) and pooled["ap"][4] == 9.0
    assert pooled["vs_first"]["n"] == 6 and pooled["vs_first"]["mean"] == pytest.approx((3.0 + 0.5 - 1.0) / 6)
    # a pooled reference pairs part by part: random_02 with fpn, fpn with random_02, seed by seed
    matched = compare(study, ["fpn+random_02", "random_02+fpn"])["entries"][1]["vs_first"]
    assert matched["n"] == 6 and matched["mean"] == pytest.approx(0.0) and matched["above"] == 3
    with pytest.raises(StudyError, match="pool 2 entries here too"):
        compare(study, ["fpn+random_02", "fpn"])
    (tmp_path / "study.json").write_text(json.dumps(study))
    result = subprocess.run([sys.executable, "-m", "autofpn.study_compare", str(tmp_path), "fpn", "panet"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'study.json'}: no entry 'panet' (entries: fpn, random_02)"
