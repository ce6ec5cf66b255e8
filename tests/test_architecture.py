"""The shape of the house (issue #18), checked: library and applications apart, no import cycle,
no module reaching into another's private names, small helpers, small library modules."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "droppath"
APPS = "droppath.apps"
MAX_LIBRARY_LINES = 400
MAX_PRIVATE_PARAMS = 6
MAX_PUBLIC_POSITIONAL = 4


def _module_name(path):
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}


def _is_private(name):
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _imports(name):
    """The droppath modules (and module.name pairs) that module ``name`` imports, anywhere in it."""
    deps = set()
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{name}: droppath uses absolute imports"
            deps.add(node.module or "")
            deps |= {f"{node.module}.{a.name}" for a in node.names}
    return {d for d in deps if d.startswith("droppath") and d != name}


def test_no_import_cycle_in_src():
    edges = {m: {d for d in _imports(m) if d in MODULES and d != "droppath"} for m in MODULES}
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(edges[m]):
            if state.get(d) == "open":
                raise AssertionError(" -> ".join([*stack, m, d]))
            if d not in state:
                visit(d, [*stack, m])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [])


def test_library_and_applications_apart():
    assert any(m.startswith(APPS + ".") for m in MODULES), "the applications live in droppath.apps"
    for m in MODULES:
        if m.startswith(APPS) or m == "droppath.__main__":
            continue
        assert not {d for d in _imports(m) if d.startswith(APPS)}, (
            f"library module {m} imports apps"
        )


def _private_reaches(name):
    """``from droppath.x import _y`` and ``x._y`` on an imported droppath module, in ``name``."""
    found = []
    tree = TREES[name]
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("droppath"):
            for a in node.names:
                full = f"{node.module}.{a.name}"
                if full in MODULES:
                    aliases[a.asname or a.name] = full
                elif _is_private(a.name):
                    found.append(f"from {node.module} import {a.name}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("droppath") and a.asname:
                    aliases[a.asname] = a.name
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and _is_private(node.attr)
        ):
            found.append(f"{node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_another_modules_private_names(name):
    assert _private_reaches(name) == []


def _functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _own_params(fn):
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    if positional and positional[0].arg in ("self", "cls", "ctx"):
        positional = positional[1:]
    return positional, a.kwonlyargs


@pytest.mark.parametrize("name", sorted(MODULES))
def test_helpers_are_small_and_options_keyword_only(name):
    private_module = any(_is_private(part) for part in name.split("."))
    broken = []
    for fn in _functions(TREES[name]):
        positional, keyword = _own_params(fn)
        if _is_private(fn.name) or private_module:
            if len(positional) + len(keyword) > MAX_PRIVATE_PARAMS:
                broken.append(
                    f"{fn.name} (line {fn.lineno}): {len(positional) + len(keyword)} parameters"
                )
        elif len(positional) > MAX_PUBLIC_POSITIONAL:
            broken.append(f"{fn.name} (line {fn.lineno}): {len(positional)} positional parameters")
    assert broken == []


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not m.startswith(APPS)))
def test_library_modules_are_short(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines < MAX_LIBRARY_LINES, f"{MODULES[name]} has {lines} lines"


def test_the_design_page_maps_every_module():
    import re

    page = (SRC.parent / "docs" / "design.md").read_text()
    placed = set(re.findall(r"[├└]── (\S+)", page))
    for path in PACKAGE.rglob("*.py"):
        if path.name != "__init__.py":
            assert path.name in placed, f"docs/design.md does not place {path}"
        elif path.parent != PACKAGE:
            assert f"{path.parent.name}/" in placed, f"docs/design.md does not place {path.parent}"
