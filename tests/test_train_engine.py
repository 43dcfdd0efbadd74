"""Engine pieces on their own: solver groups + schedule, atomic checkpoints, RNG round trip,
metrics log truncation on resume, curves, NaN check message."""
import json
import math
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from autofpn.config import load_config
from autofpn.engine.checkpoint import (CheckpointManager, atomic_torch_save, capture_rng_state,
                                       load_checkpoint, restore_rng_state)
from autofpn.engine.logging import MetricsLog, read_metrics
from autofpn.engine.solver import WarmupScheduler, build_optimizer, build_scheduler
from autofpn.engine.trainer import (NonFiniteLossError, check_finite_losses, inject_nan_for_test,
                                    parse_nan_hook)
from autofpn.viz.curves import plot_curves


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(4, 2)


def test_optimizer_groups_exclude_norms_and_biases_from_decay():
    net = _Net()
    solver = load_config(None, ["solver.weight_decay=0.001",
                                "solver.weight_decay_norm_bias=0.0"])["solver"]
    opt = build_optimizer(solver, net)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.001 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([net.conv.weight, net.fc.weight])
    assert ids(no_decay["params"]) == ids([net.bn.weight, net.bn.bias, net.gn.weight,
                                           net.gn.bias, net.fc.bias])
    net.fc.weight.requires_grad_(False)  # frozen parameters are left out
    assert id(net.fc.weight) not in ids(build_optimizer(solver, net).param_groups[0]["params"])


def test_warmup_then_step_schedule():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = WarmupScheduler(opt, max_iters=100, schedule="step", milestones=[50, 80], gamma=0.1,
                            warmup_iters=10, warmup_factor=0.1)
    lrs = [opt.param_groups[0]["lr"]]
    for _ in range(99):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.1 + 0.9 * 0.5)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # rising during warm-up
    assert lrs[10] == pytest.approx(1.0) and lrs[49] == pytest.approx(1.0)
    assert lrs[50] == pytest.approx(0.1) and lrs[80] == pytest.approx(0.01)


def test_cosine_schedule_reaches_floor_and_state_round_trip():
    solver = load_config(None, ["solver.schedule=cosine", "solver.lr=0.02", "solver.min_lr=0.001",
                                "solver.warmup_iters=0"])["solver"]
    opt = build_optimizer(solver, _Net())
    sched = build_scheduler(solver, opt, iters_per_epoch=10, max_iters=40)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02)
    for _ in range(20):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001 + 0.019 * 0.5)
    state = sched.state_dict()
    for _ in range(20):
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001)
    sched.load_state_dict(state)  # a resumed run continues the same curve
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001 + 0.019 * 0.5)


def test_rng_state_round_trip_through_weights_only_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(1), np.random.randn()
    state = capture_rng_state()
    atomic_torch_save({"rng": state}, str(tmp_path / "r.pth"))
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(str(tmp_path / "r.pth"))["rng"])
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected


def test_checkpoint_manager_keeps_last_k_and_best(tmp_path):
    mgr = CheckpointManager(str(tmp_path / "ck"), keep=2)
    assert mgr.latest() is None
    for it in (10, 20, 30, 40):
        mgr.save({"iter": it, "w": torch.full((2,), float(it))}, it, is_best=(it == 20))
    names = sorted(os.listdir(tmp_path / "ck"))
    assert names == ["best.pth", "ckpt_0000030.pth", "ckpt_0000040.pth", "last_checkpoint"]
    assert load_checkpoint(mgr.latest())["iter"] == 40
    assert load_checkpoint(mgr.best_path)["iter"] == 20
    # a torn temp file from a kill during a write is ignored
    (tmp_path / "ck" / "ckpt_0000050.pth.tmp").write_bytes(b"partial")
    assert mgr.latest().endswith("ckpt_0000040.pth")
    with pytest.raises(RuntimeError, match="ckpt_0000050.pth.tmp"):
        load_checkpoint(str(tmp_path / "ck" / "ckpt_0000050.pth.tmp"))
    # disabled manager (ranks > 0) writes nothing
    assert CheckpointManager(str(tmp_path / "other"), enabled=False).save({}, 1) is None
    assert not (tmp_path / "other").exists()


def test_metrics_log_truncates_records_after_resume_point(tmp_path):
    path = str(tmp_path / "m.jsonl")
    log = MetricsLog(path)
    for it in range(1, 7):
        log.write({"type": "train", "iter": it, "loss": 1.0 / it})
    with open(path, "a") as f:
        f.write('{"type": "train", "it')  # torn line from a SIGKILL
    MetricsLog(path, resume_iter=3)  # the checkpoint holds 3 completed iterations
    assert [r["iter"] for r in read_metrics(path)] == [1, 2, 3]
    MetricsLog(path).write({"type": "train", "iter": 1, "loss": float("nan")})  # fresh run
    records = read_metrics(path)
    assert len(records) == 1 and records[0]["loss"] == "nan"
    json.loads(open(path).read())  # valid JSON even with a NaN value


def test_plot_curves_writes_pngs(tmp_path):
    records = [{"type": "train", "iter": i, "loss": 2.0 / i, "loss_cls": 1.0 / i}
               for i in range(1, 11)]
    records += [{"type": "eval", "iter": 5, "AP": 0.1, "AP50": 0.2},
                {"type": "eval", "iter": 10, "AP": 0.2, "AP50": 0.35}]
    files = plot_curves(records, str(tmp_path))
    assert sorted(os.path.basename(f) for f in files) == ["loss_curve.png", "map_curve.png"]
    for f in files:
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(f) > 5000
    # one evaluation is no curve: the final numbers as bars (not a single dot)
    import matplotlib.pyplot as plt
    from unittest import mock
    with mock.patch.object(plt.Axes, "bar", autospec=True, side_effect=plt.Axes.bar) as bar, \
            mock.patch.object(plt.Axes, "plot", autospec=True, side_effect=plt.Axes.plot) as plot:
        plot_curves(records[:10] + [{"type": "eval", "iter": 10, "AP": 12.5, "AP50": 30.0, "APs": -1.0}],
                    str(tmp_path / "one"))
    assert bar.call_count == 1 and list(bar.call_args.args[1]) == ["AP", "AP50", "APs"]
    assert list(bar.call_args.args[2]) == [12.5, 30.0, 0.0] and plot.call_count == 2  # the loss curves only


def test_nan_hook_and_check_name_iteration_and_term():
    assert parse_nan_hook(None) is None and parse_nan_hook("7:loss_cls") == (7, "loss_cls")
    with pytest.raises(ValueError, match="ITER:TERM"):
        parse_nan_hook("loss_cls")
    losses = {"loss_cls": torch.tensor(0.5), "loss_box": torch.tensor(0.2)}
    check_finite_losses(losses, 6, torch.device("cpu"))  # finite: no error
    assert inject_nan_for_test(losses, 6, (7, "loss_cls")) is losses
    poisoned = inject_nan_for_test(losses, 7, (7, "loss_cls"))
    assert math.isnan(float(poisoned["loss_cls"])) and float(losses["loss_cls"]) == 0.5
    with pytest.raises(NonFiniteLossError, match=r"iteration 7: loss_cls=nan"):
        check_finite_losses(poisoned, 7, torch.device("cpu"))
    with pytest.raises(NonFiniteLossError, match="loss_box=inf"):
        check_finite_losses({"loss_box": torch.tensor(float("inf"))}, 3, torch.device("cpu"))
    with pytest.raises(KeyError, match="loss_nope"):
        inject_nan_for_test(losses, 7, (7, "loss_nope"))


def test_progress_prints_plain_lines_when_not_on_a_terminal(monkeypatch):
    import io
    from autofpn.engine.logging import Progress
    monkeypatch.delenv("AUTOFPN_PROGRESS", raising=False)
    stream = io.StringIO()  # a log file: not a terminal
    progress = Progress(100, start=40, desc="search neck", stream=stream)
    for _ in range(60):
        progress.update({"loss": 1.25}, 0.01, 4)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) == 20, lines  # one per 5 % of the 60 iterations
    assert lines[0].startswith("search neck 43/100 (43 %), ") and "ETA" in lines[0]
    assert lines[-1].startswith("search neck 100/100 (100 %), ") and "| loss=1.250, lr=1.00e-02, img_s=" in lines[-1]
    monkeypatch.setenv("AUTOFPN_PROGRESS", "bar")  # forced: the tqdm bar, even into a file
    stream = io.StringIO()
    progress = Progress(10, stream=stream)
    progress.update({"loss": 1.0}, 0.01, 4)
    progress.close()
    assert "\r" in stream.getvalue()


def test_precise_bn_makes_eval_mode_of_a_retrained_derived_neck_agree_with_train_mode(tmp_path):
    """The stale running statistics behind 'a BN neck retrained on real data gives 0 detections':
    after the features under the neck move (here: the backbone's last stage scaled, as trainable
    convolutions under frozen BN statistics do), eval-mode neck outputs on training images are far
    from the train-mode (batch statistics) ones; recomputed, they agree."""
    import copy
    from autofpn.data import build_dataset, build_loader
    from autofpn.engine.trainer import recompute_bn_statistics
    from autofpn.models.detector import build_detector
    from autofpn.models.genotype import load_genotype
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config(None, [
        "model.backbone.name=resnet18", "model.backbone.weights=none", "model.backbone.norm=frozen_bn",
        "model.neck.type=auto", "model.neck.norm=bn", "model.neck.channels=16", "model.head.mlp_dim=32",
        "model.transform.min_size=[96]", "model.transform.max_size=96", "model.transform.test_min_size=96",
        "data.hflip_prob=0.0", "data.num_workers=0", "data.images_per_batch=6",
        f"data.synthetic.root={tmp_path}/syn", "data.synthetic.num_train=6", "data.synthetic.num_val=2",
        "data.synthetic.image_size=96"])
    torch.manual_seed(0)
    genotype = load_genotype(os.path.join(root, "configs", "genotypes", "panet.json"))
    dataset = build_dataset(cfg, "train")
    cfg["model"]["num_classes"] = dataset.num_classes
    model = build_detector(cfg, genotype)
    loader = build_loader(cfg, dataset, train=True, seed=0)  # one batch: every training image
    images = [dataset[i][0] for i in range(len(dataset))]
    model.train()
    with torch.no_grad():  # running statistics of the neck at the initial weights
        for _ in range(20):
            for batch, targets in loader:
                model(batch, targets)
        for p in model.backbone.body.layer4.parameters():  # the features under the neck move
            p.mul_(3.0)

    def neck_outputs(m):
        with torch.no_grad():
            tensor, _, _ = m.transform(images)
            return m.neck(m.backbone(tensor))

    def batch_stat_outputs(m):
        m = copy.deepcopy(m).eval()
        for bn in m.neck.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.train()
                bn.momentum = 0.0  # normalise with the batch, leave the running statistics
        return neck_outputs(m)

    def rel_diff(a, b):
        return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in a)

    model.eval()
    stale = rel_diff(neck_outputs(model), batch_stat_outputs(model))
    assert stale > 0.5, stale
    assert recompute_bn_statistics(model, loader, 4, torch.device("cpu")) == 1
    assert not model.training  # mode restored
    fresh = rel_diff(neck_outputs(model), batch_stat_outputs(model))
    # not exact: running_var keeps the unbiased variance, the batch normalises with the biased
    # one (n / (n - 1) with n = 6 images x 3 x 3 at P5: ~1 % in the std)
    assert fresh < 0.03, fresh
    assert recompute_bn_statistics(nn.Sequential(nn.Conv2d(3, 3, 1)), loader, 4, torch.device("cpu")) == 0


def test_collapsed_bn_layers_names_the_layers_fed_a_constant_input():
    """The 0 AP of a BN neck over a saturated MobileNetV2 C5 (docs/STUDY.md, section 17): a BN
    layer whose input is constant per channel ends with a running variance below eps and is
    named; a live layer, one with a single constant channel of four, and frozen (ImageNet)
    statistics are not."""
    from torchvision.ops import FrozenBatchNorm2d
    from autofpn.engine.trainer import collapsed_bn_layers
    torch.manual_seed(0)
    model = nn.ModuleDict({"live": nn.BatchNorm2d(4), "dead": nn.BatchNorm2d(4), "one_dead": nn.BatchNorm2d(4),
                           "frozen": FrozenBatchNorm2d(4)})
    model.frozen.running_var.fill_(1e-7)
    live = torch.randn(2, 4, 5, 5)
    constant = torch.full((2, 4, 5, 5), 6.0) + 1e-4 * torch.randn(2, 4, 5, 5)  # a ReLU6 ceiling, rounding
    one_dead = live.clone()
    one_dead[:, 0] = 6.0
    model.train()
    for bn in (model.live, model.dead, model.one_dead):
        bn.momentum = None  # running statistics = those of the batches seen, as precise BN sets them
    model.live(live), model.dead(constant), model.one_dead(one_dead)
    assert collapsed_bn_layers(model) == ["dead"]
    model.dead.running_var[:2] = 1.0  # half of the channels still collapsed
    assert collapsed_bn_layers(model) == ["dead"]
    model.dead.running_var[2] = 1.0
    assert collapsed_bn_layers(model) == []
