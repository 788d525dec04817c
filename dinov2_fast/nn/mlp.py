"""``Mlp``: the feed-forward branch of a ViT block, with DINOv2's and timm's names."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["Mlp"]


class Mlp(nn.Module):
    """``fc1 -> act -> drop -> fc2 -> drop``; keys ``fc1.weight [hidden, in]``, ``fc1.bias``,
    ``fc2.weight [out, hidden]``, ``fc2.bias``. Hidden and out default to ``in_features``."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
