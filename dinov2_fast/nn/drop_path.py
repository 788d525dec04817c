"""``DropPath``: per-sample stochastic depth by a mask (DINOv2's and timm's ``drop_path``).

This is the form for small drop rates; :class:`dinov2_fast.nn.Block` skips the dropped samples
instead (``sample_drop_ratio > 0.1``), which saves their compute and activation memory.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DropPath", "drop_path"]


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Zero whole samples (dim 0) of ``x`` with probability ``drop_prob`` and scale the kept ones
    by ``1 / (1 - drop_prob)``; identity when not training or ``drop_prob == 0``."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0:
        mask.div_(keep_prob)
    return x * mask


class DropPath(nn.Module):
    """Module form of :func:`drop_path`; attribute ``drop_prob``."""

    def __init__(self, drop_prob: float | None = None) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob or 0.0, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"
