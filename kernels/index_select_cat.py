"""Gather whole samples of a ``[B, N, D]`` tensor by index, and the scatter that undoes it.

- ``index_select_rows``: ``out[j] = source[index[j]]`` into a preallocated ``out: [k, N, D]``
  (typically a view into the flat buffer that packs several sources back to back, the forward of
  ``index_select_cat``).
- ``index_scatter_rows``: its backward, ``result[index[j]] = grad[j]`` and zero elsewhere, written
  in one pass over the result through the inverse index (no zero fill, then scatter).

Both are the one kernel ``_index_copy_rows``: every destination row ``(s, n)`` copies source row
``(map[s], n)``, or writes zeros when ``map[s] = -1``. ``map`` is the index for the gather and the
inverse index for the scatter. Programs own ``[BLOCK_R, BLOCK_D]`` tiles of the destination's flat
rows (``_indexing.row_tile``); loads and stores are 16-byte vectors along the unit-stride ``D`` when
D and the strides are multiples of 16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import AOT_DTYPE_NAMES
from ._indexing import AOT_DEFAULT_STAGES, aot_divisible, inverse_index, row_tile, row_tiles
from ._indexing import sample_rows as _sample_rows


@triton.jit
def _index_copy_rows(
    Src,
    Dst,
    Map,
    R,
    N,
    D,
    stride_src_b,
    stride_src_n,
    stride_dst_b,
    stride_dst_n,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < R
    mask = row_ok[:, None] & (cols < D)[None, :]
    dst_sample, n, src_sample = _sample_rows(rows, row_ok, N, Map)
    # A destination sample without a source (map = -1) reads nothing and is written zero.
    src = Src + (src_sample * stride_src_b + n * stride_src_n)[:, None] + cols[None, :]
    value = tl.load(src, mask=mask & (src_sample >= 0)[:, None], other=0.0)
    dst = Dst + (dst_sample * stride_dst_b + n * stride_dst_n)[:, None] + cols[None, :]
    tl.store(dst, value.to(Dst.dtype.element_ty), mask=mask)


def _copy_rows(src: torch.Tensor, dst: torch.Tensor, map_: torch.Tensor) -> None:
    """``dst[s] = src[map_[s]]`` (zero where ``map_[s] = -1``) for every sample s of dst."""
    samples, tokens, dim = dst.shape
    rows = samples * tokens
    if rows == 0 or dim == 0:
        return
    block_r, block_d, num_warps = row_tile(dim)
    _index_copy_rows[(triton.cdiv(rows, block_r), triton.cdiv(dim, block_d))](
        src,
        dst,
        map_,
        rows,
        tokens,
        dim,
        src.stride(0),
        src.stride(1),
        dst.stride(0),
        dst.stride(1),
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )


def index_select_rows(source: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """``out[j] = source[index[j]]``, cast to out's dtype.

    ``source: [B, N, D]`` and ``out: [k, N, D]`` have unit stride along D and any strides along the
    first two axes; ``index: [k]`` int32 or int64, contiguous, in ``[0, B)``."""
    _copy_rows(source, out, index)


def index_scatter_rows(
    grad: torch.Tensor, index: torch.Tensor, size: int, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``result: [size, N, D]`` with ``result[index[j]] = grad[j]`` and zero for every sample not
    in index; every element written once. ``grad: [k, N, D]`` (unit stride along D); ``index:
    [k]`` unique, int32 or int64, contiguous. ``result`` is a new contiguous tensor in grad's dtype,
    or ``out`` (unit stride along D, any other strides) when given."""
    _, tokens, dim = grad.shape
    if out is None:
        out = torch.empty((size, tokens, dim), dtype=grad.dtype, device=grad.device)
    if out.numel() == 0:
        return out
    _copy_rows(grad, out, inverse_index(index, size))
    return out


def aot_configurations():
    """Yield ``(kernel, signature, constexprs, num_warps, num_stages, divisible_by_16)`` for every
    configuration the launchers can pick: every tile with bf16 data and an int64 index, and every
    (source, destination) dtype pair with both index dtypes for the tile of D = 1024."""
    cases = [(tile, "bf16", "bf16", "i64") for tile in row_tiles()]
    for src_dt in AOT_DTYPE_NAMES.values():
        for dst_dt in AOT_DTYPE_NAMES.values():
            for index_dt in ("i32", "i64"):
                cases.append((row_tile(1024), src_dt, dst_dt, index_dt))
    for (block_r, block_d, num_warps), src_dt, dst_dt, index_dt in cases:
        signature = {"Src": f"*{src_dt}", "Dst": f"*{dst_dt}", "Map": f"*{index_dt}", "R": "i32",
                     "N": "i32", "D": "i32", "stride_src_b": "i32", "stride_src_n": "i32",
                     "stride_dst_b": "i32", "stride_dst_n": "i32", "BLOCK_R": "constexpr",
                     "BLOCK_D": "constexpr"}  # fmt: skip
        yield (
            _index_copy_rows,
            signature,
            {"BLOCK_R": block_r, "BLOCK_D": block_d},
            num_warps,
            AOT_DEFAULT_STAGES,
            aot_divisible(signature, block_d >= 16),
        )
