# The blocks are the libraries' (typed as Any here): their calls return Any.
# mypy: disable-error-code="no-any-return"
"""The training forwards of timm's, torchvision's and Hugging Face's residual blocks, rewritten so
that the dropped work is skipped; used by :func:`droppath.accelerate`.

Each function below is a block class's own ``forward``, statement for statement, except that each
``a + drop_path(g(a))`` becomes ``_residual(block, "drop_path", a, lambda h: g(h))``, which runs
``g`` on the kept samples only (``drop_add_residual``). They run in training mode only, and only
while a site of the block has a rate above 0: evaluation and rates of 0 run the class's own
``forward``, untouched.

Why adapters, and not a general rewrite? ``torch.fx.symbolic_trace`` fails on Hugging Face layers
(tuple unpacking of shapes, ``**kwargs`` forwards) and bakes ``self.training`` into the graph, which
would freeze code such as timm's ``dropout_p = self.attn_drop.p if self.training else 0.``; a
capture with ``torch.export`` or a shape-aware tracer would need an example input before the first
step and gives a new graph module, not the user's model with its names and hooks. A short
forward per block family keeps the library's own modules, names and modes, and is checked against
the library's source: each adapter holds the fingerprint of the ``forward`` it was written from,
and a block whose ``forward`` differs (another library version) stays on the mask, reported as
such.

Side inputs (attention masks, rotary embeddings, relative position biases) are passed whole to
the kept samples' branch; when one of them has the batch size as its first dimension (a
per-sample mask), the block runs its own forward instead, with the mask formulation.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from droppath.residual import _host_side, _skipping_add

__all__ = ["ADAPTERS", "Adapter"]


@dataclass(frozen=True)
class Adapter:
    """How to run a block class with its dropped work skipped.

    ``forward(block, original, *args, **kwargs)`` is the training forward (``original`` is the
    class's own ``forward``, for the cases it hands back to); ``sites`` are the attributes holding
    the block's drop-path modules; ``fingerprints`` identify the versions of the class's
    ``forward`` the adapter was written from (see ``droppath.acceleration._fingerprint``);
    ``written_for`` names them for the report.
    """

    forward: Callable[..., Any]
    sites: tuple[str, ...]
    fingerprints: tuple[str, ...]
    written_for: str


class _Branch:
    """A branch closure that ``drop_add_residual`` can skip under DDP: its ``parameters()`` are the
    block's, which receive zero gradients when the branch is dropped for every sample."""

    __slots__ = ("block", "fn")

    def __init__(self, fn: Callable[[Tensor], Tensor], block: nn.Module) -> None:
        self.fn, self.block = fn, block

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.block.parameters()


@_host_side
def _residual(
    block: nn.Module,
    site: str,
    x: Tensor,
    branch: Callable[[Tensor], Tensor],
    shortcut: Callable[[Tensor], Tensor] | None = None,
    branch_first: bool = False,
) -> Tensor:
    """``shortcut(x) + block.<site>(branch(x))`` with the site's settings, skipping the dropped
    work: row mode runs ``branch`` on the kept samples, batch mode skips a dropped step.
    ``branch_first``: the original adds the branch first (``drop_path(g) + x``, or ``g += x``),
    so its sum has the branch output's memory format; the rewrite keeps it."""
    drop = getattr(block, site)
    # drop_add_residual's training step, called directly: this frame already runs on the host
    return _skipping_add(
        x,
        _Branch(branch, block),
        float(drop.p),
        shortcut,
        drop.mode,
        drop.batch_dim,
        drop.scale_by_keep,
        "auto",
        None,
        None,
        branch_first,
    )


def _per_sample(x: Tensor, *side: Any) -> bool:
    """Whether a side input may hold one entry per sample: 3 dimensions or more, the first of
    ``x``'s batch size (a per-sample attention mask or rotary table, which the kept samples'
    branch would need gathered too). Shared ones, such as a ``(tokens, dim)`` rotary table or a
    ``(tokens, tokens)`` mask, have fewer dimensions; a shared one that happens to match (heads
    equal to the batch size) only costs the saving, never correctness."""
    n = x.shape[0]
    return any(isinstance(t, Tensor) and t.dim() >= 3 and t.shape[0] == n for t in side)


def _not_the_input(out: Tensor, x: Tensor) -> Tensor:
    """``out``, copied when it is the block's input itself (every sample dropped, no
    projection): a ReLU that works in place after the sum must not overwrite the input, which
    the previous layer's backward needs."""
    return out.clone() if out.data_ptr() == x.data_ptr() else out


def _scaled(gamma: Tensor | None, x: Tensor) -> Tensor:
    return x if gamma is None else gamma * x


# --- timm 1.0.31 ------------------------------------------------------------------------------


def _timm_vit_block(
    self: Any, original: Any, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False
) -> Tensor:
    if _per_sample(x, attn_mask):
        return original(self, x, attn_mask=attn_mask, is_causal=is_causal)
    x = _residual(
        self,
        "drop_path1",
        x,
        lambda h: self.ls1(self.attn(self.norm1(h), attn_mask=attn_mask, is_causal=is_causal)),
    )
    return _residual(self, "drop_path2", x, lambda h: self.ls2(self.mlp(self.norm2(h))))


def _timm_beit_block(
    self: Any, original: Any, x: Tensor, shared_rel_pos_bias: Tensor | None = None
) -> Tensor:
    if _per_sample(x, shared_rel_pos_bias):
        return original(self, x, shared_rel_pos_bias=shared_rel_pos_bias)
    g1, g2 = self.gamma_1, self.gamma_2
    x = _residual(
        self,
        "drop_path1",
        x,
        lambda h: _scaled(g1, self.attn(self.norm1(h), shared_rel_pos_bias=shared_rel_pos_bias)),
    )
    return _residual(self, "drop_path2", x, lambda h: _scaled(g2, self.mlp(self.norm2(h))))


def _timm_eva_block(
    self: Any,
    original: Any,
    x: Tensor,
    rope: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Tensor:
    if _per_sample(x, rope, attn_mask):
        return original(self, x, rope=rope, attn_mask=attn_mask, is_causal=is_causal)

    def attn(h: Tensor) -> Tensor:
        out = self.attn(self.norm1(h), rope=rope, attn_mask=attn_mask, is_causal=is_causal)
        return _scaled(self.gamma_1, out)

    x = _residual(self, "drop_path1", x, attn)
    g2 = self.gamma_2
    return _residual(self, "drop_path2", x, lambda h: _scaled(g2, self.mlp(self.norm2(h))))


def _timm_convnext_block(self: Any, original: Any, x: Tensor) -> Tensor:
    def branch(h: Tensor) -> Tensor:
        h = self.conv_dw(h)
        if self.use_conv_mlp:
            h = self.norm(h)
            h = self.mlp(h)
        else:
            h = h.permute(0, 2, 3, 1)
            h = self.norm(h)
            h = self.mlp(h)
            h = h.permute(0, 3, 1, 2)
        if self.gamma is not None:
            h = h.mul(self.gamma.reshape(1, -1, 1, 1))
        return h

    return _residual(self, "drop_path", x, branch, shortcut=self.shortcut, branch_first=True)


def _timm_swin_block(self: Any, original: Any, x: Tensor) -> Tensor:
    B, H, W, C = x.shape
    x = _residual(self, "drop_path1", x, lambda h: self._attn(self.norm1(h)))
    x = x.reshape(B, -1, C)
    x = _residual(self, "drop_path2", x, lambda h: self.mlp(self.norm2(h)))
    return x.reshape(B, H, W, C)


def _timm_depthwise_separable(self: Any, original: Any, x: Tensor) -> Tensor:
    if not self.has_skip:
        return original(self, x)

    def branch(h: Tensor) -> Tensor:
        if self.conv_s2d is not None:
            h = self.conv_s2d(h)
            h = self.bn_s2d(h)
        h = self.conv_dw(h)
        h = self.bn1(h)
        h = self.aa(h)
        h = self.se(h)
        h = self.conv_pw(h)
        return self.bn2(h)

    return _residual(self, "drop_path", x, branch, branch_first=True)


def _timm_inverted_residual(self: Any, original: Any, x: Tensor) -> Tensor:
    if not self.has_skip:
        return original(self, x)

    def branch(h: Tensor) -> Tensor:
        if self.conv_s2d is not None:
            h = self.conv_s2d(h)
            h = self.bn_s2d(h)
        h = self.conv_pw(h)
        h = self.bn1(h)
        h = self.conv_dw(h)
        h = self.bn2(h)
        h = self.aa(h)
        h = self.se(h)
        h = self.conv_pwl(h)
        return self.bn3(h)

    return _residual(self, "drop_path", x, branch, branch_first=True)


def _timm_bottleneck(self: Any, original: Any, x: Tensor) -> Tensor:
    def branch(h: Tensor) -> Tensor:
        h = self.conv1(h)
        h = self.bn1(h)
        h = self.act1(h)
        h = self.conv2(h)
        h = self.bn2(h)
        h = self.drop_block(h)
        h = self.act2(h)
        h = self.aa(h)
        h = self.conv3(h)
        h = self.bn3(h)
        if self.se is not None:
            h = self.se(h)
        return h

    out = _residual(self, "drop_path", x, branch, shortcut=self.downsample, branch_first=True)
    return self.act3(_not_the_input(out, x))


def _timm_basic_block(self: Any, original: Any, x: Tensor) -> Tensor:
    def branch(h: Tensor) -> Tensor:
        h = self.conv1(h)
        h = self.bn1(h)
        h = self.drop_block(h)
        h = self.act1(h)
        h = self.aa(h)
        h = self.conv2(h)
        h = self.bn2(h)
        if self.se is not None:
            h = self.se(h)
        return h

    out = _residual(self, "drop_path", x, branch, shortcut=self.downsample, branch_first=True)
    return self.act2(_not_the_input(out, x))


def _timm_swin_v2_block(self: Any, original: Any, x: Tensor) -> Tensor:
    B, H, W, C = x.shape
    x = _residual(self, "drop_path1", x, lambda h: self.norm1(self._attn(h)))
    x = x.reshape(B, -1, C)
    x = _residual(self, "drop_path2", x, lambda h: self.norm2(self.mlp(h)))
    return x.reshape(B, H, W, C)


# --- torchvision 0.29.1 -----------------------------------------------------------------------


def _tv_cnblock(self: Any, original: Any, input: Tensor) -> Tensor:
    return _residual(
        self,
        "stochastic_depth",
        input,
        lambda h: self.layer_scale * self.block(h),
        branch_first=True,
    )


def _tv_swin_block(self: Any, original: Any, x: Tensor) -> Tensor:
    x = _residual(self, "stochastic_depth", x, lambda h: self.attn(self.norm1(h)))
    return _residual(self, "stochastic_depth", x, lambda h: self.mlp(self.norm2(h)))


def _tv_swin_v2_block(self: Any, original: Any, x: Tensor) -> Tensor:
    x = _residual(self, "stochastic_depth", x, lambda h: self.norm1(self.attn(h)))
    return _residual(self, "stochastic_depth", x, lambda h: self.norm2(self.mlp(h)))


def _tv_mbconv(self: Any, original: Any, input: Tensor) -> Tensor:
    if not self.use_res_connect:
        return original(self, input)
    return _residual(self, "stochastic_depth", input, self.block, branch_first=True)


def _tv_maxvit_mbconv(self: Any, original: Any, x: Tensor) -> Tensor:
    return _residual(self, "stochastic_depth", x, self.layers, shortcut=self.proj)


def _tv_partition_attention(self: Any, original: Any, x: Tensor) -> Tensor:
    gh, gw = self.grid_size[0] // self.p, self.grid_size[1] // self.p
    torch._assert(  # type: ignore[no-untyped-call]
        self.grid_size[0] % self.p == 0 and self.grid_size[1] % self.p == 0,
        f"Grid size must be divisible by partition size. Got grid size of {self.grid_size} and "
        f"partition size of {self.p}",
    )
    x = self.partition_op(x, self.p)
    x = self.partition_swap(x)
    x = _residual(self, "stochastic_dropout", x, self.attn_layer)
    x = _residual(self, "stochastic_dropout", x, self.mlp_layer)
    x = self.departition_swap(x)
    return self.departition_op(x, self.p, gh, gw)


# --- transformers 5.24.0 ----------------------------------------------------------------------


def _hf_convnext_layer(self: Any, original: Any, features: Tensor) -> Tensor:
    def branch(h: Tensor) -> Tensor:
        h = self.dwconv(h)
        h = h.permute(0, 2, 3, 1)
        h = self.layernorm(h)
        h = self.pwconv1(h)
        h = self.act(h)
        h = _scaled(self.layer_scale_parameter, self.pwconv2(h))
        return h.permute(0, 3, 1, 2)

    return _residual(self, "drop_path", features, branch)


def _hf_dinov2_layer(
    self: Any,
    original: Any,
    hidden_states: Tensor,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    if _per_sample(hidden_states, attention_mask):
        return original(self, hidden_states, attention_mask=attention_mask, **kwargs)

    def attn(h: Tensor) -> Tensor:
        h, _ = self.attention(self.norm1(h), attention_mask=attention_mask, **kwargs)
        return self.layer_scale1(h)

    hidden_states = _residual(self, "drop_path", hidden_states, attn)
    return _residual(
        self, "drop_path", hidden_states, lambda h: self.layer_scale2(self.mlp(self.norm2(h)))
    )


def _hf_beit_layer(
    self: Any,
    original: Any,
    hidden_states: Tensor,
    attention_mask: Tensor | None = None,
    interpolate_pos_encoding: bool = False,
    resolution: tuple[int, int] | None = None,
    **kwargs: Any,
) -> Tensor:
    if _per_sample(hidden_states, attention_mask):
        return original(
            self,
            hidden_states,
            attention_mask=attention_mask,
            interpolate_pos_encoding=interpolate_pos_encoding,
            resolution=resolution,
            **kwargs,
        )
    if self.relative_position_bias is not None:
        assert resolution is not None
        height, width = resolution
        window_size = (height // self.patch_size, width // self.patch_size)
        relative_position_bias = self.relative_position_bias(
            window_size, interpolate_pos_encoding, dim_size=hidden_states.shape[1]
        )
        attention_mask = (
            relative_position_bias + attention_mask
            if attention_mask is not None
            else relative_position_bias
        )

    def attn(h: Tensor) -> Tensor:
        h, _ = self.attention(self.layernorm_before(h), attention_mask=attention_mask, **kwargs)
        h = self.dropout(h)
        return self.lambda_1 * h

    def mlp(h: Tensor) -> Tensor:
        h = self.mlp(self.layernorm_after(h))
        h = self.dropout(h)
        return self.lambda_2 * h

    hidden_states = _residual(self, "drop_path", hidden_states, attn)
    return _residual(self, "drop_path", hidden_states, mlp)


def _hf_swin_layer(
    self: Any,
    original: Any,
    hidden_states: Tensor,
    input_dimensions: tuple[int, int],
    always_partition: bool = False,
    **kwargs: Any,
) -> tuple[Tensor, Any]:
    lib = sys.modules[type(self).__bases__[-1].__module__]
    if not always_partition:
        self.set_shift_and_window_size(input_dimensions)
    height, width = input_dimensions
    _, _, channels = hidden_states.size()
    weights: list[Any] = [None]

    def attn(h: Tensor) -> Tensor:
        batch_size = h.shape[0]  # the kept samples
        h = self.layernorm_before(h)
        h = h.view(batch_size, height, width, channels)
        h, pad_values = self.maybe_pad(h, height, width)
        _, height_pad, width_pad, _ = h.shape
        windows = lib.window_partition(self.cyclic_shift(h), self.window_size)
        windows = windows.view(-1, self.window_size * self.window_size, channels)
        attn_mask = self.get_attn_mask(height_pad, width_pad, dtype=h.dtype, device=windows.device)
        out, weights[0] = self.attention(windows, attn_mask, **kwargs)
        out = self.dropout(out)
        out = out.view(-1, self.window_size, self.window_size, channels)
        out = self.cyclic_shift(
            lib.window_reverse(out, self.window_size, height_pad, width_pad), reverse=True
        )
        if pad_values[3] > 0 or pad_values[5] > 0:
            out = out[:, :height, :width, :].contiguous()
        return out.view(batch_size, height * width, channels)

    hidden_states = _residual(self, "drop_path", hidden_states, attn)
    residual = hidden_states
    hidden_states = self.layernorm_after(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = self.dropout(hidden_states) + residual
    return hidden_states, weights[0]


def _hf_segformer_layer(
    self: Any, original: Any, hidden_states: Tensor, height: int, width: int, **kwargs: Any
) -> Tensor:
    def attn(h: Tensor) -> Tensor:
        h, _ = self.attention(self.layernorm_before(h), height, width, **kwargs)
        return self.hidden_dropout(h)

    hidden_states = _residual(self, "drop_path", hidden_states, attn)
    return _residual(
        self, "drop_path", hidden_states, lambda h: self.mlp(self.layernorm_after(h), height, width)
    )


def _adapter(
    forward: Callable[..., Any], sites: tuple[str, ...], fingerprints: tuple[str, ...], lib: str
) -> Adapter:
    """An adapter whose forward runs on the host under torch.compile, as ``Residual``'s step
    does: its code reads the rates and draws, while the modules and branches it calls compile as
    graphs of their own (``droppath.residual._host_side``)."""
    return Adapter(_host_side(forward), sites, fingerprints, lib)


_TIMM, _TV, _HF = "timm 1.0.31", "torchvision 0.29.1", "transformers 5.24.0"

# The block classes droppath can rewrite, by "module.QualifiedName", with the fingerprint of the
# forward each adapter was written from.
ADAPTERS: dict[str, Adapter] = {
    "timm.models.vision_transformer.Block": _adapter(
        _timm_vit_block, ("drop_path1", "drop_path2"), ("332de2ad66dc19dc",), _TIMM
    ),
    "timm.models.beit.Block": _adapter(
        _timm_beit_block, ("drop_path1", "drop_path2"), ("209cb9be221a4893",), _TIMM
    ),
    "timm.models.eva.EvaBlock": _adapter(
        _timm_eva_block, ("drop_path1", "drop_path2"), ("0ce24250938388ee",), _TIMM
    ),
    "timm.models.convnext.ConvNeXtBlock": _adapter(
        _timm_convnext_block, ("drop_path",), ("657c549673c76df6",), _TIMM
    ),
    "timm.models.swin_transformer.SwinTransformerBlock": _adapter(
        _timm_swin_block, ("drop_path1", "drop_path2"), ("c990ae53ce1102bf",), _TIMM
    ),
    "timm.models._efficientnet_blocks.DepthwiseSeparableConv": _adapter(
        _timm_depthwise_separable, ("drop_path",), ("09390d2f08ba46bd",), _TIMM
    ),
    "timm.models._efficientnet_blocks.InvertedResidual": _adapter(
        _timm_inverted_residual, ("drop_path",), ("89809e503655993d",), _TIMM
    ),
    "timm.models.resnet.Bottleneck": _adapter(
        _timm_bottleneck, ("drop_path",), ("9eacf56781af34f0",), _TIMM
    ),
    "timm.models.resnet.BasicBlock": _adapter(
        _timm_basic_block, ("drop_path",), ("5628e27389ca6509",), _TIMM
    ),
    "timm.models.swin_transformer_v2.SwinTransformerV2Block": _adapter(
        _timm_swin_v2_block, ("drop_path1", "drop_path2"), ("595ee2104b691b89",), _TIMM
    ),
    "torchvision.models.swin_transformer.SwinTransformerBlockV2": _adapter(
        _tv_swin_v2_block, ("stochastic_depth",), ("c36140788ec3e017",), _TV
    ),
    "torchvision.models.convnext.CNBlock": _adapter(
        _tv_cnblock, ("stochastic_depth",), ("8b77484002aa7235",), _TV
    ),
    "torchvision.models.swin_transformer.SwinTransformerBlock": _adapter(
        _tv_swin_block, ("stochastic_depth",), ("d18714a77cfd2c67",), _TV
    ),
    "torchvision.models.efficientnet.MBConv": _adapter(
        _tv_mbconv, ("stochastic_depth",), ("7971d2ec2a3ebfad",), _TV
    ),
    "torchvision.models.maxvit.MBConv": _adapter(
        _tv_maxvit_mbconv, ("stochastic_depth",), ("90cd43403bc42794",), _TV
    ),
    "torchvision.models.maxvit.PartitionAttentionLayer": _adapter(
        _tv_partition_attention, ("stochastic_dropout",), ("6bc4934064ff07bc",), _TV
    ),
    "transformers.models.convnext.modeling_convnext.ConvNextLayer": _adapter(
        _hf_convnext_layer, ("drop_path",), ("c5c32aecccd308bb",), _HF
    ),
    "transformers.models.dinov2.modeling_dinov2.Dinov2Layer": _adapter(
        _hf_dinov2_layer, ("drop_path",), ("52b6f5d5e5f0e7e9",), _HF
    ),
    "transformers.models.beit.modeling_beit.BeitLayer": _adapter(
        _hf_beit_layer, ("drop_path",), ("55e924396cb3189a",), _HF
    ),
    "transformers.models.swin.modeling_swin.SwinLayer": _adapter(
        _hf_swin_layer, ("drop_path",), ("afe7bb61de46911e",), _HF
    ),
    "transformers.models.segformer.modeling_segformer.SegformerLayer": _adapter(
        _hf_segformer_layer, ("drop_path",), ("9fec6905750d5652",), _HF
    ),
}
