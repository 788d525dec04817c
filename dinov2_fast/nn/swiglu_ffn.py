"""SwiGLU feed-forward branches with DINOv2's names: ``SwiGLUFFN`` and ``SwiGLUFFNFused``."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SwiGLUFFN", "SwiGLUFFNFused"]


class SwiGLUFFN(nn.Module):
    """``w3(silu(x1) * x2)`` with ``x1, x2 = w12(x).chunk(2)``: one GEMM for both gate halves.

    Keys ``w12.weight [2 * hidden, in]``, ``w12.bias``, ``w3.weight [out, hidden]``, ``w3.bias``
    (those of xFormers' ``SwiGLU`` that DINOv2 loads). ``act_layer`` and ``drop`` are accepted for
    the common FFN signature and ignored, as in DINOv2.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class SwiGLUFFNFused(SwiGLUFFN):
    """DINOv2's ``SwiGLUFFNFused``: the hidden width is ``2/3`` of the one asked for, rounded up to
    a multiple of 8 (ViT-g: 6144 -> 4096), so the parameter count matches a GELU MLP's."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        hidden_features = (int(hidden_features * 2 / 3) + 7) // 8 * 8
        super().__init__(in_features, hidden_features, out_features, bias=bias)
