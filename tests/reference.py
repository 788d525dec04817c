"""Float64 references and tolerances shared by the kernel tests."""

from __future__ import annotations

import torch

# Relative tolerance in units of the dtype's epsilon, against the largest reference magnitude:
# fp32 results may differ by reassociation over long rows, low precision by one or two roundings.
_ULPS = {torch.float32: 64, torch.float16: 4, torch.bfloat16: 4}


def assert_close_to_reference(
    actual: torch.Tensor, reference: torch.Tensor, name: str, condition: float = 1.0
) -> None:
    """Compare a result of dtype ``actual.dtype`` with a float64 reference.

    ``condition`` is the magnitude that rounding errors of intermediates reach when it exceeds the
    result's own (e.g. LayerNorm's |x|·rstd, large when a row has no variance).
    """
    assert actual.shape == reference.shape, f"{name}: shape {actual.shape} != {reference.shape}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    largest = reference.abs().max().item() if reference.numel() else 0.0
    scale = max(1.0, largest, condition)
    tolerance = _ULPS[actual.dtype] * torch.finfo(actual.dtype).eps * scale
    error = (actual.double() - reference).abs().max().item() if reference.numel() else 0.0
    assert error <= tolerance, f"{name}: max error {error:.3g} > tolerance {tolerance:.3g}"


def randomize_weights(module: torch.nn.Module, spread: float = 0.2) -> torch.nn.Module:
    """Unit-scale random weights, so that every branch of a model shows in its output (DINOv2's
    init leaves the blocks near the identity): LayerScale's gamma far from its init, norm weights
    near 1, matrices scaled by fan-in, the rest (biases, tokens, positions) normal(0, spread)."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("gamma"):
                param.uniform_(0.5, 1.5)
            elif "norm" in name and name.endswith("weight"):
                param.normal_(1.0, 0.2)
            elif name.endswith("weight") and param.dim() > 1:
                param.normal_(0.0, param[0].numel() ** -0.5)
            else:
                param.normal_(0.0, spread)
    return module
