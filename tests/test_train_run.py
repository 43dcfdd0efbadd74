"""train.py end to end on the embedded synthetic data, tiny sizes (CPU):
losses finite and falling; NaN injection; kill -9 + resume == uninterrupted, bit for bit;
2-process torchrun (Gloo) training + evaluation."""
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
import train as train_script  # noqa: E402

from autofpn.engine.checkpoint import CheckpointManager, load_checkpoint  # noqa: E402
from autofpn.engine.logging import read_metrics  # noqa: E402


def tiny_opts(synthetic_root: str, out_dir: str, **extra) -> list:
    """A CPU-fast config: 128 px synthetic images, 8 train / 4 val, 2 per batch (4 it/epoch)."""
    opts = {
        "train.output_dir": out_dir, "train.device": "cpu", "train.log_period": 1,
        "train.eval_period": 0, "train.checkpoint_period": 0, "train.keep_checkpoints": 3,
        "data.synthetic.root": synthetic_root, "data.synthetic.num_train": 8,
        "data.synthetic.num_val": 4, "data.synthetic.image_size": 128,
        "data.images_per_batch": 2, "data.num_workers": 0,
        "model.transform.min_size": "[112,128]", "model.transform.max_size": 160,
        "model.transform.test_min_size": 128,
        "model.neck.channels": 16, "model.head.mlp_dim": 64,
        "model.rpn.pre_nms_top_n_train": 200, "model.rpn.post_nms_top_n_train": 100,
        "model.rpn.pre_nms_top_n_test": 100, "model.rpn.post_nms_top_n_test": 50,
        "model.rpn.batch_size_per_image": 64, "model.roi.batch_size_per_image": 64,
        "model.roi.detections_per_img": 20,
        "solver.lr": 0.01, "solver.warmup_iters": 2, "solver.epochs": 3, "solver.steps": "[2]",
        "eval.metric": "coco",
    }
    opts.update(extra)
    return [f"{k}={v}" for k, v in opts.items()]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("synthetic"))


def _cli(opts):
    return ["--cfg", str(REPO / "configs" / "demo.yaml"), "--neck", "fpn", "--head", "mlp",
            "--opts", *opts]


def _train_losses(out_dir):
    return [r["loss"] for r in read_metrics(os.path.join(out_dir, "metrics.jsonl"))
            if r["type"] == "train"]


def test_single_process_losses_finite_and_falling(tmp_path, synthetic_root):
    out = str(tmp_path / "run")
    assert train_script.main(_cli(tiny_opts(synthetic_root, out, **{"solver.max_iters": 12}))) == 0
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    train = [r for r in records if r["type"] == "train"]
    assert [r["iter"] for r in train] == list(range(1, 13))
    for r in train:
        for key in ("loss", "loss_rpn_cls", "loss_rpn_box", "loss_cls", "loss_box"):
            assert isinstance(r[key], float) and r[key] == r[key] and abs(r[key]) < 1e6, r
    losses = [r["loss"] for r in train]
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
    evals = [r for r in records if r["type"] == "eval"]
    assert len(evals) == 1 and evals[0]["iter"] == 12 and 0.0 <= evals[0]["AP"] <= 100.0  # percent
    # outputs beside the run: resolved config, plots, final weights, checkpoints
    from autofpn.config import load_config
    saved = load_config(os.path.join(out, "config.yaml"))
    assert saved["model"]["neck"]["channels"] == 16 and saved["solver"]["max_iters"] == 12
    for name in ("loss_curve.png", "map_curve.png", "model_final.pth"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    final = load_checkpoint(os.path.join(out, "model_final.pth"))
    assert final["cfg"] == saved and "model" in final
    # TensorBoard holds the same numbers (train.tensorboard, on by default)
    board = _read_events(os.path.join(out, "tensorboard"))
    for tag in ("train/loss", "train/loss_box", "train/lr", "train/images_per_s"):
        assert [e.step for e in board.Scalars(tag)] == list(range(1, 13)), tag
    assert [e.value for e in board.Scalars("train/loss")] == pytest.approx(losses, rel=1e-6)
    assert [(e.step, e.value) for e in board.Scalars("eval/AP")] == [(12, pytest.approx(evals[0]["AP"]))]


def _read_events(folder: str):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    board = EventAccumulator(folder, size_guidance={"scalars": 0})
    board.Reload()
    return board


def test_nan_injection_stops_and_keeps_last_good_checkpoint(tmp_path, synthetic_root, capsys):
    out = str(tmp_path / "nan")
    opts = tiny_opts(synthetic_root, out, **{"train.checkpoint_period": 2,
                                             "train.debug_nan_at": "5:loss_box"})
    assert train_script.main(_cli(opts)) == 2
    err = capsys.readouterr().err
    assert "non-finite loss at iteration 5" in err and "loss_box=nan" in err
    manager = CheckpointManager(os.path.join(out, "checkpoints"))
    state = load_checkpoint(manager.latest())
    assert state["iter"] == 4  # iterations 0..4 ran (4 = epoch end), the NaN one did not step
    from autofpn.models.detector import build_detector
    model = build_detector(state["cfg"], state["genotype"])
    model.load_state_dict(state["model"])
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not os.path.exists(os.path.join(out, "model_final.pth"))


def _run(args, env=None, timeout=300):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=str(REPO),
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_kill9_and_resume_gives_bit_identical_weights(tmp_path, synthetic_root):
    # 10 iterations over 2.5 epochs, checkpoints every 3 iterations and at epoch ends (4, 8).
    extra = {"solver.max_iters": 10, "train.checkpoint_period": 3}
    full_dir, killed_dir = str(tmp_path / "full"), str(tmp_path / "killed")
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONUNBUFFERED="1")
    full = _run(_cli(tiny_opts(synthetic_root, full_dir, **extra)), env)
    assert full.returncode == 0, full.stderr[-3000:]

    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"),
                             *_cli(tiny_opts(synthetic_root, killed_dir, **extra))],
                            cwd=str(REPO), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    target = os.path.join(killed_dir, "checkpoints", "ckpt_0000006.pth")  # mid-epoch 1
    deadline = time.time() + 240
    while not os.path.exists(target) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(killed_dir, "model_final.pth"))

    resumed = _run([*_cli(tiny_opts(synthetic_root, killed_dir, **extra)), "--resume"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    a = load_checkpoint(os.path.join(full_dir, "model_final.pth"))["model"]
    b = load_checkpoint(os.path.join(killed_dir, "model_final.pth"))["model"]
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different
    assert _train_losses(full_dir) == _train_losses(killed_dir)
    assert len(_train_losses(killed_dir)) == 10
    # TensorBoard: the killed process's events past the checkpoint are purged on resume
    board = _read_events(os.path.join(killed_dir, "tensorboard"))
    assert [e.step for e in board.Scalars("train/loss")] == list(range(1, 11))
    assert [e.value for e in board.Scalars("train/loss")] == pytest.approx(_train_losses(full_dir), rel=1e-6)
    # the run's training time counts the killed process too, not only the resumed one
    time_record = [r for r in read_metrics(os.path.join(killed_dir, "metrics.jsonl")) if r["type"] == "time"][-1]
    assert time_record["seconds"] > time_record["seconds_this_process"] > 0


def test_torchrun_two_processes_gloo(tmp_path, synthetic_root):
    out = str(tmp_path / "ddp")
    opts = tiny_opts(synthetic_root, out, **{"solver.max_iters": 3})
    # build the synthetic data once before the two ranks start (no race on generation)
    from autofpn.config import load_config
    from autofpn.data import build_dataset
    build_dataset(load_config(str(REPO / "configs" / "demo.yaml"), opts), "train")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--standalone", str(REPO / "train.py"), *_cli(opts)]
    proc = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("final evaluation:") == 1  # rank 0 alone reports
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    train = [r for r in records if r["type"] == "train"]
    assert [r["iter"] for r in train] == [1, 2, 3]
    assert all(r["loss"] == r["loss"] for r in train)
    evals = [r for r in records if r["type"] == "eval"]
    assert len(evals) == 1 and 0.0 <= evals[0]["AP"] <= 100.0  # percent
    state = load_checkpoint(os.path.join(out, "checkpoints", "ckpt_0000003.pth"))
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    # the two ranks drew different augmentation streams but stayed in sync on weights:
    # DDP averaged the gradients, so rank 0's final weights are the checkpoint's
    final = load_checkpoint(os.path.join(out, "model_final.pth"))["model"]
    assert all(torch.equal(final[k], state["model"][k]) for k in final)


def test_genotype_without_cfg_uses_the_config_it_was_searched_with(tmp_path, synthetic_root):
    """`train.py --genotype out/geno.json` with no --cfg: the config.yaml search.py wrote beside
    the genotype is used (and said), not the built-in defaults; the genotype's parts are built."""
    from autofpn.config import load_config, save_config
    from autofpn.models.genotype import save_genotype
    from autofpn.search.random_sample import random_genotype
    search_dir = tmp_path / "search"
    searched_cfg = load_config(str(REPO / "configs" / "demo.yaml"),
                               tiny_opts(synthetic_root, str(tmp_path / "unused"), **{"model.head.channels": 8}))
    save_config(searched_cfg, str(search_dir / "config.yaml"))
    save_genotype(random_genotype(0, 2, cells=searched_cfg["model"]["head"]["cells"]), str(search_dir / "geno.json"))
    out = tmp_path / "retrain"
    result = subprocess.run([sys.executable, "train.py", "--genotype", str(search_dir / "geno.json"), "--opts",
                             f"train.output_dir={out}", "solver.max_iters=1"],
                            cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"config: {search_dir / 'config.yaml'}" in result.stdout
    used = load_config(str(out / "config.yaml"))
    assert used["model"]["neck"]["channels"] == 16 and used["model"]["head"]["channels"] == 8
    assert used["model"]["neck"]["type"] == "auto" and used["model"]["head"]["type"] == "auto"


def test_checkpoint_of_a_searched_neck_with_the_mlp_head_evaluates_alone(tmp_path, synthetic_root):
    """train.py --genotype G --head mlp keeps FPN's 2-MLP head; evaluate.py --ckpt (no --cfg, no
    --genotype) must rebuild that model from the checkpoint, not the genotype's Auto-head."""
    from autofpn.models.genotype import save_genotype
    from autofpn.search.random_sample import random_genotype
    save_genotype(random_genotype(0, 2), str(tmp_path / "geno.json"))
    out = tmp_path / "run"
    trained = subprocess.run([sys.executable, "train.py", "--cfg", str(REPO / "configs" / "demo.yaml"),
                              "--genotype", str(tmp_path / "geno.json"), "--head", "mlp",
                              "--opts", *tiny_opts(synthetic_root, str(out), **{"solver.max_iters": 1})],
                             cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    evaluated = subprocess.run([sys.executable, "evaluate.py", "--ckpt", str(out / "model_final.pth")],
                               cwd=str(REPO), capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((out / "eval_model_final" / "metrics.json").read_text())["params"]["head"] > 0
