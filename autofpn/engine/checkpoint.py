"""Checkpoints that survive a kill: atomic writes, last-K retention, best copy, RNG states.

A checkpoint is a plain dict saved with ``torch.save`` and read back with
``torch.load(..., weights_only=True)``, so everything in it is tensors, numbers, strings, lists
and dicts (the numpy RNG state is converted to a tensor for that reason).

Files in the checkpoint folder:
  ``ckpt_<iter:07d>.pth``  periodic / epoch-end checkpoints, the newest ``keep`` kept;
  ``best.pth``            a copy of the checkpoint with the best validation metric;
  ``last_checkpoint``     a text file naming the newest complete checkpoint.
A write goes to ``<name>.<pid>.tmp``, is fsynced, then renamed over the final name; the folder is
fsynced after the rename. A SIGKILL at any point therefore leaves either the old or the new file,
never a truncated one, and ``last_checkpoint`` is only updated after the file is in place.
"""
import glob
import json
import os
import random
import re
import sys
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

_CKPT_RE = re.compile(r"ckpt_(\d+)\.pth$")


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to ``path`` via temp file + fsync + rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # per process: two writers of one file (shards) never share a temp file
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(folder)


def _atomic_write_text(text: str, path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"  # per process: two writers of one file (shards) never share a temp file
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_json(obj: Any, path: str) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (temp file, fsync, rename; the folder
    is created): a kill leaves the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic_write_text(json.dumps(obj, indent=2), path)


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated or not a checkpoint; the message names it."""


def load_checkpoint(path: str, what: str = "checkpoint") -> Any:
    """Read a checkpoint on the CPU (``weights_only=True``); a missing, truncated or foreign
    file is a ``CheckpointError`` naming it (``what`` says what it should have been)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: {what} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds here; re-raised with the file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot read this {what}: the file is truncated or not a "
                              f"checkpoint written by torch.save ({reason[:160]})") from e


# ---------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------

def capture_rng_state() -> Dict[str, Any]:
    """Python, numpy and torch (CPU + CUDA) generator states, in ``weights_only``-safe types."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    state = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state``."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"],
                         npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Checkpoint folder
# ---------------------------------------------------------------------------------------------

class CheckpointManager:
    """Saves numbered checkpoints into ``folder``, keeps the newest ``keep`` plus ``best.pth``.

    Only the process with ``enabled=True`` (rank 0) writes; every process may read.
    """

    def __init__(self, folder: str, keep: int = 3, enabled: bool = True):
        self.folder = folder
        self.keep = max(int(keep), 1)
        self.enabled = enabled
        if enabled:
            os.makedirs(folder, exist_ok=True)

    def path_for(self, iteration: int) -> str:
        return os.path.join(self.folder, f"ckpt_{iteration:07d}.pth")

    @property
    def best_path(self) -> str:
        return os.path.join(self.folder, "best.pth")

    def list_checkpoints(self) -> List[str]:
        """Numbered checkpoints present, oldest first (temp files excluded)."""
        found = []
        for path in glob.glob(os.path.join(self.folder, "ckpt_*.pth")):
            match = _CKPT_RE.search(os.path.basename(path))
            if match:
                found.append((int(match.group(1)), path))
        return [p for _, p in sorted(found)]

    def latest(self) -> Optional[str]:
        """The newest complete checkpoint, or None when the folder has none."""
        marker = os.path.join(self.folder, "last_checkpoint")
        if os.path.isfile(marker):
            with open(marker) as f:
                name = f.read().strip()
            path = os.path.join(self.folder, name)
            if name and os.path.isfile(path):
                return path
        existing = self.list_checkpoints()
        return existing[-1] if existing else None

    def load_latest(self) -> Tuple[Optional[str], Optional[Dict[str, Any]]]:
        """(path, state) of the newest checkpoint that reads, or (None, None) for an empty folder.

        A damaged newer one (a copy or a write that broke off outside ``atomic_torch_save``) is
        renamed ``<name>.damaged`` (kept, never deleted) with a warning, and the next older one
        is tried; only when every checkpoint is damaged is that an error."""
        candidates = self.list_checkpoints()
        newest = self.latest()
        if newest is not None and newest not in candidates:
            candidates.append(newest)
        damaged = []
        for path in reversed(candidates):
            try:
                return path, load_checkpoint(path)
            except CheckpointError as e:
                damaged.append(path)
                if self.enabled:
                    os.replace(path, path + ".damaged")
                print(f"warning: {e}; kept aside as {os.path.basename(path)}.damaged, "
                      f"trying the previous checkpoint", file=sys.stderr, flush=True)
        if damaged:
            raise CheckpointError(f"{self.folder}: no intact checkpoint to resume from (damaged: "
                                  f"{', '.join(os.path.basename(p) for p in damaged)}); remove the folder "
                                  f"to start again")
        return None, None

    def save(self, state: Dict[str, Any], iteration: int, is_best: bool = False) -> Optional[str]:
        """Write ``state`` as the checkpoint of ``iteration``; prune old ones. Returns the path."""
        if not self.enabled:
            return None
        path = self.path_for(iteration)
        atomic_torch_save(state, path)
        _atomic_write_text(os.path.basename(path), os.path.join(self.folder, "last_checkpoint"))
        if is_best:
            atomic_torch_save(state, self.best_path)
        for old in self.list_checkpoints()[:-self.keep]:
            os.remove(old)
        return path
