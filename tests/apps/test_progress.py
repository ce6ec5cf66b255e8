"""The command-line tools' progress bar (tqdm, on a terminal only)."""

import io
import sys

from droppath.apps.progress import progress_bar


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
