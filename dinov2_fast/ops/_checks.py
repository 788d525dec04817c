"""Argument checks shared by the ops: each error names the argument, what was expected and what came."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DTYPE_NAMES = "float32, float16 or bfloat16"


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_float_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be {_DTYPE_NAMES}, got {tensor.dtype}")


def check_same_device(name: str, tensor: torch.Tensor, reference: torch.Tensor, ref_name: str):
    if tensor.device != reference.device:
        raise ValueError(
            f"{name} must be on the same device as {ref_name} ({reference.device}), "
            f"got {tensor.device}"
        )


def check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(
            f"{name} must have shape {list(expected)} ({what}), got {list(tensor.shape)}"
        )


def check_nonnegative_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return float(value)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype in force for ``device``'s type, or None outside autocast."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def with_unit_last_stride(tensor: torch.Tensor) -> torch.Tensor:
    """Kernels read rows by a row stride but need unit stride along the last dimension."""
    return tensor if tensor.shape[-1] <= 1 or tensor.stride(-1) == 1 else tensor.contiguous()
