"""``Attention`` and ``MemEffAttention`` with DINOv2's constructor, parameter names and state_dict."""

from __future__ import annotations

import torch
from torch import nn

from dinov2_fast import _backend
from dinov2_fast.ops.attention import _run, attention_qkvpacked, check_attn_bias
from dinov2_fast.ops.block_diagonal_mask import BlockDiagonalMask

__all__ = ["Attention", "MemEffAttention", "qkv_self_attention"]


def qkv_self_attention(
    module: nn.Module,
    x: torch.Tensor,
    attn_bias: BlockDiagonalMask | None,
    backend: str,
) -> torch.Tensor:
    """The forward, without dropout, of any attention module laid out as DINOv2's and timm's are:
    ``module.qkv`` (a Linear to ``3 * width``, ordered [3][heads][head dim]), ``num_heads``,
    ``scale`` (default ``head_dim ** -0.5``), ``proj`` and ``proj_drop`` (optional). Used by :class:`Attention` and by ``dinov2_fast.patch``.

    x is ``[B, N, C]``; with a :class:`BlockDiagonalMask` it is the packed ``[1, T, C]`` sequence.
    The qkv projection's output is read in place and the backward writes one dqkv.
    """
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, C], got shape {list(x.shape)}")
    batch, tokens, _ = x.shape
    qkv = module.qkv(x)
    width = qkv.shape[-1] // 3
    qkv = qkv.reshape(batch, tokens, 3, module.num_heads, width // module.num_heads)
    scale = getattr(module, "scale", None)
    if attn_bias is None:
        out = attention_qkvpacked(qkv, scale=scale, backend=backend)
    else:
        check_attn_bias(attn_bias)
        if batch != 1:
            raise ValueError(
                f"x must be the packed [1, T, C] sequence with a BlockDiagonalMask, got batch "
                f"{batch}"
            )
        q, k, v = qkv[0].unbind(-3)
        out = _run(q, k, v, qkv[0], scale, attn_bias, None, backend)
    out = module.proj(out.reshape(batch, tokens, width))
    proj_drop = getattr(module, "proj_drop", None)  # DINOv2's and timm's have one; copies may not
    return out if proj_drop is None else proj_drop(out)


class Attention(nn.Module):
    """Multi-head self-attention as in DINOv2: ``qkv`` Linear, fused attention, ``proj`` Linear.

    ``forward(x, attn_bias=None)``: x is ``[B, N, C]``; with a :class:`BlockDiagonalMask`, x is the
    packed ``[1, T, C]`` sequence of all crops and attention stays within each crop. The qkv
    projection's output is read in place (``[B, N, 3, H, D]``) and the backward writes one dqkv.

    Attention dropout (``attn_drop > 0``) in training runs only with ``backend="torch"`` (SDPA's
    dropout); the fused kernels raise rather than ignore it. Extra keyword: ``backend``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = _backend.check_name(backend)

    def forward(self, x: torch.Tensor, attn_bias: BlockDiagonalMask | None = None) -> torch.Tensor:
        dropout = self.attn_drop.p if self.training else 0.0
        if dropout > 0:
            batch, tokens, channels = x.shape
            qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, channels // self.num_heads)
            out = self._attention_with_dropout(qkv, attn_bias, dropout)
            return self.proj_drop(self.proj(out.reshape(batch, tokens, channels)))
        return qkv_self_attention(self, x, attn_bias, self.backend)

    def _attention_with_dropout(self, qkv, attn_bias, dropout: float) -> torch.Tensor:
        if self.backend != "torch":
            raise ValueError(
                f"attn_drop={dropout} in training needs backend='torch' (the fused kernels have "
                f"no attention dropout); got backend={self.backend!r}"
            )
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B, H, N, D]
        mask = None
        if attn_bias is not None:
            mask = attn_bias.materialize(q.dtype, q.device)
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale
        )
        return out.transpose(1, 2)

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, backend={self.backend!r}"


class MemEffAttention(Attention):
    """DINOv2's name for the attention that takes a ``BlockDiagonalMask`` (its NestedTensorBlock
    asserts ``isinstance(attn, MemEffAttention)``); the same module here."""
