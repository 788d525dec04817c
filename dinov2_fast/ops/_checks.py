"""Argument checks shared by the ops: each error names the argument, what was expected and what came."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The tags csrc/ takes for these dtypes (common.h's DType).
DTYPE_TAGS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
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


INDEX_DTYPES = (torch.int32, torch.int64)
# The tags csrc/ takes for these dtypes (indexed_rows.h's IndexType).
INDEX_DTYPE_TAGS = {torch.int32: 0, torch.int64: 1}


def check_index(
    name: str, index: object, size: int, device: torch.device, *, validate: bool
) -> torch.Tensor:
    """A 1-D int32/int64 tensor on ``device``; with ``validate``, also every value in
    ``[0, size)`` and no value twice (read on the host: a device sync for a CUDA tensor)."""
    check_tensor(name, index)
    if index.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {index.dtype}")
    if index.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {list(index.shape)}")
    if index.device != device:
        raise ValueError(f"{name} must be on {device} (the data's device), got {index.device}")
    if validate and index.numel():
        values = index.tolist()
        low, high = min(values), max(values)
        if low < 0 or high >= size:
            bad = low if low < 0 else high
            raise ValueError(f"{name} must hold values in [0, {size}), got {bad}")
        if len(set(values)) != len(values):
            seen: set[int] = set()
            twice = next(v for v in values if v in seen or seen.add(v))
            raise ValueError(f"{name} must not repeat a value (got {twice} more than once)")
    return index


def samples_shape(tensor: torch.Tensor) -> tuple[int, int, int]:
    """``[B, ...]`` as ``[B, N, D]``: D the last dimension, N the product of the middle ones (1 for
    a missing one). The layout of the stochastic-depth kernels."""
    dim = tensor.shape[-1] if tensor.dim() > 1 else 1
    middle = math.prod(tensor.shape[1:-1]) if tensor.dim() > 2 else 1
    return tensor.shape[0], middle, dim


def as_samples(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` reshaped to :func:`samples_shape`: a view where the strides allow."""
    return tensor.reshape(samples_shape(tensor))


def check_positive_float(name: str, value: object) -> float:
    """A finite real number > 0 (a temperature, a scale); any real type, bool excluded."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def check_finite_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_sources_and_indices(
    sources: object, indices: object, *, validate: bool, samples: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The ``(sources, indices)`` lists of the gather ops: S >= 1 float tensors of one dtype on one
    device and S index tensors picking samples of them (see :func:`check_index`). ``samples``:
    each source must be ``[B, N, C]`` with sources[0]'s C (else any ``[B, ...]``)."""
    sources, indices = list(sources), list(indices)
    if not sources:
        raise ValueError("sources must hold at least one tensor, got an empty list")
    if len(indices) != len(sources):
        raise ValueError(
            f"indices must have one tensor per source ({len(sources)}), got {len(indices)}"
        )
    first = check_tensor("sources[0]", sources[0])
    for i, (source, index) in enumerate(zip(sources, indices)):
        name = f"sources[{i}]"
        check_tensor(name, source)
        check_float_dtype(name, source)
        if source.dtype != first.dtype:
            raise TypeError(
                f"{name} must have sources[0]'s dtype ({first.dtype}), got {source.dtype}"
            )
        check_same_device(name, source, first, "sources[0]")
        if samples and source.dim() != 3:
            raise ValueError(f"{name} must be [B, N, C], got shape {list(source.shape)}")
        if samples and source.shape[-1] != first.shape[-1]:
            raise ValueError(
                f"{name} must have sources[0]'s C ({first.shape[-1]}), got {source.shape[-1]}"
            )
        if source.dim() == 0:
            raise ValueError(f"{name} must have a sample dimension ([B, ...]), got a 0-d tensor")
        check_index(f"indices[{i}]", index, source.shape[0], first.device, validate=validate)
    return sources, indices
