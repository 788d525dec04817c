"""Helpers shared by the kernels that gather or scatter whole samples of ``[B, N, D]`` tensors.

A *sample tensor* is ``[B, N, D]`` with unit stride along ``D`` and any strides along ``B`` and
``N``. The indexed kernels (``index_select_cat``, ``scaled_index_add``, the gathered LayerNorm) view
one as flat rows ``r = sample · N + n`` and tile ``[BLOCK_R, BLOCK_D]`` blocks of those rows; each
row finds its partner sample through an index (``index[j] = b``) or its inverse (``inv[b] = j``,
``-1`` when b is not indexed). A row block may straddle samples, so small ``N`` (even ``N = 1``)
still fills whole tiles.

- ``inverse_index``: ``inv: [size]`` int32 from ``index: [k]`` in one launch. Each program owns a
  block of b values and scans the whole index comparing: ``O(size · k)`` comparisons, trivial for
  batch-sized ``size`` and cheaper than a fill launch plus a scatter launch.
- ``sum_partial_rows``: ``out = partial.sum(0)`` in a fixed order (the second step of a
  deterministic column reduction whose first step writes one fp32 partial row per program).
- ``sample_rows`` (device function): decode flat rows into (sample, token, partner sample).
- ``row_tile``, ``max_programs``: tile and program-count choices of the indexed kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import AOT_DTYPE_NAMES

# Elements of one [BLOCK_R, BLOCK_D] tile: 32 per thread at 4 warps, i.e. four to eight 16-byte
# vectors per thread and tensor in flight. Measured on an H100 (triton 3.6, [128-512, 257, 1024]
# and [1024, 257, 384], bf16 and fp32): 2.5-2.9 TB/s for every kernel; 8 warps is the same except
# for the backward with grad_scaling (~10% slower), 2048- and 8192-element tiles no faster.
_TILE_ELEMENTS = 4096
_TILE_WARPS = 4
# Widest column block; wider rows take several column blocks (grid axis 1).
_MAX_BLOCK_D = 1024
# A column block narrower than the row still wastes nothing when it divides D exactly (384 = 3 x
# 128): preferred over a padded power of two when at least this wide.
_MIN_DIVISOR_BLOCK_D = 64

# inverse_index: BLOCK_B b values compared against BLOCK_K index entries per step.
_INVERSE_BLOCK_B = 32
_INVERSE_BLOCK_K = 128
_INVERSE_WARPS = 4
# sum_partial_rows: partial rows summed BLOCK_P at a time over 32-column blocks (one 128-byte line
# per row): narrow blocks give D / 32 programs, so the few hundred partial rows of a GPU-wide
# reduction are read in parallel rather than by a handful of programs.
_REDUCE_BLOCK_P = 128
_REDUCE_BLOCK_D = 32
_REDUCE_WARPS = 4


# --- device helpers --------------------------------------------------------------------------------


@triton.jit
def sample_rows(rows, row_ok, N, Map):
    """Decode flat rows ``r = outer · N + n`` into ``(outer, n, partner)`` with ``partner =
    Map[outer]`` (int64; ``-1`` for rows past the end). ``Map`` is an index or an inverse index."""
    outer = rows // N
    n = rows - outer * N
    partner = tl.load(Map + outer, mask=row_ok, other=-1).to(tl.int64)
    return outer.to(tl.int64), n.to(tl.int64), partner


# --- kernels ---------------------------------------------------------------------------------------


@triton.jit
def _inverse_index(
    Index,
    Inv,
    K,
    SIZE,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    # Indices are unique, so at most one j matches each b: the max over matches is that j.
    inv = tl.full((BLOCK_B,), -1, dtype=tl.int32)
    for start in range(0, K, BLOCK_K):
        j = start + tl.arange(0, BLOCK_K)
        idx = tl.load(Index + j, mask=j < K, other=-1).to(tl.int64)
        match = idx[None, :] == b.to(tl.int64)[:, None]
        inv = tl.maximum(inv, tl.max(tl.where(match, j[None, :], -1), axis=1))
    tl.store(Inv + b, inv, mask=b < SIZE)


@triton.jit
def _sum_partial_rows(
    Partial,
    Out,
    P,
    D,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    # Fixed order: BLOCK_P lanes accumulate strided rows, then one tree sum; no atomics.
    for start in range(0, P, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P)
        mask = (parts < P)[:, None] & col_ok[None, :]
        offsets = parts.to(tl.int64)[:, None] * D + cols[None, :]
        acc += tl.load(Partial + offsets, mask=mask, other=0.0)
    tl.store(Out + cols, tl.sum(acc, axis=0).to(Out.dtype.element_ty), mask=col_ok)


# --- launchers -------------------------------------------------------------------------------------


def row_tile(dim: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) of the indexed kernels for a row width D."""
    block_d = min(triton.next_power_of_2(dim), _MAX_BLOCK_D)
    divisor = dim & -dim  # the largest power of two dividing D
    if _MIN_DIVISOR_BLOCK_D <= divisor < block_d:
        block_d = divisor
    return max(1, _TILE_ELEMENTS // block_d), block_d, _TILE_WARPS


def row_tiles() -> list[tuple[int, int, int]]:
    """Every tile ``row_tile`` can return (for ahead-of-time compiles)."""
    return sorted({row_tile(2**i) for i in range(15)})


def max_programs(device: torch.device) -> int:
    """Programs of a deterministic column reduction: enough to fill the GPU, few enough to keep the
    partial rows cheap to sum."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter runs programs one by one


def inverse_index(index: torch.Tensor, size: int) -> torch.Tensor:
    """``inv: [size]`` int32 with ``inv[index[j]] = j`` and ``-1`` elsewhere, from ``index: [k]``
    (int32 or int64, unique, in ``[0, size)``, contiguous)."""
    inv = torch.empty(size, dtype=torch.int32, device=index.device)
    if size == 0:
        return inv
    _inverse_index[(triton.cdiv(size, _INVERSE_BLOCK_B),)](
        index,
        inv,
        index.numel(),
        size,
        BLOCK_B=_INVERSE_BLOCK_B,
        BLOCK_K=_INVERSE_BLOCK_K,
        num_warps=_INVERSE_WARPS,
    )
    return inv


def sum_partial_rows(partial: torch.Tensor, out: torch.Tensor) -> None:
    """``out[:] = partial.sum(0)`` rounded to out's dtype, in a fixed order (same bits run to run).
    ``partial: [P, D]`` fp32 contiguous with ``P >= 1``; ``out: [D]`` with unit stride."""
    parts, dim = partial.shape
    if dim == 0:
        return
    block_d = min(_REDUCE_BLOCK_D, triton.next_power_of_2(dim))
    _sum_partial_rows[(triton.cdiv(dim, block_d),)](
        partial,
        out,
        parts,
        dim,
        BLOCK_P=_REDUCE_BLOCK_P,
        BLOCK_D=block_d,
        num_warps=_REDUCE_WARPS,
    )


# --- ahead-of-time compiles ------------------------------------------------------------------------

# What the launchers get when they pass no num_stages (Triton's default for CUDA).
AOT_DEFAULT_STAGES = 3


def aot_divisible(signature: dict[str, str], wide: bool) -> tuple[str, ...]:
    """The arguments a usual call has as multiples of 16, as the JIT specializes them: pointers
    (16-byte aligned), and ``D`` and the strides when the row width is a multiple of 16 (``wide``);
    loads are vectorized only with that knowledge, so the compile test must see it."""
    return tuple(
        name
        for name, kind in signature.items()
        if kind.startswith("*") or (wide and (name == "D" or name.startswith("stride_")))
    )


def aot_configurations():
    """Yield ``(kernel, signature, constexprs, num_warps, num_stages, divisible_by_16)`` for every
    configuration the launchers here can pick: both index dtypes for ``_inverse_index``, every
    output dtype and column block for ``_sum_partial_rows``."""
    for index_dt in ("i32", "i64"):
        signature = {"Index": f"*{index_dt}", "Inv": "*i32", "K": "i32", "SIZE": "i32",
                     "BLOCK_B": "constexpr", "BLOCK_K": "constexpr"}  # fmt: skip
        constexprs = {"BLOCK_B": _INVERSE_BLOCK_B, "BLOCK_K": _INVERSE_BLOCK_K}
        yield (
            _inverse_index,
            signature,
            constexprs,
            _INVERSE_WARPS,
            AOT_DEFAULT_STAGES,
            aot_divisible(signature, False),
        )
    for out_dt in AOT_DTYPE_NAMES.values():
        for block_d in sorted({min(_REDUCE_BLOCK_D, 2**i) for i in range(15)}):
            signature = {"Partial": "*fp32", "Out": f"*{out_dt}", "P": "i32", "D": "i32",
                         "BLOCK_P": "constexpr", "BLOCK_D": "constexpr"}  # fmt: skip
            yield (
                _sum_partial_rows,
                signature,
                {"BLOCK_P": _REDUCE_BLOCK_P, "BLOCK_D": block_d},
                _REDUCE_WARPS,
                AOT_DEFAULT_STAGES,
                aot_divisible(signature, block_d >= 16),
            )
