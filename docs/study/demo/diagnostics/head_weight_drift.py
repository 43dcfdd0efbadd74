"""How each head op's softmax weight moved during the head searches of docs/study/demo, pooled over
the searches of a kind and over their edges: the change of log(weight) from the first to the last
architecture record of each search's head/arch_trajectory.jsonl (x 1e-3; > 0: the op gained).

    python docs/study/demo/diagnostics/head_weight_drift.py [KIND=search,search ...]

Default: the three full-channel searches against the three at search.partial_channels=4 and 2
and the three with the head supernet at half the width (search.head_channels=8).
"""
import json
import os
import sys

import numpy as np

from autofpn.models.operations import HEAD_OPS

SEARCHES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "searches")
KINDS = {"full": ["middle", "seed1/middle", "seed2/middle"],
         "pc4": ["pc4/middle", "pc4_seed1/middle", "pc4_seed2/middle"],
         "pc2": ["pc2/middle", "pc2_seed1/middle", "pc2_seed2/middle"],
         "hc8": ["hc8/middle", "hc8_seed1/middle", "hc8_seed2/middle"]}


def drift(search: str) -> np.ndarray:
    """Array[edges, len(HEAD_OPS)]: log(last weight) - log(first weight) of every edge of every cell."""
    with open(os.path.join(SEARCHES, search, "head", "arch_trajectory.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    first, last = np.array(rows[0]["beta"]), np.array(rows[-1]["beta"])
    return (np.log(last) - np.log(first)).reshape(-1, len(HEAD_OPS))


def main() -> None:
    kinds = dict(KINDS)
    if len(sys.argv) > 1:
        kinds = {arg.split("=")[0]: arg.split("=")[1].split(",") for arg in sys.argv[1:]}
    print(f"{'searches':<8}" + "".join(f"{op[:15]:>16}" for op in HEAD_OPS))
    for kind, searches in kinds.items():
        present = [s for s in searches if os.path.isfile(os.path.join(SEARCHES, s, "head", "arch_trajectory.jsonl"))]
        if not present:
            continue
        mean = np.concatenate([drift(s) for s in present]).mean(axis=0) * 1e3
        print(f"{kind:<8}" + "".join(f"{v:>16.2f}" for v in mean) + f"   ({len(present)} searches)")


if __name__ == "__main__":
    main()
