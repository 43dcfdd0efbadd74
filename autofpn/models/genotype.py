"""Genotype files: the decoded architecture as versioned, human-readable JSON.

Format (version 1)::

    {
      "version": 1,
      "name": "fpn",                              # optional, free text
      "description": "...",                       # optional, free text
      "decode_rule": "argmax",                    # optional, how it was decoded
      "neck": {                                   # or null: the neck is not an Auto-fusion neck
        "levels": [2, 3, 4, 5],                   # P2..P5
        "layers": [                               # one list of links per Auto-fusion layer
          [{"from": 5, "to": 4, "op": "identity"}, ...],
          ...
        ]
      },
      "head": {                                   # or null: the head is not an Auto-head
        "cells": [                                # one list of edges per cell
          [{"node": 2, "input": 0, "op": "sep_conv_3x3"}, ...],
          ...
        ]
      }
    }

A neck link ``{"from": j, "to": i, "op": o}`` reads level j of the previous layer (layer 0 reads
the projected backbone features C_j), applies a 1x1 conv and op ``o`` at level j's resolution,
resamples to level i, and is summed into level i. Links that are absent are "none"; every level
of every layer needs at least one incoming link.

Head nodes: 0 = output of cell m-2, 1 = output of cell m-1 (for the first cell both are the RoI
features), 2..5 = intermediate nodes; an edge ``{"node": n, "input": k, "op": o}`` feeds node k
into node n (k < n). The cell output is the concatenation of nodes 2..5; every intermediate
node needs at least one input. "none" is never written: an absent edge is "none".

Never ``eval()``-ed: the file is parsed with ``json`` and checked by ``validate_genotype``.
"""
import json
import os
from typing import Any, Dict, List, Sequence

from .operations import HEAD_OPS, NECK_OPS

GENOTYPE_VERSION = 1
HEAD_INPUT_NODES = 2
HEAD_INTERMEDIATE_NODES = 4
_TOP_KEYS = ("version", "name", "description", "decode_rule", "neck", "head")


class GenotypeError(ValueError):
    """A malformed genotype; the message names the entry (and the file when loaded from one)."""


def _check_keys(entry: Any, keys: tuple, where: str) -> None:
    if not isinstance(entry, dict):
        raise GenotypeError(f"{where}: expected an object with keys {list(keys)}, got {entry!r}")
    if set(entry) != set(keys):
        raise GenotypeError(f"{where}: keys {sorted(entry)} but expected exactly {list(keys)}")


def _check_int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GenotypeError(f"{where}: expected an integer, got {value!r}")
    return value


def _check_op(op: Any, table: tuple, where: str) -> None:
    if op == "none":
        raise GenotypeError(f"{where}: op 'none' is written by leaving the entry out")
    if op not in table:
        raise GenotypeError(f"{where}: unknown op {op!r}; valid ops: {', '.join(table[1:])}")


def _validate_neck(neck: Any) -> None:
    if not isinstance(neck, dict):
        raise GenotypeError(f"neck: expected an object or null, got {neck!r}")
    _check_keys(neck, ("levels", "layers"), "neck")
    levels = neck["levels"]
    if not isinstance(levels, list) or not levels:
        raise GenotypeError(f"neck.levels: expected a non-empty list of integers, got {levels!r}")
    for k, lv in enumerate(levels):
        if _check_int(lv, f"neck.levels[{k}]") < 1:
            raise GenotypeError(f"neck.levels[{k}]: level {lv} must be >= 1")
    if levels != sorted(set(levels)) or levels != list(range(levels[0], levels[-1] + 1)):
        raise GenotypeError(f"neck.levels: {levels} must be consecutive and increasing, e.g. [2, 3, 4, 5]")
    layers = neck["layers"]
    if not isinstance(layers, list) or not layers:
        raise GenotypeError(f"neck.layers: expected a non-empty list of layers, got {layers!r}")
    for li, links in enumerate(layers):
        if not isinstance(links, list):
            raise GenotypeError(f"neck.layers[{li}]: expected a list of links, got {links!r}")
        seen = set()
        for k, link in enumerate(links):
            where = f"neck.layers[{li}][{k}]"
            _check_keys(link, ("from", "to", "op"), where)
            for key in ("from", "to"):
                if _check_int(link[key], f"{where}.{key}") not in levels:
                    raise GenotypeError(f"{where}.{key}: unknown level {link[key]}; levels are {levels}")
            _check_op(link["op"], NECK_OPS, f"{where}.op")
            pair = (link["from"], link["to"])
            if pair in seen:
                raise GenotypeError(f"{where}: duplicate link from P{pair[0]} to P{pair[1]}")
            seen.add(pair)
        missing = [lv for lv in levels if lv not in {dst for _, dst in seen}]
        if missing:
            raise GenotypeError(f"neck.layers[{li}]: levels {missing} have no incoming link")


def _validate_head(head: Any) -> None:
    if not isinstance(head, dict):
        raise GenotypeError(f"head: expected an object or null, got {head!r}")
    _check_keys(head, ("cells",), "head")
    cells = head["cells"]
    if not isinstance(cells, list) or not cells:
        raise GenotypeError(f"head.cells: expected a non-empty list of cells, got {cells!r}")
    first, last = HEAD_INPUT_NODES, HEAD_INPUT_NODES + HEAD_INTERMEDIATE_NODES - 1
    for ci, edges in enumerate(cells):
        if not isinstance(edges, list):
            raise GenotypeError(f"head.cells[{ci}]: expected a list of edges, got {edges!r}")
        seen = set()
        for k, edge in enumerate(edges):
            where = f"head.cells[{ci}][{k}]"
            _check_keys(edge, ("node", "input", "op"), where)
            node = _check_int(edge["node"], f"{where}.node")
            if not first <= node <= last:
                raise GenotypeError(f"{where}.node: node index {node} out of range {first}..{last}")
            inp = _check_int(edge["input"], f"{where}.input")
            if not 0 <= inp < node:
                raise GenotypeError(f"{where}.input: input index {inp} must be in 0..{node - 1} "
                                    f"(an earlier node of node {node})")
            _check_op(edge["op"], HEAD_OPS, f"{where}.op")
            if (node, inp) in seen:
                raise GenotypeError(f"{where}: duplicate edge {inp} -> {node}")
            seen.add((node, inp))
        missing = [n for n in range(first, last + 1) if n not in {n for n, _ in seen}]
        if missing:
            raise GenotypeError(f"head.cells[{ci}]: nodes {missing} have no input edge")


def validate_genotype(g: Any) -> Dict[str, Any]:
    """Check a genotype dict; returns it unchanged or raises GenotypeError naming the entry."""
    if not isinstance(g, dict):
        raise GenotypeError(f"genotype: expected a JSON object, got {type(g).__name__}")
    unknown = sorted(set(g) - set(_TOP_KEYS))
    if unknown:
        raise GenotypeError(f"genotype: unknown keys {unknown}; valid keys: {list(_TOP_KEYS)}")
    if g.get("version") != GENOTYPE_VERSION:
        raise GenotypeError(f"version: {g.get('version')!r} is not supported (expected {GENOTYPE_VERSION})")
    for key in ("neck", "head"):
        if key not in g:
            raise GenotypeError(f"genotype: missing key '{key}' (use null when not searched)")
    if g["neck"] is not None:
        _validate_neck(g["neck"])
    if g["head"] is not None:
        _validate_head(g["head"])
    return g


def _part(genotype: Dict[str, Any], key: str, validate_part) -> Dict[str, Any]:
    if isinstance(genotype, dict) and "version" in genotype:
        validate_genotype(genotype)
        if genotype[key] is None:
            raise GenotypeError(f'the genotype has no {key} part ("{key}": null)')
        return genotype[key]
    validate_part(genotype)
    return genotype


def neck_part(genotype: Dict[str, Any]) -> Dict[str, Any]:
    """The validated neck part of a full genotype or of a bare ``{"levels", "layers"}`` part."""
    return _part(genotype, "neck", _validate_neck)


def head_part(genotype: Dict[str, Any]) -> Dict[str, Any]:
    """The validated head part of a full genotype or of a bare ``{"cells"}`` part."""
    return _part(genotype, "head", _validate_head)


def dense_identity_neck(levels: Sequence[int], layers: int) -> Dict[str, Any]:
    """The unsearched control of a neck search: every link (source -> target) of every layer is
    identity (a 1x1 projection, resampled), no link dropped, no head part. A search whose
    decisions are mostly identity has to beat this, not only a random draw."""
    levels = [int(level) for level in levels]
    return validate_genotype({
        "version": GENOTYPE_VERSION,
        "name": "identity",
        "description": f"every link of {layers} layers over levels {levels} is identity: nothing searched",
        "neck": {"levels": levels, "layers": [[{"from": s, "to": t, "op": "identity"} for t in levels for s in levels]
                                               for _ in range(layers)]},
        "head": None,
    })


def load_genotype(path: str) -> Dict[str, Any]:
    """Read and validate a genotype JSON file; errors name the file and the entry."""
    if not os.path.isfile(path):
        raise GenotypeError(f"genotype file not found: {path}")
    with open(path) as f:
        try:
            g = json.load(f)
        except json.JSONDecodeError as e:
            raise GenotypeError(f"{path}: invalid JSON: {e}") from e
    try:
        return validate_genotype(g)
    except GenotypeError as e:
        raise GenotypeError(f"{path}: {e}") from None


def _dump_groups(key: str, groups: List[List[Dict[str, Any]]]) -> List[str]:
    """``"key": [[...], ...]`` with one link/edge object per line."""
    lines = [f'    "{key}": [']
    for gi, group in enumerate(groups):
        lines.append("      [")
        lines += [f"        {json.dumps(e)}" + ("," if k < len(group) - 1 else "") for k, e in enumerate(group)]
        lines.append("      ]" + ("," if gi < len(groups) - 1 else ""))
    lines.append("    ]")
    return lines


def _dump(g: Dict[str, Any]) -> str:
    """JSON with one link/edge per line, so a person can read and diff it."""
    lines: List[str] = ["{"]
    items = [k for k in _TOP_KEYS if k in g]
    for n, key in enumerate(items):
        comma = "," if n < len(items) - 1 else ""
        value = g[key]
        if key == "neck" and value is not None:
            lines += ['  "neck": {', f'    "levels": {json.dumps(value["levels"])},',
                      *_dump_groups("layers", value["layers"]), "  }" + comma]
        elif key == "head" and value is not None:
            lines += ['  "head": {', *_dump_groups("cells", value["cells"]), "  }" + comma]
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def save_genotype(genotype: Dict[str, Any], path: str) -> None:
    """Validate and write ``genotype`` as JSON (atomically: temp file then rename)."""
    validate_genotype(genotype)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # per process: two writers of one file (shards) never share a temp file
    with open(tmp, "w") as f:
        f.write(_dump(genotype))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
