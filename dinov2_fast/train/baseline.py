"""The ``baseline`` implementation's block: stock PyTorch the way the iBOT code ran a ViT.

Attention is the explicit ``softmax(q kᵀ · scale) v`` with the attention matrix materialised,
LayerNorm is ``torch.nn.LayerNorm`` (fp32 under autocast), and drop path is the per-sample mask at
every rate: the dropped samples are computed and multiplied by zero. The trainer runs this block
with one forward per crop resolution (no packing). Names, keys and constructor are DINOv2's (so
that both implementations load the same weights); the class is named ``Block`` as iBOT's and
DINOv2's are, which is also how ``dinov2_fast.patch`` and the FSDP wrapping recognise it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dinov2_fast.nn.block import BlockLayout

__all__ = ["Block", "ExplicitAttention", "SdpaAttention", "StockBlock"]


class ExplicitAttention(nn.Module):
    """iBOT's attention: the ``[B, H, N, N]`` attention matrix is computed, soft-maxed and kept
    for the backward. DINOv2's constructor and keys (``qkv``, ``proj``)."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, D]
        attn = (q * self.scale) @ k.transpose(-2, -1)
        attn = self.attn_drop(attn.softmax(dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, channels)
        return self.proj_drop(self.proj(out))


class SdpaAttention(ExplicitAttention):
    """The same module with torch's ``scaled_dot_product_attention`` (its best backend for the
    inputs): stock PyTorch at its best, the ``stock`` implementation (under torch.compile)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, N, D]
        dropout = self.attn_drop.p if self.training else 0.0
        out = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(batch, tokens, channels)
        return self.proj_drop(self.proj(out))


class Block(BlockLayout):
    """``x + drop_path1(ls1(attn(norm1(x))))``, then ``x + drop_path2(ls2(mlp(norm2(x))))``, with
    the per-sample mask drop path at every rate; DINOv2's ``block_fn`` signature and keys
    (:class:`dinov2_fast.nn.block.BlockLayout`), here with ``torch.nn.LayerNorm`` and
    :class:`ExplicitAttention` by default."""

    def __init__(
        self,
        *args,
        norm_layer: Callable[..., nn.Module] = nn.LayerNorm,
        attn_class: Callable[..., nn.Module] = ExplicitAttention,
        **kwargs,
    ) -> None:
        super().__init__(*args, norm_layer=norm_layer, attn_class=attn_class, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                "the baseline block takes one crop resolution at a time (a tensor), got "
                f"{type(x).__name__}: packing crops is what impl=fast does"
            )
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def StockBlock(*args, **kwargs) -> Block:  # noqa: N802 (a block_fn, named like a class)
    """The baseline block with :class:`SdpaAttention` (the ``stock`` implementation)."""
    return Block(*args, attn_class=SdpaAttention, **kwargs)
