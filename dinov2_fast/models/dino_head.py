"""DINOv2's projection head ``DINOHead`` (DINO and iBOT losses), with DINOv2's state_dict keys.

DINOv2 builds the last layer with the deprecated ``torch.nn.utils.weight_norm``, whose state_dict
holds ``last_layer.weight_g [K, 1]`` and ``last_layer.weight_v [K, bottleneck]``. Here the same
two parameters live in :class:`WeightNormLinear`, which computes the weight in its forward (no
hooks, no deprecation warning), so DINOv2's checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DINOHead", "WeightNormLinear"]


class WeightNormLinear(nn.Module):
    """A bias-free Linear with a weight-normalized weight: ``weight = weight_g · weight_v /
    ||weight_v||`` row by row (``torch.nn.utils.weight_norm(Linear, dim=0)``'s parametrization).

    Parameters ``weight_g [out, 1]`` (filled with 1, as DINOv2 sets it) and ``weight_v [out, in]``
    (nn.Linear's default init). ``forward(x: [..., in]) -> [..., out]``.
    """

    def __init__(self, in_features: int, out_features: int, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        factory = {"device": device, "dtype": dtype}
        self.weight_g = nn.Parameter(torch.ones(out_features, 1, **factory))
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features, **factory))
        # nn.Linear's init (the same random draws), which DINOv2's last layer keeps.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight ``[out, in]``."""
        norm = torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True)
        return self.weight_v * (self.weight_g / norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _build_mlp(
    nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool
) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(nlayers - 1):
        layers.append(nn.Linear(width, hidden_dim, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
        width = hidden_dim
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINOv2's head: an MLP to the bottleneck, L2 normalization, then the weight-normalized
    prototype layer.

    ``mlp``: ``Linear(in, hidden) GELU [Linear(hidden, hidden) GELU]×(nlayers-2) Linear(hidden,
    bottleneck)`` (BatchNorm1d after each hidden Linear with ``use_bn``; one Linear for
    ``nlayers=1``); weights trunc_normal(std 0.02), zero biases. ``last_layer``:
    :class:`WeightNormLinear` ``(bottleneck, out_dim)``, ``weight_g`` = 1.

    ``forward(x: [B, in_dim]) -> [B, out_dim]``: ``last_layer(normalize(mlp(x)))``, the
    normalization's eps 1e-6 for float16 and 1e-12 otherwise (DINOv2's).

    Keys (nlayers 3): ``mlp.{0,2,4}.weight``, ``mlp.{0,2,4}.bias``, ``last_layer.weight_g [K, 1]``,
    ``last_layer.weight_v [K, bottleneck]``.

    Raises:
        ValueError: a size argument that is not a positive int.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_dim", in_dim),
            ("out_dim", out_dim),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        nlayers = max(nlayers, 1)  # as DINOv2
        # DINOv2's order of random draws: the MLP is built and initialised, then the last layer.
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn, mlp_bias)
        self.apply(self._init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck features ``[B, bottleneck]``: everything but the last
        layer (the fused ``ops.prototype_cross_entropy`` takes them with
        ``last_layer.weight``, so that the ``[B, out_dim]`` logits are never stored)."""
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return F.normalize(x, dim=-1, p=2, eps=eps)

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """``[B, out_dim]`` logits; with ``return_features``, ``(features, last_layer.weight)``
        instead, for ``ops.prototype_cross_entropy`` (through forward, so that FSDP gathers the
        weights for it as for any forward)."""
        features = self.features(x)
        if return_features:
            return features, self.last_layer.weight
        return self.last_layer(features)
