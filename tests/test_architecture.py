"""The package's seams, checked on its source: no import cycles (lazy imports included), no
private names imported across modules, sampling/evaluation never reach the trainer, and the
trainer names no method."""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "kindjax"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports(name: str) -> list[tuple[str, str | None]]:
    """``(module, imported name or None)`` for every kindjax import in ``name``, at any depth."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, None) for a in node.names if a.name.split(".")[0] == "kindjax"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "kindjax":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, None) if sub in MODULES else (base, alias.name))
    return found


def graph() -> dict[str, set[str]]:
    return {name: {m for m, _ in imports(name) if m in MODULES and m != name} for name in MODULES}


def test_the_walk_sees_the_package():
    g = graph()
    assert {"kindjax.models.dit", "kindjax.train.trainer", "kindjax.papers.kind.layer"} <= set(g)
    assert "kindjax.layers" in g["kindjax.models.dit"]


def test_no_import_cycles():
    """Tarjan's strongly connected components of the module graph: every one a single module."""
    g, index, low, stack, on_stack, cycles = graph(), {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in g:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_a_cycle_is_detected(monkeypatch):
    """The checker itself fails on a cycle (two modules importing each other)."""
    fake = {"kindjax.a": {"kindjax.b"}, "kindjax.b": {"kindjax.a"}}
    monkeypatch.setattr(__import__(__name__), "graph", lambda: fake)
    with pytest.raises(AssertionError, match="kindjax.a"):
        test_no_import_cycles()


def test_no_private_names_across_modules():
    private = [(name, f"{mod}.{attr}") for name in MODULES for mod, attr in imports(name)
               if attr is not None and attr.startswith("_") and mod != name]
    assert not private, f"private names imported across modules: {private}"


def reachable(start: str) -> set[str]:
    g, seen, todo = graph(), set(), [start]
    while todo:
        for w in g[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


@pytest.mark.parametrize("module", ["kindjax.diffusion.generate", "kindjax.evaluation.__main__", "kindjax.evaluation.pipeline",
                                    "kindjax.evaluation.adm",
                                    "kindjax.evaluation.inception", "kindjax.evaluation.dinov2"])
def test_sampling_and_evaluation_never_import_the_trainer(module):
    assert not {m for m in reachable(module) if m.startswith("kindjax.train")}


def test_the_trainer_names_no_method():
    """``kindjax/train`` applies ``params.update_rule``; KIND's words live elsewhere."""
    words = re.compile(r"learngene|tailor|\bkind\b|\bKIND\b|\bFINE\b|ungated|class[ _]gate", re.IGNORECASE)
    found = [(p.name, i + 1, line.strip()) for p in sorted((ROOT / "train").glob("*.py"))
             for i, line in enumerate(p.read_text().splitlines()) if words.search(line)]
    assert not found, found


# ------------------------------------------------------------------ the core and the paper packages

def is_core(name: str) -> bool:
    """Everything outside ``kindjax.papers`` and ``kindjax.tools``."""
    return not name.startswith(("kindjax.papers", "kindjax.tools"))


def test_the_core_imports_no_paper_package():
    found = sorted((name, m) for name in MODULES if is_core(name) for m, _ in imports(name)
                   if m.startswith("kindjax.papers") or m.startswith("kindjax.tools"))
    assert not found, f"core modules importing papers/ or tools/: {found}"


#: A paper's name (KIND, FINE) or its method, job and key names (``kind="kind"``, ``== "fine"``,
#: ``kind_transfer``, ``init.fine_sigma`` …); "kind" and "fine" as English words or as the key
#: ``model.linear.kind`` ("fine-tuning", ``linear.get("kind")``) are not.
PAPER_WORDS = re.compile(r"\b(KIND|FINE)\b|[\"']fine[\"']|(==|!=|\bkind=|\bgrouping=)\s*[\"']kind[\"']"
                         r"|\b(kind|fine)_(?!tun)\w+|\w+_(kind|fine)\b")


def paper_words(text: str) -> list[str]:
    return [m.group(0) for m in PAPER_WORDS.finditer(text)]


def test_paper_words_are_recognised():
    """The checker sees a paper's name and its identifiers, not the English words."""
    assert paper_words('KIND and FINE; kind="kind"; job="kind_transfer"; init.fine_sigma; is_fine; x == "kind"') == \
        ["KIND", "FINE", 'kind="kind"', "kind_transfer", "fine_sigma", "is_fine", '== "kind"']
    assert paper_words('model.linear.kind picks the kind of layer; fine-tuning, fine_tune, kindjax; '
                       'linear.get("kind")') == []


def test_the_core_names_no_paper():
    """The core speaks of learngenes, tailors and class gates (the vocabulary), never of KIND or FINE."""
    found = [(name, i + 1, line.strip()) for name, path in MODULES.items() if is_core(name)
             for i, line in enumerate(path.read_text().splitlines()) if paper_words(line)]
    assert not found, "\n".join(f"{n}:{i}: {line}" for n, i, line in found)


def test_at_most_eight_loose_modules():
    loose = sorted(p.name for p in ROOT.glob("*.py") if p.name not in ("__init__.py", "__main__.py"))
    assert len(loose) <= 8, loose


def test_every_path_in_the_architecture_page_exists():
    """``docs/architecture.md`` names modules as paths (``kindjax/train/stages.py``, relative names in a
    package's row) and as dotted names (``kindjax.layers.VARIANTS``): each must exist."""
    import importlib

    text = (ROOT.parent / "docs" / "architecture.md").read_text()
    paths = set(re.findall(r"`(kindjax/[\w/]*\w(?:\.py)?/?)`", text)) | set(re.findall(r"`(configs/)`", text))
    missing = [p for p in sorted(paths) if not (ROOT.parent / p).exists()]
    for row in re.findall(r"^\| `(kindjax/\w+/)` \|(.*)$", text, re.M):   # files named in a package's row
        missing += [row[0] + f for f in re.findall(r"`(\w+\.py)`", row[1]) if not (ROOT.parent / row[0] / f).exists()]
    dotted = set(re.findall(r"`(kindjax(?:\.\w+)+)`", text))
    for name in sorted(dotted):
        module, _, attr = name.rpartition(".")
        try:
            importlib.import_module(name)
        except ImportError:
            try:
                if not hasattr(importlib.import_module(module), attr):
                    missing.append(name)
            except ImportError:
                missing.append(name)
    assert len(paths) + len(dotted) > 20, "the page names few modules: is the pattern still right?"
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"
