"""Reading finished runs of train.py: final metrics, the trained detector, its backbone."""
import glob
import json
import os
from typing import Dict, Tuple

from torch import nn

from autofpn.engine.checkpoint import atomic_torch_save, load_checkpoint


def final_metrics(run_dir: str) -> Dict[str, float]:
    """The summary of the last evaluation of a training run (``eval/iter_*/metrics.json``)."""
    found = sorted(glob.glob(os.path.join(run_dir, "eval", "iter_*", "metrics.json")))
    if not found:
        raise FileNotFoundError(f"no evaluation found in {run_dir}/eval")
    with open(found[-1]) as f:
        return json.load(f)


def load_final_model(run_dir: str) -> Tuple[Dict[str, int], nn.Module]:
    """(parameter breakdown, detector in eval mode) of a finished run's ``model_final.pth``."""
    from autofpn.config import complete_config
    from autofpn.models.detector import build_detector, parameter_breakdown
    path = os.path.join(run_dir, "model_final.pth")
    state = load_checkpoint(path, "trained model")
    cfg = complete_config(state["cfg"], ["model.backbone.weights=none"], where=path)  # weights: from the file
    model = build_detector(cfg, state.get("genotype"))
    model.load_state_dict(state["model"])
    return parameter_breakdown(model), model.eval()


def export_backbone(run_dir: str, path: str) -> str:
    """Write the backbone of a finished run to ``path`` as a plain state dict, the format
    ``model.backbone.weights`` reads. Returns ``path``."""
    state = load_checkpoint(os.path.join(run_dir, "model_final.pth"), "trained model")["model"]
    prefix = "backbone.body."
    atomic_torch_save({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, path)
    return path
