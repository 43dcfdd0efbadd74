"""What a person sees: a JSON-lines metrics log and a tqdm progress bar, both on rank 0 only.

``MetricsLog`` appends one JSON object per line (``{"type": "train", "iter": 20, "loss": ...}``)
to ``metrics.jsonl``; when a run is resumed, the records past the resume point (written by the
killed run after its last checkpoint) are dropped so the log has each iteration once.
``read_metrics`` reads it back (the plots use it).

``TensorBoard`` mirrors the numbers of those records into TensorBoard event files
(``tensorboard --logdir out/``); the JSON-lines log stays the record of a run.

``Progress``: iteration / total, ETA, the loss terms, lr and images/s; a tqdm bar on a terminal,
plain lines elsewhere.
"""
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, TextIO

from tqdm import tqdm


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN / Inf
    return value


NOT_SCALARS = ("type", "iter", "epoch", "stage")  # a record's identity, not a curve


class TensorBoard:
    """TensorBoard event files in ``folder`` (rank 0; a no-op when disabled). A resumed run
    purges the events past ``resume_iter``, written by the killed process after its checkpoint,
    as MetricsLog truncates its lines. Without the ``tensorboard`` package: one warning, no-op."""

    def __init__(self, folder: str, enabled: bool = True, resume_iter: Optional[int] = None):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # tensorboard is in requirements.txt; a stripped install still runs
            print(f"WARNING: no TensorBoard events in {folder} ({e}); pip install tensorboard, "
                  f"or set train.tensorboard: false", file=sys.stderr, flush=True)
            return
        self.writer = SummaryWriter(folder, purge_step=None if resume_iter is None else resume_iter + 1)

    def record(self, record: Dict[str, Any]) -> None:
        """Every number of a metrics record as scalar ``<type>/<key>`` at step ``iter``."""
        if self.writer is None:
            return
        step = int(record.get("iter", 0))
        for key, value in record.items():
            if key not in NOT_SCALARS and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{record.get('type', 'log')}/{key}", value, step)

    def scalars(self, values: Dict[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def arch_weights(self, stage: str, weights, link_pairs, step: int) -> None:
        """Every softmax weight of a search stage (``Tensor[layers or cells, rows, ops]``) as a
        scalar: ``neck_weights/layer1/P3 -> P4/sep_conv_3x3``, ``head_weights/cell0/node 2 <- 0/...``."""
        if self.writer is None:
            return
        from autofpn.models.operations import HEAD_OPS, NECK_OPS
        from autofpn.viz.arch_heatmap import row_labels
        ops = NECK_OPS if stage == "neck" else HEAD_OPS
        group = "layer" if stage == "neck" else "cell"
        labels = row_labels(stage, link_pairs)
        self.scalars({f"{stage}_weights/{group}{g + (stage == 'neck')}/{labels[r]}/{op}": float(weights[g, r, k])
                      for g in range(weights.shape[0]) for r in range(weights.shape[1])
                      for k, op in enumerate(ops)}, step)

    def arch_heatmap(self, stage: str, weights, link_pairs, step: int) -> None:
        """The heat map of a search stage's weights (``autofpn.viz``) as image ``<stage>_heatmap``."""
        if self.writer is None:
            return
        from autofpn.viz.arch_heatmap import arch_heatmap_figure
        title = f"Auto-FPN {stage} search: weights at iteration {step} (red: argmax)"
        self.writer.add_figure(f"{stage}_heatmap", arch_heatmap_figure(weights, stage, link_pairs, title=title),
                               step, close=True)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MetricsLog:
    """Append-only JSON-lines log; a no-op when ``enabled`` is False (ranks > 0). With ``board``
    every record's numbers also go to TensorBoard."""

    def __init__(self, path: str, enabled: bool = True, resume_iter: Optional[int] = None,
                 board: Optional[TensorBoard] = None):
        self.path = path
        self.enabled = enabled
        self.board = board
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resume_iter is None:
            if os.path.exists(path):
                os.remove(path)
        else:
            self._truncate_after(resume_iter)

    def _truncate_after(self, resume_iter: int) -> None:
        """Keep the records up to ``resume_iter`` (iterations completed by the checkpoint; a
        record's "iter" counts completed iterations, and an evaluation logged at an epoch end
        precedes that epoch's checkpoint)."""
        kept = [r for r in read_metrics(self.path) if r.get("iter", 0) <= resume_iter]
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            for record in kept:
                f.write(json.dumps(record) + "\n")
        os.replace(tmp, self.path)

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.board is not None:
            self.board.record(record)
        record = {k: _jsonable(v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class RunClock:
    """Wall seconds of a run that may span processes (kill, resume): ``before`` (restored from the
    checkpoint's ``"seconds"``) plus this process's since ``start()``; checkpoints store ``total()``."""

    def __init__(self) -> None:
        self.before = 0.0
        self._start: Optional[float] = None

    def start(self) -> None:
        self._start = time.perf_counter()

    def this_process(self) -> float:
        return 0.0 if self._start is None else time.perf_counter() - self._start

    def total(self) -> float:
        return self.before + self.this_process()


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """All records of a metrics log (a torn last line from a kill is skipped)."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class Progress:
    """Progress over iterations with loss terms, lr and images/s; silent when disabled.

    On a terminal: a tqdm bar. Elsewhere (a log file, CI, a cluster job), where a bar becomes one
    endless line of carriage returns: plain lines, one per 5 % of the run and at least one a
    minute, each with the iteration, s/it, ETA and the same values. ``AUTOFPN_PROGRESS=bar`` or
    ``lines`` forces one of the two.
    """

    LINES_PER_RUN = 20
    MAX_SECONDS_BETWEEN_LINES = 60.0

    def __init__(self, total: int, start: int = 0, enabled: bool = True, desc: str = "train",
                 stream: Optional[TextIO] = None):
        self.enabled, self.total, self.desc = enabled, total, desc
        self.stream = stream if stream is not None else sys.stderr
        forced = os.environ.get("AUTOFPN_PROGRESS", "")
        self.lines = forced == "lines" or (forced != "bar" and not _is_terminal(self.stream))
        self.n = self._first = start
        self._last_time = self._started = self._last_line = time.perf_counter()
        self._every = max(1, (total - start) // self.LINES_PER_RUN)
        self._bar = None if self.lines else tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True,
                                                 disable=not enabled, smoothing=0.1, file=self.stream)

    def update(self, losses: Dict[str, float], lr: float, images: int) -> float:
        """Advance one iteration; returns images/s of that iteration."""
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        self._last_time = now
        images_per_s = images / elapsed
        short = {k.replace("loss_", ""): f"{v:.3f}" for k, v in losses.items()}
        short.update(lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
        self.advance(1, short, now)
        return images_per_s

    def advance(self, steps: int, values: Dict[str, str], now: Optional[float] = None) -> None:
        """Count ``steps`` more done and show ``values`` (name -> formatted value) beside the count."""
        now = time.perf_counter() if now is None else now
        before, self.n = self.n, self.n + steps
        if not self.enabled or steps <= 0:
            return
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)
            self._bar.update(steps)
        elif ((self.n - self._first) // self._every > (before - self._first) // self._every
              or self.n == self.total or now - self._last_line >= self.MAX_SECONDS_BETWEEN_LINES):
            self._print_line(now, values)

    def _print_line(self, now: float, values: Dict[str, str]) -> None:
        self._last_line = now
        per_it = (now - self._started) / max(self.n - self._first, 1)
        eta = per_it * max(self.total - self.n, 0)
        pct = 100.0 * self.n / max(self.total, 1)
        print(f"{self.desc} {self.n}/{self.total} ({pct:.0f} %), {per_it:.2f} s/it, ETA {_clock(eta)} | "
              + ", ".join(f"{k}={v}" for k, v in values.items()), file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        if self.enabled:
            if self._bar is not None:
                self._bar.write(message)
            else:
                print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"
