"""The package's rooms import one way: models/ holds every network and imports nothing from the
search, training, evaluation or drawing code; data/ does not import eval/; search/ draws nothing.
Checked on the source text, lazy imports inside functions included."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autofpn"

FORBIDDEN = {
    "models": ("autofpn.search", "autofpn.engine", "autofpn.eval", "autofpn.viz", "autofpn.data"),
    "data": ("autofpn.eval",),
    "search": ("autofpn.viz",),
}


def imported_modules(path: Path):
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module
            yield name
            yield from (f"{name}.{alias.name}" for alias in node.names)


@pytest.mark.parametrize("room", sorted(FORBIDDEN))
def test_room_imports_one_way(room):
    bad = [f"{path.relative_to(PACKAGE.parent)} imports {name}"
           for path in sorted((PACKAGE / room).glob("*.py"))
           for name in imported_modules(path)
           if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[room])]
    assert not bad, "\n".join(bad)


def test_relative_imports_are_resolved():
    names = set(imported_modules(PACKAGE / "models" / "auto_fusion.py"))
    assert "autofpn.models.operations" in names and "autofpn.models.genotype" in names


DATA = Path(__file__).resolve().parent / "data"


def test_files_written_before_the_layout_still_load():
    """A genotype JSON and a checkpoint written by main before models/ took the searchable parts
    (tests/data, written at 4a46426 with the backbone weights left out for size) load into
    the detector built now: same keys, same shapes, for the decoded model and the supernet."""
    import torch

    from autofpn.config import complete_config
    from autofpn.models.detector import build_detector
    from autofpn.models.genotype import load_genotype
    state = torch.load(DATA / "pre_layout_checkpoint.pth", weights_only=True)
    genotype = load_genotype(str(DATA / "pre_layout_genotype.json"))
    assert genotype == state["genotype"]
    for key, search in (("model", False), ("supernet", True)):
        cfg = complete_config(state["cfg"])  # keys added since (model.detector) take their defaults
        model = build_detector(cfg, None if search else genotype, search=search)
        missing, unexpected = model.load_state_dict(state[key], strict=False)
        assert not unexpected, key
        assert all(k.startswith("backbone.") for k in missing), key
        loaded = model.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in state[key].items()), key
