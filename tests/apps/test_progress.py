"""The command-line tools' progress: a bar (tqdm) on a terminal, a line per epoch elsewhere."""

import io
import sys

from droppath.apps.progress import epoch_line, progress_bar


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_draws_on_a_terminal_even_with_fast_updates(monkeypatch):
    term = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", term)
    bar = progress_bar(50, "bench")
    for _ in range(50):  # far faster than 10 per second
        bar.update(1)
    bar.close()
    assert "bench" in term.getvalue() and "50/50" in term.getvalue()


def test_off_when_not_a_terminal_or_disabled(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress_bar(10, "x") is None
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    assert progress_bar(10, "x", enabled=False) is None


def test_a_line_per_epoch_where_stderr_is_not_a_terminal(monkeypatch):
    """Issue 27, item 11: under nohup, in a log file or a cluster job, a run shows it is alive."""
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    epoch_line("with_sd 2/10", {"train_loss": 0.123456, "epoch_time_s": 12.0})
    assert log.getvalue() == "with_sd 2/10: train_loss 0.1235, epoch_time_s 12\n"
    epoch_line("with_sd 3/10", {"train_loss": 0.1}, enabled=False)  # --no-progress, or rank 1
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    epoch_line("with_sd 3/10", {"train_loss": 0.1})  # the bar shows it there
    assert sys.stderr.getvalue() == "" and log.getvalue().count("\n") == 1
