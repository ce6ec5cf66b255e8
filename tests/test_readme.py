"""The README's promises about itself: a front door of at most 150 lines, two set-up commands,
and CI runs the test one.

Its code examples, and the documentation site's, run as tests: see tests/test_docs.py.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP = "python3 -m venv .venv && "


def _setup_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    return [line.strip() for line in lines if line.strip().startswith(SETUP)]


def test_readme_is_a_front_door_of_at_most_150_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


def test_readme_has_exactly_two_setup_commands():
    commands = _setup_commands()
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert main_job.endswith("droppath train --compare --overwrite")
    assert tests.endswith("python -m pytest")
    for command in commands:
        assert "torch==2.13.0" in command  # the CPU build on this machine's disk


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _setup_commands()[1] in [line.strip() for line in ci]


def test_project_requires_a_torch_range():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"torch>=2.1"' in text


def test_ci_runs_the_readme_real_library_command():
    real = [
        line.strip()
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith("python3 -m venv .venv-real && ")
    ]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert len(real) == 1 and real[0] in ci and "DROPPATH_REQUIRE_REAL=1" in real[0]


def test_ci_builds_the_docs_strictly():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert any("mkdocs build --strict" in line for line in ci)
