"""Residual connections that skip the dropped work: ``Residual``, ``drop_add_residual``.

The module and the function check their arguments, hold or build a ``DropSpec``, and take their
training step in ``droppath._engine``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from droppath._checks import check_input
from droppath._engine import (
    ALL_SETTINGS,
    Branch,
    DropBase,
    DropSpec,
    ahead_add,
    eager,
    fitting,
    host_side,
    mask_add,
    masks,
    skip_add,
)
from droppath._fx import function_node, is_proxy, module_node, module_reference
from droppath.drop import drop_path

__all__ = ["Residual", "drop_add_residual"]


def drop_add_residual(
    x: Tensor,
    branch: Branch,
    p: float = 0.0,
    training: bool = True,
    *,
    shortcut: Branch | None = None,
    mode: str = "row",
    batch_dim: int = 0,
    scale_by_keep: bool = True,
    strategy: str = "auto",
    bucket: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Compute ``base + drop_path(branch(x))`` without computing what is dropped.

    Stochastic depth as in Huang et al., "Deep Networks with Stochastic Depth" (ECCV 2016), whose
    code skipped dropped blocks; ``base`` is ``shortcut(x)`` when a shortcut is given, else ``x``.
    The result has the distribution of ``base + drop_path(branch(x), p, mode=mode, ...)``, but:

    - ``mode="batch"``: a dropped step never calls ``branch`` (no forward, no backward).
    - ``mode="row"``, ``strategy="subset"``: ``branch`` runs only on the kept samples, gathered
      along ``batch_dim``, and its output is added back at their rows, scaled by ``1 / (1 - p)``.
      Each sample is kept independently with probability exactly ``1 - p``, at every batch size.
      When one sample alone is kept, a dropped one runs beside it (its output discarded), so the
      branch never sees a batch of one (BatchNorm rejects it; torch.compile specializes it).
    - ``mode="row"``, ``strategy="mask"``: ``branch`` runs on every sample and the drop is fused
      into the add (``torch.addcmul``), as timm and torchvision do, without their extra temporary.
    - ``mode="row"``, ``strategy="auto"``: draws the kept samples first, then skips the branch when
      none is kept, runs it plainly when all are, and otherwise takes the subset. A ``Residual``
      measures what the subset saves and costs at its site on its first training calls and then
      takes the mask where the subset costs more (``auto_choice``; see the docs' "How auto
      chooses"); this function keeps no state, so it takes the subset.

    Branches that mix samples (BatchNorm in training mode) see only the kept samples under
    ``"subset"``: their batch statistics are those of the kept samples, as if the batch were
    smaller. Use ``strategy="mask"`` to keep statistics over the whole batch.

    Random decisions are drawn on the host from the CPU generator (``generator`` when it is a CPU
    generator, else the global one): no device synchronization, identical decisions in processes
    seeded alike, and exact replay under ``torch.utils.checkpoint``. ``strategy="mask"`` draws its
    mask on ``x``'s device instead (with ``generator`` when it lives there).

    Args:
        x: the input, of any floating dtype and rank >= 1.
        branch: the residual branch, a callable (usually a module) from ``x`` to a tensor whose
            shape is ``base``'s.
        p: the probability of dropping the branch, per sample or per step, in [0, 1]. Default: 0.0.
        training: apply stochastic depth only when True; otherwise return ``base + branch(x)``.
            Default: True.
        shortcut: a callable applied to ``x`` for the identity path, e.g. a projection when the
            branch changes the shape. Default: None (the identity).
        mode: ``"row"`` (one decision per sample) or ``"batch"`` (one per call). Default: ``"row"``.
        batch_dim: the dimension that indexes samples, e.g. 1 for ``(L, N, E)``. Default: 0.
        scale_by_keep: multiply the kept branch output by ``1 / (1 - p)``. Default: True.
        strategy: ``"auto"``, ``"subset"`` or ``"mask"``, how row mode spends compute (above).
            Ignored in batch mode. Default: ``"auto"``.
        bucket: row mode's subset: round the number of rows the branch runs on up to a multiple
            of ``bucket`` (or the batch size) by adding dropped rows, whose outputs are
            discarded. The draws and the result are unchanged for branches that treat samples
            independently; the branch sees at most ``ceil(n / bucket)`` batch sizes, which
            CUDA graphs (``torch.compile(mode="reduce-overhead")``) need. Default: None.
        generator: the random generator for the decisions. Default: None (the global ones).

    Shape:
        - Input: :math:`(*)`, with the batch at ``batch_dim``.
        - Output: the shape of ``base``, which the branch's output must match.

    Examples:
        >>> import torch
        >>> from droppath import drop_add_residual
        >>> calls = []
        >>> def branch(t):
        ...     calls.append(t.shape[0])
        ...     return 2 * t
        >>> x = torch.ones(8, 3)
        >>> y = drop_add_residual(x, branch, p=0.5, generator=torch.Generator().manual_seed(0))
        >>> calls[-1] < 8  # the branch saw only the kept rows
        True
        >>> sorted(set(y[:, 0].tolist()))  # dropped rows are x, kept rows x + 2 * x / (1 - p)
        [1.0, 5.0]
        >>> torch.equal(drop_add_residual(x, branch, p=0.5, training=False), 3 * x)
        True
    """
    settings: dict[str, Any] = {
        "p": p,
        "mode": mode,
        "batch_dim": batch_dim,
        "scale_by_keep": scale_by_keep,
        "strategy": strategy,
        "bucket": bucket,
    }
    if is_proxy(x):  # torch.fx: one node, see droppath._fx
        node: Tensor = _fx_node(x, branch, DropSpec(**settings), training, shortcut)
        return node
    if training and not masks(mode, strategy):
        # Checked and decided on the host: the rate never enters a torch.compile graph (a
        # DropSpec built in a graph would guard on it).
        return _host_step(x, branch, settings, shortcut, generator)
    spec = _spec_of(x, branch, settings, shortcut)
    if not training:
        return _plain(x, branch, shortcut)
    return mask_add(x, branch, spec, shortcut=shortcut, generator=generator)


def _spec_of(x: Any, branch: Any, settings: dict[str, Any], shortcut: Any) -> DropSpec:
    """Check the arguments of ``drop_add_residual``; return its settings as a ``DropSpec``."""
    check_input(x, settings["batch_dim"])
    spec = DropSpec(**settings)
    if not callable(branch):
        raise TypeError(f"branch must be callable, got {type(branch).__name__}")
    if shortcut is not None and not callable(shortcut):
        raise TypeError(f"shortcut must be callable or None, got {type(shortcut).__name__}")
    return spec


@host_side
def _host_step(
    x: Tensor,
    branch: Branch,
    settings: dict[str, Any],
    shortcut: Branch | None,
    generator: torch.Generator | None,
) -> Tensor:
    """A skipping training step of ``drop_add_residual``, its arguments checked on the host."""
    spec = _spec_on_host(x, branch, settings, shortcut)
    return skip_add(x, branch, spec, shortcut=shortcut, source=generator)


# Called from the host-side step, whose callees would otherwise compile.
_spec_on_host = eager(_spec_of)


def _plain(x: Tensor, branch: Branch, shortcut: Branch | None) -> Tensor:
    """The residual without stochastic depth: ``shortcut(x) + branch(x)``."""
    base = x if shortcut is None else shortcut(x)
    out: Tensor = base + branch(x)
    return out


def _fx_node(x: Any, branch: Branch, spec: DropSpec, training: Any, shortcut: Any) -> Any:
    """``drop_add_residual`` on a ``torch.fx`` proxy: one node when the branch (and shortcut) are
    submodules of the traced model, else the traced branch followed by ``drop_path``."""
    branch_ref = module_reference(x, branch) if isinstance(branch, nn.Module) else None
    shortcut_ref = module_reference(x, shortcut) if isinstance(shortcut, nn.Module) else None
    if branch_ref is not None and (shortcut is None or shortcut_ref is not None):
        return function_node(
            drop_add_residual,
            x,
            branch_ref,
            spec.p,
            training,
            shortcut=shortcut_ref,
            mode=spec.mode,
            batch_dim=spec.batch_dim,
            scale_by_keep=spec.scale_by_keep,
            strategy=spec.strategy,
            bucket=spec.bucket,
        )
    drop = drop_path(
        branch(x),
        spec.p,
        training,
        mode=spec.mode,
        batch_dim=spec.batch_dim,
        scale_by_keep=spec.scale_by_keep,
    )
    return (x if shortcut is None else shortcut(x)) + drop


class Residual(DropBase):
    """A residual block ``shortcut(x) + drop_path(branch(x))`` that skips the dropped work.

    The module form of ``drop_add_residual`` (see there for the modes and strategies), after
    Huang et al., "Deep Networks with Stochastic Depth" (ECCV 2016).

    Args:
        branch: the residual branch, stored as ``self.branch``.
        p: the probability of dropping the branch, in [0, 1]. Default: 0.0.
        shortcut: a module for the identity path, stored as ``self.shortcut``. Default: None.
        mode: ``"row"`` or ``"batch"``. Default: ``"row"``.
        batch_dim: the dimension that indexes samples. Default: 0.
        scale_by_keep: multiply the kept branch output by ``1 / (1 - p)``. Default: True.
        strategy: ``"auto"``, ``"subset"`` or ``"mask"``. ``"auto"`` takes the subset or the mask,
            whichever costs less here, measured on the first training calls (``auto_choice``
            says which). Default: ``"auto"``.
        bucket: round subset batch sizes up to a multiple of ``bucket``. Default: None.

    ``p``, ``mode``, ``batch_dim``, ``scale_by_keep``, ``strategy`` and ``bucket`` are plain
    attributes that may be changed between steps; the state dict holds only ``branch.*`` and
    ``shortcut.*`` entries.

    Shape:
        - Input: :math:`(*)`, with the batch at ``batch_dim``.
        - Output: the shape of ``branch(x)``.

    Examples:
        >>> import torch
        >>> from torch import nn
        >>> from droppath import Residual
        >>> block = Residual(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16)), p=0.1)
        >>> block(torch.randn(4, 16)).shape
        torch.Size([4, 16])
        >>> list(block.state_dict())
        ['branch.0.weight', 'branch.0.bias', 'branch.1.weight', 'branch.1.bias']
    """

    strategy: str
    bucket: int | None

    def __init__(
        self,
        branch: nn.Module,
        p: float = 0.0,
        *,
        shortcut: nn.Module | None = None,
        mode: str = "row",
        batch_dim: int = 0,
        scale_by_keep: bool = True,
        strategy: str = "auto",
        bucket: int | None = None,
    ) -> None:
        super().__init__(
            DropSpec(p, mode, batch_dim, scale_by_keep, strategy, bucket), ALL_SETTINGS
        )
        if not isinstance(branch, nn.Module):
            raise TypeError(f"branch must be an nn.Module, got {type(branch).__name__}")
        if shortcut is not None and not isinstance(shortcut, nn.Module):
            raise TypeError(f"shortcut must be an nn.Module or None, got {type(shortcut).__name__}")
        self.branch = branch
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        if is_proxy(x):  # torch.fx: one node that follows train() / eval(), see droppath._fx
            node: Tensor = module_node(self, x, lambda training: self._residual(x, training))
            return node
        if not self.training:  # the plain residual; reads no rate (no guard under compile)
            return _plain(x, self.branch, self.shortcut)
        if masks(self.mode, self.strategy):  # in the graph, with the branch
            return self._residual(x, True)
        dim = fitting(self._ahead, x, self.batch_dim)  # decisions drawn before the forward
        if dim is not None:  # (draw_ahead): the step in the model's graph
            return ahead_add(x, self.branch, self._ahead, dim, self.shortcut)
        # "auto" too, whichever step it chose: under torch.compile a choice that changes with the
        # rate then changes no graph
        return _module_step(self, x)

    def _residual(self, x: Tensor, training: Any) -> Tensor:
        return drop_add_residual(
            x,
            self.branch,
            self.p,
            training,
            shortcut=self.shortcut,
            mode=self.mode,
            batch_dim=self.batch_dim,
            scale_by_keep=self.scale_by_keep,
            strategy=self.strategy,
            bucket=self.bucket,
        )

    def extra_repr(self) -> str:
        bucket = "" if self.bucket is None else f", bucket={self.bucket}"
        settings = super().extra_repr().replace(self._chosen(), "")
        return f"{settings}, strategy={self.strategy!r}{bucket}{self._chosen()}"


@host_side
def _module_step(block: Residual, x: Tensor) -> Tensor:
    """A training step of ``block`` whose settings are read here, on the host: under
    torch.compile, no graph reads the rate, so no guard is put on it whatever the PyTorch
    version (some specialize every float a graph reads)."""
    spec = block.spec
    check_input(x, spec.batch_dim)
    block._ahead_rows = (x.shape[spec.batch_dim], x.device)
    return skip_add(x, block.branch, spec, shortcut=block.shortcut)
