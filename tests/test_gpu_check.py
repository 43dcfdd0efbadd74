"""bench/gpu_check.py (``make gpu-check``) keeps working where no GPU is: the same steps with
``--device cpu`` at a tiny size, and one clear line when CUDA is asked for and absent."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_search_run import tiny_opts

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "bench" / "gpu_check.py")


def test_gpu_check_runs_its_steps_on_the_cpu(tmp_path):
    opts = [o for o in tiny_opts(str(tmp_path / "synthetic"), str(tmp_path / "unused"))
            if not o.startswith(("search.output_dir", "train.output_dir", "train.device", "search.max_iters"))]
    out = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--skip-tests", "--reps", "1", "--iters", "2",
                          "--out", str(tmp_path / "check"), "--opts", *opts],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for label in ("FPN training step", "neck search iteration", "head search iteration", "neck search, gdas",
                  "head search, gdas", "neck search, 1/4 ch.", "head search, 1/4 ch.",
                  "neck search iteration, 1 by 1", "neck search, 1/4 ch., 1 by 1", "neck search iteration, all stacked"):
        assert label in out.stdout
    assert "bfloat16" in out.stdout  # the search iterations timed with search.amp too
    assert "end to end: search.py (2 iterations per stage)" in out.stdout
    assert (tmp_path / "check" / "search" / "geno.json").is_file()
    assert (tmp_path / "check" / "train" / "model_final.pth").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_check_without_cuda_says_so_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().startswith("gpu-check: no CUDA device here") and out.stderr.count("\n") == 1


def test_gpu_check_steps_only_times_the_variants_asked_for_and_nothing_else(tmp_path):
    opts = [o for o in tiny_opts(str(tmp_path / "synthetic"), str(tmp_path / "unused"))
            if not o.startswith(("search.output_dir", "train.output_dir", "train.device", "search.max_iters"))]
    out = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--steps-only", "--reps", "1",
                          "--variants", "fpn", "neck_recompute", "--out", str(tmp_path / "check"), "--opts", *opts],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith(("FPN training step", "neck search"))]
    assert [r.split()[-4] for r in rows] == ["none", "none", "bfloat16"]  # search.amp column: FPN once
    assert all("recompute" in r for r in rows[1:])
    assert "end to end" not in out.stdout and not (tmp_path / "check").exists()
