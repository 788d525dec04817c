"""``LayerScale``: a learned per-channel scale of a residual branch, DINOv2's and timm's module."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LayerScale"]


class LayerScale(nn.Module):
    """``x * gamma`` with ``gamma: [dim]`` initialised to ``init_values``; key ``gamma``.

    Inside :class:`dinov2_fast.nn.Block` with stochastic depth the multiply is not run on its own:
    gamma is folded into the fused residual update (``ops.scaled_index_add``'s ``scaling``).
    """

    def __init__(
        self,
        dim: int,
        init_values: float | torch.Tensor = 1e-5,
        inplace: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.inplace = inplace
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if isinstance(self.init_values, torch.Tensor):
                self.gamma.copy_(self.init_values)
            else:
                self.gamma.fill_(self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(self.gamma) if self.inplace else x * self.gamma
