"""Derived training forwards (``droppath._derive``) on blocks written in every form the libraries
use: each is rewritten, verified against its own forward by running it, and then skips the
dropped work. The real timm, torchvision and transformers blocks are covered by
tests/integration/test_census_real.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from droppath import DropPath, accelerate
from droppath._derive import DeriveError, derive
from droppath._derive.ops import DroppedRows

D = 8


class _Base(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc, self.fc2 = nn.LayerNorm(D), nn.Linear(D, D), nn.Linear(D, D)
        self.gamma = nn.Parameter(torch.full((D,), 0.5))
        self.drop_path = nn.Identity()  # an empty slot, as timm leaves it at rate 0

    def ls(self, x):
        return x * self.gamma


class Expression(_Base):
    def forward(self, x):
        x = x + self.drop_path(self.fc(self.norm(x)))
        return x


class Reversed(_Base):
    def forward(self, x):
        return self.drop_path(self.fc(self.norm(x))) + x


class AugAssign(_Base):
    def forward(self, x):
        y = self.fc2(x)
        y += self.drop_path(self.fc(self.norm(x)))
        return y


class ShortcutExpression(_Base):
    def forward(self, x):
        return self.fc2(x) + self.drop_path(self.fc(self.norm(x)))


class Statements(_Base):
    """ConvNeXt, MBConv, DINOv3: the branch is the statements since the shortcut was taken."""

    def forward(self, x):
        shortcut = x
        x = self.norm(x)
        x = self.fc(x)
        x = torch.relu(x)
        x = self.drop_path(x) + shortcut
        return x


class UnderIf(_Base):
    """EfficientNet: the sum sits under an ``if``, the branch starts before it."""

    def __init__(self, skip: bool = True) -> None:
        super().__init__()
        self.has_skip = skip

    def forward(self, x):
        shortcut = x
        x = self.fc(self.norm(x))
        if self.has_skip:
            x = self.drop_path(x) + shortcut
        return x


class RowWiseAfter(_Base):
    """A layer scale applied to the site's output: part of the branch."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = _Scale()

    def forward(self, x):
        return x + self.scale(self.drop_path(self.fc(self.norm(x))))


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((D,), 0.1))

    def forward(self, x):
        return x * self.gamma


class SideInputs(_Base):
    """A per-sample mask (gathered with the kept rows), a shared bias (passed whole) and sizes
    read off the input (taken again on the kept rows)."""

    def forward(self, x, mask, bias):
        B, N, C = x.shape
        h = self.norm(x).reshape(B, N, C) * mask + bias
        return x + self.drop_path(self.fc(h))


class Mask2D(_Base):
    """A per-sample mask of 2 dimensions: gathered once a check without it has failed."""

    def forward(self, x, mask):
        return x + self.drop_path(self.fc(self.norm(x) * mask[:, None, :]))


class SharedTable(_Base):
    """A shared (tokens, dim) table whose tokens equal the batch size: never gathered."""

    def forward(self, x, table):
        return x + self.drop_path(self.fc(self.norm(x) + table))


class TupleSide(_Base):
    def forward(self, x, extras):
        mask, bias = extras
        return x + self.drop_path(self.fc(self.norm(x) * mask + bias))


class Concatenated(_Base):
    """A drop path whose output is not added to a shortcut: dropped rows are zeros."""

    def forward(self, x):
        return torch.cat([x, self.drop_path(self.fc(self.norm(x)))], dim=-1)


class Statement2(_Base):
    """The site's output named first, added later (Hugging Face CvT)."""

    def forward(self, x):
        out = self.fc(self.norm(x))
        out = self.drop_path(out)
        x = out + x
        return x


class AssignedUnderIf(_Base):
    """Hugging Face VitDet: sizes assigned under an ``if`` in the branch and read under the same
    condition later in it; they have no value before the branch (they are no argument of it)."""

    def __init__(self) -> None:
        super().__init__()
        self.windowed = True

    def forward(self, x):
        shortcut = x
        x = self.norm(x)
        if self.windowed:
            tokens = x.shape[1]
            x, pad = x[:, :4], x[:, 4:]
        x = self.fc(x)
        if self.windowed:
            x = torch.cat([x, pad], dim=1)[:, :tokens]
        return shortcut + self.drop_path(x)


class NestedIfRows(_Base):
    """timm RexNet: the site under two nested ``if``s, its output concatenated rather than added
    (the dropped rows are zeros, computed by no one); the branch starts before the outer ``if``."""

    def __init__(self) -> None:
        super().__init__()
        self.use_shortcut = True

    def forward(self, x):
        shortcut = x
        x = self.fc(self.norm(x))
        if self.use_shortcut:
            if self.drop_path is not None:
                x = self.drop_path(x)
            x = torch.cat([x[..., :4] + shortcut[..., :4], x[..., 4:]], dim=-1)
        return x


class HelperMethod(_Base):
    """timm's aligned Xception: the site in a helper method that ``forward`` calls (inlined),
    under two nested ``if``s, the helper's argument computed in ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.no_skip = False

    def _residual(self, x, skip):
        if not self.no_skip:
            if self.drop_path is not None:
                x = self.drop_path(x)
            x = x + skip
        return x

    def forward(self, x):
        x = self.norm(x)
        return self._residual(self.fc(x), x)


class HelperInExpression(_Base):
    """MONAI's Swin blocks: the site called in ``forward`` and again in a helper that
    ``forward`` calls inside an expression (``x + self.part2(x)``), under an ``if`` whose other
    branch hands the helper to checkpointing."""

    def __init__(self) -> None:
        super().__init__()
        self.use_checkpoint = False

    def part2(self, x):
        return self.drop_path(self.fc2(self.norm(x)))

    def forward(self, x):
        shortcut = x
        x = shortcut + self.drop_path(self.fc(self.norm(x)))
        if self.use_checkpoint:
            x = x + torch.utils.checkpoint.checkpoint(self.part2, x, use_reentrant=False)
        else:
            x = x + self.part2(x)
        return x


FORMS = [
    Expression,
    Reversed,
    AugAssign,
    ShortcutExpression,
    Statements,
    UnderIf,
    RowWiseAfter,
    SideInputs,
    Mask2D,
    SharedTable,
    TupleSide,
    Concatenated,
    Statement2,
    AssignedUnderIf,
    NestedIfRows,
    HelperMethod,
    HelperInExpression,
]


def _inputs(cls: type, n: int = 16) -> tuple:
    x = torch.randn(n, 5, D)
    if cls is SideInputs:
        return (x, torch.rand(n, 5, 1), torch.randn(5, D))
    if cls is Mask2D:
        return (x, torch.rand(n, D))
    if cls is SharedTable:
        return (torch.randn(n, n, D), torch.randn(n, D))
    if cls is TupleSide:
        return (x, (torch.rand(n, 5, 1), torch.randn(5, D)))
    return (x,)


def _stack(cls: type, p: float) -> nn.Module:
    torch.manual_seed(0)
    block = cls()
    accelerate(block, [p], strategy="subset")
    return block


@pytest.mark.parametrize("cls", FORMS, ids=lambda c: c.__name__)
def test_every_form_is_rewritten_verified_and_skips_work(cls):
    block = _stack(cls, 0.5)
    report = accelerate(block)
    assert report.counts()["row subset"] == 1, str(report)
    seen = []
    block.fc.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    block.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed verification warns
        for _ in range(6):
            args = _inputs(cls)
            out = block(*args)
            out.float().sum().backward()
    assert block._droppath_state.verified is True
    assert not block._droppath_state.failed
    assert block._droppath_state.gather == (2 if cls is Mask2D else 3)
    # the verification ran the branch on 16 rows and on the kept ones; training on kept rows only
    trained = seen[2:]
    assert any(n < 16 for n in trained), seen


@pytest.mark.parametrize("cls", FORMS, ids=lambda c: c.__name__)
def test_eval_and_rate_zero_are_the_original(cls):
    torch.manual_seed(0)
    plain = cls()
    block = _stack(cls, 0.5)
    block.load_state_dict(plain.state_dict())
    args = _inputs(cls)
    with torch.no_grad():
        assert torch.equal(block.eval()(*args), plain.eval()(*args))
        accelerate(block, [0.0])
        assert torch.equal(block.train()(*args), plain.train()(*args))


@pytest.mark.parametrize("cls", [Expression, Statements, UnderIf, SideInputs, Concatenated])
def test_rate_one_runs_no_branch(cls):
    block = _stack(cls, 0.5)
    block.train()
    block(*_inputs(cls))  # verified at 0.5
    block(*_inputs(cls))
    accelerate(block, [1.0])
    calls = []
    block.fc.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    out = block(*_inputs(cls))
    assert calls == []
    if cls is Concatenated:  # no shortcut: zeros shaped as the branch's last output
        assert torch.equal(out[..., D:], torch.zeros_like(out[..., D:]))


def test_a_branch_that_is_not_row_wise_fails_verification_and_stays_on_the_mask():
    class BiasAfter(_Base):
        def forward(self, x):  # fc2 after the site has a bias: fc2(0) is not 0
            return x + self.fc2(self.drop_path(self.fc(x)))

    block = _stack(BiasAfter, 0.5)
    block.train()
    x = torch.randn(16, D)
    with pytest.warns(UserWarning, match="BiasAfter stays on the mask .verify: output"):
        block(x)
    assert block._droppath_state.failed.startswith("verify: output")
    block(x).sum().backward()  # the original forward, on the mask


def test_a_single_sample_defers_the_check():
    block = _stack(Expression, 0.5)
    block.train()
    block(torch.randn(1, D))
    assert not block._droppath_state.verified
    block(torch.randn(4, D))
    assert block._droppath_state.verified is True


def test_what_cannot_be_derived_is_reported():
    class ViaHelper(_Base):  # a helper called by keyword: not inlined
        def forward(self, x):
            return self._inner(x=x)

        def _inner(self, x):
            return x + self.drop_path(self.fc(x))

    block = _stack(ViaHelper, 0.5)
    row = accelerate(block)[0]
    assert row.runs == "mask"
    assert row.reason.startswith("rewrite: ")
    assert row.reason.endswith("ViaHelper.forward calls no site directly")
    with pytest.raises(DeriveError, match="^parse: "):
        derive(type(lambda: 0), ("drop_path",))


def test_the_generated_code_reads_as_the_original():
    source = derive(Statements, ("drop_path",)).source
    assert "def __droppath_branch_0(self, x):" in source
    assert "x = __droppath_radd(self, 'drop_path', shortcut, __droppath_branch_0, (x,))" in (source)


def test_under_if_without_skip_runs_the_whole_branch():
    torch.manual_seed(0)
    plain = UnderIf(skip=False)
    block = UnderIf(skip=False)
    block.load_state_dict(plain.state_dict())
    accelerate(block, [0.5])
    x = torch.randn(8, D)
    assert torch.equal(block.train()(x), plain.train()(x))


def test_sites_of_droppath_timm_and_torchvision_style():
    class TimmStyle(_Base):
        def __init__(self):
            super().__init__()
            self.drop_path = DropPath(0.3)

        def forward(self, x):
            return x + self.drop_path(self.fc(x))

    block = TimmStyle()
    assert accelerate(block)[0].runs == "row subset"
    block.train()(torch.randn(8, D)).sum().backward()
    assert block._droppath_state.verified is True


def test_a_branch_whose_work_cannot_move_stays_on_the_mask_and_is_reported():
    class Trivial(_Base):
        def forward(self, x):
            h = self.fc(self.norm(x))
            x = x + self.drop_path(h)  # h is computed for every sample first, then read again
            return x + self.drop_path(h)

    row = accelerate(_stack(Trivial, 0.5))[0]
    assert row.runs == "mask" and row.reason.endswith("nothing to skip")


def test_per_sample_values_read_after_the_site_fail_the_check():
    class WeightsOut(_Base):
        def forward(self, x):
            h = self.fc(self.norm(x))  # the branch's work, returned too: rows of dropped samples
            x = x + self.drop_path(h)
            return x, h

    block = _stack(WeightsOut, 0.5)
    assert accelerate(block)[0].runs == "row subset"
    with pytest.warns(UserWarning, match="stays on the mask .verify: output item 1"):
        block.train()(torch.randn(8, D))
    x, h = block(torch.randn(8, D))  # the original forward
    assert h.shape == (8, D)


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x, output_attentions=False):
        h = self.fc(x)
        return (h, h.softmax(-1)) if output_attentions else (h,)


class OutputsTuple(_Base):
    """Hugging Face 4.x layers: the attention returns a tuple whose tail (attention weights when
    asked for) the layer returns after the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attn()

    def forward(self, x, output_attentions=False):
        outputs = self.attn(self.norm(x), output_attentions=output_attentions)
        h = outputs[0]
        extra = outputs[1:]
        h = self.drop_path(h)
        x = h + x
        return (x, *extra)


def test_values_read_after_the_site_come_back_beside_the_output():
    block = _stack(OutputsTuple, 0.5)
    assert "extra = __droppath_out_0" not in block._droppath_derived.source
    assert "__droppath_out_0, extra = __droppath_radd(" in block._droppath_derived.source
    block.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            (y,) = block(torch.randn(16, 5, D))
            y.sum().backward()
    assert block._droppath_state.verified is True
    seen = []
    block.attn.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    block(torch.randn(16, 5, D))
    assert seen and seen[0] < 16  # the attention ran on the kept samples only
    # attention weights asked for in training: that call runs the block's own forward, so they
    # cover every sample (issue 27, item 1)
    seen.clear()
    for _ in range(5):
        _, weights = block(torch.randn(16, 5, D), output_attentions=True)
        assert not isinstance(weights, DroppedRows) and weights.shape[0] == 16
    assert seen == [16] * 5
    assert len(block.eval()(torch.randn(4, 5, D), output_attentions=True)) == 2


def test_a_traceback_inside_a_derived_forward_shows_its_source_line():
    """Issue 28, item 5: the generated code is registered with linecache, as torch.fx does."""
    import traceback

    from torch import nn

    from droppath import accelerate

    class Fails(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.drop_path = nn.Linear(4, 4), nn.Identity()
            self.broken = False

        def forward(self, x):
            h = self.lin(x)
            if self.broken:
                raise ValueError("inside the branch")
            return x + self.drop_path(h.relu())

    model = nn.Sequential(Fails())
    accelerate(model, 0.5, rule="uniform")
    model.train()(torch.randn(8, 4))  # checked: runs its derived forward from now on
    assert model[0]._droppath_state.verified
    model[0].broken = True
    with pytest.raises(ValueError, match="inside the branch") as caught:
        model(torch.randn(8, 4))
    frames = traceback.extract_tb(caught.value.__traceback__)
    derived = [f for f in frames if f.filename.startswith("<droppath derived")]
    assert derived, [f.filename for f in frames]
    assert "raise ValueError('inside the branch')" in [f.line for f in derived]
    source = type(model[0])._droppath_derived.source
    assert all(f.line in source for f in derived)


def test_a_helper_called_in_an_expression_is_inlined_and_skips_work():
    """Issue 27, item 6 (MONAI SwinUNETR): the helper's site skips work too."""
    block = _stack(HelperInExpression, 0.5)
    assert block._droppath_derived.source.count("__droppath_add(self, 'drop_path'") == 2
    seen = []
    block.fc2.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    block.train()
    for _ in range(6):
        block(torch.randn(16, 5, D)).sum().backward()
    assert block._droppath_state.verified
    assert any(n < 16 for n in seen[2:]), seen  # after the check's runs: kept rows only


class PerFrame(_Base):
    """transformers' Timesformer (divided space-time): a site that drops rows of
    ``batch * frames``, made by a reshape with the batch size, and whose output is reshaped back
    and used otherwise than in a sum."""

    frames = 3

    def forward(self, x):
        batch_size = x.shape[0]
        t = x.reshape(batch_size, self.frames, -1, D).reshape(batch_size * self.frames, -1, D)
        out = self.fc(self.norm(t))
        r = self.drop_path(out)
        r = r.reshape(batch_size, -1, D)
        return x + self.fc2(r)


def test_a_site_on_rows_regrouped_by_the_batch_size_skips_those_rows():
    """Issue 27, item 6 (Timesformer): the first two rewrites move the reshape into the branch,
    which then gathers per-sample rows for a site that drops per frame, and fail their check; the
    third starts the branch after the reshape and runs it on the kept frames."""
    first = derive(PerFrame, ("drop_path",)).source
    third = derive(PerFrame, ("drop_path",), regroup=True).source
    assert "batch_size * self.frames" in first.split("def forward")[0]  # inside a branch
    assert "batch_size * self.frames" not in third.split("def forward")[0]
    block = _stack(PerFrame, 0.5)
    seen = []
    block.fc.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    block.train()
    for _ in range(6):
        block(torch.randn(4, 3 * 5, D)).sum().backward()
    state = block._droppath_state
    assert state.verified and not state.failed
    assert block._droppath_candidates[state.chosen].source == third
    runs = seen[-5:]  # after the check: rows of 4 samples x 3 frames, the dropped ones skipped
    assert all(n <= 12 for n in runs) and any(n < 12 for n in runs), seen


def test_the_check_runs_the_engine_step_that_training_runs(monkeypatch):
    """Issue 28, item 1: a derived sum, checked or in training, takes the engine's one step
    (``skip_add``); in the check with forced decisions (``ForcedDrop.decisions``), so that the
    check tests the step training runs, fillers and the all-dropped form included."""
    import droppath._derive.ops as ops

    seen = []
    real = ops.skip_add

    def spy(x, branch, spec, **kw):
        seen.append(kw.get("source"))
        return real(x, branch, spec, **kw)

    monkeypatch.setattr(ops, "skip_add", spy)
    block = _stack(Statements, 0.5)
    block.train()
    block(torch.randn(8, 5, D)).sum().backward()  # the check, then the derived forward
    assert block._droppath_state.verified
    forced = [s for s in seen if s is not None]
    assert forced and all(
        getattr(s, "__self__", None).__class__.__name__ == "ForcedDrop" for s in forced
    )
    assert None in seen  # the training call itself: decisions drawn now
    seen.clear()
    block(torch.randn(8, 5, D)).sum().backward()
    assert seen == [None]


def test_few_droppath_frames_between_a_block_and_its_branch():
    """Issue 28, item 6: from an accelerated block's call to its branch's code, droppath's own
    files hold at most 4 frames (the block's forward, the training forward, the derived op, the
    engine's step); the generated code is not counted."""
    import traceback
    from pathlib import Path

    import droppath

    package = str(Path(droppath.__file__).resolve().parent)
    block = _stack(Statements, 0.5)
    block.train()
    block(torch.randn(8, 5, D))  # the check
    stacks = []
    block.fc.register_forward_pre_hook(lambda *_: stacks.append(traceback.extract_stack()))
    for _ in range(20):
        block(torch.randn(8, 5, D))
        if stacks:
            break
    own = [f for f in stacks[-1] if str(Path(f.filename).resolve()).startswith(package)]
    assert 1 <= len(own) <= 4, [f"{Path(f.filename).name}:{f.name}" for f in own]
