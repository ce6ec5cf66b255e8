"""What an accelerated block knows of itself, in one object (``BlockState``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["BlockState", "block_state"]


@dataclass
class BlockState:
    """The state of one block that ``accelerate`` rewrote, kept on the block as
    ``_droppath_state``. It travels with the block through ``copy.deepcopy`` and pickle: a copy
    has the same class and parameters, so what was checked holds for it.

    Attributes:
        verified: the derived forward ``chosen`` passed its check on this block.
        failed: why no derived forward passed it (the block then runs its own forward).
        chosen: which of the class's derived forwards runs (0: the rewrite; 1: the more
            conservative one, tried when the first fails; 2: the one whose branches start
            where rows are regrouped by the batch size, tried last; see ``derive_candidates``).
        ahead: ``droppath.draw_ahead`` draws this block's decisions before the forward.
        check_now: check on the next training call, whatever the rates (``checking_now``).
        gather: side inputs with at least this many dimensions and the batch size are gathered
            with the kept rows (3, or 2 where the check needed a ``(batch, tokens)`` mask).
        shapes: each site's branch output shape per row, by input shape, for a step that drops
            every row (it returns zeros of that shape).
    """

    verified: bool = False
    failed: str = ""
    chosen: int = 0
    ahead: bool = False
    check_now: bool = False
    gather: int = 3
    shapes: dict[tuple[Any, ...], tuple[list[int], Any]] = field(default_factory=dict)

    def forget_check(self) -> None:
        """Check again on the next training call."""
        self.verified, self.failed, self.chosen = False, "", 0


def block_state(block: Any) -> BlockState:
    """The state of an accelerated block, made on first use."""
    state: BlockState | None = getattr(block, "_droppath_state", None)
    if state is None:
        state = BlockState()
        setattr(block, "_droppath_state", state)  # noqa: B010 (a module attribute, not a child)
    return state
