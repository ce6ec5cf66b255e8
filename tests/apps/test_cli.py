"""The command line: it answers --help without torch, parses each command's options, and the
public names load. (The layering of library and applications: tests/test_architecture.py.)"""


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
