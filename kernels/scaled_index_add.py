"""Scaled index add on whole samples: ``x[index[j]] += alpha · scaling · source[j]``.

In a transformer block with stochastic depth this is the fused residual update: x is the
residual stream ``[B, N, D]``, source the branch output on the k kept samples, scaling the
LayerScale gamma ``[D]`` and ``alpha = B / k``. All math is fp32; the sum is rounded once to x's
dtype. x, source, scaling and the gradient may all have different dtypes.

- ``scaled_index_add_fwd(inplace=False)``: a new ``[B, N, D]`` tensor in one pass over x: rows
  walk x, and the inverse index (``inv[b] = j`` or ``-1``) says which source sample, if any, to
  add. ``inplace=True``: rows walk the source and add into ``x[index[j]]``; the other samples
  are not touched.
- ``scaled_index_add_bwd``: ``grad_source[j] = alpha · scaling · grad_out[index[j]]`` and
  ``grad_scaling = alpha · Σ_{j,n} grad_out[index[j], n] · source[j, n]`` from one pass over the
  gathered gradient. ``grad_scaling`` is deterministic: a fixed grid of programs walks a fixed set
  of row blocks each and writes one fp32 partial row, then ``_indexing.sum_partial_rows`` sums
  the partial rows in a fixed order (as LayerNorm's dweight; no atomics).

Tiles are ``[BLOCK_R, BLOCK_D]`` blocks of flat rows ``(sample, n)`` (``_indexing.row_tile``), with
16-byte vectors along the unit-stride ``D``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import AOT_DTYPE_NAMES
from ._indexing import (
    AOT_DEFAULT_STAGES,
    aot_divisible,
    inverse_index,
    max_programs,
    row_tile,
    row_tiles,
    sum_partial_rows,
)
from ._indexing import sample_rows as _sample_rows


@triton.jit
def _scaled_index_add_fwd(
    X,
    Out,
    Source,
    Scaling,
    Map,
    R,
    N,
    D,
    alpha,
    stride_xb,
    stride_xn,
    stride_ob,
    stride_on,
    stride_sb,
    stride_sn,
    HAS_SCALING: tl.constexpr,
    INPLACE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < R
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    outer, n, partner = _sample_rows(rows, row_ok, N, Map)
    if INPLACE:
        # Rows walk the source (Map is the index): only the indexed samples of x are touched.
        b = partner
        j = outer
        has_source = row_ok
    else:
        # Rows walk x (Map is the inverse index): every output row is written once.
        b = outer
        j = partner
        has_source = partner >= 0
    factor = tl.full((BLOCK_D,), alpha, dtype=tl.float32)
    if HAS_SCALING:
        factor = factor * tl.load(Scaling + cols, mask=col_ok, other=0.0).to(tl.float32)
    x = tl.load(X + (b * stride_xb + n * stride_xn)[:, None] + cols[None, :], mask=mask, other=0.0)
    src_ptrs = Source + (j * stride_sb + n * stride_sn)[:, None] + cols[None, :]
    src = tl.load(src_ptrs, mask=mask & has_source[:, None], other=0.0).to(tl.float32)
    # Rows without a source keep x's bits exactly (x + 0 would turn -0.0 into +0.0).
    y = tl.where(has_source[:, None], x.to(tl.float32) + factor[None, :] * src, x)
    out_ptrs = Out + (b * stride_ob + n * stride_on)[:, None] + cols[None, :]
    tl.store(out_ptrs, y.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _scaled_index_add_bwd(
    GradOut,
    Source,
    Scaling,
    Index,
    GradSource,
    Partial,
    R,
    N,
    D,
    alpha,
    stride_gb,
    stride_gn,
    stride_sb,
    stride_sn,
    HAS_SCALING: tl.constexpr,
    NEED_SOURCE_GRAD: tl.constexpr,
    NEED_SCALING_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    factor = tl.full((BLOCK_D,), alpha, dtype=tl.float32)
    if HAS_SCALING:
        factor = factor * tl.load(Scaling + cols, mask=col_ok, other=0.0).to(tl.float32)
    # Summed over rows once, after the loop: no cross-warp reduction per row block.
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    # A fixed, strided set of row blocks per program: the partial sums do not depend on timing.
    for block in range(pid, tl.cdiv(R, BLOCK_R), programs):
        rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        mask = row_ok[:, None] & col_ok[None, :]
        j, n, b = _sample_rows(rows, row_ok, N, Index)
        # grad_out may be expanded (stride 0 along B or N): read through its strides.
        grad_ptrs = GradOut + (b * stride_gb + n * stride_gn)[:, None] + cols[None, :]
        grad = tl.load(grad_ptrs, mask=mask, other=0.0).to(tl.float32)
        if NEED_SOURCE_GRAD:
            # grad_source is a new contiguous [k, N, D]: flat row r starts at r * D.
            dst = GradSource + rows.to(tl.int64)[:, None] * D + cols[None, :]
            tl.store(dst, (grad * factor[None, :]).to(GradSource.dtype.element_ty), mask=mask)
        if NEED_SCALING_GRAD:
            src_ptrs = Source + (j * stride_sb + n * stride_sn)[:, None] + cols[None, :]
            acc += grad * tl.load(src_ptrs, mask=mask, other=0.0).to(tl.float32)
    if NEED_SCALING_GRAD:
        tl.store(Partial + pid * D + cols, tl.sum(acc, axis=0) * alpha, mask=col_ok)


def scaled_index_add_fwd(
    x: torch.Tensor,
    index: torch.Tensor,
    source: torch.Tensor,
    scaling: torch.Tensor | None,
    alpha: float,
    *,
    inplace: bool,
) -> torch.Tensor:
    """``x[index[j]] + alpha · scaling · source[j]`` for every j, other samples of x unchanged.

    ``x: [B, N, D]``, ``source: [k, N, D]`` (unit stride along D, any other strides), ``index:
    [k]`` unique int32/int64 in ``[0, B)`` (contiguous), ``scaling: [D]`` (unit stride) or None
    for 1. ``inplace=False`` returns a new contiguous tensor in x's dtype; ``inplace=True`` adds
    into x and returns it."""
    batch, tokens, dim = x.shape
    samples = index.numel()
    if inplace:
        out, map_, rows = x, index, samples * tokens
    else:
        out = torch.empty((batch, tokens, dim), dtype=x.dtype, device=x.device)
        map_, rows = None, batch * tokens
    if rows == 0 or dim == 0:
        return out
    if map_ is None:
        map_ = inverse_index(index, batch)
    block_r, block_d, num_warps = row_tile(dim)
    _scaled_index_add_fwd[(triton.cdiv(rows, block_r), triton.cdiv(dim, block_d))](
        x,
        out,
        source,
        scaling,
        map_,
        rows,
        tokens,
        dim,
        float(alpha),
        x.stride(0),
        x.stride(1),
        out.stride(0),
        out.stride(1),
        source.stride(0),
        source.stride(1),
        HAS_SCALING=scaling is not None,
        INPLACE=inplace,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return out


def scaled_index_add_bwd(
    grad_out: torch.Tensor,
    index: torch.Tensor,
    source: torch.Tensor,
    scaling: torch.Tensor | None,
    alpha: float,
    need_source_grad: bool,
    need_scaling_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(grad_source, grad_scaling)`` of ``scaled_index_add_fwd``; None for one not needed (and
    ``grad_scaling`` None when scaling is None).

    ``grad_out: [B, N, D]`` (unit stride along D; any strides along B and N, 0 included),
    ``source: [k, N, D]`` (unit stride along D), ``index: [k]`` contiguous. ``grad_source: [k, N,
    D]`` is contiguous in source's dtype, ``grad_scaling: [D]`` in scaling's dtype, accumulated in
    fp32 and the same bits run to run."""
    samples, tokens, dim = source.shape
    need_scaling_grad = need_scaling_grad and scaling is not None
    grad_source = (
        torch.empty((samples, tokens, dim), dtype=source.dtype, device=source.device)
        if need_source_grad
        else None
    )
    grad_scaling = (
        torch.empty(dim, dtype=scaling.dtype, device=scaling.device) if need_scaling_grad else None
    )
    rows = samples * tokens
    if rows == 0 or dim == 0:
        if grad_scaling is not None:
            grad_scaling.zero_()
        return grad_source, grad_scaling
    if not (need_source_grad or need_scaling_grad):
        return None, None
    block_r, block_d, num_warps = row_tile(dim)
    row_blocks = triton.cdiv(rows, block_r)
    col_blocks = triton.cdiv(dim, block_d)
    if need_scaling_grad:
        # About max_programs programs in all, each owning one column block of a partial row.
        programs = max(1, min(row_blocks, triton.cdiv(max_programs(source.device), col_blocks)))
        partial = torch.empty((programs, dim), dtype=torch.float32, device=source.device)
    else:
        programs, partial = row_blocks, None  # no reduction: one row block per program
    _scaled_index_add_bwd[(programs, col_blocks)](
        grad_out,
        source,
        scaling,
        index,
        grad_source,
        partial,
        rows,
        tokens,
        dim,
        float(alpha),
        grad_out.stride(0),
        grad_out.stride(1),
        source.stride(0),
        source.stride(1),
        HAS_SCALING=scaling is not None,
        NEED_SOURCE_GRAD=need_source_grad,
        NEED_SCALING_GRAD=need_scaling_grad,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    if need_scaling_grad:
        sum_partial_rows(partial, grad_scaling)
    return grad_source, grad_scaling


def aot_configurations():
    """Yield ``(kernel, signature, constexprs, num_warps, num_stages, divisible_by_16)`` for every
    configuration the launchers can pick: every tile with a bf16 source, fp32 x / gradient and
    scaling and an int64 index (all flags); and, for the tile of D = 1024, every dtype of x and
    source, with and without scaling, both index dtypes. ``_indexing`` compiles its own kernels."""
    fwd_cases = []
    bwd_cases = []
    for tile in row_tiles():
        for inplace in (False, True):
            fwd_cases.append((tile, "fp32", "bf16", "fp32", "i64", inplace))
        for need_source, need_scaling in ((True, False), (False, True), (True, True)):
            bwd_cases.append((tile, "fp32", "bf16", "fp32", "i64", need_source, need_scaling))
    tile = row_tile(1024)
    for x_dt in AOT_DTYPE_NAMES.values():
        for src_dt in AOT_DTYPE_NAMES.values():
            for scale_dt in (None, src_dt):
                for index_dt in ("i32", "i64"):
                    # Out of place, the map is the int32 inverse index whatever the index dtype.
                    for inplace in (True,) if index_dt == "i32" else (False, True):
                        fwd_cases.append((tile, x_dt, src_dt, scale_dt, index_dt, inplace))
                    for need_source, need_scaling in ((True, False), (True, scale_dt is not None)):
                        bwd_cases.append(
                            (tile, x_dt, src_dt, scale_dt, index_dt, need_source, need_scaling)
                        )
    for (block_r, block_d, num_warps), x_dt, src_dt, scale_dt, index_dt, inplace in fwd_cases:
        scale_sig = "constexpr" if scale_dt is None else f"*{scale_dt}"
        signature = {"X": f"*{x_dt}", "Out": f"*{x_dt}", "Source": f"*{src_dt}",
                     "Scaling": scale_sig, "Map": f"*{index_dt}" if inplace else "*i32",
                     "R": "i32", "N": "i32", "D": "i32", "alpha": "fp32", "stride_xb": "i32",
                     "stride_xn": "i32", "stride_ob": "i32", "stride_on": "i32", "stride_sb": "i32",
                     "stride_sn": "i32", "HAS_SCALING": "constexpr", "INPLACE": "constexpr",
                     "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"}  # fmt: skip
        constexprs = {**({"Scaling": None} if scale_dt is None else {}),
                      "HAS_SCALING": scale_dt is not None, "INPLACE": inplace,
                      "BLOCK_R": block_r, "BLOCK_D": block_d}  # fmt: skip
        yield (
            _scaled_index_add_fwd,
            signature,
            constexprs,
            num_warps,
            AOT_DEFAULT_STAGES,
            aot_divisible(signature, block_d >= 16),
        )
    for case in bwd_cases:
        (block_r, block_d, num_warps), x_dt, src_dt, scale_dt, index_dt, need_src, need_scale = case
        absent = {
            name: None
            for name, present in (
                ("Scaling", scale_dt is not None),
                ("GradSource", need_src),
                ("Partial", need_scale),
            )
            if not present
        }
        signature = {"GradOut": f"*{x_dt}", "Source": f"*{src_dt}",
                     "Scaling": "constexpr" if scale_dt is None else f"*{scale_dt}",
                     "Index": f"*{index_dt}",
                     "GradSource": f"*{src_dt}" if need_src else "constexpr",
                     "Partial": "*fp32" if need_scale else "constexpr", "R": "i32", "N": "i32",
                     "D": "i32", "alpha": "fp32", "stride_gb": "i32", "stride_gn": "i32",
                     "stride_sb": "i32", "stride_sn": "i32", "HAS_SCALING": "constexpr",
                     "NEED_SOURCE_GRAD": "constexpr", "NEED_SCALING_GRAD": "constexpr",
                     "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"}  # fmt: skip
        constexprs = {**absent, "HAS_SCALING": scale_dt is not None, "NEED_SOURCE_GRAD": need_src,
                      "NEED_SCALING_GRAD": need_scale, "BLOCK_R": block_r,
                      "BLOCK_D": block_d}  # fmt: skip
        yield (
            _scaled_index_add_bwd,
            signature,
            constexprs,
            num_warps,
            AOT_DEFAULT_STAGES,
            aot_divisible(signature, block_d >= 16),
        )
