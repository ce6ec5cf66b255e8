"""The command line: it answers --help without torch, parses each command's options, and the
public names load. (The layering of library and applications: tests/test_architecture.py.)"""

import pytest


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["--help"], ["bench", "train"]),  # the commands are listed
        (["bench", "--help"], ["--kind", "--json"]),
        (["train", "--help"], ["--time-rule", "pld", "--theta-bar", "--data-dir"]),  # issue 27
    ],
)
def test_help_answers_without_importing_torch(args, shown):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from droppath.apps.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert all(s in out.stdout for s in shown)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_each_command_still_parses_its_options():
    from droppath.apps.cli import main

    assert main(["bench", "--kind", "lstm"]) == 2  # bench's own option, checked


def test_every_public_name_loads():
    import droppath

    assert set(droppath.__all__) == {*droppath._EXPORTS, "__version__"}
    for name in droppath.__all__:
        assert getattr(droppath, name) is not None
