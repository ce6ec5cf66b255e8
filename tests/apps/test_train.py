"""Tests of the training command: runs, files, resume, bad input, safe loading, 2 processes."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from droppath.apps.cli import main
from droppath.apps.data import load_cifar10, load_image_folder, restricted_load

FAST = ["--depth", "20", "--batch-size", "128", "--no-progress", "--threads", "1"]


def test_compare_run_writes_everything(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--compare", "--epochs", "2", "--out", str(out), *FAST]) == 0
    text = capsys.readouterr().out
    assert "| with_sd | 0.5 |" in text and "| without_sd | 0 |" in text
    for name in ("results.md", "results.json", "plot.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "results.json").read_text())
    with_sd, without = summary["runs"]
    assert with_sd["expected_depth"] < without["expected_depth"] == without["blocks"] == 9
    for run in ("with_sd", "without_sd"):
        history = json.loads((out / run / "metrics.json").read_text())
        assert [e["epoch"] for e in history] == [1, 2]
        assert (out / run / "metrics.csv").read_text().startswith("epoch,train_loss,")
        ckpt = torch.load(out / run / "checkpoint.pt", weights_only=True)
        assert ckpt["epoch"] == 2
    assert not list(out.rglob(".*.tmp"))


def test_a_line_per_epoch_when_stderr_is_not_a_terminal(tmp_path, capsys):
    """Issue 27, item 11: ``droppath train`` in a log file (capsys: not a terminal) prints one
    line per epoch of each run, and ``--out`` makes missing folders (as ``bench --json``)."""
    out = tmp_path / "new" / "deeper"
    fast = [a for a in FAST if a != "--no-progress"]
    assert main(["train", "--compare", "--epochs", "2", "--out", str(out), *fast]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "with_sd 1/2",
        "without_sd 1/2",
        "without_sd 2/2",  # first place alternates between the runs
        "with_sd 2/2",
    ]
    assert all("train_loss " in line and "epoch_time_s " in line for line in lines)
    assert (out / "results.md").exists()


def _run(label, times):
    history = [{"epoch_time_s": t, "test_acc": 0.9} for t in times]
    return {"label": label, "p": 0.5, "history": history, "expected_depth": 4.0, "sites": 8}


def test_results_say_when_epoch_times_are_too_noisy_for_the_ratio():
    """Issue 27, item 11: a time ratio from epochs of 22 s to 1036 s is marked as unsupported;
    steady epochs (one slow first epoch aside) are not."""
    from droppath.apps.train import format_results
    from droppath.apps.train.compare import NOISY_SPREAD, summary, time_spread

    steady = [_run("with_sd", [9.0, 7.1, 7.0, 7.2]), _run("without_sd", [9.5, 9.1, 9.0, 9.2])]
    assert "noisy" not in format_results(steady)
    loaded = [_run("with_sd", [22.0, 30.0, 400.0, 1036.0]), _run("without_sd", [25, 24, 26, 25])]
    text = format_results(loaded)
    table, note = text.split("\n\n")
    assert table.count("\n") == 3 and "| with_sd | 0.5 |" in table
    assert note.startswith("The epoch times are too noisy to support the time ratio: ")
    assert "with_sd's took 22 s to 1.04e+03 s (spread 88%)" in note and "without_sd's" not in note
    assert summary(loaded[0])["epoch_time_spread"] == time_spread([22.0, 30.0, 400.0, 1036.0])
    assert time_spread([1.0, 1.2]) < NOISY_SPREAD < time_spread([1.0, 1.25])  # two epochs
    assert "noisy" not in format_results(loaded[:1])  # one run: no ratio to doubt


def test_learns_digits(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "8", "--lr", "0.1", "--out", str(out), *FAST]) == 0
    history = json.loads((out / "with_sd" / "metrics.json").read_text())
    assert history[-1]["test_acc"] > 0.8  # chance is 0.1


def _final_state(folder):
    return torch.load(folder / "with_sd" / "checkpoint.pt", weights_only=True)


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_resume_gives_the_same_weights(tmp_path, mode):
    common = [
        "--epochs",
        "3",
        "--mode",
        mode,
        "--time-rule",
        "warmup",
        "--warmup-steps",
        "20",
        "--deterministic",  # strategy auto's choice would otherwise follow timings
        *FAST,
    ]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--out", str(a), *common]) == 0
    assert main(["train", "--out", str(b), "--stop-after", "1", *common]) == 0
    interrupted = _final_state(b)
    assert interrupted["epoch"] == 1
    assert main(["train", "--out", str(b), "--resume", *common]) == 0
    sa, sb = _final_state(a), _final_state(b)
    assert sb["epoch"] == 3
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
    assert sa["drop_scheduler"] == sb["drop_scheduler"]
    # the weights after epoch 1 differ from the final ones: the comparison above can fail
    assert any(not torch.equal(sa["model"][k], interrupted["model"][k]) for k in sa["model"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "lenet"], "--model must be one of 'resnet', 'vit', got 'lenet'"),
        (["-p", "1.5"], "-p must be a probability in [0, 1], got 1.5"),
        (
            ["--data", "imagenet"],
            "--data must be one of 'digits', 'cifar10', 'folder', got 'imagenet'",
        ),
        (["--depth", "21"], "--depth must be 6n + 2 for --model resnet (20, 56, 110...), got 21"),
        (["--time-rule", "warmup"], "--time-rule warmup needs --warmup-steps"),
        (["--time-rule", "pld", "--gamma", "0.1"], "--time-rule pld needs --theta-bar"),
        (["--time-rule", "pld"], "--time-rule pld needs --theta-bar, --gamma"),
        (["--time-rule", "late", "--warmup-steps", "3"], "--warmup-steps is not an option of"),
        (["--time-rule", "hourly"], "--time-rule must be one of 'constant', 'warmup'"),
        (["--mode", "layer"], "--mode must be one of 'row', 'batch', got 'layer'"),
        (["--data", "cifar10"], "--data cifar10 needs --data-dir, the folder that holds it"),
        (["--data", "folder"], "--data folder needs --data-dir, the folder that holds it"),
        (
            ["--data", "cifar10", "--data-dir", "/nonexistent/x"],
            "--data-dir must be a folder, got '/nonexistent/x' (not found)",
        ),
        (
            ["--time-rule", "warmup", "--warmup-steps", "-5"],
            "--warmup-steps must be an int >= 1, got -5",
        ),
        (
            ["--time-rule", "pld", "--theta-bar", "2", "--gamma", "0.1"],
            "--theta-bar must be a probability in [0, 1], got 2.0",
        ),
        (["--threads", "-1"], "--threads must be an int >= 1, got -1"),
        (["--image-size", "0"], "--image-size must be an int >= 1, got 0"),
        (
            ["--mode", "batch", "--strategy", "subset"],
            "--strategy applies to --mode row only, got --strategy subset with --mode batch",
        ),
        (
            ["--data-dir", "/tmp"],
            "--data-dir is for --data cifar10 or --data folder, got one with --data digits",
        ),
        (["--resume", "--overwrite"], "--resume and --overwrite exclude each other"),
        (["--resume"], "--resume found no checkpoint at"),
        (["--resume"], "run without --resume to start fresh"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, capsys, args, message):
    """A mistake is one line that names the flags the user typed (issue 27, item 11), not the
    settings of the config behind them."""
    out = tmp_path / "out"
    assert main(["train", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("droppath train: error: ")
    assert message in err[0]
    assert not any(p.is_file() for p in out.rglob("*")) if out.exists() else True


def test_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--out", str(blocker / "sub"), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error: --out must be a writable folder" in err[0]


def test_cli_subprocess_prints_no_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "droppath", "train", "--model", "x", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip() == "droppath train: error: --model must be one of 'resnet', 'vit', got 'x'"
    )


# --- data on disk -----------------------------------------------------------------------------


def _fake_cifar(root, n=40, protocol=2):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"labels": [int(v) for v in rng.integers(0, 10, size=n)],
            b"batch_label": b"fake",
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return root


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_reader(tmp_path, protocol):
    root = _fake_cifar(tmp_path / "cifar-10-batches-py", protocol=protocol)
    data = load_cifar10(tmp_path)
    assert data.x_train.shape == (200, 3, 32, 32) and data.x_test.shape == (40, 3, 32, 32)
    assert data.num_classes == 10
    assert load_cifar10(root).x_train.shape == (200, 3, 32, 32)


def test_cifar10_training(tmp_path):
    _fake_cifar(tmp_path / "c")
    assert (
        main(
            [
                "train",
                "--data",
                "cifar10",
                "--data-dir",
                str(tmp_path / "c"),
                "--epochs",
                "1",
                "--out",
                str(tmp_path / "out"),
                *FAST,
            ]
        )
        == 0
    )


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path, capsys):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Evil(marker), b"labels": [0]})
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        restricted_load(payload)
    assert not marker.exists()
    assert pickle.loads(payload) == {b"data": 0, b"labels": [0]} and marker.exists()  # it is live
    marker.unlink()
    root = _fake_cifar(tmp_path / "c")
    (root / "data_batch_3").write_bytes(payload)
    assert (
        main(["train", "--data", "cifar10", "--data-dir", str(root), "--out", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err
    assert "refusing to load" in err and "data_batch_3" in err
    assert not marker.exists()


def test_corrupt_cifar_file(tmp_path, capsys):
    root = _fake_cifar(tmp_path / "c")
    (root / "test_batch").write_bytes(b"\x80\x02garbage")
    assert (
        main(["train", "--data", "cifar10", "--data-dir", str(root), "--out", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test_batch" in err[0]


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            arr = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "imgs" / cls / f"{i}.png")
    data = load_image_folder(tmp_path / "imgs", image_size=16)
    assert data.classes == ["cats", "dogs"] and data.x_train.shape[1:] == (3, 16, 16)
    assert len(data.x_train) + len(data.x_test) == 12
    assert (
        main(
            [
                "train",
                "--data",
                "folder",
                "--data-dir",
                str(tmp_path / "imgs"),
                "--image-size",
                "16",
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--out",
                str(tmp_path / "out"),
                "--depth",
                "20",
                "--no-progress",
            ]
        )
        == 0
    )


def test_vit_with_pld_schedule(tmp_path):
    assert (
        main(
            [
                "train",
                "--model",
                "vit",
                "--depth",
                "2",
                "--epochs",
                "1",
                "--time-rule",
                "pld",
                "--theta-bar",
                "0.5",
                "--gamma",
                "0.01",
                "--out",
                str(tmp_path / "v"),
                "--no-progress",
                "--batch-size",
                "128",
            ]
        )
        == 0
    )
    ckpt = torch.load(tmp_path / "v" / "with_sd" / "checkpoint.pt", weights_only=True)
    assert ckpt["drop_scheduler"]["time_rule"] == "pld" and ckpt["drop_scheduler"]["last_step"] > 0


def test_compile(tmp_path):
    assert (
        main(
            [
                "train",
                "--depth",
                "8",
                "--epochs",
                "1",
                "--compile",
                "--out",
                str(tmp_path / "c"),
                "--no-progress",
                "--batch-size",
                "256",
            ]
        )
        == 0
    )


def test_torchrun_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "droppath",
            "train",
            "--compare",
            "--epochs",
            "2",
            "--out",
            str(tmp_path / "d"),
            *FAST,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("| with_sd |") == 1  # only rank 0 prints
    summary = json.loads((tmp_path / "d" / "results.json").read_text())
    assert summary["processes"] == 2
    history = json.loads((tmp_path / "d" / "with_sd" / "metrics.json").read_text())
    assert len(history) == 2 and history[-1]["test_acc"] > 0.2


def test_every_time_rule_option_has_its_flag():
    # One table declares the rules; the flags come from it (early's shape included).
    from droppath.apps.cli import build_parser
    from droppath.apps.commands.train import TIME_RULE_FLAGS, _rule_options_from_flags
    from droppath.apps.train import TrainConfig
    from droppath.scheduler import TIME_RULE_TABLE

    parser = build_parser()

    def given(option):
        cli_type = TIME_RULE_FLAGS[option.name][0]
        value = {int: "1", float: "0.5", str: "linear"}[cli_type]
        return [f"--{option.name.replace('_', '-')}", value], cli_type(value)

    for rule in TIME_RULE_TABLE.values():
        required = [o for o in rule.options if o.required]
        for option in rule.options:  # with the options the rule needs (missing ones: an error)
            args = [a for o in {*required, option} for a in given(o)[0]]
            ns = parser.parse_args(["train", "--time-rule", rule.name, *args])
            got = _rule_options_from_flags(ns)
            assert got == {o.name: given(o)[1] for o in {*required, option}}
    ns = parser.parse_args(
        ["train", "--time-rule", "early", "--cutoff-step", "3", "--shape", "constant"]
    )
    options = _rule_options_from_flags(ns)
    assert options == {"cutoff_step": 3, "shape": "constant"}
    cfg = TrainConfig(time_rule="early", rule_options=options)
    assert cfg.rule_options == {"cutoff_step": 3, "shape": "constant"}
    assert TrainConfig(time_rule="early", rule_options={"cutoff_step": 3}).rule_options[
        "shape"
    ] == ("linear")


def _tree(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(capsys, args, message):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("droppath train: error: ") and message in err[0], err


def test_resume_with_a_bad_checkpoint_is_one_line_and_touches_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--stop-after", "1", "--out", str(out), *FAST]) == 0
    ckpt = out / "with_sd" / "checkpoint.pt"
    good = ckpt.read_bytes()
    cases = {
        "empty": b"",
        "truncated": good[: len(good) // 2],
    }
    for name, data in cases.items():
        ckpt.write_bytes(data)
        before = _tree(out)
        _one_line_error(
            capsys, ["--epochs", "2", "--resume", "--out", str(out), *FAST], "resume cannot use"
        )
        assert _tree(out) == before, name
    ckpt.write_bytes(good)
    for args in (["--depth", "32"], ["--model", "vit", "--depth", "2"]):  # another model
        before = _tree(out)
        flags = [f for f in FAST if f not in ("--depth", "20")]
        _one_line_error(
            capsys,
            ["--epochs", "2", "--resume", "--out", str(out), *flags, *args],
            "resume cannot use",
        )
        assert _tree(out) == before
    assert main(["train", "--epochs", "2", "--resume", "--out", str(out), *FAST]) == 0
    assert "with_sd: resuming from" in capsys.readouterr().out


def test_previous_run_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--compare", "--epochs", "1", "--out", str(out), *FAST]) == 0
    capsys.readouterr()
    before = _tree(out)
    _one_line_error(
        capsys,
        ["--epochs", "1", "--out", str(out), *FAST],
        f"--out {out} holds a previous run (results.json, with_sd/checkpoint.pt, "
        "without_sd/checkpoint.pt): continue it with --resume, or replace it with --overwrite",
    )
    assert _tree(out) == before
    assert main(["train", "--epochs", "1", "--overwrite", "--out", str(out), *FAST]) == 0
    assert not (out / "without_sd" / "checkpoint.pt").exists()  # the other run's stale files go
    assert (out / "with_sd" / "checkpoint.pt").exists() and (out / "results.json").exists()


def test_interrupt_waits_for_the_files_then_stops(tmp_path, capsys, monkeypatch):
    import os
    import signal

    from droppath.apps.train import Run
    from droppath.apps.train.checkpointing import interrupt_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupt_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the block went on to its end")
    assert done

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Run, "train_epoch", interrupted)
    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "x"), *FAST]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"droppath train: interrupted; continue with --resume --out {tmp_path / 'x'}"]


def test_missing_train_extra_names_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # as if scikit-learn were not installed
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    _one_line_error(capsys, ["--out", str(tmp_path / "o"), *FAST], "pip install 'droppath[train]'")
