"""Run folders of train.py and search.py: who may write into one, and reading finished runs
(final metrics, the trained detector from a run or any of its checkpoints, its backbone, what
its labels mean)."""
import ctypes
import fcntl
import glob
import json
import os
import signal
from typing import IO, Any, Dict, List, Optional, Tuple

from torch import nn

from autofpn.engine.checkpoint import atomic_torch_save, load_checkpoint


# keys that change how a run is watched or where it writes, not what it computes: a folder may be
# resumed with other values of these
RESULT_NEUTRAL_KEYS = ("train.output_dir", "search.output_dir", "train.log_period", "train.checkpoint_period",
                       "train.keep_checkpoints", "train.auto_resume", "train.device", "data.num_workers",
                       "eval.images_per_batch", "eval.output_dir", "eval.draw_images")


class FolderInUseError(RuntimeError):
    """An output folder holds a run made with another config (or genotype)."""


def folder_differences(folder: str, cfg: Dict[str, Any], genotype: Optional[Dict[str, Any]] = None,
                       ignore: Tuple[str, ...] = (), genotype_file: str = "genotype.json",
                       genotype_label: str = "genotype") -> List[str]:
    """The config keys (and ``genotype_label``) in which the run recorded in ``folder`` (its
    config.yaml, ``genotype_file``) differs from ``cfg`` / ``genotype``, ignoring
    RESULT_NEUTRAL_KEYS and keys under the ``ignore`` prefixes (e.g. "search." for a training
    run); [] for a folder with no recorded run."""
    import yaml
    from autofpn.config import complete_config, diff_keys
    path = os.path.join(folder, "config.yaml")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        saved = complete_config(yaml.safe_load(f) or {}, where=path)
    diff = [k for k in diff_keys(saved, cfg) if k not in RESULT_NEUTRAL_KEYS and not k.startswith(tuple(ignore))]
    geno_path = os.path.join(folder, genotype_file)
    saved_genotype = None
    if os.path.isfile(geno_path):
        with open(geno_path) as f:
            saved_genotype = json.load(f)
    if diff_keys(saved_genotype, genotype):
        diff.append(genotype_label)
    return diff


def claim_folder(folder: str, cfg: Dict[str, Any], genotype: Optional[Dict[str, Any]] = None,
                 force: bool = False, what: str = "run", ctx=None, ignore: Tuple[str, ...] = (),
                 genotype_file: str = "genotype.json", genotype_label: str = "genotype") -> Optional[str]:
    """Make ``folder`` safe for a run of ``cfg`` before anything is written there: a folder that
    holds a run of the same config (and genotype, recorded in ``genotype_file``) is resumed; one of
    another config raises FolderInUseError naming the keys that differ (on every rank), or with
    ``force`` is moved aside to ``<folder>.old[N]`` by the main rank (nothing is deleted). Returns
    that path."""
    from autofpn.engine import distributed as du
    is_main = ctx is None or ctx.is_main
    diff = folder_differences(folder, cfg, genotype, ignore, genotype_file, genotype_label)
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


def lock_folder(folder: str) -> Optional[IO]:
    """An exclusive lock on ``folder/running.lock`` (``fcntl.flock``, non-blocking): the open
    lock file while this process may work in ``folder`` (close it to let go), None when another
    process holds it now. The study's units and the evolution's candidates use it so that two
    processes on one folder never train the same run twice into it. The OS drops the lock when its
    process dies (kill -9 included), so a crash never leaves a folder claimed."""
    os.makedirs(folder, exist_ok=True)
    lock = open(os.path.join(folder, "running.lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def threads_per_job(jobs: int) -> int:
    """CPU threads for each of ``jobs`` worker processes run at once (at least 1), out of the
    CPUs this process may run on (``taskset`` / a cgroup's CPU set), not all of the machine's."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) // max(1, jobs))


def parse_shard(text: str) -> Tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n; ValueError saying what is wrong."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"{text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"{text!r}: I must be in 0..N-1")
    return i, n


def log_tail(path: str, lines: int = 15) -> str:
    """The last ``lines`` non-empty lines of a worker's log (progress bars' carriage returns as
    line breaks); "" when it cannot be read."""
    try:
        with open(path, errors="replace") as f:
            text = f.read().replace("\r", "\n")
    except OSError:
        return ""
    return "\n".join([l for l in text.splitlines() if l.strip()][-lines:])


def die_with_parent() -> None:
    """``preexec_fn`` of a worker subprocess (runs in the child before exec): SIGKILL it when its
    parent dies (Linux), so a killed study or evolution leaves no orphan training runs writing
    into its folders."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def final_metrics(run_dir: str) -> Dict[str, float]:
    """The summary of the last evaluation of a training run (``eval/iter_*/metrics.json``)."""
    found = sorted(glob.glob(os.path.join(run_dir, "eval", "iter_*", "metrics.json")))
    if not found:
        raise FileNotFoundError(f"no evaluation found in {run_dir}/eval")
    with open(found[-1]) as f:
        return json.load(f)


def dataset_classes(dataset) -> Optional[Dict[str, List]]:
    """What a trained model's labels mean: ``{"names": [K names], "category_ids": [K ids]}``,
    label k (1..K) being ``names[k - 1]`` with the dataset's own category id
    ``category_ids[k - 1]``; read from a detection dataset (or a Subset of one, or the training
    loader's wrapper), None for a dataset without class names. Training records it in its
    checkpoints and ``model_final.pth`` (``"classes"``) so that predictions name their classes
    and write the dataset's ids without the data at hand."""
    from torch.utils.data import Subset
    while isinstance(dataset, Subset) or hasattr(dataset, "base"):  # Subset, the loader's wrapper of one
        dataset = dataset.dataset if isinstance(dataset, Subset) else dataset.base
    names, ids = getattr(dataset, "class_names", None), getattr(dataset, "label_to_category_id", None)
    if names is None or ids is None:
        return None
    return {"names": [str(n) for n in names[1:]], "category_ids": [int(c) for c in ids[1:]]}  # 0: background


def load_trained_model(path: str) -> Tuple[Dict[str, Any], Dict[str, Any], nn.Module]:
    """(checkpoint, resolved config, detector in eval mode on the CPU) of a checkpoint holding
    ``"cfg"`` and ``"model"``: a ``model_final.pth`` or any training checkpoint; a run folder
    means its ``model_final.pth``. The detector is built as ``evaluate.py --ckpt`` builds it
    without ``--cfg``: the saved config names the neck / head types it was trained with, the
    saved genotype gives the searched parts, the backbone weights come from the file."""
    from autofpn.config import complete_config
    from autofpn.engine.checkpoint import CheckpointError
    from autofpn.models.detector import build_detector, use_genotype
    if os.path.isdir(path):
        path = os.path.join(path, "model_final.pth")
    state = load_checkpoint(path, "trained model")
    if not isinstance(state, dict) or "model" not in state or not isinstance(state.get("cfg"), dict):
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: not a training checkpoint with 'cfg' and 'model' entries (has {keys})")
    cfg = complete_config(state["cfg"], ["model.backbone.weights=none"], where=f"{path} (its config)")
    if cfg["model"]["num_classes"] is None:  # a config saved before the data filled it in
        cls_score = state["model"].get("roi_heads.box_predictor.cls_score.weight")
        if cls_score is not None:
            cfg["model"]["num_classes"] = int(cls_score.shape[0])
    genotype = state.get("genotype")
    use_genotype(cfg, genotype, cfg["model"]["neck"]["type"], cfg["model"]["head"]["type"])
    model = build_detector(cfg, genotype)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # a config / genotype that is not the one it was trained with
        raise CheckpointError(f"{path}: its weights do not fit the model its config builds: "
                              f"{str(e).splitlines()[0]}") from e
    return state, cfg, model.eval()


def load_final_model(run_dir: str) -> Tuple[Dict[str, int], nn.Module]:
    """(parameter breakdown, detector in eval mode) of a finished run's ``model_final.pth``."""
    from autofpn.models.detector import parameter_breakdown
    _, _, model = load_trained_model(os.path.join(run_dir, "model_final.pth"))
    return parameter_breakdown(model), model


def export_backbone(run_dir: str, path: str) -> str:
    """Write the backbone of a finished run to ``path`` as a plain state dict, the format
    ``model.backbone.weights`` reads. Returns ``path``."""
    state = load_checkpoint(os.path.join(run_dir, "model_final.pth"), "trained model")["model"]
    prefix = "backbone.body."
    atomic_torch_save({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, path)
    return path
