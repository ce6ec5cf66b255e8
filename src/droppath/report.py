"""What ``accelerate`` reports: how each drop-path site runs, as data and as a table."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AccelerationReport", "SiteReport"]

ROW, BATCH, MASK = "row subset", "batch skip", "mask"


@dataclass(frozen=True)
class SiteReport:
    """How one drop-path site runs after ``accelerate``.

    Attributes:
        name: the site's qualified module name (the same as ``drop_path_sites`` gives).
        block: the class name of the block that holds it.
        rate: its drop rate at the time of the call.
        runs: ``"row subset"`` (the branch runs on the kept samples), ``"batch skip"`` (a dropped
            step skips the branch) or ``"mask"`` (the branch runs on every sample and the dropped
            ones are multiplied by zero).
        reason: why a site stays on the mask; empty otherwise.
        auto: for a row-subset site with ``strategy="auto"``, what it takes in training:
            ``"pending"`` until its costs are measured on its first training calls, then
            ``"subset"`` or ``"mask"`` (see ``droppath.Residual``); empty otherwise.
    """

    name: str
    block: str
    rate: float
    runs: str
    reason: str = ""
    auto: str = ""


class AccelerationReport(tuple[SiteReport, ...]):
    """What ``accelerate`` did: one ``SiteReport`` per site, in forward order.

    A tuple of rows (usable as data), printed as a table; ``counts`` sums up how they run.
    """

    def counts(self) -> dict[str, int]:
        """How many sites run as ``"row subset"``, ``"batch skip"`` and ``"mask"``."""
        return {kind: sum(row.runs == kind for row in self) for kind in (ROW, BATCH, MASK)}

    def __str__(self) -> str:
        head: tuple[str, ...] = ("site", "block", "rate", "runs", "reason")
        rows: list[tuple[str, ...]] = [
            (r.name, r.block, f"{r.rate:.4g}", r.runs, r.reason) for r in self
        ]
        if any(r.auto not in ("", "pending") for r in self):  # chosen: show the choices
            head = (*head[:4], "auto", head[4])
            rows = [(*row[:4], r.auto, row[4]) for row, r in zip(rows, self, strict=True)]
        widths = [max(len(str(c)) for c in col) for col in zip(head, *rows, strict=True)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
            for row in (head, *rows)
        ]
        counts = ", ".join(f"{v} {k}" for k, v in self.counts().items())
        return "\n".join([*lines, f"{len(self)} sites: {counts}"])

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.counts().items())
        return f"AccelerationReport({len(self)} sites: {counts})"
