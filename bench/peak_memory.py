"""Peak resident memory of one step, for the benchmarks (Linux).

The kernel's resident-set high-water mark is reset to the current resident size
(``echo 5 > /proc/self/clear_refs``), the step runs, and the result is VmHWM after it minus
VmRSS before it: the extra peak memory of that step alone. Run it in a fresh process per variant
(after a warm-up step), so one variant's freed memory does not hide another's.
"""
from typing import Callable, Dict


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
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # VmHWM := VmRSS
    before = proc_status_kib()
    if before["VmHWM"] != before["VmRSS"]:
        raise RuntimeError(f"could not reset the RSS high-water mark: {before}")
    step()
    return (proc_status_kib()["VmHWM"] - before["VmRSS"]) / 1024.0
