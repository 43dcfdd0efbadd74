"""Run folders of train.py and search.py: who may write into one, and reading finished runs
(final metrics, the trained detector, its backbone)."""
import glob
import json
import os
from typing import Any, Dict, List, Optional, Tuple

from torch import nn

from autofpn.engine.checkpoint import atomic_torch_save, load_checkpoint


# keys that change how a run is watched or where it writes, not what it computes: a folder may be
# resumed with other values of these
RESULT_NEUTRAL_KEYS = ("train.output_dir", "search.output_dir", "train.log_period", "train.checkpoint_period",
                       "train.keep_checkpoints", "train.auto_resume", "train.device", "data.num_workers",
                       "eval.images_per_batch", "eval.output_dir")


class FolderInUseError(RuntimeError):
    """An output folder holds a run made with another config (or genotype)."""


def folder_differences(folder: str, cfg: Dict[str, Any], genotype: Optional[Dict[str, Any]] = None,
                       ignore: Tuple[str, ...] = ()) -> List[str]:
    """The config keys (and "genotype") in which the run recorded in ``folder`` (its config.yaml,
    genotype.json) differs from ``cfg`` / ``genotype``, ignoring RESULT_NEUTRAL_KEYS and keys
    under the ``ignore`` prefixes (e.g. "search." for a training run); [] for a folder with no
    recorded run."""
    import yaml
    from autofpn.config import complete_config, diff_keys
    path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        saved = complete_config(yaml.safe_load(f) or {}, where=path)
    diff = [k for k in diff_keys(saved, cfg) if k not in RESULT_NEUTRAL_KEYS and not k.startswith(tuple(ignore))]
    geno_path = os.path.join(folder, "genotype.json")
    saved_genotype = None
    if os.path.isfile(geno_path):
        with open(geno_path) as f:
            saved_genotype = json.load(f)
    if diff_keys(saved_genotype, genotype):
        diff.append("genotype")
    return diff


def claim_folder(folder: str, cfg: Dict[str, Any], genotype: Optional[Dict[str, Any]] = None,
                 force: bool = False, what: str = "run", ctx=None, ignore: Tuple[str, ...] = ()) -> Optional[str]:
    """Make ``folder`` safe for a run of ``cfg`` before anything is written there: a folder that
    holds a run of the same config (and genotype) is resumed; one of another config raises
    FolderInUseError naming the keys that differ (on every rank), or with ``force`` is moved
    aside to ``<folder>.old[N]`` by the main rank (nothing is deleted). Returns that path."""
    from autofpn.engine import distributed as du
    is_main = ctx is None or ctx.is_main
    diff = folder_differences(folder, cfg, genotype, ignore)
    du.barrier()  # every rank has read the folder before the main rank may move it
    if not diff:
        return None
    if not force:
        shown = ", ".join(diff[:8]) + (f" and {len(diff) - 8} more" if len(diff) > 8 else "")
        raise FolderInUseError(f"{folder} holds a {what} made with another config ({shown} differ); "
                               f"use another output folder, or --force to move that one aside and start anew")
    aside = None
    if is_main:
        aside, n = f"{folder.rstrip(os.sep)}.old", 1
        while os.path.exists(aside):
            n += 1
            aside = f"{folder.rstrip(os.sep)}.old{n}"
        os.replace(folder, aside)
        print(f"--force: moved the previous {what} in {folder} to {aside}", flush=True)
    du.barrier()
    return aside


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
