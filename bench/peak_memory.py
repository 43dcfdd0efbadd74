"""Peak resident memory of one step, for the benchmarks (Linux).

The kernel's resident-set high-water mark is reset to the current resident size
(``echo 5 > /proc/self/clear_refs``), the step runs, and the result is VmHWM after it minus
VmRSS before it: the extra peak memory of that step alone. Run it in a fresh process per variant
(after a warm-up step), so one variant's freed memory does not hide another's.
"""
import multiprocessing as mp
import os
from queue import Empty
from typing import Any, Callable, Dict, Tuple


def proc_status_kib() -> Dict[str, int]:
    """VmRSS (current) and VmHWM (high-water mark) of this process, KiB."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def peak_growth_mib(step: Callable[[], None]) -> float:
    """Extra peak resident MiB while ``step()`` runs."""
    for _ in range(20):  # another thread (allocator, torch's pool) may move RSS between reset and read
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # VmHWM := VmRSS
        before = proc_status_kib()
        if before["VmHWM"] - before["VmRSS"] < 1024:  # within 1 MiB: the figures are MiB
            break
    else:
        raise RuntimeError(f"could not reset the RSS high-water mark: {before}")
    step()
    return (proc_status_kib()["VmHWM"] - before["VmRSS"]) / 1024.0


def _worker(build_step: Callable[..., Callable[[], None]], args: Tuple, queue) -> None:
    step = build_step(*args)
    step()  # warm-up: optimizer state, allocator, lazily loaded code
    queue.put(peak_growth_mib(step))


def peak_in_fresh_process(build_step: Callable[..., Callable[[], None]], *args: Any) -> float:
    """Extra peak MiB of one ``step()`` after a warm-up, in a fresh (spawned) process, where
    ``step = build_step(*args)`` (``build_step`` must be a module-level function).

    glibc's malloc is told to hand every block over 64 KiB straight back to the kernel
    (``MALLOC_MMAP_THRESHOLD_``; by default the threshold grows with freed blocks, which then
    stay in the heap and hide the next step's peak).
    """
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the child's malloc at start-up
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(build_step, args, queue))
    proc.start()
    while True:  # a worker that dies (killed, out of memory) never answers: fail, do not wait forever
        try:
            value = queue.get(timeout=5)
            break
        except Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the peak-memory process for {args} exited with code {proc.exitcode} "
                                   "before reporting (its error, if any, is above)")
    proc.join()
    return value


def profile_table(step: Callable[[], None], rows: int = 8) -> str:
    """torch.profiler table of one ``step()``: the largest self-CPU-time operators."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    return prof.key_averages(group_by_input_shape=True).table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40, max_shapes_column_width=50)
