"""autofpn.search.plan: the planner's numbers agree with the built models, and its activation
memory estimate agrees with the peak memory measured on CPU (within 25%).

How peak memory is measured (``measure()`` below, one fresh subprocess per stage):
the stage's detector is built on the CPU, one warm-up training step (forward + backward) runs so
that parameter gradients exist and lazy one-time allocations (oneDNN primitives, thread pools)
are done; then the current RSS is read (``VmRSS`` in /proc/self/status), the kernel's peak-RSS
mark is reset to it (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0), one more training step
(same image, same seed) runs, and ``VmHWM`` (peak RSS) is read. Measured = VmHWM - VmRSS before
the step: the memory the step itself needed on top of the model, its gradients and the data.
glibc is told to serve every allocation >= 64 KiB by mmap (``MALLOC_MMAP_THRESHOLD_``) so freed
tensors go back to the kernel and the RSS before the step holds no stale free heap; one thread
(``torch.set_num_threads(1)``) so per-thread scratch does not depend on the machine.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autofpn.config import load_config
from autofpn.models.detector import parameter_breakdown
from autofpn.search.cost import ResourceCost
from autofpn.search.plan import (GPU_PEAK_FLOPS, STAGES, build_stage_model, evolution_candidate, format_compute,
                                 format_plan, main, plan_search, random_search_compute, representative_genotype,
                                 search_compute, training_image_size)

REPO = Path(__file__).resolve().parents[1]
IMAGE = 256
# a small CPU size: ResNet-18 from scratch, 256 px, 32-channel neck, 32-channel Auto-head, 64 RoIs
SMALL_OPTS = ["model.backbone.weights=none", f"model.transform.min_size=[{IMAGE}]",
              f"model.transform.max_size={IMAGE}", "model.head.channels=32",
              "model.roi.batch_size_per_image=64", "search.head_rois_per_image=0"]  # the head search on all 64 too


def small_cfg():
    return load_config(str(REPO / "configs" / "demo.yaml"), SMALL_OPTS)


def test_training_image_size_is_the_largest_training_scale():
    cfg = load_config(None, ["model.transform.min_size=[400,800,600]", "model.transform.max_size=1333"])
    assert training_image_size(cfg) == (800, 1333)
    cfg = load_config(None, ["model.transform.min_size=[1400]", "model.transform.max_size=1333"])
    assert training_image_size(cfg) == (1333, 1333)


def test_plan_matches_built_models_and_cost_tables():
    cfg = small_cfg()
    genotype = representative_genotype(cfg)
    plan = plan_search(cfg, genotype)
    assert set(plan["stages"]) == set(STAGES)
    assert plan["image_size"] == (IMAGE, IMAGE) and plan["num_rois"] == cfg["model"]["roi"]["batch_size_per_image"]
    for stage, p in plan["stages"].items():
        model = build_stage_model(cfg, stage, genotype, device="cpu")
        real = parameter_breakdown(model)
        for part in ("backbone", "neck", "rpn", "head"):
            assert p["params"][part] == real[part], (stage, part)
        assert p["params"]["arch"] == sum(q.numel() for q in model.arch_parameters())
        # the frozen backbone of a search stage saves nothing; the decoded model trains it
        if stage == "decoded":
            assert p["activation_bytes"]["backbone"] > 0
        else:
            assert p["activation_bytes"]["backbone"] == 0
        # FLOPs of the decoded neck / head agree with the search-space cost tables
        if stage == "decoded":
            rc = ResourceCost(model.neck, model.roi_heads.box_head, image_size=plan["image_size"],
                              num_rois=plan["num_rois"]).total()
            assert p["flops"]["neck"] == pytest.approx(rc["neck"].flops)
            predictor = model.roi_heads.box_predictor
            predictor_flops = 2 * plan["num_rois"] * sum(l.in_features * l.out_features  # 2 per multiply-add
                                                     for l in (predictor.cls_score, predictor.bbox_pred))
            assert p["flops"]["head"] == pytest.approx(rc["head"].flops + predictor_flops)
    neck, head, dec = (plan["stages"][s] for s in STAGES)
    # the supernet is the expensive part of each search stage
    assert neck["activation_bytes"]["neck"] > dec["activation_bytes"]["neck"]
    assert head["activation_bytes"]["head"] > dec["activation_bytes"]["head"]
    assert neck["flops"]["neck"] > dec["flops"]["neck"] and head["flops"]["head"] > dec["flops"]["head"]
    text = format_plan(plan)
    for stage in STAGES:
        assert stage in text


def test_plan_counts_the_head_search_at_its_own_roi_batch():
    """search.head_rois_per_image: the head stage is planned at that many RoIs (its FLOPs and
    activations scale with them), the other stages at the retrained detector's."""
    cfg = small_cfg()
    genotype = representative_genotype(cfg)
    full = plan_search(cfg, genotype)
    cfg["search"]["head_rois_per_image"] = 16
    sub = plan_search(cfg, genotype)
    assert sub["stages"]["search: head"]["num_rois"] == 16 and sub["stages"]["decoded"]["num_rois"] == 64
    assert sub["stages"]["search: head"]["flops"]["head"] == pytest.approx(
        full["stages"]["search: head"]["flops"]["head"] / 4)
    # the head's saved activations: a part per RoI (all of it but the weights the ops save)
    cfg["search"]["head_rois_per_image"] = 32
    half = plan_search(cfg, genotype)
    a16, a32, a64 = (p["stages"]["search: head"]["activation_bytes"]["head"] for p in (sub, half, full))
    assert 0 < a32 - a16 and a64 - a32 == 2 * (a32 - a16)
    assert sub["stages"]["decoded"] == full["stages"]["decoded"]
    assert "(16 in the head search)" in format_plan(sub)


def test_plan_counts_the_search_stages_at_the_search_input_size():
    cfg = small_cfg()
    cfg["search"]["min_size"], cfg["search"]["max_size"] = [128, 160], 160
    plan = plan_search(cfg, representative_genotype(cfg))
    assert plan["stages"]["search: neck"]["image_size"] == plan["stages"]["search: head"]["image_size"] == (160, 160)
    assert plan["stages"]["decoded"]["image_size"] == (IMAGE, IMAGE)
    assert "(the decoded model: 256x256)" in format_plan(plan)


def measure(stages, genotype_path: str, search_opts: dict = None) -> dict:
    """Run one fresh process per stage, concurrently (RSS is per process, so they do not disturb
    each other's figures; see the module docstring). Returns {stage: {"measured_bytes": peak
    growth of one training step, "rois": RoIs the box head saw}}."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    procs = {s: subprocess.Popen([sys.executable, __file__, s, genotype_path, json.dumps(search_opts or {})], env=env,
                                 cwd=str(REPO),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in stages}
    results = {}
    for s, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        results[s] = json.loads(out.strip().splitlines()[-1])
    return results


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure_in_this_process(stage: str, genotype_path: str, search_opts: dict = None) -> dict:
    import gc

    from autofpn.models.genotype import load_genotype

    torch.set_num_threads(1)
    cfg = small_cfg()
    cfg["search"].update(search_opts or {})
    model = build_stage_model(cfg, stage, load_genotype(genotype_path), device="cpu")
    rois = []
    model.roi_heads.box_head.register_forward_pre_hook(lambda mod, args: rois.append(args[0].shape[0]))
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, IMAGE, IMAGE, generator=g)]
    targets = [{"boxes": torch.tensor([[20., 30., 120., 140.], [100., 90., 220., 230.], [10., 150., 60., 240.]]),
                "labels": torch.tensor([1, 2, 3]), "image_id": 0}]

    def step():
        torch.manual_seed(0)
        losses = model(images, targets)
        sum(losses.values()).backward()

    step()  # warm-up: gradients allocated, lazy initialisation done
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS mark := current RSS
    step()
    peak = _status_kib("VmHWM")
    return {"measured_bytes": (peak - before) * 1024, "rois": rois[-1]}


@pytest.mark.parametrize("search_opts", [{}, {"recompute": True}, {"partial_channels": 4}],
                         ids=["saved", "recompute", "partial4"])
def test_activation_estimate_within_25_percent_of_measured_peak(tmp_path, search_opts):
    """search.recompute: the search stages keep a fraction of the activations (the mixed ops'
    inputs, and one op's activations while it is recomputed), and the plan still matches;
    search.partial_channels: the mixed ops run on a quarter of the channels, the plan matches."""
    if not os.path.exists("/proc/self/clear_refs") or not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak-RSS mark")
    cfg = small_cfg()
    cfg["search"].update(search_opts)
    genotype = representative_genotype(cfg)
    path = tmp_path / "genotype.json"
    path.write_text(json.dumps(genotype))
    plan = plan_search(cfg, genotype)
    rows = []
    stages = STAGES[:2] if search_opts else STAGES  # the decoded model is the same for every setting
    measured = measure(stages, str(path), search_opts)
    for stage in stages:
        got = measured[stage]
        assert got["rois"] == plan["num_rois"], f"{stage}: the box head saw {got['rois']} RoIs"
        estimate = plan["stages"][stage]["activation_bytes"]["total"]
        rows.append((stage, estimate, got["measured_bytes"]))
    report = "\n".join(f"{s}: estimate {e / 2**20:.1f} MiB, measured {m / 2**20:.1f} MiB, "
                       f"ratio {e / m:.3f}" for s, e, m in rows)
    print(report)
    for stage, estimate, measured in rows:
        assert abs(estimate - measured) <= 0.25 * measured, report


if __name__ == "__main__":  # the measuring subprocess: python tests/test_plan.py STAGE GENOTYPE SEARCH_OPTS_JSON
    print(json.dumps(_measure_in_this_process(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))))


def test_search_compute_counts_weight_and_architecture_steps():
    """By hand: per stage, epochs x N/2 weight steps (forward + 2x the trained part's forward)
    and, after the warm-up, as many architecture steps (forward + 1x)."""
    cfg = small_cfg()
    cfg["search"]["max_iters"] = 0  # every epoch (the cap: the next test)
    plan = plan_search(cfg, representative_genotype(cfg))
    compute = search_compute(cfg, plan, train_images=1000, utilization=0.5)
    epochs, arch = cfg["search"]["epochs"], 1 - cfg["search"]["arch_start_epoch_fraction"]
    expected = {}
    for stage in ("search: neck", "search: head"):
        f = plan["stages"][stage]["flops"]
        trained = f["total"] - f["backbone"]  # the search freezes the backbone
        expected[stage] = epochs * 500 * ((f["total"] + 2 * trained) + arch * (f["total"] + trained))
        assert compute["flops"][stage] == pytest.approx(expected[stage])
    assert compute["flops"]["total"] == pytest.approx(sum(expected.values()))
    for gpu, peak in GPU_PEAK_FLOPS.items():
        assert compute["gpu_days"][gpu] == pytest.approx(sum(expected.values()) / (peak * 0.5) / 86400)
    # linear in the data, inverse in the utilisation
    twice = search_compute(cfg, plan, train_images=2000, utilization=0.25)
    assert twice["gpu_days"]["V100"] == pytest.approx(4 * compute["gpu_days"]["V100"])
    # a neck-only search costs its stage only; a trained backbone adds its backward
    neck_only = search_compute({**cfg, "search": {**cfg["search"], "stage": "neck"}}, plan, 1000, 0.5)
    assert set(neck_only["images"]) == {"search: neck"}
    assert neck_only["flops"]["total"] == pytest.approx(expected["search: neck"])
    unfrozen = search_compute({**cfg, "search": {**cfg["search"], "freeze_backbone": False}}, plan, 1000, 0.5)
    assert unfrozen["flops"]["total"] > compute["flops"]["total"]
    with pytest.raises(ValueError, match="train_images"):
        search_compute(cfg, plan, train_images=0)


def test_dry_run_prints_the_whole_search_compute(tmp_path):
    cmd = [sys.executable, str(REPO / "search.py"), "--cfg", str(REPO / "configs" / "demo.yaml"), "--dry-run",
           "--train-images", "300", "--gpu-utilization", "0.5", "--opts", *SMALL_OPTS, "model.num_classes=11"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert "Whole search over 300 training images" in out
    assert "at an assumed 50 % of dense fp32 peak: V100" in out and "GPU-days" in out
    # a sampled mode's steps are planned on one op per link / edge, and it says so
    out = subprocess.run(cmd + ["search.mode=gdas"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert "search.mode gdas: the weight and arch steps counted at one op per link/edge" in out
    assert "GFLOPs on one sampled op per link/edge" in out


# the strategies of the paper's Table 8: one plan of the small size, an evolution candidate
# included, the backbone's stem and first stage frozen as the retrain freezes them
@pytest.fixture(scope="module")
def evolution_plan():
    cfg = load_config(str(REPO / "configs" / "demo.yaml"),
                      SMALL_OPTS + ["search.strategy=evolution", "model.backbone.frozen_stages=1"])
    return cfg, plan_search(cfg)


def updated(cfg, sections):
    """A copy of ``cfg`` with each dotted section of ``sections`` ({"search.evolution": {...}}) updated."""
    import copy
    cfg = copy.deepcopy(cfg)
    for path, values in sections.items():
        node = cfg
        for key in path.split("."):
            node = node[key]
        node.update(values)
    return cfg


def step_by_hand(stage_plan):
    """forward + 2 x the forward of all but the frozen stem and first backbone stage."""
    f = stage_plan["flops"]
    return f["total"] + 2 * (f["total"] - stage_plan["frozen_backbone_flops"])


def test_frozen_backbone_flops_are_the_frozen_stages_forward(evolution_plan):
    """model.backbone.frozen_stages=1: the stem conv and layer1 (no backward through them), counted
    by hand; a search stage freezes the whole backbone."""
    from autofpn.search.cost import count_cost
    cfg, plan = evolution_plan
    model = build_stage_model(cfg, "decoded", representative_genotype(cfg))
    body = model.backbone.body
    stem = 2 * 64 * (IMAGE // 2) ** 2 * 3 * 7 * 7  # conv1: 64 x 128 x 128 outputs of a 3 x 7 x 7 kernel
    layer1 = count_cost(body.layer1, torch.empty(1, 64, IMAGE // 4, IMAGE // 4, device="meta")).flops
    for p in (plan["stages"]["decoded"], plan["candidate"]):  # both train as the retrain does
        assert p["frozen_backbone_flops"] == pytest.approx(stem + layer1)
        assert 0 < p["frozen_backbone_flops"] < p["flops"]["backbone"]
    for stage in ("search: neck", "search: head"):
        p = plan["stages"][stage]
        assert p["frozen_backbone_flops"] == pytest.approx(p["flops"]["backbone"])


def test_evolution_compute_is_candidates_times_training_and_evaluation(evolution_plan):
    """By hand: candidates x (candidate_epochs x |half A| training steps + |half B| forwards) of the
    planned candidate; linear in candidates and candidate_epochs; max_iters caps the training."""
    cfg, plan = evolution_plan
    e = cfg["search"]["evolution"]
    candidate = plan["candidate"]
    assert candidate["image_size"] == (IMAGE, IMAGE)
    assert (candidate["neck_type"], candidate["head_type"]) == ("auto", "auto")
    half = 500
    one_candidate = e["candidate_epochs"] * half * step_by_hand(candidate) + half * candidate["flops"]["total"]
    compute = search_compute(cfg, plan, train_images=2 * half, utilization=0.5)
    assert compute["strategy"] == "evolution" and compute["architectures"] == e["candidates"]
    assert compute["flops"]["total"] == pytest.approx(e["candidates"] * one_candidate)
    for gpu, peak in GPU_PEAK_FLOPS.items():
        assert compute["gpu_days"][gpu] == pytest.approx(e["candidates"] * one_candidate / (peak * 0.5) / 86400)
    more = search_compute(updated(cfg, {"search.evolution": {"candidates": 3 * e["candidates"]}}),
                          plan, 2 * half, 0.5)
    assert more["flops"]["total"] == pytest.approx(3 * compute["flops"]["total"])
    longer = search_compute(updated(cfg, {"search.evolution": {"candidate_epochs": 2 * e["candidate_epochs"]}}),
                            plan, 2 * half, 0.5)
    assert longer["flops"]["train"] == pytest.approx(2 * compute["flops"]["train"])
    assert longer["flops"]["evaluate"] == pytest.approx(compute["flops"]["evaluate"])
    # max_iters x images_per_batch images per candidate, below the epochs' 6 x 500
    capped_cfg = updated(cfg, {"search.evolution": {"max_iters": 10}, "data": {"images_per_batch": 4}})
    capped = search_compute(capped_cfg, plan, 2 * half, 0.5)
    assert capped["images_per_candidate"] == 40
    assert capped["flops"]["total"] == pytest.approx(
        e["candidates"] * (40 * step_by_hand(candidate) + half * candidate["flops"]["total"]))
    assert "capped at max_iters 10 x 4 images = 40 images" in format_compute(capped)
    # an odd training set: half A = N // 2 trains, half B = the rest evaluates
    odd = search_compute(cfg, plan, 2 * half + 1, 0.5)
    assert (odd["half_a"], odd["half_b"]) == (half, half + 1)
    with pytest.raises(ValueError, match="no evolution candidate"):
        search_compute(cfg, {k: v for k, v in plan.items() if k != "candidate"}, 2 * half)


def test_evolution_candidate_is_what_the_evolution_trains(evolution_plan):
    """The part an evolution does not search is FPN / the given neck / the 2-MLP head; the
    candidate trains at the search's input size."""
    cfg, _ = evolution_plan
    genotype = representative_genotype(cfg)
    fpn = json.loads((REPO / "configs" / "genotypes" / "fpn.json").read_text())
    for stage, given, neck, head in (("both", None, "auto", "auto"), ("neck", None, "auto", "mlp"),
                                     ("head", None, "fpn", "auto"), ("head", fpn, "auto", "auto")):
        ccfg, candidate = evolution_candidate(updated(cfg, {"search": {"stage": stage}}), genotype, given)
        assert (ccfg["model"]["neck"]["type"], ccfg["model"]["head"]["type"]) == (neck, head), stage
        assert (candidate["neck"] is None) == (neck == "fpn") and (candidate["head"] is None) == (head == "mlp")
        if given is not None:
            assert candidate["neck"] == fpn["neck"]
    ccfg, _ = evolution_candidate(updated(cfg, {"search": {"min_size": [128], "max_size": 160}}), genotype, None)
    assert training_image_size(ccfg) == (128, 160)


def test_gradient_and_snas_searches_cost_the_same(evolution_plan):
    cfg, plan = evolution_plan
    gradient = search_compute(updated(cfg, {"search": {"strategy": "differentiable"}}), plan, 1000, 0.5)
    snas = search_compute(updated(cfg, {"search": {"strategy": "snas"}}), plan, 1000, 0.5)
    assert (gradient["strategy"], snas["strategy"]) == ("differentiable", "snas")
    assert gradient["architectures"] == snas["architectures"] == 1
    assert snas["flops"] == gradient["flops"] and snas["gpu_days"] == gradient["gpu_days"]
    assert format_compute(snas).startswith("SNAS: ") and format_compute(snas).endswith(format_compute(gradient))
    with pytest.raises(ValueError, match="search.strategy 'grid'"):
        search_compute(updated(cfg, {"search": {"strategy": "grid"}}), plan, 1000)


def test_random_search_is_k_retrains(evolution_plan):
    """One retrain: solver.epochs x N training steps of the decoded model (at the training size);
    K architectures: K of them; solver.max_iters caps each."""
    cfg, plan = evolution_plan
    decoded = plan["stages"]["decoded"]
    one = random_search_compute(cfg, plan, train_images=300, utilization=0.5)
    assert one["strategy"] == "random" and one["architectures"] == 1
    assert one["flops"]["total"] == pytest.approx(cfg["solver"]["epochs"] * 300 * step_by_hand(decoded))
    ten = random_search_compute(cfg, plan, 300, architectures=10, utilization=0.5)
    assert ten["flops"]["total"] == pytest.approx(10 * one["flops"]["total"])
    assert ten["gpu_days"]["V100"] == pytest.approx(10 * one["gpu_days"]["V100"])
    capped_cfg = updated(cfg, {"solver": {"max_iters": 5}, "data": {"images_per_batch": 2}})
    capped = random_search_compute(capped_cfg, plan, 300, architectures=2, utilization=0.5)
    assert capped["flops"]["total"] == pytest.approx(2 * 10 * step_by_hand(decoded))
    assert "(capped at max_iters 5 x 2 images = 10 images; the decoded model" in format_compute(capped)
    assert "Random search of 10 architectures" in format_compute(ten)
    with pytest.raises(ValueError, match="architectures"):
        random_search_compute(cfg, plan, 300, architectures=0)


def test_cli_prints_the_evolution_and_random_search_compute():
    cmd = [sys.executable, "-m", "autofpn.search.plan", "--cfg", str(REPO / "configs" / "demo.yaml"),
           "--train-images", "300", "--random-architectures", "4", "--gpu-utilization", "0.5",
           "--opts", *SMALL_OPTS, "search.strategy=evolution"]
    out = subprocess.run(cmd, cwd=str(REPO), capture_output=True, text=True, check=True).stdout
    assert "Evolution over 300 training images: 50 candidates x 6 epochs on half A (150 images)" in out
    assert "Random search of 4 architectures, each retrained" in out
    assert out.count("at an assumed 50 % of dense fp32 peak: V100") == 2
    with pytest.raises(SystemExit):
        main(["--random-architectures", "4"])  # needs --train-images


def test_small_computes_are_printed_in_readable_units():
    """A CPU-sized search (~1e13 FLOPs) must not print as 0.00 EFLOP and 0.0 GPU-days."""
    from autofpn.search.plan import _flops, _gpu_time
    assert _flops(21.13e18) == "21.13 EFLOP" and _flops(2.5e15) == "2.50 PFLOP" and _flops(1.371e13) == "13.71 TFLOP"
    assert _gpu_time(51.94) == "51.9 GPU-days"
    assert _gpu_time(0.5) == "0.5 GPU-days (12 GPU-hours)"


def test_search_compute_caps_at_max_iters_and_counts_sampled_steps_on_one_op():
    """search.max_iters caps a stage's weight steps at max_iters x images_per_batch images (the
    Searcher's cap), its architecture steps at the same fraction; gdas counts both steps at the
    plan's sampled-path FLOPs, sampled_weights the weight steps only."""
    cfg = small_cfg()
    cfg["search"]["max_iters"] = 0
    plan = plan_search(cfg, representative_genotype(cfg))
    full = search_compute(cfg, plan, train_images=1000, utilization=0.5)
    arch = 1 - cfg["search"]["arch_start_epoch_fraction"]

    def with_search(**values):
        return {**cfg, "search": {**cfg["search"], **values}}

    capped = search_compute(with_search(max_iters=50), plan, train_images=1000, utilization=0.5)
    cap_images = 50 * cfg["data"]["images_per_batch"]  # 200 of the epochs' 4 x 500
    assert capped["weight_images"] == cap_images
    for stage in ("search: neck", "search: head"):
        assert capped["flops"][stage] == pytest.approx(full["flops"][stage] * cap_images / (4 * 500))
        assert capped["images"][stage] == pytest.approx(cap_images * (1 + arch))
    assert "capped at max_iters 50" in format_compute(capped)

    gdas = search_compute(with_search(mode="gdas"), plan, train_images=1000, utilization=0.5)
    weights_only = search_compute(with_search(mode="sampled_weights"), plan, train_images=1000, utilization=0.5)
    for stage in ("search: neck", "search: head"):
        f, g = plan["stages"][stage]["flops"], plan["stages"][stage]["sampled_flops"]
        assert g["backbone"] == f["backbone"] and g["rpn"] == f["rpn"] and g["total"] < f["total"]
        sampled_weight_step = g["total"] + 2 * (g["total"] - g["backbone"])
        full_arch_step = f["total"] + (f["total"] - f["backbone"])
        sampled_arch_step = g["total"] + (g["total"] - g["backbone"])
        assert gdas["flops"][stage] == pytest.approx(4 * 500 * (sampled_weight_step + arch * sampled_arch_step))
        assert weights_only["flops"][stage] == pytest.approx(4 * 500 * (sampled_weight_step + arch * full_arch_step))
    assert gdas["flops"]["total"] < weights_only["flops"]["total"] < full["flops"]["total"]


def test_sampled_path_flops_are_the_mean_over_one_op_paths():
    """The plan's sampled-path FLOPs of the head supernet, against paths run for real: a gdas
    head supernet on the CPU with every edge on one op k (a one-hot weight: only that op runs)
    costs P + E_k, identity adds nothing (E_identity = 0, so P = F_identity), "none" computes
    nothing; a uniformly drawn path costs P + sum_k E_k / len(HEAD_OPS) in expectation, the full
    mixed op P + sum_k E_k."""
    from autofpn.models.detector import build_detector
    from autofpn.models.operations import HEAD_OPS, set_fused
    from autofpn.search.cost import count_cost
    from autofpn.search.differentiable import stage_config
    cfg = small_cfg()
    genotype = representative_genotype(cfg)
    head_plan = plan_search(cfg, genotype)["stages"]["search: head"]
    stage_cfg = stage_config({**cfg, "search": {**cfg["search"], "mode": "gdas"}}, "head", genotype)
    torch.manual_seed(0)
    model = build_detector(stage_cfg, genotype={"neck": genotype["neck"], "head": None}, search="head")
    box_head = model.roi_heads.box_head
    assert any(m.sampled for m in box_head.modules() if hasattr(m, "sampled"))
    pooler = cfg["model"]["roi"]["pooler_size"]
    rois = torch.randn(head_plan["num_rois"], box_head.in_channels, pooler, pooler)

    def flops_with(op: str) -> float:
        weights = torch.zeros(box_head.arch_shape)
        weights[..., HEAD_OPS.index(op)] = 1.0
        return count_cost(box_head, rois, weights).flops

    one_op = {op: flops_with(op) for op in HEAD_OPS if op != "none"}
    shared = one_op["identity"]
    edges = sum(f - shared for f in one_op.values())
    set_fused(box_head, False)  # every op as built: the FLOP-counting hooks see each one
    mixed = count_cost(box_head, rois, torch.full(box_head.arch_shape, 1.0 / len(HEAD_OPS))).flops
    assert mixed == pytest.approx(shared + edges)
    saving = head_plan["flops"]["head"] - head_plan["sampled_flops"]["head"]
    assert saving == pytest.approx(edges - edges / len(HEAD_OPS))
    assert plan_search(cfg, genotype)["stages"]["decoded"]["sampled_flops"] is None  # no architecture weights


def test_compute_counts_the_mean_multi_scale_image():
    """Multi-scale training draws short sides uniformly: the dense parts scale with the mean
    pixel count, (s / max)^2 averaged; the RoI head's fixed RoIs do not."""
    from autofpn.search.plan import mean_flops, mean_pixel_fraction
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), SMALL_OPTS + ["model.transform.min_size=[128,192,256]"])
    assert mean_pixel_fraction(cfg) == pytest.approx(((128 / 256) ** 2 + (192 / 256) ** 2 + 1) / 3)
    decoded = plan_search(cfg, representative_genotype(cfg))["stages"]["decoded"]
    assert decoded["image_size"][0] == 256 and decoded["pixel_fraction"] == pytest.approx(mean_pixel_fraction(cfg))
    mean = mean_flops(decoded)
    for part in ("backbone", "neck", "rpn"):
        assert mean[part] == pytest.approx(decoded["flops"][part] * decoded["pixel_fraction"])
    assert mean["head"] == decoded["flops"]["head"]
    single = plan_search(small_cfg(), representative_genotype(small_cfg()))["stages"]["decoded"]
    assert single["pixel_fraction"] == 1.0 and mean_flops(single) == pytest.approx(single["flops"])


def test_the_head_search_can_run_a_narrower_supernet():
    """search.head_channels: the head stage's supernet at that width (the genotype does not
    depend on it), planned so; the retrained (decoded) head keeps model.head.channels."""
    from autofpn.search.differentiable import stage_config
    cfg = small_cfg()  # model.head.channels 32
    narrow = {**cfg, "search": {**cfg["search"], "head_channels": 16}}
    assert stage_config(narrow, "head", None)["model"]["head"]["channels"] == 16
    assert stage_config(cfg, "head", None)["model"]["head"]["channels"] == 32
    wide_plan, narrow_plan = (plan_search(c, representative_genotype(cfg)) for c in (cfg, narrow))
    assert narrow_plan["stages"]["search: head"]["params"]["head"] < wide_plan["stages"]["search: head"]["params"]["head"]
    assert narrow_plan["stages"]["search: head"]["flops"]["head"] < 0.5 * wide_plan["stages"]["search: head"]["flops"]["head"]
    assert narrow_plan["stages"]["decoded"]["params"] == wide_plan["stages"]["decoded"]["params"]
    with pytest.raises(ValueError, match="search.head_channels"):
        stage_config({**cfg, "search": {**cfg["search"], "head_channels": -1}}, "head", None)
