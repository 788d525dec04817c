"""``dinov2_fast.nn.LayerNorm``: torch's LayerNorm, computed by ``dinov2_fast.ops.layer_norm``."""

from __future__ import annotations

import torch

from dinov2_fast import _backend
from dinov2_fast.ops._checks import FLOAT_DTYPES
from dinov2_fast.ops.layer_norm import layer_norm

__all__ = ["LayerNorm"]


class LayerNorm(torch.nn.LayerNorm):
    """A subclass of :class:`torch.nn.LayerNorm` with the same constructor, parameters
    (``weight``, ``bias``) and state_dict, whose forward runs the fused kernels.

    Extra keyword: ``backend`` ("auto", "triton", "cuda" or "torch"; see
    :func:`dinov2_fast.ops.layer_norm`). A ``normalized_shape`` of several dimensions is normalised
    as one flattened row. Inputs of a dtype the kernels do not take (float64) go through torch's
    own LayerNorm. Under ``torch.autocast`` the output has the autocast dtype (torch's writes fp32).
    """

    def __init__(
        self,
        normalized_shape,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.backend = _backend.check_name(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in FLOAT_DTYPES:
            return super().forward(x)
        dims = len(self.normalized_shape)
        if x.dim() < dims or tuple(x.shape[x.dim() - dims :]) != tuple(self.normalized_shape):
            raise ValueError(
                f"x must end with normalized_shape {list(self.normalized_shape)}, "
                f"got shape {list(x.shape)}"
            )
        flat = x.flatten(-dims) if dims > 1 else x
        weight = None if self.weight is None else self.weight.reshape(-1)
        bias = None if self.bias is None else self.bias.reshape(-1)
        return layer_norm(flat, weight, bias, self.eps, backend=self.backend).view(x.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend!r}"
