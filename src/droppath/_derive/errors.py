"""What a forward that cannot be derived raises: the step that failed and why, in one line."""

from __future__ import annotations

__all__ = ["NOTHING_TO_SKIP", "DeriveError"]

NOTHING_TO_SKIP = "the branch's work is done before the site and read after it: nothing to skip"


class DeriveError(Exception):
    """A forward that cannot be derived: ``step`` (``"parse"`` or ``"rewrite"``) and why."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step, self.reason = step, reason
