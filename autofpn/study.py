"""The study: does the searched Auto-FPN beat FPN, and a random architecture of the same space,
at the same training budget? (The paper's Tables 2 and 8, at any scale, with seeds.)

    python -m autofpn.study --cfg configs/demo.yaml --out out/study/demo \
        [--seeds 3] [--random 8] [--lambdas small middle large] [--jobs 2]
    python -m autofpn.study --cfg ... --out DIR --collect           # table from the folders only
    python -m autofpn.study --cfg ... --out DIR --tag fastarch --search-opts search.arch_lr=0.03
    python -m autofpn.study --cfg ... --out DIR --seeds 7 --only fpn searched_middle   # more seeds for two
    python -m autofpn.study --cfg ... --out DIR --shard 0/4 --launcher "torchrun --nproc_per_node 8"

Entries: the handcrafted baselines (``fpn``: FPN + 2-MLP head; ``panet`` and ``ssd``: the
shipped genotypes' necks + 2-MLP head; on request ``conv``: FPN's neck with the handcrafted
convolutional head, the Auto-head's control, ``plain``: no fusion neck, plain SSD, and
``identity``: the Auto-fusion neck with every link identity, the neck search's control),
``--random`` genotypes drawn uniformly from the search space (neck and head,
``autofpn.search.random_sample``; with ``--random-parts head`` the head only, on the config's
handcrafted neck; with ``--random-parts neck`` the neck only, with the 2-MLP head, the baseline
of a ``search.stage=neck`` variant; with ``--random-parts neck --random-convs K`` the dense
identity neck with K random links made random convolutions, the control of a neck search
decoded with ``argmax_nonnone``), ``--budget-random N --budget-of GENOTYPE ...`` the baseline
of a search under its resource constraint: N genotypes drawn uniformly from the valid ones
whose neck + head FLOPs (the penalty's tables, at the search's input size) are at most those of
the costliest GENOTYPE, e.g. the searches' own ``geno.json`` (entries ``budget_random_XX``, kind
``budget_random``: uniform draws from the whole space cost more than any searched detector, so
they compare a search with architectures it was not allowed to pick), and one searched genotype per
resource-lambda preset (``search.py`` as it is; ``searched_<preset>``). Every entry is
retrained by ``train.py`` with the same config and budget once per seed (``train.seed``: weight
init and data order). A config without pretrained backbone weights (the demo) searches with the
backbone of the ``fpn`` run of the first seed, frozen, as ``make demo`` does (that run trains
again when a search still to run finds neither its model nor the exported backbone: a study
folder kept in git holds the run's result, not its model; the earlier result is kept as
``result.replaced.json``, as training on another machine need not reproduce it).

Units and safety. Each (entry, seed) is a unit in ``DIR/units/<entry>/seed_<s>/`` (``run/`` is
its train.py folder, ``log.txt`` its output, ``result.json`` its metrics once finished); each
search is a unit in ``DIR/searches/<preset>/``. Units run as subprocesses (``--jobs`` at a time,
the CPU threads divided between them) that die with the study. Running the same command again
skips finished units and resumes an interrupted one from its newest checkpoint (train.py and
search.py resume by themselves), so a kill -9 loses at most a unit's progress since its last
checkpoint. Two invocations on one folder at once (a second ``--tag`` started while the first
runs) never run a unit twice: each unit is claimed with a lock (``running.lock``); a unit
that another study process holds is left to it, and a unit here that needs it waits for it. A unit that fails leaves ``error.txt``, is reported in the table and does not stop
the others; it is retried only with ``--retry-failed``. ``DIR/study_config.json`` records the
training config and the kind of random architectures: a folder is never continued with another
config, nor given random architectures of another kind once it holds some.

Search variants. ``--search-opts search.k=v ... --tag NAME`` adds a way of searching to a study
folder: its entries are ``searched_<preset>_<NAME>``, searched with those overrides (with
``search.stage=neck``, the searched neck retrained with FPN's 2-MLP head; with
``search.stage=head search.head_with_searched_neck=false``, the Auto-head searched and retrained
on the config's handcrafted neck, the paper's Auto-head alone; with ``search.stage=head
search.neck_genotype=GENOTYPE``, the Auto-head searched on that genotype's neck and retrained
with it). Training
does not read ``search.*``, so the folder's baselines and random architectures serve every
variant: trying an idea costs its searches and their retraining, and the table compares all
the variants the folder holds.

Outputs in DIR: ``study.md`` (table: params neck / head / total, FLOPs, mean ± std over seeds of
AP, AP50, AP75, APs/m/l, training and search time, and the verdict), ``study.json`` (every run
and the aggregates) and ``pareto.png`` (AP against neck + head params).
"""
import argparse
import glob
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Dict, List, Optional, Sequence

from autofpn.engine.checkpoint import atomic_write_json as write_json
from autofpn.engine.runs import die_with_parent, lock_folder, log_tail, parse_shard, threads_per_job

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASELINES = ("fpn", "panet", "ssd")  # the default entries
# on request: "conv", FPN's neck with the handcrafted convolutional head (model.head.type=conv,
# its size from model.head.convs / channels / mlp_dim): the control for a searched Auto-head;
# "plain", no fusion neck (model.neck.type=none): plain SSD, the paper's Table 6 baseline;
# "identity", the Auto-fusion neck with every link identity (nothing searched) and the 2-MLP head:
# the control a neck search whose decisions are mostly identity has to beat
OPTIONAL_BASELINES = ("conv", "plain", "identity")
RANDOM_PARTS = ("both", "head", "neck")
# the pools of random architectures a searched entry is ranked against, and their names in the report
RANDOM_KINDS = ("random", "budget_random")
RANDOM_KIND_NAMES = {"random": "random architectures",
                     "budget_random": "random architectures within the budget"}
LAMBDA_PRESETS = ("small", "middle", "large")
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
ELAPSED_SAVE_PERIOD = 10.0  # seconds between saves of a running unit's elapsed time


class StudyError(RuntimeError):
    """A study that cannot go on (folder made by another config, bad arguments)."""


# ----------------------------------------------------------------------------------- entries

@dataclass
class Entry:
    """One architecture of the study.

    ``neck`` / ``head`` are train.py's ``--neck`` / ``--head``; ``genotype_path`` its
    ``--genotype`` (for a searched entry it exists once its search is done)."""
    name: str
    kind: str  # baseline | random | budget_random | searched
    neck: str
    head: str
    genotype_path: Optional[str] = None
    search: Optional["SearchVariant"] = None  # how a searched entry was searched
    preset: Optional[str] = None  # its resource-lambda preset

    def train_args(self) -> List[str]:
        args = ["--neck", self.neck, "--head", self.head]
        return args + (["--genotype", self.genotype_path] if self.genotype_path else [])


@dataclass
class SearchVariant:
    """One way of searching, tried in the study: ``search_opts`` (config overrides given to
    search.py only) under a ``tag``; its entries are ``searched_<preset>[_<tag>]``. Training
    runs do not read ``search.*``, so the baselines and random architectures of a study folder
    serve every variant, and trying an idea costs its searches and their retraining only."""
    tag: str
    search_opts: List[str]
    lambdas: List[str]

    def entry_name(self, preset: str) -> str:
        return f"searched_{preset}" + (f"_{self.tag}" if self.tag else "")

    def folder(self, out: str, preset: str) -> str:
        return os.path.join(out, "searches", *([self.tag] if self.tag else []), preset)

    def unit_key(self, preset: str) -> str:
        return f"search/{self.tag + '/' if self.tag else ''}{preset}"


def plan_entries(out: str, baselines: Sequence[str], num_random: int, variants: Sequence[SearchVariant],
                 random_seed: int, cfg: Dict[str, Any], random_parts: str = "both",
                 random_convs: int = 0, budget_random: int = 0,
                 budget_of: Sequence[str] = ()) -> List[Entry]:
    """The study's entries (searched ones of every variant, in the order they were added);
    random genotypes (and the ``identity`` baseline's) are written to ``out/genotypes/``.
    ``random_parts``: "both" draws neck and head; "head" draws the head only (entries
    ``random_head_XX``, on the config's neck), the baseline of a head search on a handcrafted
    neck; "neck" the neck only (entries ``random_neck_XX``, with the 2-MLP head), the baseline of
    a neck-only search; "neck" with ``random_convs`` K > 0 the dense identity neck with K random
    links made random convolutions (entries ``random_convK_XX``, with the 2-MLP head), the
    control of a neck search decoded with "none" excluded. ``budget_random`` N: N genotypes
    (neck and head) within the neck + head FLOPs of the costliest genotype of ``budget_of``
    (``budget_random_cost``; entries ``budget_random_XX``)."""
    from autofpn.models.genotype import dense_identity_neck
    from autofpn.search.random_sample import identity_necks_with_convs, random_genotypes
    entries = []
    for name in baselines:
        if name == "fpn":
            entries.append(Entry("fpn", "baseline", "fpn", "mlp"))
        elif name == "conv":
            entries.append(Entry("conv", "baseline", "fpn", "conv"))
        elif name == "plain":
            entries.append(Entry("plain", "baseline", "none", "mlp"))
        elif name == "identity":
            neck_cfg = cfg["model"]["neck"]
            path = os.path.join(out, "genotypes", "identity.json")
            _save_drawn(dense_identity_neck(neck_cfg["levels"], neck_cfg["layers"]), path)
            entries.append(Entry(name, "baseline", "auto", "mlp", path))
        else:
            entries.append(Entry(name, "baseline", "auto", "mlp",
                                 os.path.join(REPO, "configs", "genotypes", f"{name}.json")))
    model = cfg["model"]
    levels, layers = model["neck"]["levels"], model["neck"]["layers"]
    if random_convs:
        if random_parts != "neck":
            raise StudyError(f"--random-convs draws necks only: use it with --random-parts neck, not {random_parts}")
        if not 0 < random_convs <= layers * len(levels) ** 2:
            raise StudyError(f"--random-convs {random_convs}: the neck has {layers * len(levels) ** 2} links "
                             f"({layers} layers over levels {list(levels)})")
        for genotype in identity_necks_with_convs(num_random, random_convs, random_seed, levels, layers):
            path = os.path.join(out, "genotypes", f"{genotype['name']}.json")
            _save_drawn(genotype, path)
            entries.append(Entry(genotype["name"], "random", "auto", "mlp", path))
        num_random = 0
    drawn = random_genotypes(num_random, random_seed, levels, layers, model["head"]["cells"])
    for genotype in drawn:
        # a part left out: the same draws without it, so the i-th neck or head is the same either way
        neck, head = "auto", "auto"
        if random_parts == "head":
            neck = handcrafted_neck(cfg, "--random-parts head")
            genotype = {**genotype, "name": genotype["name"].replace("random_", "random_head_"), "neck": None}
        elif random_parts == "neck":
            head = "mlp"
            genotype = {**genotype, "name": genotype["name"].replace("random_", "random_neck_"), "head": None}
        path = os.path.join(out, "genotypes", f"{genotype['name']}.json")
        _save_drawn(genotype, path)
        entries.append(Entry(genotype["name"], "random", neck, head, path))
    if budget_random:
        from autofpn.search.random_sample import random_genotypes_within
        flops, budget = budget_random_cost(cfg, budget_of)
        for genotype in random_genotypes_within(budget_random, flops, budget, random_seed, levels, layers,
                                                model["head"]["cells"]):
            path = os.path.join(out, "genotypes", f"{genotype['name']}.json")
            _save_drawn(genotype, path)
            entries.append(Entry(genotype["name"], "budget_random", "auto", "auto", path))
    for variant in variants:
        # a neck-only search (search.stage=neck) decodes no head: its detector keeps FPN's 2-MLP head;
        # a head-only search decodes no neck: its detector keeps the neck it was searched on
        stage = variant_stage(cfg, variant)
        head = "mlp" if stage == "neck" else "auto"
        # a head searched on a given neck: the search's geno.json holds that neck too
        on_given_neck = stage == "head" and _variant_search_value(cfg, variant, "head_with_searched_neck")
        neck = handcrafted_neck(cfg, f"search variant '{variant.tag}'") if stage == "head" and not on_given_neck \
            else "auto"
        for preset in variant.lambdas:
            entries.append(Entry(variant.entry_name(preset), "searched", neck, head,
                                 os.path.join(variant.folder(out, preset), "geno.json"), variant, preset))
    return entries


def budget_random_cost(cfg: Dict[str, Any], budget_of: Sequence[str]):
    """(flops, budget): ``flops(genotype)``, the neck + head FLOPs of a decoded ``genotype`` read
    from the tables of the search's resource penalty (``search_resource_cost``: the search's
    largest input, the retrain's RoIs per image), and the budget, the largest of those of the
    genotype files ``budget_of``. The Auto-head's fc readout is left out of both: it is the same
    for every genotype, so it changes no draw's place under the budget, while the draws' random
    stream is keyed by the budget's value (the tables have counted it since 2352727; the first
    folder with these draws, docs/study/demo_head_cs3_fc, was drawn without it)."""
    from autofpn.models.genotype import load_genotype
    from autofpn.search.differentiable import supernet_cost_tables
    if not budget_of:
        raise StudyError("--budget-random needs --budget-of: the genotype(s) whose neck + head FLOPs are the budget")
    tables = supernet_cost_tables(cfg)

    def flops(genotype: Dict[str, Any]) -> float:
        cost = tables.decoded_cost(genotype)
        return cost["neck"].flops + cost["head"].flops - tables.head_const.flops

    budgets = []
    for path in budget_of:
        if not os.path.isfile(path):
            raise StudyError(f"--budget-of {path}: no such genotype file (a search's geno.json exists once it ran)")
        genotype = load_genotype(path)
        if genotype.get("neck") is None or genotype.get("head") is None:
            raise StudyError(f"--budget-of {path}: the budget is a neck + head genotype's, and this one has "
                             f"no {'neck' if genotype.get('neck') is None else 'head'}")
        budgets.append(flops(genotype))
    return flops, max(budgets)


def _save_drawn(genotype: Dict[str, Any], path: str) -> None:
    """Write a genotype the study made; one already there must be the same (a folder never holds
    architectures its arguments did not make)."""
    from autofpn.models.genotype import load_genotype, save_genotype
    if os.path.isfile(path) and load_genotype(path) != genotype:
        raise StudyError(f"{path} differs from the genotype made now (another --random-seed, search space "
                         f"or neck levels made this folder); use another --out")
    save_genotype(genotype, path)


def handcrafted_neck(cfg: Dict[str, Any], what: str) -> str:
    """The config's ``model.neck.type``, which a head-only entry keeps; it must be a handcrafted one."""
    neck = cfg["model"]["neck"]["type"]
    if neck == "auto":
        raise StudyError(f"{what}: a head on the config's neck needs a handcrafted model.neck.type (fpn, panet), "
                         f"not 'auto'")
    return neck


def _variant_search_value(cfg: Dict[str, Any], variant: SearchVariant, key: str) -> Any:
    """``search.<key>`` of ``variant``: the config's, or its ``--search-opts`` override."""
    from autofpn.config import parse_override
    value = cfg["search"][key]
    for item in variant.search_opts:
        value = parse_override(item).get("search", {}).get(key, value)
    return value


def variant_stage(cfg: Dict[str, Any], variant: SearchVariant) -> str:
    """``search.stage`` of ``variant``: both, neck, or head (on the config's handcrafted neck, or
    on the neck of ``search.neck_genotype``)."""
    stage = _variant_search_value(cfg, variant, "stage")
    if (stage == "head" and _variant_search_value(cfg, variant, "head_with_searched_neck")
            and not _variant_search_value(cfg, variant, "neck_genotype")):
        raise StudyError(f"search variant '{variant.tag}': search.stage=head on a searched neck needs that neck: "
                         f"search.neck_genotype=<a genotype JSON>, or search.head_with_searched_neck=false "
                         f"(the head on the config's handcrafted neck)")
    return stage


# ----------------------------------------------------------------------------------- units

@dataclass
class Unit:
    """A subprocess of the study (one training run or one search) and its folder."""
    key: str  # "fpn/seed_0" or "search/middle"
    folder: str
    command: Callable[[], List[str]]  # built when the unit starts (its dependencies are done then)
    deps: List[str] = field(default_factory=list)
    finish: Callable[[float], None] = lambda seconds: None  # after exit code 0
    slots: int = 1  # of the study's --jobs it occupies (an evolution search trains candidates at once)
    # a file this unit leaves that a unit still to run needs (the FPN run's trained model, which
    # lends the searches their backbone): a finished unit without it runs again
    needed_output: Optional[str] = None

    @property
    def result_path(self) -> str:
        return os.path.join(self.folder, "result.json")

    @property
    def replaced_path(self) -> str:
        """Where the result of a finished unit that runs again is kept (``needed_output``)."""
        return os.path.join(self.folder, "result.replaced.json")

    @property
    def error_path(self) -> str:
        return os.path.join(self.folder, "error.txt")

    def is_done(self) -> bool:
        return os.path.isfile(self.result_path) and (self.needed_output is None
                                                     or os.path.isfile(self.needed_output))

    def has_failed(self) -> bool:
        return os.path.isfile(self.error_path)


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _elapsed_before(unit: Unit) -> float:
    path = os.path.join(unit.folder, "elapsed.json")
    return float(read_json(path)["seconds"]) if os.path.isfile(path) else 0.0


class Running:
    def __init__(self, unit: Unit, env: Dict[str, str], lock: IO):
        self.unit = unit
        self.lock = lock  # held until the unit ends (lock_folder)
        self.prior = _elapsed_before(unit)
        self.start = time.perf_counter()
        self.last_save = self.start
        self.log = open(os.path.join(unit.folder, "log.txt"), "a")
        cmd = unit.command()
        self.log.write(f"\n$ {shlex.join(cmd)}\n")
        self.log.flush()
        self.process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL,
                                        preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)

    def seconds(self) -> float:
        return self.prior + time.perf_counter() - self.start

    def save_elapsed(self) -> None:
        write_json({"seconds": self.seconds()}, os.path.join(self.unit.folder, "elapsed.json"))
        self.last_save = time.perf_counter()


def _needs(unit: Unit, keys: set, pending: Dict[str, Unit]) -> bool:
    """Whether ``unit`` needs, directly or through units in ``pending``, a unit of ``keys``."""
    return any(d in keys or (d in pending and _needs(pending[d], keys, pending)) for d in unit.deps)


def run_units(units: List[Unit], jobs: int, threads_per_job: int, retry_failed: bool = False,
              done_elsewhere: Callable[[str], bool] = lambda key: False,
              say: Callable[[str], None] = print) -> Dict[str, str]:
    """Run the units that are not done, ``jobs`` at a time, each after its dependencies.

    A dependency that is not among ``units`` (another shard's) counts as met when
    ``done_elsewhere(key)``. A unit that another study process runs (its lock is held) is left
    to it; while a unit here needs it, this process waits for it, and runs it itself if that
    process dies before finishing it. Returns {key: status} with status done | failed | blocked
    (a dependency failed) | waiting (another shard's dependency is not done yet, or the unit runs
    in another study process that nothing here waits for)."""
    status: Dict[str, str] = {}
    by_key = {u.key: u for u in units}  # every unit of the folder: this shard's needs may be another's
    todo = []
    for unit in units:
        if unit.is_done():
            status[unit.key] = "done"
        elif unit.has_failed() and not retry_failed:
            status[unit.key] = "failed"
        else:  # a failed unit's error.txt goes when it starts again, under its lock
            todo.append(unit)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_job), MKL_NUM_THREADS=str(threads_per_job),
               PYTHONUNBUFFERED="1")
    total, finished = len(todo), 0
    say(f"study: {len(units) - total} of {len(units)} units already done or failed, {total} to run "
        f"({jobs} at a time, {threads_per_job} thread(s) each)")
    running: List[Running] = []
    elsewhere: set = set()  # keys of units in todo that another study process holds now
    try:
        while todo or running:
            for unit in list(todo):
                if sum(r.unit.slots for r in running) + unit.slots > jobs:
                    break
                dep_states = [status.get(d) if d in by_key else ("done" if done_elsewhere(d) else "waiting")
                              for d in unit.deps]
                if any(s in ("failed", "blocked") for s in dep_states):
                    status[unit.key] = "blocked"
                    todo.remove(unit)
                    say(f"study: {unit.key} not run: a unit it needs failed ({', '.join(unit.deps)})")
                elif all(s == "done" for s in dep_states):
                    lock = lock_folder(unit.folder)
                    if lock is None:
                        if unit.key not in elsewhere:
                            elsewhere.add(unit.key)
                            say(f"study: {unit.key} runs in another study process: not run here")
                        continue
                    todo.remove(unit)
                    elsewhere.discard(unit.key)
                    if unit.is_done() or (unit.has_failed() and not retry_failed):  # by the process that let it go
                        lock.close()
                        status[unit.key] = "done" if unit.is_done() else "failed"
                        say(f"study: {unit.key} " + ("was finished" if unit.is_done() else "FAILED")
                            + " in another study process")
                        continue
                    if unit.has_failed():  # retried here (--retry-failed, or it failed in another process)
                        os.remove(unit.error_path)
                    resumed = " (resuming)" if os.path.isfile(os.path.join(unit.folder, "log.txt")) else ""
                    if os.path.isfile(unit.result_path):  # finished once, but what it left is gone
                        resumed = (f" (again: {os.path.relpath(unit.needed_output, unit.folder)} is gone;"
                                   f" its earlier result kept as {os.path.basename(unit.replaced_path)})")
                        os.replace(unit.result_path, unit.replaced_path)
                    say(f"study: start {unit.key}{resumed}  [{finished}/{total} finished]")
                    running.append(Running(unit, env, lock))
            # nothing of ours runs: wait only while a unit here needs one that another process runs
            pending = {t.key: t for t in todo}
            if not running and not any(_needs(u, elsewhere, pending) for u in todo):
                for unit in todo:
                    status[unit.key] = "waiting"
                    if unit.key not in elsewhere:
                        say(f"study: {unit.key} waits for {', '.join(unit.deps)} (another shard's unit)")
                break
            time.sleep(0.5)
            for run in list(running):
                code = run.process.poll()
                if code is None:
                    if time.perf_counter() - run.last_save > ELAPSED_SAVE_PERIOD:
                        run.save_elapsed()
                    continue
                running.remove(run)
                run.save_elapsed()
                run.log.close()
                finished += 1
                seconds = run.seconds()
                if code == 0:
                    try:
                        run.unit.finish(seconds)
                        status[run.unit.key] = "done"
                        run.lock.close()  # after result.json: a process waiting on the lock sees it done
                        say(f"study: done  {run.unit.key} in {seconds:.0f} s  [{finished}/{total}]")
                        continue
                    except Exception as e:  # an unreadable result is a failed unit, not a dead study
                        reason = f"finished but its result could not be read: {e}"
                else:
                    reason = f"exit code {code}"
                status[run.unit.key] = "failed"
                with open(run.unit.error_path, "w") as f:
                    f.write(f"{reason}\n{log_tail(os.path.join(run.unit.folder, 'log.txt'))}\n")
                run.lock.close()
                say(f"study: FAILED {run.unit.key} ({reason}); log: {os.path.join(run.unit.folder, 'log.txt')}")
    finally:
        for run in running:  # interrupted (Ctrl-C): stop the children, keep their checkpoints
            run.process.kill()
            run.process.wait()
            run.save_elapsed()
            run.log.close()
            run.lock.close()
    return status


# ----------------------------------------------------------------------------------- the study

def unit_folder(out: str, entry: str, seed: int) -> str:
    return os.path.join(out, "units", entry, f"seed_{seed}")


def make_units(args, entries: List[Entry], seeds: List[int], cfg: Dict[str, Any]) -> List[Unit]:
    """Every unit of the study in the order they are started: the FPN run that lends the
    searches its backbone (when the config has no pretrained one), the searches, then the
    training runs seed by seed (a partial study holds whole seeds)."""
    from autofpn.config import load_config
    from autofpn.engine.runs import export_backbone, final_metrics
    out, py = args.out, sys.executable
    launcher = shlex.split(args.launcher) if args.launcher else [py]
    needs_backbone = str(cfg["model"]["backbone"]["weights"]).lower() in ("none", "null")
    backbone_unit = f"fpn/seed_{seeds[0]}"
    units: List[Unit] = []

    def train_unit(entry: Entry, seed: int) -> Unit:
        folder = unit_folder(out, entry.name, seed)
        run_dir = os.path.join(folder, "run")

        def command() -> List[str]:
            return [*launcher, os.path.join(REPO, "train.py"), "--cfg", args.cfg, *entry.train_args(), "--opts",
                    *args.opts, f"train.seed={seed}", f"train.output_dir={run_dir}"]

        def finish(seconds: float) -> None:
            metrics = final_metrics(run_dir)
            write_json({"entry": entry.name, "seed": seed, "train_seconds": seconds,
                        "inference_seconds": metrics.get("inference_seconds"),
                        "metrics": {k: v for k, v in metrics.items()
                                    if isinstance(v, (int, float)) and k != "inference_seconds"}},
                       os.path.join(folder, "result.json"))
            if not args.keep_checkpoints:  # model_final.pth stays; the resume points go
                shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)

        deps = [entry.search.unit_key(entry.preset)] if entry.search else []
        return Unit(f"{entry.name}/seed_{seed}", folder, command, deps, finish)

    def search_unit(variant: SearchVariant, preset: str) -> Unit:
        folder = variant.folder(out, preset)

        def command() -> List[str]:
            opts = [*args.opts, *variant.search_opts, f"search.output_dir={folder}",
                    f"search.resource_lambda={preset}"]
            if needs_backbone:
                path = os.path.join(out, "searches", "backbone.pth")
                if not os.path.isfile(path):
                    export_backbone(os.path.join(unit_folder(out, "fpn", seeds[0]), "run"), path)
                opts.append(f"model.backbone.weights={path}")
            return [*launcher, os.path.join(REPO, "search.py"), "--cfg", args.cfg, "--opts", *opts,
                    *(["--jobs", str(slots)] if slots > 1 else [])]

        def finish(seconds: float) -> None:
            if not os.path.isfile(os.path.join(folder, "geno.json")):
                raise FileNotFoundError(f"{folder}/geno.json was not written")
            write_json({"search": preset, "tag": variant.tag, "search_opts": variant.search_opts,
                        "search_seconds": seconds}, os.path.join(folder, "result.json"))

        # an evolution trains the candidates of a round at once: up to round_size of the study's jobs
        searching = load_config(args.cfg, [*args.opts, *variant.search_opts])["search"]
        slots = min(args.jobs, searching["evolution"]["round_size"]) if searching["strategy"] == "evolution" else 1
        deps = [backbone_unit] if needs_backbone else []
        return Unit(variant.unit_key(preset), folder, command, deps, finish, slots)

    fpn = next((e for e in entries if e.name == "fpn"), None)
    searches = [(e.search, e.preset) for e in entries if e.search]
    if needs_backbone and searches and fpn is None:
        raise StudyError("the config has no pretrained backbone (model.backbone.weights: none): the searches "
                         "borrow the fpn baseline's backbone, so keep 'fpn' in --baselines")
    search_units = [search_unit(v, p) for v, p in searches]
    if needs_backbone and searches:
        lender = train_unit(fpn, seeds[0])
        # a study folder kept in git holds the FPN run's result, not its model (a fresh clone): a
        # search still to run then needs that run trained again (the same command, a new result)
        if (not os.path.isfile(os.path.join(out, "searches", "backbone.pth"))
                and not all(u.is_done() for u in search_units)):
            lender.needed_output = os.path.join(lender.folder, "run", "model_final.pth")
        units.append(lender)
    units += search_units
    for seed in seeds:
        units += [train_unit(e, seed) for e in entries if not (e is fpn and needs_backbone and searches
                                                                and seed == seeds[0])]
    return units


def select_units(units: List[Unit], entries: List[Entry], only: Sequence[str]) -> List[Unit]:
    """The units of the entries named in ``only`` (all when empty), in the study's order, with
    every unit they wait on that is not done yet (a searched entry's search, the FPN run lending
    it the backbone): more seeds for a few entries without training the rest again."""
    if not only:
        return units
    names = [e.name for e in entries]
    unknown = [name for name in only if name not in names]
    if unknown:
        raise StudyError(f"--only {unknown[0]}: no such entry in this study (its entries: {', '.join(names)})")
    by_key = {u.key: u for u in units}
    wanted = {u.key for u in units if u.key.split("/seed_")[0] in only}
    pending = list(wanted)
    while pending:  # a unit that is done runs nothing, so it needs nothing
        unit = by_key[pending.pop()]
        for dep in [] if unit.is_done() else unit.deps:
            if dep not in wanted and not by_key[dep].is_done():
                wanted.add(dep)
                pending.append(dep)
    return [u for u in units if u.key in wanted]


def shard_units(units: List[Unit], shard: Optional[str]) -> List[Unit]:
    """The units of shard ``i/n``: every n-th unit from the i-th, in the study's order."""
    if not shard:
        return units
    try:
        i, n = parse_shard(shard)
    except ValueError as e:
        raise StudyError(f"--shard {e}") from None
    return units[i::n]


# ----------------------------------------------------------------------------------- collecting

def _mean_std(values: List[float]):
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def entry_complexity(cfg_path: str, opts: List[str], entry: Entry) -> Dict[str, Any]:
    """Params (neck / head / total) and FLOPs of one eval forward at the test size, of the
    detector train.py builds for ``entry``."""
    import torch

    from autofpn.config import load_config
    from autofpn.models.detector import build_detector, count_flops, parameter_breakdown
    from autofpn.models.genotype import load_genotype
    cfg = load_config(cfg_path, [*opts, f"model.neck.type={entry.neck}", f"model.head.type={entry.head}"])
    genotype = load_genotype(entry.genotype_path) if entry.genotype_path else None
    torch.manual_seed(0)
    model = build_detector(cfg, genotype)
    params = parameter_breakdown(model)
    size = int(cfg["model"]["transform"]["test_min_size"])
    flops = count_flops(model, size, size)
    return {"params": {"neck": params["neck"], "head": params["head"], "total": params["total"]},
            "flops": flops["total"], "flops_parts": flops, "flops_image_size": size}


def collect(args, entries: List[Entry], seeds: List[int], status: Dict[str, str]) -> Dict[str, Any]:
    """The study as data (``study.json``) from the unit folders."""
    out = []
    for entry in entries:
        record: Dict[str, Any] = {"name": entry.name, "kind": entry.kind, "genotype": None, "params": None,
                                  "flops": None, "flops_parts": None, "runs": [], "failed_seeds": [], "mean": {}, "std": {},
                                  "search_seconds": None}
        if entry.search:
            record["search_opts"] = entry.search.search_opts
            result = os.path.join(entry.search.folder(args.out, entry.preset), "result.json")
            if os.path.isfile(result):
                record["search_seconds"] = read_json(result)["search_seconds"]
        available = entry.genotype_path is None or os.path.isfile(entry.genotype_path)
        if available:
            if entry.genotype_path:
                record["genotype"] = read_json(entry.genotype_path)
            record.update(entry_complexity(args.cfg, args.opts, entry))
        for seed in seeds:
            folder = unit_folder(args.out, entry.name, seed)
            if os.path.isfile(os.path.join(folder, "result.json")):
                r = read_json(os.path.join(folder, "result.json"))
                record["runs"].append({"seed": seed, "metrics": r["metrics"], "train_seconds": r["train_seconds"]})
            elif os.path.isfile(os.path.join(folder, "error.txt")) or status.get(f"{entry.name}/seed_{seed}") in (
                    "failed", "blocked"):
                record["failed_seeds"].append(seed)
        keys = list(METRIC_KEYS) + ["train_seconds"]
        for k in keys:
            values = [run["train_seconds"] if k == "train_seconds" else run["metrics"].get(k) for run in record["runs"]]
            values = [v for v in values if v is not None and v >= 0]  # pycocotools: -1 = no object of that size
            record["mean"][k], record["std"][k] = _mean_std(values)
        out.append(record)
    study = {"config": os.path.relpath(os.path.abspath(args.cfg), REPO), "opts": list(args.opts), "seeds": seeds,
             "jobs": args.jobs, "threads_per_unit": threads_per_job(args.jobs),
             "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
             "entries": out}
    study["verdict"] = verdict(study)
    return study


def paired_differences(entry: Dict[str, Any], fpn: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """AP − FPN AP seed by seed, over the training seeds both finished: {n, mean, se (None for
    one seed), above (seeds where the entry scored higher)}. Same-seed runs share the data order
    and initialisation draws, so the spread of their differences is usually smaller than the
    unpaired standard error says; None when no seed is shared."""
    fpn_ap = {run["seed"]: run["metrics"].get("AP") for run in fpn["runs"]}
    diffs = [run["metrics"]["AP"] - fpn_ap[run["seed"]] for run in entry["runs"]
             if run["metrics"].get("AP") is not None and fpn_ap.get(run["seed"]) is not None]
    if not diffs:
        return None
    mean, std = _mean_std(diffs)
    return {"n": len(diffs), "mean": mean, "se": None if std is None else std / math.sqrt(len(diffs)),
            "above": sum(1 for d in diffs if d > 0)}


def _mean_ap_on_seeds(entry: Dict[str, Any], seeds) -> float:
    """``entry``'s mean AP over its runs of ``seeds`` (all its runs when it has none of them)."""
    aps = [run["metrics"]["AP"] for run in entry["runs"]
           if run["seed"] in seeds and run["metrics"].get("AP") is not None]
    return sum(aps) / len(aps) if aps else entry["mean"]["AP"]


def _mean_ap_on_shared_seeds(entry: Dict[str, Any], other: Dict[str, Any]) -> float:
    """``entry``'s mean AP over the training seeds ``other`` also finished (all its runs when they
    share none): an entry given more seeds (--only) is ranked on the seeds its rival has."""
    return _mean_ap_on_seeds(entry, {run["seed"] for run in other["runs"]})


def _pool_means(pool: List[Dict[str, Any]]) -> List[float]:
    """Each entry's mean AP over the training seeds every entry of ``pool`` finished (all its runs
    when they share none): a pool's mean, median and best are not lifted or lowered by the extra
    seeds a few entries were given (--only)."""
    seed_sets = [{run["seed"] for run in e["runs"] if run["metrics"].get("AP") is not None} for e in pool]
    shared = set.intersection(*seed_sets) if seed_sets else set()
    return [_mean_ap_on_seeds(e, shared) for e in pool]


def verdict(study: Dict[str, Any]) -> Dict[str, Any]:
    """Searched - FPN AP with its standard error (unpaired, and paired by training seed), each
    random pool's mean / median / best (over the seeds all its entries finished), and each
    searched entry's rank among the random ones (by mean AP over the seeds both finished), from
    the numbers alone."""
    entries = {e["name"]: e for e in study["entries"]}
    fpn = entries.get("fpn")
    pools = {kind: sorted(_pool_means([e for e in study["entries"]
                                       if e["kind"] == kind and e["mean"].get("AP") is not None]), reverse=True)
             for kind in RANDOM_KINDS}
    result: Dict[str, Any] = {f"{kind}_AP": {"count": len(ap)} for kind, ap in pools.items()}
    result["searched"] = {}
    for kind, ap in pools.items():
        if ap:
            mean, std = _mean_std(ap)
            result[f"{kind}_AP"].update(mean=mean, std=std, best=ap[0], median=ap[len(ap) // 2] if len(ap) % 2 else
                                        0.5 * (ap[len(ap) // 2 - 1] + ap[len(ap) // 2]))
    for e in study["entries"]:
        if e["kind"] != "searched" or e["mean"].get("AP") is None:
            continue
        v: Dict[str, Any] = {"seeds": len(e["runs"])}
        if fpn and fpn["mean"].get("AP") is not None:
            v["AP_minus_fpn"] = e["mean"]["AP"] - fpn["mean"]["AP"]
            var = sum((x["std"]["AP"] or 0.0) ** 2 / len(x["runs"]) for x in (e, fpn))
            v["AP_minus_fpn_se"] = math.sqrt(var) if all(x["std"]["AP"] is not None for x in (e, fpn)) else None
            paired = paired_differences(e, fpn)
            if paired:
                v["AP_minus_fpn_paired"] = paired
            if e["params"] and fpn["params"]:
                nh = lambda x: x["params"]["neck"] + x["params"]["head"]  # noqa: E731
                v["neck_head_params_vs_fpn"] = nh(e) / nh(fpn)
                v["flops_vs_fpn"] = e["flops"] / fpn["flops"]
                nh_flops = lambda x: x["flops_parts"]["neck"] + x["flops_parts"]["head"]  # noqa: E731
                v["neck_head_flops_vs_fpn"] = nh_flops(e) / nh_flops(fpn)
        for kind, ap in pools.items():
            if ap:
                rivals = [x for x in study["entries"] if x["kind"] == kind and x["mean"].get("AP") is not None]
                above = sum(1 for x in rivals if _mean_ap_on_shared_seeds(e, x) > _mean_ap_on_shared_seeds(x, e))
                v[f"{kind}_beaten"] = above
                v[f"rank_among_{kind}"] = len(ap) - above + 1  # 1 = better than every one of them
        result["searched"][e["name"]] = v
    return result


# ----------------------------------------------------------------------------------- report

def _fmt_ms(mean: Optional[float], std: Optional[float], digits: int = 2) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else f"{mean:.{digits}f}"


def _fmt_count(n: Optional[float], unit: str = "M", scale: float = 1e6, digits: int = 3) -> str:
    return "-" if n is None else f"{n / scale:.{digits}f} {unit}"


def _fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / 60:.1f} min"


# how the units were run, from the last invocation that ran any: a --collect keeps them
RUN_KEYS = ("wall_seconds", "command", "jobs", "threads_per_unit")


def format_report(study: Dict[str, Any]) -> str:
    wall_seconds = study.get("wall_seconds")
    lines = [f"# Study: {study['config']}", ""]
    if study.get("command"):
        lines += [f"Command: `{study['command']}`", ""]
    lines += [f"Seeds {study['seeds']}; {study['jobs']} unit(s) at a time, {study['threads_per_unit']} thread(s) "
              f"each; machine: {study['machine']}"
              + (f"; wall time of the last invocation that ran units {wall_seconds / 60:.1f} min"
                 if wall_seconds else "") + ".", "",
              "AP in percent (COCO-style, pycocotools), mean ± sample std over the seeds that finished (n). "
              "FLOPs: one eval forward at the test size (a multiply-add = 2 FLOPs). Train time: wall time of "
              "one train.py run (evaluation included), mean over seeds; search time: the whole search "
              "(neck then head), once per searched entry.", "",
              "| entry | kind | n | params neck | params head | params total | FLOPs neck+head | FLOPs total | AP "
              "| AP50 | AP75 | APs | APm | APl | train time | search time |",
              "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for e in study["entries"]:
        p = e["params"] or {}
        failed = f" ({len(e['failed_seeds'])} failed)" if e["failed_seeds"] else ""
        lines.append(" | ".join([
            f"| {e['name']}", e["kind"], f"{len(e['runs'])}{failed}", _fmt_count(p.get("neck")),
            _fmt_count(p.get("head")), _fmt_count(p.get("total"), digits=2),
            _fmt_count(e["flops_parts"]["neck"] + e["flops_parts"]["head"] if e["params"] else None, "G", 1e9, 3),
            _fmt_count(e["flops"], "G", 1e9, 2),
            *[_fmt_ms(e["mean"].get(k), e["std"].get(k)) for k in METRIC_KEYS],
            _fmt_time(e["mean"].get("train_seconds")), _fmt_time(e["search_seconds"])]) + " |")
    lines += ["", "## Verdict", ""]
    v = study["verdict"]
    for kind in RANDOM_KINDS:
        r = v.get(f"{kind}_AP", {"count": 0})
        if r["count"]:
            lines.append(f"- {RANDOM_KIND_NAMES[kind].capitalize()} ({r['count']}): mean AP "
                         f"{_fmt_ms(r['mean'], r.get('std'))}, median {r['median']:.2f}, best {r['best']:.2f}.")
    if not v["searched"]:
        lines.append("- No searched entry has finished runs yet.")
    for name, s in v["searched"].items():
        parts = [f"- **{name}** (n = {s['seeds']}):"]
        if "AP_minus_fpn" in s:
            se = f" ± {s['AP_minus_fpn_se']:.2f} (standard error)" if s.get("AP_minus_fpn_se") is not None else ""
            parts.append(f"AP − FPN = {s['AP_minus_fpn']:+.2f}{se};")
        if "AP_minus_fpn_paired" in s:
            p = s["AP_minus_fpn_paired"]
            se = f" ± {p['se']:.2f}" if p["se"] is not None else ""
            parts.append(f"paired by training seed {p['mean']:+.2f}{se} ({p['above']} of {p['n']} seeds above FPN's);")
        if "neck_head_params_vs_fpn" in s:
            parts.append(f"neck + head params {100 * s['neck_head_params_vs_fpn']:.0f} % of FPN's, neck + head "
                         f"FLOPs {100 * s['neck_head_flops_vs_fpn']:.0f} % (whole detector "
                         f"{100 * s['flops_vs_fpn']:.0f} %);")
        ranks = [f"rank {s[f'rank_among_{kind}']} of {v[f'{kind}_AP']['count'] + 1} against the "
                 f"{RANDOM_KIND_NAMES[kind]} (better than {s[f'{kind}_beaten']} of {v[f'{kind}_AP']['count']})"
                 for kind in RANDOM_KINDS if f"rank_among_{kind}" in s]
        if ranks:
            parts.append("; ".join(ranks) + ".")
        lines.append(" ".join(parts))
    variants = {e["name"]: e.get("search_opts") for e in study["entries"] if e["kind"] == "searched"}
    if any(variants.values()):
        lines += ["", "Search settings of the searched entries (besides the config): " + "; ".join(
            f"{name}: {' '.join(opts) if opts else 'the config as is'}" for name, opts in variants.items())]
    failed = [f"{e['name']}/seed_{s}" for e in study["entries"] for s in e["failed_seeds"]]
    if failed:
        lines += ["", f"Failed units (see their error.txt): {', '.join(failed)}"]
    return "\n".join(lines) + "\n"


def write_outputs(study: Dict[str, Any], out: str) -> None:
    from autofpn.viz.study_plot import plot_pareto
    write_json(study, os.path.join(out, "study.json"))
    text = format_report(study)
    tmp = os.path.join(out, "study.md.tmp")
    with open(tmp, "w") as f:
        f.write(text + "\n![AP against neck + head parameters](pareto.png)\n")
    os.replace(tmp, os.path.join(out, "study.md"))
    plot_pareto(study, os.path.join(out, "pareto.png"))


# ----------------------------------------------------------------------------------- main

SEARCH_KEYS_SET_PER_UNIT = ("output_dir", "resource_lambda")


def check_study_config(out: str, cfg_path: str, opts: List[str], random_seed: int, tag: str = "",
                       search_opts: Sequence[str] = (), lambdas: Sequence[str] = (),
                       random_parts: str = "both", random_convs: int = 0) -> List[SearchVariant]:
    """Record the study in ``out/study_config.json`` and return its search variants.

    The training config (everything but ``search.*``) and the random stream must be the ones the
    folder was made with: otherwise StudyError naming the keys. The kind of random architectures
    (``random_parts``, ``random_convs``) must be the folder's once it holds some; a folder that
    has drawn none yet takes this invocation's. A search variant ``tag`` is
    added with its resolved ``search`` section, or must match the one recorded under that tag;
    new lambda presets of a known variant are added to it."""
    from autofpn.config import complete_config, diff_keys, load_config
    plain = lambda d: json.loads(json.dumps(d))  # noqa: E731  (tuples -> lists, as read back)
    cfg = plain(load_config(cfg_path, opts))
    training = {k: v for k, v in cfg.items() if k != "search"}
    searching = {k: v for k, v in plain(load_config(cfg_path, [*opts, *search_opts]))["search"].items()
                 if k not in SEARCH_KEYS_SET_PER_UNIT}
    path = os.path.join(out, "study_config.json")
    record = read_json(path) if os.path.isfile(path) else {
        "config": os.path.abspath(cfg_path), "opts": list(opts), "random_seed": random_seed,
        "random_parts": random_parts, "random_convs": random_convs, "training": training, "variants": []}
    # keys added to the project since the folder was made take their defaults (same behaviour)
    diff = diff_keys({k: v for k, v in plain(complete_config(record["training"], where=path)).items()
                       if k != "search"}, training)
    if record["random_seed"] != random_seed:
        diff.append("--random-seed")
    if not glob.glob(os.path.join(out, "genotypes", "random_*.json")):  # no random architecture drawn yet
        record.update(random_parts=random_parts, random_convs=random_convs)
    # folders made before the options drew both parts from the whole space
    if record.get("random_parts", "both") != random_parts:
        diff.append("--random-parts")
    if record.get("random_convs", 0) != random_convs:
        diff.append("--random-convs")
    if diff:
        raise StudyError(f"{out} holds a study made with another config ({', '.join(diff[:6])} differ); "
                         f"use another --out or the same --cfg/--opts")
    variant = next((v for v in record["variants"] if v["tag"] == tag), None)
    if variant is not None:
        recorded = plain(complete_config({"search": variant["search"]}, where=path))["search"]
        diff = diff_keys({k: v for k, v in recorded.items() if k not in SEARCH_KEYS_SET_PER_UNIT}, searching,
                          "search.")
        if diff:
            raise StudyError(f"{out}: search variant '{tag or '(default)'}' was searched with other settings "
                             f"({', '.join(diff[:6])} differ); name the new settings with --tag")
        variant["lambdas"] += [p for p in lambdas if p not in variant["lambdas"]]
    elif lambdas:
        record["variants"].append({"tag": tag, "search_opts": list(search_opts), "lambdas": list(lambdas),
                                   "search": searching})
    write_json(record, path)
    return [SearchVariant(v["tag"], v["search_opts"], v["lambdas"]) for v in record["variants"]]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, help="the config every entry is trained (and searched) with")
    p.add_argument("--out", required=True, help="the study's folder")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every unit")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per entry (0..n-1)")
    p.add_argument("--random", type=int, default=8, help="random architectures from the search space")
    p.add_argument("--random-seed", type=int, default=0, help="the random architectures' stream")
    p.add_argument("--random-parts", default="both", choices=RANDOM_PARTS,
                   help="what a random architecture draws: neck and head; the head only on the config's "
                        "neck (the baseline of a head search with search.head_with_searched_neck=false); "
                        "the neck only with the 2-MLP head (the baseline of a search.stage=neck search)")
    p.add_argument("--random-convs", type=int, default=0, metavar="K",
                   help="with --random-parts neck: each random neck is the dense identity neck with K random "
                        "links made random convolutions (the control of a search decoded with argmax_nonnone)")
    p.add_argument("--budget-random", type=int, default=0, metavar="N",
                   help="random architectures (neck and head) within the neck + head FLOPs of --budget-of: "
                        "the baseline of a search under its resource constraint")
    p.add_argument("--budget-of", nargs="*", default=[], metavar="GENOTYPE",
                   help="genotype files (e.g. the searches' geno.json): the budget is the costliest one's neck + "
                        "head FLOPs in the search penalty's tables")
    p.add_argument("--lambdas", nargs="*", default=list(LAMBDA_PRESETS), choices=LAMBDA_PRESETS,
                   help="one search per resource-lambda preset (none: no searched entry)")
    p.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=BASELINES + OPTIONAL_BASELINES,
                   help="handcrafted entries (default: %(default)s); conv: FPN's neck with model.head.type=conv; "
                        "plain: no fusion neck (SSD); identity: every neck link identity, 2-MLP head")
    p.add_argument("--search-opts", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides for the searches only (a way of searching to try), named by --tag")
    p.add_argument("--tag", default="", help="name of the search variant (entries searched_<preset>_<tag>)")
    p.add_argument("--jobs", type=int, default=1, help="units run in parallel (threads divided between them)")
    p.add_argument("--only", nargs="+", default=[], metavar="ENTRY",
                   help="run the units of these entries only (e.g. more --seeds for a few); the report covers all")
    p.add_argument("--shard", default=None, metavar="I/N", help="run the I-th of N disjoint slices of the units")
    p.add_argument("--launcher", default=None,
                   help='how a unit runs its script, e.g. "torchrun --nproc_per_node 8" (default: this python)')
    p.add_argument("--collect", action="store_true", help="run nothing: build the table from the folders")
    p.add_argument("--retry-failed", action="store_true", help="run failed units again")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep a finished unit's resume checkpoints (model_final.pth is always kept)")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.random < 0 or args.jobs < 1 or args.random_convs < 0 or args.budget_random < 0:
        p.error("--seeds and --jobs must be >= 1, --random, --random-convs and --budget-random >= 0")
    if args.budget_random and not args.budget_of:
        p.error("--budget-random needs --budget-of: the genotype(s) whose neck + head FLOPs are the budget")
    if args.random_convs and args.random_parts != "neck":
        p.error("--random-convs draws necks only: add --random-parts neck")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    import torch
    torch.set_num_threads(1)  # the units do the work; this process only counts params and FLOPs
    from autofpn.config import load_config
    args.out = os.path.abspath(args.out)
    args.cfg = os.path.abspath(args.cfg)
    cfg = load_config(args.cfg, args.opts)
    if args.search_opts and not args.tag:
        raise StudyError("--search-opts need a --tag naming that way of searching")
    if any(not item.startswith("search.") for item in args.search_opts):
        raise StudyError(f"--search-opts take search.* keys only, got {args.search_opts}")
    variants = check_study_config(args.out, args.cfg, args.opts, args.random_seed, args.tag,
                                  args.search_opts, args.lambdas, args.random_parts, args.random_convs)
    seeds = list(range(args.seeds))
    entries = plan_entries(args.out, args.baselines, args.random, variants, args.random_seed, cfg,
                           args.random_parts, args.random_convs, args.budget_random,
                           [os.path.abspath(path) for path in args.budget_of])
    units = make_units(args, entries, seeds, cfg)
    mine = shard_units(select_units(units, entries, args.only), args.shard)
    by_key = {u.key: u for u in units}  # every unit of the folder: this shard's needs may be another's
    finished_before = {u.key for u in mine if u.is_done() or u.has_failed()}
    status = {} if args.collect else run_units(mine, args.jobs, threads_per_job(args.jobs), args.retry_failed,
                                               done_elsewhere=lambda key: by_key[key].is_done())
    command = "python -m autofpn.study " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    study = collect(args, entries, seeds, status)
    if any(s in ("done", "failed") and k not in finished_before for k, s in status.items()):
        study.update(wall_seconds=time.perf_counter() - start, command=command)
    elif os.path.isfile(os.path.join(args.out, "study.json")):
        # ran nothing (--collect, or all done): the report keeps what the invocation that ran units said
        previous = read_json(os.path.join(args.out, "study.json"))
        study.update({k: previous[k] for k in RUN_KEYS if k in previous})
    study.setdefault("command", command)
    write_outputs(study, args.out)
    print(format_report(study), flush=True)
    print(f"study: {os.path.join(args.out, 'study.md')}, study.json, pareto.png", flush=True)
    bad = [k for k, s in status.items() if s in ("failed", "blocked")]
    return 1 if bad else 0


if __name__ == "__main__":
    from autofpn import study  # as imported, not as __main__: run_command knows that module's StudyError
    from autofpn.cli import run_command
    sys.exit(run_command(study.main))
