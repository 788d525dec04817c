"""The measured table behind ``backend="auto"``: which backend is fastest, per op and shape class.

Each op call names a coarse *shape class* (:func:`shape_class`), e.g. ``"D=64,N<=320,dense,bf16"``
for attention or ``"C<=1024,rows>8192,fp32->bf16"`` for LayerNorm. A table maps (op, shape class)
to measured times of each backend on one GPU; ``"auto"`` on CUDA tensors takes the fastest
available backend it measured (:func:`choose`) and otherwise the fixed order of
``_backend.AUTO_PREFERENCE``.

Shape classes (the buckets are DINOv2's sizes: ViT-S/B/L/g widths 384/768/1024/1536, 257-token
global and 37-token local crops at 224 and 96 px, 1370 tokens at 518 px):

- attention: head dim ``D=<D>``; the longest sequence ``N<=320`` (ViT crops), ``N<=1400`` (up to
  518 px) or ``N>1400``; ``dense`` (``[B, N, H, D]``) or ``packed`` (``cu_seqlens``); the dtype.
- layer_norm, index_select_layer_norm: row width ``C<=512``, ``C<=1024`` or ``C>1024``; rows (of
  all calls' tokens) ``rows<=8192`` or ``rows>8192``; x's dtype, ``->`` the output's under autocast
  (``fp32->bf16``).
- index_select_cat: as above with the gathered rows and the sources' dtype.
- scaled_index_add: as above with x's rows and dtype, ``+`` the source's when it differs
  (``fp32+bf16``: an fp32 residual stream and a bf16 branch under autocast).

Which table applies (read once per process; :func:`reload` reads again):

1. ``DINOV2_FAST_BACKEND_TABLE=PATH``: that file first; ``DINOV2_FAST_BACKEND_TABLE=off``: no
   table at all (the fixed order only).
2. The table ``dinov2-fast bench tune`` wrote for this GPU: :func:`user_table_path`, under
   ``$XDG_CACHE_HOME/dinov2_fast`` (default ``~/.cache/dinov2_fast``).
3. The tables shipped with the package (:data:`SHIPPED_TABLES`: one measured on an H100).

A table applies to a GPU of the same name or of the same compute capability: a table measured on
one GPU is a fair guess for another of the same architecture (an H100 table for an H200), and for
no other. For each (op, shape class), the first applicable table that decides wins, in the order
above; a table decides when it has CUDA-graph times (the GPU's time, free of the host's launch
cost: RESULTS.md found eager times of small ops on the H100 machine to be host-bound) of at least
one available backend. Among backends within :data:`TIE_FRACTION` of the fastest, the earlier in
the preference order wins, so that noise does not flip the choice between runs.

Table file (JSON; ``format`` 1)::

    {"format": 1, "device": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0",
     "torch": ..., "triton": ..., "dinov2_fast": ..., "commit": ..., "date": ..., "source": ...,
     "notes": [...],
     "ops": {"attention": {"D=64,N<=320,dense,bf16": [
         {"shape": "64x257x16x64", "pass": "fwd+bwd",
          "graph_ms": {"triton": 0.21, "cuda": 0.18, "torch": 0.30},   # what auto compares
          "eager_ms": {"triton": 0.45, ...},                           # a record, not compared
          "host_ms": {...},                                            # host time to issue
          "others": {"sdpa-cudnn": {"eager_ms": 0.47}},                # comparisons, never chosen
          "rejected": {"cuda": "why"}, "source": ...}, ...]}}}

Several measurements in one class are summed per backend, over those that measured every
backend compared.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ENV_TABLE",
    "FORMAT",
    "SHIPPED_TABLES",
    "TIE_FRACTION",
    "BackendTable",
    "auto_choice",
    "choose",
    "load",
    "reload",
    "shape_class",
    "shipped_path",
    "tables_for",
    "user_table_path",
    "validate",
    "write",
]

FORMAT = 1
ENV_TABLE = "DINOV2_FAST_BACKEND_TABLE"
DISABLED = "off"
# Files in this package, tried after the user's tables.
SHIPPED_TABLES = ("backend_table_h100.json",)
# Backends within 3% of the fastest count as tied: the preference order decides among them.
TIE_FRACTION = 0.03
# Bucket bounds (inclusive) and the label of what is above the last one.
SEQUENCE_BOUNDS = (320, 1400)
WIDTH_BOUNDS = (512, 1024)
ROW_BOUNDS = (8192,)
# The times a measurement may hold per backend (ms); only graph_ms is compared.
TIME_KEYS = ("graph_ms", "eager_ms", "host_ms")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
OPS = (
    "attention",
    "layer_norm",
    "index_select_layer_norm",
    "index_select_cat",
    "scaled_index_add",
)


# --- shape classes -------------------------------------------------------------------------------


def _dtype(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _bucket(name: str, value: int, bounds: Sequence[int]) -> str:
    # Comparisons only (no formatting of the value): under torch.compile with dynamic shapes a
    # size is symbolic, and a comparison becomes a guard rather than a graph break.
    for bound in bounds:
        if value <= bound:
            return f"{name}<={bound}"
    return f"{name}>{bounds[-1]}"


def _rows_class(width: int, rows: int, dtype: str) -> str:
    return f"{_bucket('C', width, WIDTH_BOUNDS)},{_bucket('rows', rows, ROW_BOUNDS)},{dtype}"


def shape_class(op: str, **sizes: Any) -> str:
    """The shape class of one call of ``op`` (see the module docstring), from its sizes:

    - ``attention``: ``head_dim``, ``seqlen`` (N, or the longest packed sequence), ``packed``,
      ``dtype``;
    - ``layer_norm``, ``index_select_layer_norm``: ``width``, ``rows``, ``dtype`` (x's) and
      ``out_dtype`` (the output's; under autocast it differs);
    - ``index_select_cat``: ``width``, ``rows`` (gathered), ``dtype``;
    - ``scaled_index_add``: ``width``, ``rows`` (x's), ``dtype`` (x's), ``source_dtype``.

    Raises:
        ValueError: an unknown op.
        TypeError: a size missing or not expected for ``op`` (Python's own message).
    """
    if op == "attention":
        return _attention_class(**sizes)
    if op in ("layer_norm", "index_select_layer_norm"):
        return _layer_norm_class(**sizes)
    if op == "index_select_cat":
        return _gather_class(**sizes)
    if op == "scaled_index_add":
        return _scatter_class(**sizes)
    raise ValueError(f"op must be one of {', '.join(OPS)} for a shape class, got {op!r}")


def _attention_class(*, head_dim: int, seqlen: int, packed: bool, dtype: torch.dtype) -> str:
    layout = "packed" if packed else "dense"
    return f"D={head_dim},{_bucket('N', seqlen, SEQUENCE_BOUNDS)},{layout},{_dtype(dtype)}"


def _layer_norm_class(
    *, width: int, rows: int, dtype: torch.dtype, out_dtype: torch.dtype | None = None
) -> str:
    types = _dtype(dtype)
    if out_dtype is not None and out_dtype != dtype:
        types = f"{types}->{_dtype(out_dtype)}"
    return _rows_class(width, rows, types)


def _gather_class(*, width: int, rows: int, dtype: torch.dtype) -> str:
    return _rows_class(width, rows, _dtype(dtype))


def _scatter_class(
    *, width: int, rows: int, dtype: torch.dtype, source_dtype: torch.dtype | None = None
) -> str:
    types = _dtype(dtype)
    if source_dtype is not None and source_dtype != dtype:
        types = f"{types}+{_dtype(source_dtype)}"
    return _rows_class(width, rows, types)


# --- tables --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackendTable:
    """One loaded table: where it came from and its JSON data (see the module docstring)."""

    origin: str
    data: Mapping[str, Any]

    @property
    def device(self) -> str:
        return self.data["device"]

    @property
    def compute_capability(self) -> str | None:
        return self.data.get("compute_capability")

    def applies_to(self, device_name: str, compute_capability: str | None) -> bool:
        """Measured on a GPU of this name, or of this compute capability (the same architecture)."""
        if self.device == device_name:
            return True
        return compute_capability is not None and self.compute_capability == compute_capability

    def measurements(self, op: str, shape_class: str) -> list[Mapping[str, Any]]:
        return list(self.data.get("ops", {}).get(op, {}).get(shape_class, []))

    def decide(self, op: str, shape_class: str, available: Sequence[str]) -> str | None:
        """The fastest of ``available`` (in preference order) by this table's CUDA-graph times at
        ``shape_class``, or None when it measured none of them there."""
        timed = [m["graph_ms"] for m in self.measurements(op, shape_class) if m.get("graph_ms")]
        candidates = [b for b in available if timed and all(b in ms for ms in timed)]
        if not candidates:
            return None
        totals = {b: sum(ms[b] for ms in timed) for b in candidates}
        fastest = min(totals.values())
        return next(b for b in candidates if totals[b] <= fastest * (1 + TIE_FRACTION))


def _check_times(origin: str, where: str, times: object) -> None:
    if not isinstance(times, Mapping):
        raise ValueError(f"{origin}: {where} must be an object of backend -> ms, got {times!r}")
    for backend, ms in times.items():
        if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms):
            raise ValueError(f"{origin}: {where}[{backend!r}] must be a number, got {ms!r}")
        if ms <= 0:
            raise ValueError(f"{origin}: {where}[{backend!r}] must be positive, got {ms!r}")


def validate(data: object, origin: str = "the table") -> Mapping[str, Any]:
    """``data`` if it is a table of :data:`FORMAT`, else a ValueError naming ``origin`` and what
    is wrong."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{origin}: a backend table is a JSON object, got {type(data).__name__}")
    if data.get("format") != FORMAT:
        raise ValueError(f"{origin}: format must be {FORMAT}, got {data.get('format')!r}")
    if not isinstance(data.get("device"), str) or not data["device"]:
        raise ValueError(f"{origin}: device must name the GPU, got {data.get('device')!r}")
    ops = data.get("ops")
    if not isinstance(ops, Mapping):
        raise ValueError(f"{origin}: ops must be an object of op -> shape class, got {ops!r}")
    for op, classes in ops.items():
        if not isinstance(classes, Mapping):
            raise ValueError(f"{origin}: ops[{op!r}] must be an object of shape class -> list")
        for name, measurements in classes.items():
            where = f"ops[{op!r}][{name!r}]"
            if not isinstance(measurements, list):
                raise ValueError(f"{origin}: {where} must be a list of measurements")
            for i, measurement in enumerate(measurements):
                if not isinstance(measurement, Mapping):
                    raise ValueError(f"{origin}: {where}[{i}] must be an object")
                for key in TIME_KEYS:
                    if key in measurement:
                        _check_times(origin, f"{where}[{i}][{key!r}]", measurement[key])
                others = measurement.get("others", {})
                if not isinstance(others, Mapping):
                    raise ValueError(f"{origin}: {where}[{i}]['others'] must be an object")
                for provider, times in others.items():
                    place = f"{where}[{i}]['others'][{provider!r}]"
                    if not isinstance(times, Mapping):
                        raise ValueError(f"{origin}: {place} must be an object of *_ms -> ms")
                    _check_times(origin, place, {k: v for k, v in times.items() if k in TIME_KEYS})
    return data


def load(path: str | os.PathLike) -> BackendTable:
    """The table in the JSON file at ``path``. Raises OSError when it cannot be read, ValueError
    (naming the file) when it is not a table."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON: {error}") from error
    return BackendTable(str(path), validate(data, str(path)))


def write(data: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the table ``data`` (validated first) as JSON at ``path``, making its folder."""
    validate(data, str(path))
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=2) + "\n")
    return target


def user_table_path(device_name: str) -> Path:
    """Where ``dinov2-fast bench tune`` keeps the table of the GPU called ``device_name``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", device_name).strip("_") or "gpu"
    return Path(cache) / "dinov2_fast" / f"backend_table-{name}.json"


def shipped_path(name: str = SHIPPED_TABLES[0]) -> Path:
    """The path of a table shipped in this package (for ``bench tune --ship``)."""
    return Path(str(importlib.resources.files("dinov2_fast").joinpath(name)))


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=4)


def _try_load(path: Path, *, required: bool) -> BackendTable | None:
    """The table at ``path``; a missing optional file is None, any other failure a warning."""
    if not required and not path.exists():
        return None
    try:
        return load(path)
    except (OSError, ValueError) as error:
        _warn_once(f"backend table not used, backend='auto' falls back to its fixed order: {error}")
        return None


@functools.cache
def tables_for(device_name: str, compute_capability: str | None = None) -> tuple[BackendTable, ...]:
    """The tables that apply to this GPU, first the one that wins (see the module docstring)."""
    chosen = os.environ.get(ENV_TABLE, "")
    if chosen.strip().lower() == DISABLED:
        return ()
    found: list[BackendTable] = []
    if chosen:
        table = _try_load(Path(chosen), required=True)
        if table is not None and not table.applies_to(device_name, compute_capability):
            _warn_once(
                f"{ENV_TABLE}={chosen} was measured on {table.device} "
                f"(compute capability {table.compute_capability}); it does not apply to "
                f"{device_name} (compute capability {compute_capability})"
            )
        found.append(table)
    found.append(_try_load(user_table_path(device_name), required=False))
    for name in SHIPPED_TABLES:
        found.append(_try_load(shipped_path(name), required=False))
    return tuple(
        table
        for table in found
        if table is not None and table.applies_to(device_name, compute_capability)
    )


def choose(
    op: str,
    shape_class: str,
    available_backends: Iterable[str],
    device_name: str,
    compute_capability: str | None = None,
) -> str | None:
    """The fastest backend of ``available_backends`` (given in preference order) for ``op`` at
    ``shape_class`` on this GPU, by the first applicable table that measured any of them; None
    when no table did (then the preference order applies)."""
    available = tuple(available_backends)
    for table in tables_for(device_name, compute_capability):
        decided = table.decide(op, shape_class, available)
        if decided is not None:
            return decided
    return None


@functools.cache
def _identity(index: int) -> tuple[str, str]:
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), f"{major}.{minor}"


@functools.cache
def _cached_choice(op: str, shape_class: str, available: tuple[str, ...], index: int) -> str | None:
    return choose(op, shape_class, available, *_identity(index))


def auto_choice(
    op: str, shape_class: str, available: Sequence[str], device: torch.device
) -> str | None:
    """:func:`choose` for a CUDA ``device``, remembered per (op, class, backends, GPU): what
    ``_backend.resolve`` asks on every ``"auto"`` call."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cached_choice(op, shape_class, tuple(available), index)


def reload() -> None:
    """Forget the loaded tables and choices: the next call reads the files and the environment
    again (after ``bench tune`` wrote a table, or ``DINOV2_FAST_BACKEND_TABLE`` changed)."""
    for cached in (tables_for, _cached_choice, _identity, _warn_once):
        cached.cache_clear()
