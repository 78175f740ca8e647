"""Each fact of a paper has one home (``kindjax/papers/<paper>/facts.py``): no config, method,
experiment or tool writes one of its values again."""
from __future__ import annotations

import ast
import pathlib

import pytest

from kindjax.papers.fine import facts as fine_facts
from kindjax.papers.kind import facts as kind_facts

ROOT = pathlib.Path(__file__).resolve().parent.parent
FACTS = {ROOT / "kindjax/papers/kind/facts.py": kind_facts, ROOT / "kindjax/papers/fine/facts.py": fine_facts}
#: Where facts are read: the configs, the paper packages and the tools.
READERS = sorted({*ROOT.glob("configs/*.py"), *(ROOT / "kindjax/papers").rglob("*.py"),
                  *(ROOT / "kindjax/tools").rglob("*.py")} - set(FACTS))


def literal(node: ast.AST):
    """The value of a literal expression (numbers, strings, tuples, dicts of them), else None."""
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def distinctive(value) -> bool:
    """A value that, written elsewhere, can only be the fact again: a table, a tuple of several items, or a
    number of three significant digits or more (318, 424, 148, 512; not 3, 150, 3e-3 or 100_000, which
    ordinary settings use too)."""
    if isinstance(value, dict):
        return len(value) >= 1
    if isinstance(value, tuple):
        return len(value) >= 2
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value == 0:
        return False
    return len(f"{abs(value):.6e}".split("e")[0].replace(".", "").rstrip("0")) >= 3


def facts() -> dict[str, object]:
    """``module.NAME`` → value of every distinctive module-level constant of the facts modules, and of
    the numbers inside its collections."""
    found = {}
    for path, module in FACTS.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                name = node.targets[0].id
                value = getattr(module, name)
                items = value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else ()
                for i, v in enumerate([value, *items]):
                    if distinctive(v) and not isinstance(v, str):
                        found[f"{module.__name__}.{name}" + (f"[{i - 1}]" if i else "")] = v
    return found


def written_values(path: pathlib.Path) -> list[tuple[int, object]]:
    """``(line, value)`` of every literal in ``path``: whole collections and the numbers in them, not
    a dict's keys (they name entries, e.g. a TPU slice's chip count ``512``, and state no fact)."""
    out = []
    tree = ast.parse(path.read_text())
    keys = {id(key) for node in ast.walk(tree) if isinstance(node, ast.Dict) for key in node.keys}
    for node in ast.walk(tree):
        if id(node) in keys:
            continue
        if isinstance(node, (ast.Constant, ast.Tuple, ast.Dict)) and not isinstance(getattr(node, "value", None), str):
            value = literal(node)
            if value is not None:
                out.append((node.lineno, value))
    return out


def test_the_facts_are_found():
    """The checker sees the facts it guards (a typo in it would make the next test vacuous)."""
    found = facts()
    assert found["kindjax.papers.kind.facts.N_LEARNGENE"] == {"B": 318, "L": 424}
    assert 424 in found.values() and 148 in found.values() and 512 in found.values()
    assert {("svdiff", "L"): 3e-3} in found.values() and 150 not in found.values()
    assert found["kindjax.papers.kind.facts.OFT_BLOCKS"][0] == 21


def test_a_fact_written_twice_is_found(tmp_path):
    """A config that writes a fact's value again is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("RANK = {'B': 100, 'L': 148}\nN_G = 424\nGRID = {512: (8, 8, 8)}\n")
    values = [v for _, v in written_values(bad)]
    assert {"B": 100, "L": 148} in values and 424 in values and 512 not in values


@pytest.mark.parametrize("path", READERS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_fact_is_written_twice(path):
    known = facts()
    again = [(line, name) for line, value in written_values(path) for name, fact in known.items()
             if value == fact and type(value) is type(fact)]
    assert not again, f"{path.relative_to(ROOT)} writes facts again (read them from the facts module): {again}"
