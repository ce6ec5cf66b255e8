"""The command line's layering: the applications (droppath.apps) on top of the library, the
commands on top of the applications' work, no import cycle in src/."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def _imports():
    """Module name -> the droppath modules it imports, at the top or inside functions."""
    graph = {}
    for path in (SRC / "droppath").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                assert not node.level, f"{name}: droppath uses absolute imports"
                deps.add(node.module or "")
                deps |= {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {d for d in deps if d.startswith("droppath") and d != name}
    return graph


def test_no_import_cycle_in_src():
    graph = _imports()
    modules = set(graph)
    edges = {m: {d for d in deps if d in modules and d != "droppath"} for m, deps in graph.items()}
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in edges[m]:
            if state.get(d) == "open":
                raise AssertionError(" -> ".join([*stack, m, d]))
            if d not in state:
                visit(d, [*stack, m])
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    assert "droppath.apps.train" in edges and "droppath.apps.commands.train" in edges


def test_library_never_imports_the_command_line():
    graph = _imports()
    command_line = ("droppath.apps.cli", "droppath.apps.commands", "droppath.__main__")
    below = [m for m in graph if not m.startswith(command_line)]
    assert "droppath.apps.bench" in below and "droppath.apps.train" in below
    for m in below:
        assert not {d for d in graph[m] if d.startswith(command_line[:2])}, m


def test_library_never_imports_the_applications():
    graph = _imports()
    library = [m for m in graph if not m.startswith(("droppath.apps", "droppath.__main__"))]
    assert "droppath.rates" in library and "droppath.models" in library
    for m in library:
        assert not {d for d in graph[m] if d.startswith("droppath.apps")}, m


def test_help_answers_without_importing_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from droppath.apps.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "bench" in out.stdout and "train" in out.stdout  # the commands are listed
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_each_command_still_parses_its_options():
    from droppath.apps.cli import main

    assert main(["bench", "--kind", "lstm"]) == 2  # bench's own option, checked


def test_every_public_name_loads():
    import droppath

    assert set(droppath.__all__) == {*droppath._EXPORTS, "__version__"}
    for name in droppath.__all__:
        assert getattr(droppath, name) is not None
