"""How ``strategy="auto"`` chooses, per site, between the row subset and the mask: from what each
costs on the device at hand, measured on the site's first training calls.

The row subset saves the dropped rows' branch work and adds a cost of its own, nearly fixed per
call: the gather of the kept rows, the scatter of their output, their backward, the index lists.
The mask adds a multiply. So the subset is worth it when

    p * n * (time of the branch per row, forward and backward)  >  extra cost of the subset

``AutoChoice`` measures both sides for its site, as ``cudnn.benchmark`` measures convolutions:

- the branch's forward time per row, on the site's training calls 2 to 4 (the first one warms up:
  allocations, lazy initialization, compilation); its backward is taken as twice its forward;
- the subset's extra cost, by running the step's own operations (``split`` and ``scatter_add``
  against the mask's ``addcmul``, forward and backward) on a tensor shaped like the site's input,
  once per shape, without the branch.

Until both are known the site takes the subset. Then the choice is a comparison, made again
whenever the rate changes (a schedule can flip it). On a GPU the times come from CUDA events
that are read once the device has passed them: no measurement waits for the device. The choice
only changes at the start of a forward call outside a backward pass, so that checkpointing
recomputes a step the way it first ran. With ``torch.use_deterministic_algorithms(True)`` nothing
is measured and every site takes the subset: the two steps round differently, and a run must not
depend on timings (``cudnn.benchmark`` is off there too).
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any

import torch
from torch import Tensor

from droppath._engine.ops import eager, scatter_add, split

TIMED_CALLS = 3  # branch calls timed, after one untimed call
BACKWARD_FACTOR = 2.0  # a branch's backward takes about twice its forward
_REPS = 3  # repetitions of each variant when the subset's extra cost is measured

# The subset's extra cost per input layout: shape, strides, dtype, device, batch dim, kept rows.
_EXTRA: dict[tuple[Any, ...], _Measure] = {}


class Clock:
    """One measured interval: host time on the CPU, CUDA events on a GPU (read when done)."""

    __slots__ = ("end", "start", "value")

    def __init__(self, device: torch.device) -> None:
        self.value: float | None = None
        self.start: Any = None
        self.end: Any = None
        if device.type == "cuda":
            self.start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            self.end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            self.start.record()
        else:
            self.value = -time.perf_counter()

    def stop(self) -> None:
        if self.end is not None:
            self.end.record()
        elif self.value is not None:
            self.value += time.perf_counter()

    def seconds(self) -> float | None:
        """The interval, or None while the device has not reached its end."""
        if self.end is not None and self.value is None and self.end.query():
            self.value = self.start.elapsed_time(self.end) / 1000.0
        return self.value if self.end is None or self.value is not None else None


def measurable(device: torch.device) -> bool:
    """Whether times can be measured on ``device`` (the CPU and CUDA devices)."""
    return device.type in ("cpu", "cuda")


class _Measure:
    """The subset's extra cost over the mask on one input layout: pairs of clocks, read when the
    device is done with them."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[Clock, Clock]]) -> None:
        self.pairs = pairs

    def seconds(self) -> float | None:
        subset = [s.seconds() for s, _ in self.pairs]
        masked = [m.seconds() for _, m in self.pairs]
        if any(t is None for t in (*subset, *masked)):
            return None
        return min(t for t in subset if t is not None) - min(t for t in masked if t is not None)


@eager
def _measure_extra(x: Tensor, dim: int, kept: int) -> _Measure:
    """Time the subset's own operations and the mask's on a tensor shaped like ``x``, forward
    and backward, interleaved; the branch is the identity. Uses no random numbers, so that the
    training run's draws are the same whether or not a measurement was made."""
    n = x.shape[dim]
    data = torch.empty_like(x).copy_(torch.linspace(-1.0, 1.0, x.numel()).view(x.shape))
    step = 2 if 2 * kept <= n else 1  # every other row, as a draw would scatter them
    idx = torch.arange(0, step * kept, step, device=x.device)
    shape = [1] * x.dim()
    shape[dim] = n
    grad = torch.ones_like(data)
    pairs = []
    with torch.enable_grad():
        for rep in range(_REPS + 1):
            leaf = data.detach().requires_grad_()
            subset = Clock(x.device)
            x_all, rows = split(leaf, idx, dim)
            out = scatter_add(x_all, rows, idx, dim, scale=2.0)
            torch.autograd.grad(out, leaf, grad)
            subset.stop()
            masked = Clock(x.device)
            mask = torch.zeros(n, dtype=x.dtype, device=x.device).index_fill_(0, idx, 2.0)
            out = torch.addcmul(leaf, leaf, mask.view(shape))
            torch.autograd.grad(out, leaf, grad)
            masked.stop()
            if rep:  # the first repetition warms up
                pairs.append((subset, masked))
    return _Measure(pairs)


def _extra_cost(x: Tensor, dim: int, kept: int) -> _Measure:
    """The subset's extra cost for inputs laid out as ``x``: measured once per layout.

    The measurement runs in a thread of its own, and so outside the caller's thread-local
    state: autocast, and the saved-tensor hooks of checkpointing, whose recomputation would
    otherwise expect to find the measurement's tensors again."""
    key = (tuple(x.shape), x.stride(), x.dtype, x.device, dim, kept)
    measure = _EXTRA.get(key)
    if measure is None:
        found: list[_Measure] = []

        def measure_here() -> None:
            if x.device.type == "cuda":
                torch.cuda.set_device(x.device)  # the events of this thread's current stream
            found.append(_measure_extra(x, dim, kept))

        worker = threading.Thread(target=measure_here)
        worker.start()
        worker.join()
        if not found:
            raise RuntimeError("droppath: measuring the row subset's cost failed")
        measure = _EXTRA[key] = found[0]
    return measure


def _settling() -> bool:
    """Whether a choice may be measured or changed now: in a forward with gradients, outside a
    backward pass (where checkpointing recomputes a forward, which must take its first path)."""
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        return False
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is None or task() == -1


class AutoChoice:
    """What ``strategy="auto"`` knows of one site's costs, and its choice.

    ``subset`` is the choice: True (the row subset) until the costs are known, then whether the
    subset saves more than it adds at the current rate. ``state`` names it for reports:
    ``"pending"``, ``"subset"`` or ``"mask"``.
    """

    __slots__ = ("calls", "clocks", "extra", "n", "p", "row_time", "subset")

    def __init__(self) -> None:
        self.calls = 0
        self.clocks: list[tuple[Clock, int]] = []
        self.row_time = math.inf  # the branch's forward seconds per row
        self.extra: _Measure | float | None = None  # the subset's extra seconds per call
        self.n = 0  # the batch size the costs were measured at
        self.p = 0.0
        self.subset = True

    @property
    def measured(self) -> bool:
        return isinstance(self.extra, float)

    @property
    def state(self) -> str:
        if not self.measured:
            return "pending"
        return "subset" if self.subset else "mask"

    def saving(self, p: float) -> float:
        """Seconds the subset saves per call at rate ``p``: the dropped rows' branch work."""
        return p * self.n * self.row_time * (1.0 + BACKWARD_FACTOR)

    def update(self, p: float) -> None:
        """Choose again for the rate ``p`` (a schedule changed it)."""
        self.p = p
        if isinstance(self.extra, float):
            self.subset = self.saving(p) > self.extra

    @eager
    def begin(self, x: Tensor, dim: int, p: float) -> Clock | None:
        """Called at the start of a training step: reads finished measurements, settles the
        choice when it can, and returns a clock when this call's branch is to be timed."""
        if self.measured or not measurable(x.device) or not _settling():
            return None
        if torch.are_deterministic_algorithms_enabled():  # no choice that timing could change
            return None
        self.calls += 1
        times = [(c.seconds(), rows) for c, rows in self.clocks]
        done = [t / rows for t, rows in times if t is not None]
        if len(done) >= TIMED_CALLS:
            self.row_time = min(done)
            self.n = x.shape[dim]
            if self.extra is None:
                kept = min(self.n - 1, max(1, round(self.n * (1.0 - p))))
                self.extra = _extra_cost(x, dim, kept)
            if isinstance(self.extra, _Measure):
                extra = self.extra.seconds()
                if extra is not None:  # below 0 only by the noise of a measurement
                    self.extra = max(extra, 0.0)
                    self.update(p)
            return None
        if self.calls > 1 and len(self.clocks) < TIMED_CALLS:
            return Clock(x.device)
        return None

    @eager
    def timed(self, clock: Clock, rows: int) -> None:
        """The branch's call timed by ``clock`` ran on ``rows`` rows."""
        clock.stop()
        self.clocks.append((clock, rows))
