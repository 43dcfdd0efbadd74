"""Regularized (aging) evolution over the Auto-FPN search space (Real et al. 2019).

The paper's Table 8 compares its gradient search with an "evolutionary algorithm with early
stopping" over the same space; this is that baseline (``search.strategy: evolution``):

- population: the first ``population`` candidates are random valid genotypes of the searched
  parts (``random_sample.random_genotype`` with the evolution's seed: the same draws as a
  study's random baseline of that seed);
- cycle: ``sample_size`` members of the population are drawn at random (a tournament), the
  fittest is mutated (``mutate``: one link / edge changes its op or its input), the child is
  trained and scored, joins the population, and the OLDEST member leaves. The population
  before candidate i is therefore candidates i - population .. i - 1, whatever their fitness;
- stop after ``candidates`` architectures in all (the initial population included);
  ``geno.json`` is the fittest candidate ever trained.

Rounds (``search.evolution.round_size`` = R): the children are bred R at a time, each from the
population as it stood before its round (candidates s - population .. s - 1 for a round starting
at s), so a round's candidates are independent and may train at once; R = 1 is the strictly
sequential evolution above, a larger R the batched form of the paper's asynchronous workers. The
initial population is one round. ``search.py --jobs J`` trains up to J candidates of a round at
once (worker subprocesses, ``python -m autofpn.search.evolution --candidate DIR``, each with its
log in ``candidates/<i>/log.txt``), and ``--shard i/n`` makes this invocation train only the
candidates whose index is i modulo n, waiting for the other shards' results on the shared folder.
What is bred and its fitness do not depend on J or n: they only say who trains what. Each
candidate is claimed with a lock (``candidates/<i>/running.lock``), so two invocations on one
folder never train a candidate twice.

Fitness, without touching ``data.val``: each candidate is trained from its initial weights
(seed ``search_seed``, the same for every candidate, so candidates differ by their architecture
only) for ``candidate_epochs`` (the retrain's ``solver`` settings, lr steps scaled to the
shorter schedule) on half A of the training set, and evaluated on half B (COCO AP) -- the two
halves the differentiable search uses (``search.split_seed``). ``fitness = AP / 100 - lambda x C``
with lambda = ``search.resource_lambda`` x ``resource_lambda_scale`` and C the gradient search's
normalised penalty at the candidate's one-hot architecture (``ResourceCost.normalized_cost``),
so lambda trades AP (as a fraction) against cost as the gradient search trades loss against it.

Resume: ``OUT/candidates/<i>/genotype.json`` is written before candidate i trains, its training
run (``train/``, the Trainer's auto-resume, one checkpoint kept) sits beside it and
``result.json`` is written atomically when it is scored (then the checkpoints are deleted).
Candidate i's random draws come from ``random.Random((seed, i))`` and the recorded results of
candidates < i only, so a rerun after kill -9 skips the finished candidates, resumes the
interrupted one, and breeds the same children.
"""
import copy
import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from autofpn.engine import distributed as du
from autofpn.engine.checkpoint import atomic_write_json
from autofpn.models.genotype import GENOTYPE_VERSION, HEAD_INPUT_NODES, HEAD_INTERMEDIATE_NODES, validate_genotype
from autofpn.models.operations import HEAD_OPS, NECK_OPS
from autofpn.search.differentiable import (SearchResult, resource_lambda, search_halves, search_seed,
                                           search_transform, stages_to_run, supernet_cost_tables)

PARTS = ("neck", "head")


@dataclass(frozen=True)
class EvolutionSettings:
    """The ``search.evolution`` section, checked (``seed`` resolved: never -1)."""
    population: int
    sample_size: int
    candidates: int
    candidate_epochs: int
    max_iters: int
    seed: int
    round_size: int


def evolution_settings(cfg: Dict[str, Any]) -> EvolutionSettings:
    """``search.evolution`` of ``cfg``; ConfigError naming the key when two keys disagree (each
    key's own type and range are checked when the config is loaded)."""
    from autofpn.config import ConfigError
    e = cfg["search"]["evolution"]
    if e["sample_size"] > e["population"]:
        raise ConfigError(f"'search.evolution.sample_size' = {e['sample_size']}: must be <= "
                          f"search.evolution.population ({e['population']}), the tournament draws from the population")
    if e["candidates"] < e["population"]:
        raise ConfigError(f"'search.evolution.candidates' = {e['candidates']}: must be >= "
                          f"search.evolution.population ({e['population']}), which counts the initial random members")
    seed = int(e["seed"]) if int(e["seed"]) >= 0 else search_seed(cfg)
    return EvolutionSettings(int(e["population"]), int(e["sample_size"]), int(e["candidates"]),
                             int(e["candidate_epochs"]), int(e["max_iters"]), seed, int(e["round_size"]))


def check_config(cfg: Dict[str, Any]) -> None:
    """What ``search.py`` checks before it claims the output folder."""
    from autofpn.config import ConfigError
    evolution_settings(cfg)
    searched_parts(cfg)
    if cfg["search"]["selection"] != "weights":
        raise ConfigError(f"'search.selection' = {cfg['search']['selection']!r} picks ops from a trained supernet; "
                          f"search.strategy=evolution trains no supernet (leave search.selection=weights)")


def searched_parts(cfg: Dict[str, Any]) -> Tuple[str, ...]:
    """The genotype parts the evolution searches: ``search.stage`` neck | head | both."""
    from autofpn.config import ConfigError
    try:
        return tuple(stages_to_run(cfg))
    except ValueError as e:
        raise ConfigError(f"'search.stage' = {cfg['search']['stage']!r}: {e}") from None


# ------------------------------------------------------------------------------------ mutation

def _head_nodes() -> range:
    return range(HEAD_INPUT_NODES, HEAD_INPUT_NODES + HEAD_INTERMEDIATE_NODES)


def _part_slots(genotype: Dict[str, Any], part: str):
    """``(groups, sources, ops, name)`` of one part: ``groups`` = per neck layer / head cell a
    dict ``{(source, target): op}`` of its links / edges, ``sources(target)`` the possible
    sources of a target (every level; the earlier nodes), ``ops`` the op table, "none" first."""
    if part == "neck":
        levels = list(genotype["neck"]["levels"])
        groups = [{(l["from"], l["to"]): l["op"] for l in links} for links in genotype["neck"]["layers"]]
        return groups, (lambda target: levels), NECK_OPS, levels
    groups = [{(e["input"], e["node"]): e["op"] for e in edges} for edges in genotype["head"]["cells"]]
    return groups, (lambda node: list(range(node))), HEAD_OPS, list(_head_nodes())


def _rebuild_part(genotype: Dict[str, Any], part: str, groups: List[Dict[Tuple[int, int], str]]) -> Dict[str, Any]:
    """The genotype part of ``groups``, links / edges in ``random_sample``'s order (by target,
    then source), so equal architectures give equal JSON."""
    if part == "neck":
        levels = genotype["neck"]["levels"]
        return {"levels": list(levels),
                "layers": [[{"from": s, "to": t, "op": g[(s, t)]} for t in levels for s in levels if (s, t) in g]
                           for g in groups]}
    return {"cells": [[{"node": n, "input": k, "op": g[(k, n)]} for n in _head_nodes() for k in range(n)
                       if (k, n) in g] for g in groups]}


def _describe(part: str, group: int, source: int, target: int) -> str:
    if part == "neck":
        return f"neck layer {group + 1} P{source}->P{target}"
    return f"head cell {group} node {target}<-{source}"


def mutate(genotype: Dict[str, Any], rng: random.Random, parts: Sequence[str] = PARTS) -> Tuple[Dict[str, Any], str]:
    """A child of ``genotype``: one neck link or head edge of ``parts`` changed. Returns
    ``(child, what changed)``; ``genotype`` is left as it is.

    Either the op of one link / edge slot changes to another op of its table, "none" included
    (a link appears or disappears) unless the slot is its target's only input; or one existing
    link / edge moves to another source (level / node) of the same target that had none. Every
    target level / intermediate node keeps an input, and the child always differs from the
    parent. A function of (genotype, rng state, parts) only."""
    parts = [p for p in PARTS if p in parts and genotype.get(p) is not None]
    if not parts:
        raise ValueError(f"mutate: the genotype has none of the parts {list(PARTS)} to mutate")
    part = rng.choice(parts)
    groups, sources, ops, targets = _part_slots(genotype, part)
    g = rng.randrange(len(groups))
    chosen = dict(groups[g])
    movable = sorted((s, t) for (s, t) in chosen if any((o, t) not in chosen for o in sources(t)))
    if movable and rng.random() < 0.5:  # input mutation: a link / edge reads another source
        source, target = rng.choice(movable)
        new_source = rng.choice([o for o in sources(target) if (o, target) not in chosen])
        op = chosen.pop((source, target))
        chosen[(new_source, target)] = op
        change = f"{_describe(part, g, source, target)} ({op}) moved to read {'P' if part == 'neck' else 'node '}{new_source}"
    else:  # op mutation of one slot, present or absent
        slots = [(s, t) for t in targets for s in sources(t)]
        source, target = rng.choice(slots)
        current = chosen.get((source, target), "none")
        inputs = sum(1 for (_, t) in chosen if t == target)
        choices = [o for o in ops if o != current and not (o == "none" and inputs == 1)]
        new_op = rng.choice(choices)
        if new_op == "none":
            del chosen[(source, target)]
        else:
            chosen[(source, target)] = new_op
        change = f"{_describe(part, g, source, target)} op {current} -> {new_op}"
    child_groups = [dict(x) for x in groups]
    child_groups[g] = chosen
    child = copy.deepcopy(genotype)
    child[part] = _rebuild_part(genotype, part, child_groups)
    return validate_genotype(child), change


# --------------------------------------------------------------------------------- candidates

def fixed_neck(cfg: Dict[str, Any], parts: Sequence[str], neck_genotype: Optional[Dict[str, Any]]):
    """The neck part a head-only evolution keeps: the given genotype's neck when
    ``search.head_with_searched_neck`` (the differentiable head stage's rule), else None (FPN)."""
    if "neck" in parts or neck_genotype is None or not cfg["search"]["head_with_searched_neck"]:
        return None
    return neck_genotype.get("neck")


def random_member(cfg: Dict[str, Any], settings: EvolutionSettings, index: int, parts: Sequence[str],
                  neck: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Initial member ``index``: the ``index``-th random genotype of the evolution's seed, its
    unsearched parts replaced by the kept neck (or None: FPN / the 2-MLP head)."""
    from autofpn.search.random_sample import random_genotype
    m = cfg["model"]
    g = random_genotype(settings.seed, index, m["neck"]["levels"], m["neck"]["layers"], m["head"]["cells"])
    return {"version": GENOTYPE_VERSION,
            "neck": g["neck"] if "neck" in parts else neck, "head": g["head"] if "head" in parts else None}


def candidate_round(settings: EvolutionSettings, index: int) -> range:
    """The candidates bred together with candidate ``index``: the initial population, or the
    round of ``round_size`` children that holds it (the last one may be shorter)."""
    if index < settings.population:
        return range(0, settings.population)
    start = index - (index - settings.population) % settings.round_size
    return range(start, min(start + settings.round_size, settings.candidates))


def rounds(settings: EvolutionSettings) -> List[range]:
    """Every round of the evolution, in order (``candidate_round``)."""
    out, index = [], 0
    while index < settings.candidates:
        out.append(candidate_round(settings, index))
        index = out[-1].stop
    return out


def breed(settings: EvolutionSettings, index: int, history: List[Dict[str, Any]],
          parts: Sequence[str]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Candidate ``index`` >= population: tournament over the population before its round (the
    ``population`` candidates before the round's first, records of ``history`` in index order)
    and mutation of its winner. Returns ``(genotype, origin record)``; the draws come from
    (seed, index) alone."""
    rng = random.Random(f"autofpn-evolution-{settings.seed}-{index}")  # str seeds are stable across runs
    start = candidate_round(settings, index).start
    population = history[start - settings.population: start]
    contenders = rng.sample(population, settings.sample_size)
    parent = max(contenders, key=lambda r: r["fitness"])  # a tie: the first drawn
    child, change = mutate(parent["genotype"], rng, parts)
    return child, {"origin": "mutation", "parent": parent["index"],
                   "tournament": [r["index"] for r in contenders], "mutation": change}


def candidate_config(cfg: Dict[str, Any], genotype: Dict[str, Any], settings: EvolutionSettings,
                     run_dir: str) -> Dict[str, Any]:
    """The config a candidate trains with: the retrain's model and solver (its norms, backbone,
    lr) at the search's input sizes (``search.min_size`` / ``max_size``), the part not searched
    being FPN / the 2-MLP head as in the differentiable search's stages; ``candidate_epochs``
    epochs (lr steps and warm-up scaled from ``solver.epochs``), capped by ``search.evolution.max_iters``;
    one checkpoint kept; no pictures."""
    c = copy.deepcopy(cfg)
    c["model"]["transform"] = search_transform(cfg)
    c["model"]["neck"]["type"] = "auto" if genotype["neck"] is not None else "fpn"
    c["model"]["head"]["type"] = "auto" if genotype["head"] is not None else "mlp"
    s = c["solver"]
    scale = settings.candidate_epochs / max(int(s["epochs"]), 1)
    s["steps"] = [float(e) * scale for e in s["steps"]]
    # the warm-up shrinks with the schedule: unscaled, the demo's 50 iterations outlast a
    # one-epoch candidate (38 iterations on half A), which never trains at the full lr
    s["warmup_iters"] = int(round(int(s["warmup_iters"]) * min(scale, 1.0)))
    s["epochs"] = settings.candidate_epochs
    s["max_iters"] = settings.max_iters
    t = c["train"]
    t.update({"output_dir": run_dir, "seed": search_seed(cfg), "keep_checkpoints": 1, "eval_period": 0,
              "auto_resume": True})
    c["eval"]["draw_images"] = 0
    return c


def unaugmented(dataset):
    """A view of ``dataset`` (a training set or a Subset of one) without the random flip, to
    score candidates on: the same records, so the halves' indices stay valid."""
    from torch.utils.data import Subset
    if isinstance(dataset, Subset):
        return Subset(unaugmented(dataset.dataset), dataset.indices)
    view = copy.copy(dataset)
    view.hflip_prob = 0.0
    return view


@dataclass
class Candidate:
    """What scoring a candidate needs: the two halves, the cost tables, lambda, the context."""
    cfg: Dict[str, Any]
    settings: EvolutionSettings
    half_a: Any
    half_b: Any
    cost: Any
    lam: float
    ctx: du.DistContext


def train_and_score(job: Candidate, genotype: Dict[str, Any], cand_dir: str) -> Dict[str, Any]:
    """Train ``genotype`` on half A (resuming from ``cand_dir/train``'s checkpoint) and score it
    on half B. Returns ``{"AP", "AP50", "cost", "fitness", "seconds", "iterations"}`` (+
    ``"diverged"``: a candidate whose loss became NaN / Inf scores AP 0)."""
    from autofpn.data import build_loader
    from autofpn.engine.trainer import NonFiniteLossError, Trainer, seed_everything
    from autofpn.eval import evaluate_model
    from autofpn.models.detector import build_detector
    ctx = job.ctx
    ccfg = candidate_config(job.cfg, genotype, job.settings, os.path.join(cand_dir, "train"))
    seed = int(ccfg["train"]["seed"])
    seed_everything(seed)  # the same initial weights for every candidate (of the parts they share)
    model = build_detector(ccfg, genotype)
    seed_everything(seed + ctx.rank)
    train_loader = build_loader(ccfg, job.half_a, train=True, seed=seed)
    eval_loader = build_loader(ccfg, job.half_b, train=False)

    def evaluate(net, eval_dir):
        return evaluate_model(net, eval_loader, job.half_b, eval_dir, "coco", ctx.device, verbose=False)

    trainer = Trainer(ccfg, model, train_loader, ctx, evaluate=evaluate, genotype=genotype)
    trainer.resume()
    diverged = None
    try:
        summary = trainer.train() or {}
    except NonFiniteLossError as e:  # an architecture that cannot be trained is unfit, not a crash
        summary, diverged = {}, str(e)
    ap = summary.get("AP")
    ap = float(ap) if isinstance(ap, (int, float)) and math.isfinite(ap) else 0.0
    ap50 = summary.get("AP50")
    cost = job.cost.normalized_cost(genotype)
    result = {"AP": ap, "AP50": float(ap50) if isinstance(ap50, (int, float)) and math.isfinite(ap50) else None,
              "cost": cost, "lambda": job.lam, "fitness": ap / 100.0 - job.lam * cost,
              "seconds": trainer.clock.total(), "iterations": trainer.iter}
    if diverged:
        result["diverged"] = diverged
    return result


def clean_candidate(cand_dir: str) -> None:
    """Delete what a scored candidate no longer needs: its checkpoints, final weights and
    detections (kept: genotype, result, metrics.jsonl, curves, eval metrics.json)."""
    run = os.path.join(cand_dir, "train")
    shutil.rmtree(os.path.join(run, "checkpoints"), ignore_errors=True)
    paths = [os.path.join(run, "model_final.pth")]
    eval_root = os.path.join(run, "eval")
    if os.path.isdir(eval_root):
        for sub in os.listdir(eval_root):
            paths += [os.path.join(eval_root, sub, n) for n in ("detections.json", "ground_truth.json")]
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:  # never written, or cleaned by another shard of the same evolution
            pass


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def format_candidate(record: Dict[str, Any], total: int, best: Dict[str, Any]) -> str:
    """The progress line of one scored candidate."""
    origin = ("random" if record["origin"] == "random"
              else f"child of {record['parent']}: {record['mutation']}")
    return (f"evolution candidate {record['index']}/{total - 1}: fitness {record['fitness']:+.4f} = "
            f"AP {record['AP']:.2f} / 100 - {record['lambda']:g} x cost {record['cost']:.3f}; "
            f"{record['seconds']:.0f} s; {origin}; best so far {best['index']} ({best['fitness']:+.4f})")


def check_manifest(out_dir: str, manifest: Dict[str, Any], is_main: bool) -> None:
    """``OUT/evolution.json`` records what the folder's evolution searches (the kept neck
    included, which the config does not hold); a folder of another evolution is refused."""
    from autofpn.engine.runs import FolderInUseError
    path = os.path.join(out_dir, "evolution.json")
    if os.path.isfile(path):
        saved = _read_json(path)
        saved["settings"].setdefault("round_size", 1)  # written before rounds existed: one child at a time
        diff = sorted(k for k in set(saved) | set(manifest) if saved.get(k) != manifest.get(k))
        if diff:
            raise FolderInUseError(f"{out_dir} holds an evolution of another setup ({', '.join(diff)} differ); "
                                   f"use another search.output_dir, or --force to move that one aside")
    elif is_main:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_json(manifest, path)
    du.barrier()


def candidate_job(cfg: Dict[str, Any], ctx: du.DistContext, dataset=None) -> Candidate:
    """What scoring any candidate of ``cfg``'s evolution needs (the halves, the searched parts'
    cost tables as the gradient search builds them, lambda); the same in a worker subprocess."""
    parts = searched_parts(cfg)
    half_a, half_b = search_halves(cfg, dataset)  # fills model.num_classes in
    cost = supernet_cost_tables(cfg, parts)
    return Candidate(cfg, evolution_settings(cfg), half_a, unaugmented(half_b), cost,
                     resource_lambda(cfg["search"]), ctx)


def _candidate_dir(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, "candidates", f"{index:04d}")


def _is_scored(out_dir: str, index: int) -> bool:
    return os.path.isfile(os.path.join(_candidate_dir(out_dir, index), "result.json"))


def score_candidate(job: Candidate, cand_dir: str) -> None:
    """Train and score the candidate of ``cand_dir/genotype.json``; ``result.json`` written
    atomically (the mark of a finished candidate)."""
    from autofpn.models.genotype import load_genotype
    result = train_and_score(job, load_genotype(os.path.join(cand_dir, "genotype.json")), cand_dir)
    if job.ctx.is_main:
        atomic_write_json(result, os.path.join(cand_dir, "result.json"))


@dataclass
class Parallel:
    """Who trains which candidates: ``jobs`` worker subprocesses at once (1: in this process),
    this invocation's ``shard`` of ``shards`` (candidate i is shard i mod shards')."""
    jobs: int = 1
    shard: int = 0
    shards: int = 1


class EvolutionError(RuntimeError):
    """A candidate's worker subprocess failed (not a diverged candidate: that one scores 0)."""


WAIT_POLL_SECONDS = 2.0


def _worker(job: Candidate, out_dir: str, index: int, threads: int):
    """Start the worker subprocess of candidate ``index``: (process, its log file)."""
    import subprocess
    import sys
    from autofpn.engine.runs import die_with_parent
    cand_dir = _candidate_dir(out_dir, index)
    log = open(os.path.join(cand_dir, "log.txt"), "a")
    cmd = [sys.executable, "-m", "autofpn.search.evolution", "--candidate", cand_dir,
           "--cfg", os.path.join(out_dir, "config.yaml")]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    process = subprocess.Popen(cmd, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               preexec_fn=die_with_parent if sys.platform.startswith("linux") else None)
    return process, log


def train_round(job: Candidate, out_dir: str, members: Sequence[int], parallel: Parallel) -> None:
    """Return once every candidate of ``members`` is scored (``result.json``): this invocation
    trains the unscored ones of its shard (in this process, or ``parallel.jobs`` workers at once),
    each under its lock, and waits for the others (another shard, or another process holding a
    candidate's lock: should that process die, its candidate is taken over here)."""
    import time
    from autofpn.engine.runs import lock_folder, log_tail, threads_per_job
    pending = [i for i in members if not _is_scored(out_dir, i)]
    if job.ctx.world_size > 1:  # torchrun: every rank trains each candidate together, in order
        for index in pending:
            score_candidate(job, _candidate_dir(out_dir, index))
            du.barrier()
        return
    mine = [i for i in pending if i % parallel.shards == parallel.shard]
    threads = threads_per_job(parallel.jobs)
    if parallel.jobs > 1 and mine:
        print(f"evolution: candidates {members[0]}-{members[-1]}: {len(mine)} to train here, {parallel.jobs} at a "
              f"time ({threads} thread(s) each; logs in {os.path.join(out_dir, 'candidates', '<i>', 'log.txt')})",
              flush=True)
    workers: Dict[int, Any] = {}  # index -> (process, log, lock)
    said_waiting = False
    try:
        while True:
            for index, (process, log, lock) in list(workers.items()):
                code = process.poll()
                if code is None:
                    continue
                log.close()
                lock.close()
                del workers[index]
                if code != 0 or not _is_scored(out_dir, index):
                    path = os.path.join(_candidate_dir(out_dir, index), "log.txt")
                    raise EvolutionError(f"evolution candidate {index} failed (exit code {code}); its log "
                                         f"{path} ends:\n{log_tail(path, 12)}")
            left = [i for i in pending if not _is_scored(out_dir, i)]
            if not left and not workers:
                return
            for index in left:
                if index not in mine or index in workers or len(workers) >= parallel.jobs:
                    continue
                lock = lock_folder(_candidate_dir(out_dir, index))
                if lock is None:
                    continue  # another process trains it
                if _is_scored(out_dir, index):  # finished by the process that just let it go
                    lock.close()
                elif parallel.jobs == 1:
                    try:
                        score_candidate(job, _candidate_dir(out_dir, index))
                    finally:
                        lock.close()
                else:
                    workers[index] = (*_worker(job, out_dir, index, threads), lock)
            if not workers and any(not _is_scored(out_dir, i) for i in left):
                if not said_waiting:
                    others = [i for i in left if not _is_scored(out_dir, i)]
                    print(f"evolution: waiting for candidates {', '.join(map(str, others))} "
                          f"(trained by another shard or process)", flush=True)
                    said_waiting = True
                time.sleep(WAIT_POLL_SECONDS)
            elif workers:
                time.sleep(0.5)
    finally:
        for process, log, lock in workers.values():  # an error or a signal here: stop the others too
            process.kill()
            process.wait()
            log.close()
            lock.close()


def run_search(cfg: Dict[str, Any], ctx: du.DistContext, out_dir: str,
               neck_genotype: Optional[Dict[str, Any]] = None, dataset=None,
               parallel: Optional[Parallel] = None) -> SearchResult:
    """Run the evolution in ``out_dir`` (resuming what is there); writes ``geno.json`` (the
    fittest candidate), ``history.json`` (every candidate in order: genotype, origin, AP, cost,
    fitness, seconds) and ``search_times.json``. ``neck_genotype``: the neck a head-only
    evolution keeps. ``dataset``: the training set when the caller has built it. ``parallel``:
    who trains what (``Parallel``; default: every candidate here, one at a time)."""
    from autofpn.engine.runs import FolderInUseError
    from autofpn.models.genotype import load_genotype, save_genotype

    parallel = parallel or Parallel()
    settings = evolution_settings(cfg)
    parts = searched_parts(cfg)
    kept_neck = fixed_neck(cfg, parts, neck_genotype)
    check_manifest(out_dir, {"parts": list(parts), "kept_neck": kept_neck, "settings": asdict(settings),
                             "lambda": resource_lambda(cfg["search"])}, ctx.is_main)
    job = candidate_job(cfg, ctx, dataset)

    history: List[Dict[str, Any]] = []
    for members in rounds(settings):
        origins = {}
        for index in members:  # bred from the records before the round
            cand_dir = _candidate_dir(out_dir, index)
            if index < settings.population:
                genotype, origin = random_member(cfg, settings, index, parts, kept_neck), {"origin": "random"}
            else:
                genotype, origin = breed(settings, index, history, parts)
            genotype = validate_genotype({**genotype, "name": f"evolution_{index:04d}",
                                          "description": ("random initial member" if origin["origin"] == "random"
                                                          else f"mutation of candidate {origin['parent']}: "
                                                               f"{origin['mutation']}")})
            geno_path = os.path.join(cand_dir, "genotype.json")
            if os.path.isfile(geno_path) and load_genotype(geno_path) != genotype:
                raise FolderInUseError(f"{geno_path} is not the candidate this evolution breeds at index {index} "
                                       f"(another seed, config or code); use another search.output_dir")
            if ctx.is_main and not os.path.isfile(geno_path):
                save_genotype(genotype, geno_path)  # before training: what the folder is training
            origins[index] = (origin, genotype)
        du.barrier()
        train_round(job, out_dir, members, parallel)
        du.barrier()
        for index in members:
            origin, genotype = origins[index]
            result = _read_json(os.path.join(_candidate_dir(out_dir, index), "result.json"))
            if ctx.is_main:
                clean_candidate(_candidate_dir(out_dir, index))
            history.append({"index": index, **origin, **result, "genotype": genotype})
            best = max(history, key=lambda r: r["fitness"])  # a tie: the earlier candidate
            if ctx.is_main:
                print(format_candidate(history[-1], settings.candidates, best), flush=True)
        if ctx.is_main:
            atomic_write_json(history, os.path.join(out_dir, "history.json"))

    best = max(history, key=lambda r: r["fitness"])
    found = validate_genotype({**best["genotype"], "name": "evolution",
                               "description": f"searched by regularized evolution ({', '.join(parts)}): candidate "
                                              f"{best['index']} of {settings.candidates}, fitness "
                                              f"{best['fitness']:+.4f} (AP {best['AP']:.2f} on training half B, "
                                              f"cost {best['cost']:.3f})"})
    if ctx.is_main:
        save_genotype(found, os.path.join(out_dir, "geno.json"))
        atomic_write_json({"evolution": sum(r["seconds"] for r in history)}, os.path.join(out_dir, "search_times.json"))
        print(f"evolution: best candidate {best['index']} of {settings.candidates} (fitness {best['fitness']:+.4f}, "
              f"AP {best['AP']:.2f}, cost {best['cost']:.3f})", flush=True)
    du.barrier()
    return SearchResult(genotype=found)


def candidate_main(argv: Optional[List[str]] = None) -> int:
    """A worker: ``python -m autofpn.search.evolution --candidate DIR --cfg OUT/config.yaml``
    trains and scores the candidate of ``DIR/genotype.json`` (resuming its ``DIR/train``)."""
    import argparse
    from autofpn.config import load_config
    p = argparse.ArgumentParser(description="train and score one evolution candidate (a worker of search.py --jobs)")
    p.add_argument("--candidate", required=True, help="the candidate's folder (holds genotype.json)")
    p.add_argument("--cfg", required=True, help="the evolution's config.yaml (written by search.py)")
    args = p.parse_args(argv)
    cfg = load_config(args.cfg)
    ctx = du.init_distributed(cfg["train"]["device"])
    try:
        score_candidate(candidate_job(cfg, ctx), args.candidate)
    finally:
        du.cleanup_distributed()
    return 0


if __name__ == "__main__":
    import sys
    from autofpn.cli import run_command
    sys.exit(run_command(candidate_main))
