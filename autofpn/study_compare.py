"""Entries of one study compared run by run: AP per training seed and, for every entry after the
first, its paired difference to the first (mean ± standard error over the seeds both finished,
and on how many of them it scored higher).

    python -m autofpn.study_compare docs/study/demo_head_cs3_fc fpn searched_middle random_02
    python -m autofpn.study_compare DIR fpn random_02 --seeds 3 4 5 6   # held-out seeds only
    python -m autofpn.study_compare DIR fpn searched_middle+searched_middle_seed1   # pooled runs
    python -m autofpn.study_compare DIR searched_middle+searched_middle_seed1 searched_middle_pc4+searched_middle_pc4_seed1

Runs of one seed share the data order and the initialisation draws, so paired differences
are the fair comparison; restricting to seeds that were not used to pick an entry (the best of
several random architectures, say) gives its AP without the winner's bias of the pick. Names
joined by "+" pool those entries' runs (several searches of one method): each run is paired with
the first entry's run of its seed, and a seed's column shows the pooled runs' mean. A pooled
first entry pairs part by part: every other entry pools as many entries, and its i-th entry's run
of a seed is paired with the reference's i-th entry's run of that seed (two ways of searching,
each run with the same search seeds)."""
import argparse
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

from autofpn.study import StudyError, _mean_std, read_json


def entry_ap(study: Dict[str, Any], name: str, where: str) -> Dict[int, float]:
    """{seed: AP} of the entry ``name`` of a study.json (the seeds it finished)."""
    by_name = {e["name"]: e for e in study["entries"]}
    if name not in by_name:
        raise StudyError(f"{where}: no entry {name!r} (entries: {', '.join(by_name)})")
    return {int(run["seed"]): float(run["metrics"]["AP"]) for run in by_name[name]["runs"]
            if run["metrics"].get("AP") is not None}


def compare(study: Dict[str, Any], names: Sequence[str], seeds: Optional[Sequence[int]] = None,
            where: str = "study.json") -> Dict[str, Any]:
    """{"seeds": the seeds shown, "entries": [{name, ap: {seed: AP (pooled: the mean)}, runs, mean,
    std (over the runs), vs_first: {n, mean, se, above} or None}]}; ``seeds`` None: every seed any
    of them finished."""
    reference = names[0].split("+")
    for name in names[1:]:
        if len(reference) > 1 and len(name.split("+")) != len(reference):
            raise StudyError(f"{name}: a pooled reference ({names[0]}) is paired part by part: "
                             f"pool {len(reference)} entries here too")
    # {entry: {seed: AP}} of every entry named, pooled or not; a pooled name's runs are its parts'
    part_ap = {part: entry_ap(study, part, where) for name in names for part in name.split("+")}
    runs = {name: {} for name in names}
    for name in names:
        for part in name.split("+"):
            for s, ap in part_ap[part].items():
                runs[name].setdefault(s, []).append(ap)
    shown = sorted(set(seeds) if seeds is not None else {s for ap in runs.values() for s in ap})
    out = []
    for name in names:
        kept = {s: runs[name][s] for s in shown if s in runs[name]}
        values = [v for aps in kept.values() for v in aps]
        mean, std = _mean_std(values)
        row = {"name": name, "ap": {s: sum(aps) / len(aps) for s, aps in kept.items()}, "runs": len(values),
               "mean": mean, "std": std, "vs_first": None}
        parts = name.split("+")
        pairs = zip(parts, reference) if len(reference) > 1 else ((part, names[0]) for part in parts)
        diffs = [part_ap[part][s] - part_ap[ref][s] for part, ref in pairs
                 for s in shown if s in part_ap[part] and s in part_ap[ref]]
        if name != names[0] and diffs:
            d_mean, d_std = _mean_std(diffs)
            row["vs_first"] = {"n": len(diffs), "mean": d_mean, "above": sum(d > 0 for d in diffs),
                               "se": None if d_std is None else d_std / math.sqrt(len(diffs))}
        out.append(row)
    return {"seeds": shown, "entries": out}


def format_comparison(result: Dict[str, Any]) -> str:
    seeds, rows = result["seeds"], result["entries"]
    first = rows[0]["name"]
    lines = ["| entry | " + " | ".join(f"seed {s}" for s in seeds) + f" | runs | mean ± std | − {first}, paired |",
             "|---|" + "--:|" * (len(seeds) + 3)]
    for row in rows:
        cells = [f"{row['ap'][s]:.2f}" if s in row["ap"] else "-" for s in seeds]
        mean = "-" if row["mean"] is None else (f"{row['mean']:.2f}" + (
            f" ± {row['std']:.2f}" if row["std"] is not None else ""))
        v = row["vs_first"]
        paired = "" if v is None else (f"{v['mean']:+.2f}" + (f" ± {v['se']:.2f}" if v["se"] is not None else "")
                                       + f" ({v['above']} of {v['n']} above)")
        lines.append(f"| {row['name']} | " + " | ".join(cells) + f" | {row['runs']} | {mean} | {paired} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("study", help="a study folder (its study.json) or a study.json")
    p.add_argument("entries", nargs="+", help="entry names; the first is the reference")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="only these training seeds")
    args = p.parse_args(argv)
    path = os.path.join(args.study, "study.json") if os.path.isdir(args.study) else args.study
    if not os.path.isfile(path):
        raise StudyError(f"{path}: no such study.json (run python -m autofpn.study ... --collect first)")
    try:
        study = read_json(path)
    except ValueError as e:
        raise StudyError(f"{path}: not a study.json ({e})") from None
    print(format_comparison(compare(study, args.entries, args.seeds, path)), end="")
    return 0


if __name__ == "__main__":
    from autofpn.cli import run_command
    sys.exit(run_command(main))
