"""LayerNorm over the last dimension in Triton: forward, and backward with deterministic dweight/dbias.

Layout: x is viewed as ``[M, D]`` rows with unit stride along ``D`` and any row stride. Every
program holds whole rows in registers (``BLOCK_D = next_pow2(D)``), so x is read once in the
forward and x, dy once each in the backward; statistics and all math are fp32.

Gathered (``index`` given, ``HAS_INDEX``): x is a sample tensor ``[B, N, D]`` (unit stride along D,
any strides along B and N) and the rows normalised are ``x[index[j], n]``, output row ``j·N + n``;
the gather is fused into the loads (no ``x[index]`` copy), and the backward writes dx rows back at
the gathered positions of a zero-filled ``[B, N, D]``.

The backward writes one fp32 partial row of dweight/dbias per program (programs walk a fixed set
of row blocks), then ``_layer_norm_bwd_dwdb`` sums the partial rows in a fixed order: the result is
the same bits run to run, with no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import AOT_DTYPE_NAMES
from ._indexing import AOT_DEFAULT_STAGES, aot_divisible, max_programs
from ._indexing import sample_rows as _sample_rows

MAX_DIM = 16384
# Elements one program keeps per tensor: rows per program are chosen to fill this, warps to give
# each thread about 8-16 of them.
_TILE_ELEMENTS = 4096
# The dweight/dbias reduction: partial rows summed BLOCK_P at a time over 256-column blocks.
_REDUCE_BLOCK_P = 32
_REDUCE_BLOCK_D = 256
_REDUCE_WARPS = 4


@triton.jit
def _layer_norm_fwd(
    X,
    Y,
    W,
    B,
    Mean,
    Rstd,
    Index,
    XOut,
    M,
    N,
    D,
    stride_x,
    stride_xb,
    stride_y,
    stride_xo,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    HAS_X_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < M
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    if HAS_INDEX:
        # Row j·N + n is x[index[j], n]: stride_x is the stride along N, stride_xb along B.
        _, n, b = _sample_rows(rows, row_ok, N, Index)
        x_rows = (b * stride_xb + n * stride_x)[:, None]
    else:
        x_rows = rows64 * stride_x
    x = tl.load(X + x_rows + cols[None, :], mask=mask, other=0.0)
    if HAS_X_OUT:
        # The gathered rows, compact, for the backward: written from registers, so gather and
        # LayerNorm read the stream once instead of twice.
        tl.store(XOut + rows64 * stride_xo + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)
    # Two passes over registers (mean, then centred variance): exact enough for fp32 residual streams.
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows64 * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_ok)
    tl.store(Rstd + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_dx(
    DY,
    X,
    W,
    Mean,
    Rstd,
    DX,
    Partial,
    Index,
    M,
    N,
    D,
    stride_dy,
    stride_x,
    stride_xb,
    stride_dx,
    stride_dxb,
    HAS_WEIGHT: tl.constexpr,
    NEED_PARTIAL: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    # A fixed, strided set of row blocks per program: the partial sums do not depend on timing.
    for block in range(pid, tl.cdiv(M, BLOCK_M), programs):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)[:, None]
        if HAS_INDEX:
            # x and dx are [B, N, D]: row j·N + n lives at sample index[j], token n.
            _, n, b = _sample_rows(rows, row_ok, N, Index)
            x_rows = (b * stride_xb + n * stride_x)[:, None]
            dx_rows = (b * stride_dxb + n * stride_dx)[:, None]
        else:
            x_rows = rows64 * stride_x
            dx_rows = rows64 * stride_dx
        x = tl.load(X + x_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_WEIGHT:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, axis=1) / D
        c2 = tl.sum(wdy, axis=1) / D
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + dx_rows + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_PARTIAL:
            dw_acc += tl.sum(dy * xhat, axis=0)
            db_acc += tl.sum(dy, axis=0)
    if NEED_PARTIAL:
        # Partial is [2, programs, D]: dweight partials, then dbias partials.
        tl.store(Partial + pid * D + cols, dw_acc, mask=col_ok)
        tl.store(Partial + (programs + pid) * D + cols, db_acc, mask=col_ok)


@triton.jit
def _layer_norm_bwd_dwdb(
    Partial,
    DW,
    DB,
    P,
    D,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    dw = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    db = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        parts = start + tl.arange(0, BLOCK_P)
        mask = (parts < P)[:, None] & col_ok[None, :]
        offsets = parts[:, None] * D + cols[None, :]
        if HAS_WEIGHT:
            dw += tl.load(Partial + offsets, mask=mask, other=0.0)
        if HAS_BIAS:
            db += tl.load(Partial + P * D + offsets, mask=mask, other=0.0)
    if HAS_WEIGHT:
        tl.store(DW + cols, tl.sum(dw, axis=0).to(DW.dtype.element_ty), mask=col_ok)
    if HAS_BIAS:
        tl.store(DB + cols, tl.sum(db, axis=0).to(DB.dtype.element_ty), mask=col_ok)


def _tile(dim: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) for a row width: whole rows, ~_TILE_ELEMENTS per program."""
    block_d = triton.next_power_of_2(dim)
    block_m = max(1, _TILE_ELEMENTS // block_d)
    elements = block_m * block_d
    num_warps = min(16, max(1, elements // 256))
    return block_m, block_d, num_warps


def _num_programs(device: torch.device, row_blocks: int) -> int:
    """Programs of the backward: enough to fill the GPU, few enough to keep partial rows cheap."""
    return max(1, min(row_blocks, max_programs(device)))


def _gathered_rows(x: torch.Tensor, index: torch.Tensor | None) -> tuple[int, int, int, int, int]:
    """(rows, N, D, stride along N or rows, stride along B) of plain ``[M, D]`` or gathered x."""
    if index is None:
        rows, dim = x.shape
        return rows, 1, dim, x.stride(0), 0
    _, tokens, dim = x.shape
    return index.numel() * tokens, tokens, dim, x.stride(1), x.stride(0)


def layer_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
    index: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    mean: torch.Tensor | None = None,
    rstd: torch.Tensor | None = None,
    x_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm forward of ``x: [M, D]`` rows, or with ``index: [k]`` (int32/int64, contiguous)
    of the gathered rows ``x[index[j], n]`` of a sample tensor ``x: [B, N, D]`` (row ``j·N + n``,
    ``M = k·N``). x has unit stride along D.

    Returns ``y: [M, D]`` (``out_dtype``), ``mean`` and ``rstd: [M]`` (fp32). Each may be given
    preallocated: ``y`` with unit stride along D and any row stride (a slice of a packed buffer;
    its own dtype is used), ``mean``/``rstd`` contiguous fp32; otherwise they are new and
    contiguous. ``x_out`` (``[M, D]`` in x's dtype, unit stride along D): also write the rows read
    there (the gathered rows, for a backward that should not keep all of x)."""
    rows, tokens, dim, stride_x, stride_xb = _gathered_rows(x, index)
    if y is None:
        y = torch.empty((rows, dim), dtype=out_dtype, device=x.device)
    if mean is None:
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rstd is None:
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, mean, rstd
    block_m, block_d, num_warps = _tile(dim)
    _layer_norm_fwd[(triton.cdiv(rows, block_m),)](
        x,
        y,
        weight,
        bias,
        mean,
        rstd,
        index,
        x_out,
        rows,
        tokens,
        dim,
        stride_x,
        stride_xb,
        y.stride(0),
        0 if x_out is None else x_out.stride(0),
        eps,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        HAS_INDEX=index is not None,
        HAS_X_OUT=x_out is not None,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return y, mean, rstd


def layer_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    has_bias: bool,
    param_dtype: torch.dtype,
    index: torch.Tensor | None = None,
    dx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """LayerNorm backward: ``dx`` in x's dtype, ``dweight``/``dbias: [D]`` in ``param_dtype``
    (None when there is no weight / bias). dy and x have unit stride along D.

    Plain: ``x, dy, dx: [M, D]``. Gathered (``index: [k]``, as in the forward): ``x: [B, N, D]``,
    ``dy: [k·N, D]``, and dx rows are written at x's gathered positions into ``dx: [B, N, D]``
    (given zero-filled, with unit stride along D, or new zeros); samples not in index keep their
    zeros. A given ``dx`` is used in the plain case too (unit stride along D, any row stride)."""
    rows, tokens, dim, stride_x, stride_xb = _gathered_rows(x, index)
    if dx is None:
        new = torch.empty if index is None else torch.zeros
        dx = new(x.shape, dtype=x.dtype, device=x.device)
    stride_dx, stride_dxb = (dx.stride(0), 0) if index is None else (dx.stride(1), dx.stride(0))
    has_weight = weight is not None
    dweight = torch.empty(dim, dtype=param_dtype, device=x.device) if has_weight else None
    dbias = torch.empty(dim, dtype=param_dtype, device=x.device) if has_bias else None
    need_partial = has_weight or has_bias
    if rows == 0:
        for grad in (dweight, dbias):
            if grad is not None:
                grad.zero_()
        return dx, dweight, dbias
    block_m, block_d, num_warps = _tile(dim)
    programs = _num_programs(x.device, triton.cdiv(rows, block_m))
    partial = (
        torch.empty((2, programs, dim), dtype=torch.float32, device=x.device)
        if need_partial
        else None
    )
    _layer_norm_bwd_dx[(programs,)](
        dy,
        x,
        weight,
        mean,
        rstd,
        dx,
        partial,
        index,
        rows,
        tokens,
        dim,
        dy.stride(0),
        stride_x,
        stride_xb,
        stride_dx,
        stride_dxb,
        HAS_WEIGHT=has_weight,
        NEED_PARTIAL=need_partial,
        HAS_INDEX=index is not None,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    if need_partial:
        reduce_block_d = min(_REDUCE_BLOCK_D, block_d)
        _layer_norm_bwd_dwdb[(triton.cdiv(dim, reduce_block_d),)](
            partial,
            dweight,
            dbias,
            programs,
            dim,
            HAS_WEIGHT=has_weight,
            HAS_BIAS=has_bias,
            BLOCK_P=_REDUCE_BLOCK_P,
            BLOCK_D=reduce_block_d,
            num_warps=_REDUCE_WARPS,
        )
    return dx, dweight, dbias


def aot_configurations():
    """Yield ``(kernel, signature, constexprs, num_warps, num_stages, divisible_by_16)`` for every
    configuration the launchers can pick, for ahead-of-time compiles without a GPU: each tile (one
    per power-of-two width up to MAX_DIM) with bf16 rows and fp32 parameters, plain and gathered
    (int64 index), and every dtype and flag combination at D=1024, plain and gathered with either
    index dtype. Specialized as a usual call is: pointers 16-byte aligned, and D and the strides
    multiples of 16 when the width is (the JIT then pipelines the backward's row loop through
    shared memory, which is what the compile test must see)."""
    for kernel, signature, constexprs, num_warps in _aot_cases():
        divisible = aot_divisible(signature, constexprs["BLOCK_D"] >= 16)
        yield kernel, signature, constexprs, num_warps, AOT_DEFAULT_STAGES, divisible


def _aot_cases():
    bf16, fp32 = "bf16", "fp32"
    cases = [
        (d, bf16, bf16, fp32, True, True, index_dt)
        for d in (2**i for i in range(15))
        for index_dt in (None, "i64")
    ]
    for x_dt in AOT_DTYPE_NAMES.values():
        for y_dt in AOT_DTYPE_NAMES.values():
            for has_weight in (False, True):
                for has_bias in (False, True):
                    for index_dt in (None, "i32", "i64"):
                        cases.append((1024, x_dt, y_dt, x_dt, has_weight, has_bias, index_dt))
    reduce_blocks = set()
    for dim, x_dt, y_dt, w_dt, has_weight, has_bias, index_dt in cases:
        block_m, block_d, num_warps = _tile(dim)
        weight_sig = f"*{w_dt}" if has_weight else "constexpr"
        bias_sig = f"*{w_dt}" if has_bias else "constexpr"
        index_sig = "constexpr" if index_dt is None else f"*{index_dt}"
        tiles = {"BLOCK_M": block_m, "BLOCK_D": block_d}
        need_partial = has_weight or has_bias
        # Gathered rows are also written out compact (ops.index_select_layer_norm does that).
        gathered = index_dt is not None
        absent = {
            name: None
            for name, present in (
                ("W", has_weight),
                ("B", has_bias),
                ("Index", gathered),
                ("XOut", gathered),
            )
            if not present
        }
        yield (
            _layer_norm_fwd,
            {"X": f"*{x_dt}", "Y": f"*{y_dt}", "W": weight_sig, "B": bias_sig, "Mean": "*fp32",
             "Rstd": "*fp32", "Index": index_sig, "XOut": f"*{x_dt}" if gathered else "constexpr",
             "M": "i32", "N": "i32", "D": "i32", "stride_x": "i32", "stride_xb": "i32",
             "stride_y": "i32", "stride_xo": "i32", "eps": "fp32", "HAS_WEIGHT": "constexpr",
             "HAS_BIAS": "constexpr", "HAS_INDEX": "constexpr", "HAS_X_OUT": "constexpr",
             "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"},
            {**absent, "HAS_WEIGHT": has_weight, "HAS_BIAS": has_bias, "HAS_INDEX": gathered,
             "HAS_X_OUT": gathered, **tiles},
            num_warps,
        )  # fmt: skip
        yield (
            _layer_norm_bwd_dx,
            {"DY": f"*{y_dt}", "X": f"*{x_dt}", "W": weight_sig, "Mean": "*fp32", "Rstd": "*fp32",
             "DX": f"*{x_dt}", "Partial": "*fp32" if need_partial else "constexpr",
             "Index": index_sig, "M": "i32", "N": "i32", "D": "i32", "stride_dy": "i32",
             "stride_x": "i32", "stride_xb": "i32", "stride_dx": "i32", "stride_dxb": "i32",
             "HAS_WEIGHT": "constexpr", "NEED_PARTIAL": "constexpr", "HAS_INDEX": "constexpr",
             "BLOCK_M": "constexpr", "BLOCK_D": "constexpr"},
            {**({} if has_weight else {"W": None}), **({} if need_partial else {"Partial": None}),
             **({} if index_dt is not None else {"Index": None}),
             "HAS_WEIGHT": has_weight, "NEED_PARTIAL": need_partial,
             "HAS_INDEX": index_dt is not None, **tiles},
            num_warps,
        )  # fmt: skip
        reduce_key = (min(_REDUCE_BLOCK_D, block_d), w_dt, has_weight, has_bias)
        if need_partial and reduce_key not in reduce_blocks:
            reduce_blocks.add(reduce_key)
            yield (
                _layer_norm_bwd_dwdb,
                {"Partial": "*fp32", "DW": weight_sig, "DB": bias_sig, "P": "i32", "D": "i32",
                 "HAS_WEIGHT": "constexpr", "HAS_BIAS": "constexpr", "BLOCK_P": "constexpr",
                 "BLOCK_D": "constexpr"},
                {**({} if has_weight else {"DW": None}), **({} if has_bias else {"DB": None}),
                 "HAS_WEIGHT": has_weight, "HAS_BIAS": has_bias, "BLOCK_P": _REDUCE_BLOCK_P,
                 "BLOCK_D": reduce_key[0]},
                _REDUCE_WARPS,
            )  # fmt: skip
