"""The README and the documentation site: every code example runs as written, every public name
is in the API reference, and the benchmark page shows what the renderer makes of the results.

``pycon`` blocks run as doctests (pytest's ``--doctest-glob=*.md``); ``python`` blocks run here,
each in a fresh namespace, except those that need timm, torchvision, transformers or Lightning,
which ``tests/integration/test_readme_docs.py`` runs. See ``docs_blocks``.
"""

import importlib.util
import re

import pytest

import droppath
from docs_blocks import LANGUAGES, ROOT, blocks, find, run

PYTHON = [b for b in blocks("python") if not b.needs()]


def test_every_block_names_a_language_it_is_run_or_shown_by():
    wrong = [f"{b.id}: {b.lang!r}" for b in blocks() if b.lang not in LANGUAGES]
    assert not wrong, f"fences must be one of {LANGUAGES}: {wrong}"


def test_doctest_blocks_are_pycon_and_scripts_are_python():
    for b in blocks():
        starts = b.code.lstrip().startswith(">>>")
        assert starts == (b.lang == "pycon"), f"{b.id}: a >>> block is pycon, nothing else is"
        if b.lang == "pycon":  # the default suite runs them: nothing beyond the test extra
            assert not b.needs(), f"{b.id} needs {b.needs()}: write it as a python block"


@pytest.mark.parametrize("block", PYTHON, ids=[b.id for b in PYTHON])
def test_python_block_runs_as_written(block):
    run(block)


def test_accelerate_page_shows_the_code_accelerate_generates():
    """The concept page's generated code is what ``Derived.source`` prints for its example."""
    block = find("docs/concepts/accelerate.md", "_droppath_derived.source")
    _, printed = run(block)
    shown = [b.code for b in blocks("text") if b.path == block.path and "__droppath" in b.code]
    assert shown and printed.endswith(shown[0]), printed


def test_each_page_has_examples_that_run():
    assert len(PYTHON) >= 2 and len(blocks("pycon")) >= 10


def test_api_reference_documents_every_public_name():
    text = (ROOT / "docs" / "reference.md").read_text()
    documented = set(re.findall(r"^::: droppath\.(\w+)$", text, flags=re.M))
    assert documented == set(droppath.__all__)


def test_readme_links_point_to_files():
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if "://" not in t]
    assert local, "the README links into the docs"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing


def _render():
    spec = importlib.util.spec_from_file_location("render", ROOT / "benchmarks" / "render.py")
    render = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(render)
    return render


FOLDERS = ["benchmarks/results", *sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks" / "results").iterdir() if p.is_dir()
)]  # fmt: skip


@pytest.mark.parametrize("folder", FOLDERS)
def test_benchmark_page_holds_the_rendered_table(folder):
    render = _render()
    table = render.table(render.load(str(ROOT / folder)))
    assert table in (ROOT / "docs" / "benchmarks.md").read_text(), (
        f"docs/benchmarks.md must hold `python benchmarks/render.py {folder}`:\n{table}"
    )


def test_benchmark_page_holds_the_auto_table():
    spec = importlib.util.spec_from_file_location(
        "auto_check", ROOT / "benchmarks" / "auto_check.py"
    )
    auto_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(auto_check)
    folders = [ROOT / "benchmarks" / "results", ROOT / "benchmarks" / "results" / "lowrate"]
    table = auto_check.table(folders)
    assert table.count("\n| ") >= 20  # every setup of run_all.sh and of the low-rate grid
    assert table in (ROOT / "docs" / "benchmarks.md").read_text(), (
        "docs/benchmarks.md must hold `python benchmarks/auto_check.py benchmarks/results "
        f"benchmarks/results/lowrate`:\n{table}"
    )


def test_render_draws_the_plot(tmp_path):
    pytest.importorskip("matplotlib")
    render = _render()
    render.main([str(ROOT / "benchmarks" / "results" / "llama"), "--plot", str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for folder in FOLDERS:
        name = "cpu" if folder == "benchmarks/results" else folder.rsplit("/", 1)[1]
        assert (ROOT / "docs" / "img" / f"bench-{name}.png").exists(), name


def test_readme_headline_numbers_are_measured():
    """Every ratio of the README's table of measured savings is in a rendered benchmark table."""
    render = _render()
    tables = "\n".join(render.table(render.load(str(ROOT / f))) for f in FOLDERS)
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Measured savings") :].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) >= 3
    for row in rows:
        for number in re.findall(r"\b\d\.\d\d\d?\b", row):
            assert f"| {number} |" in tables, f"{number} of {row!r} is in no benchmark table"


def test_wide_blocks_scroll_instead_of_being_cut_off():
    """Issue 27, item 11: the home page's diagram and the benchmark tables are wider than the
    text column; a style sheet of the site makes code blocks and tables scroll sideways."""
    config = (ROOT / "mkdocs.yml").read_text()
    sheets = re.findall(r"^extra_css:\n((?:  - .+\n)+)", config, flags=re.M)
    assert sheets, "mkdocs.yml lists a style sheet under extra_css"
    css = "".join(
        (ROOT / "docs" / line.split("- ")[1].split("#")[0].strip()).read_text()
        for line in sheets[0].splitlines()
    )
    rules = dict(re.findall(r"([^{}]+)\{([^}]*)\}", re.sub(r"/\*.*?\*/", "", css, flags=re.S)))
    scrolling = [sel for sel, body in rules.items() if "overflow-x: auto" in body]
    assert any(".md-typeset pre" in sel for sel in scrolling)
    assert any("table" in sel for sel in scrolling)


def test_the_docs_speak_of_the_project_not_of_who_ran_it():
    """Issue 27, item 10: the pages say what the project measured, not which session was lent a
    machine, when, or for how long."""
    phrases = re.compile(
        r"\b(was|were) lent\b|\blent to\b|\bthe sessions?\b|\bthat session\b|\bdevice time\b",
        flags=re.I,
    )
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    found = [
        f"{page.relative_to(ROOT)}:{n}: {line.strip()}"
        for page in pages
        for n, line in enumerate(page.read_text().splitlines(), 1)
        if phrases.search(line)
    ]
    assert found == []
