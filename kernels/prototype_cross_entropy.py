"""Soft-target cross-entropy over K prototypes in Triton, never materialising the ``[R, K]`` logits.

The DINO / iBOT head's last layer and loss in one: student logits ``s = xs wsᵀ`` and teacher logits
``t = xt wtᵀ`` (``xs, xt: [R, F]`` rows, ``ws, wt: [K, F]`` prototypes), teacher probabilities
``p = softmax(t/τt + u)`` per row (``u: [K]`` a bias: ``−center/τt`` for centering, Sinkhorn-Knopp's
log column scaling, or zeros), and per row

    CE_r = Σ_k p[r,k] · (−log_softmax(s[r]/τs)[k]) = lse_k(s[r]/τs) − Σ_k p[r,k] s[r,k]/τs.

Every kernel computes ``[BLOCK_R, BLOCK_K]`` tiles of s and t over the whole feature width ``F``,
held as up to four column chunks of ``BLOCK_F`` (64 or 128: F = 384 is three chunks of 128, no
padding; F = 7 is one chunk of 64, masked; F <= 512), and keeps softmax statistics online (running
max, rescaled sums; ``exp2`` with log2(e) folded into the scales), so nothing of size ``R × K``
exists anywhere.

Kernels (all accumulators and statistics fp32):

- ``_pce_fwd_rows`` (grid ``row blocks × K splits``): for one row block and one contiguous range of
  K blocks, the teacher's running (max, sum) of ``t/τt + u`` and, in the loss pass, the student's
  (max, sum) of ``s/τs`` and ``Σ exp(t/τt + u − max)·s/τs``, rescaled with the teacher's max, as
  partial statistics ``[5, splits, R]``; the loss pass also writes the column sums of t over its
  rows (``[row blocks, K]``, for the teacher-logit mean, reduced afterwards in a fixed order).
  Splitting K keeps the GPU busy when there are few row blocks (2816 rows are 44 blocks of 64).
  Without the student, the same kernel is Sinkhorn-Knopp's row pass.
- ``_pce_fwd_combine`` (one program): merges the splits per row into ``lse_t`` and ``lse_s``
  (natural log) and sums ``w_r · CE_r`` into the loss, in a fixed order.
- ``_pce_sinkhorn_cols`` (grid K blocks): Sinkhorn-Knopp's column pass, the running (max, sum) of
  ``t/τt − shift_r`` over all rows for each prototype.
- ``_pce_bwd_dfeats`` (grid ``row blocks × K splits``) and ``_pce_bwd_dweight`` (grid K blocks):
  recompute s and t, ``dS = c_r (softmax(s/τs) − p)`` with ``c_r = grad · w_r / τs`` from the saved
  ``lse_s``, ``lse_t`` and ``u``, then ``d xs = dS ws`` (fp32 partial rows per K split, summed
  after) and ``d ws = dSᵀ xs`` (each program owns its prototypes: written once). As
  FlashAttention's dQ and dK/dV kernels, no atomics: the same bits on every run.

fp16/bf16 dots take 16-bit operands (dS rounded to the input dtype, as FlashAttention rounds P)
and accumulate in fp32 on the tensor cores; fp32 dots are ``ieee`` (no TF32). Under the Triton
interpreter (``UPCAST``) dot operands are upcast to fp32, as it would multiply bf16 bit patterns,
and the streamed operand is loaded transposed instead of transposed after the load, as numpy
multiplies a transposed view about 1000 times slower. Tiles come from a table (``_config``), not
``@triton.autotune``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import AOT_DTYPE_NAMES, INTERPRETED
from ._indexing import max_programs, sum_partial_rows
from .attention import _LN2, _LOG2E, _mma

# Widest feature row (the head's bottleneck: 256, or 384 for DINOv2's ViT-L/g heads).
MAX_WIDTH = 512
# Narrow features are padded to 64 columns in registers (tl.dot needs 16; fewer tilings to
# compile ahead of time; DINO heads have 256 or 384).
_MIN_BLOCK_F = 64
# The combine kernel walks the rows BLOCK at a time in one program.
_COMBINE_BLOCK = 256
_COMBINE_WARPS = 4
# Statistics per (split, row) of the forward pass, in this order.
_STATS = 5  # teacher max, teacher sum, student max, student sum, Σ p·s


# --- kernels -------------------------------------------------------------------------------------


@triton.jit
def _load_tile(X, rows, row_ok, stride, f, f_ok):
    """``[len(rows), len(f)]`` elements of a ``[*, F]`` matrix (unit stride along F); rows past
    the end and columns past F read as zeros."""
    ptrs = X + rows.to(tl.int64)[:, None] * stride + f[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & f_ok[None, :], other=0.0)


@triton.jit
def _load_chunks(X, rows, row_ok, stride, F, BLOCK_F: tl.constexpr, CHUNKS: tl.constexpr):
    """Rows of a ``[*, F]`` matrix as CHUNKS (1 to 4) column tiles ``[len(rows), BLOCK_F]``;
    the unused ones repeat the first (they are never read)."""
    f = tl.arange(0, BLOCK_F)
    c0 = _load_tile(X, rows, row_ok, stride, f, f < F)
    c1 = c0
    c2 = c0
    c3 = c0
    if CHUNKS > 1:
        c1 = _load_tile(X, rows, row_ok, stride, f + BLOCK_F, f + BLOCK_F < F)
    if CHUNKS > 2:
        c2 = _load_tile(X, rows, row_ok, stride, f + 2 * BLOCK_F, f + 2 * BLOCK_F < F)
    if CHUNKS > 3:
        c3 = _load_tile(X, rows, row_ok, stride, f + 3 * BLOCK_F, f + 3 * BLOCK_F < F)
    return c0, c1, c2, c3


@triton.jit
def _load_chunks_t(X, rows, row_ok, stride, F, BLOCK_F: tl.constexpr, CHUNKS: tl.constexpr):
    """As :func:`_load_chunks`, transposed: ``[BLOCK_F, len(rows)]`` tiles."""
    f = tl.arange(0, BLOCK_F)
    ptrs = X + rows.to(tl.int64)[None, :] * stride + f[:, None]
    c0 = tl.load(ptrs, mask=(f < F)[:, None] & row_ok[None, :], other=0.0)
    c1 = c0
    c2 = c0
    c3 = c0
    if CHUNKS > 1:
        mask = (f + BLOCK_F < F)[:, None] & row_ok[None, :]
        c1 = tl.load(ptrs + BLOCK_F, mask=mask, other=0.0)
    if CHUNKS > 2:
        mask = (f + 2 * BLOCK_F < F)[:, None] & row_ok[None, :]
        c2 = tl.load(ptrs + 2 * BLOCK_F, mask=mask, other=0.0)
    if CHUNKS > 3:
        mask = (f + 3 * BLOCK_F < F)[:, None] & row_ok[None, :]
        c3 = tl.load(ptrs + 3 * BLOCK_F, mask=mask, other=0.0)
    return c0, c1, c2, c3


@triton.jit
def _streamed_chunks(
    X,
    rows,
    row_ok,
    stride,
    F,
    BLOCK_F: tl.constexpr,
    CHUNKS: tl.constexpr,
    ROW_MAJOR: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """The operand a loop streams, as row-major chunks ``[len(rows), BLOCK_F]`` (for the gradient
    products; only when ROW_MAJOR) and transposed ones ``[BLOCK_F, len(rows)]`` (for the logits).
    On the GPU the transposed chunks are views of the loaded ones; the interpreter loads them
    transposed instead, because numpy multiplies a transposed view about 1000 times slower."""
    if UPCAST:
        t0, t1, t2, t3 = _load_chunks_t(X, rows, row_ok, stride, F, BLOCK_F, CHUNKS)
        r0 = t0
        r1 = t1
        r2 = t2
        r3 = t3
        if ROW_MAJOR:
            r0, r1, r2, r3 = _load_chunks(X, rows, row_ok, stride, F, BLOCK_F, CHUNKS)
    else:
        r0, r1, r2, r3 = _load_chunks(X, rows, row_ok, stride, F, BLOCK_F, CHUNKS)
        t0 = tl.trans(r0)
        t1 = tl.trans(r1)
        t2 = tl.trans(r2)
        t3 = tl.trans(r3)
    return r0, r1, r2, r3, t0, t1, t2, t3


@triton.jit
def _dot_chunks(a0, a1, a2, a3, b0, b1, b2, b3, acc, CHUNKS: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + Σ_c a_c b_c`` (``a_c: [M, BLOCK_F]``, ``b_c: [BLOCK_F, N]``): a product over the
    feature axis, chunk by chunk."""
    acc = _mma(a0, b0, acc, UPCAST)
    if CHUNKS > 1:
        acc = _mma(a1, b1, acc, UPCAST)
    if CHUNKS > 2:
        acc = _mma(a2, b2, acc, UPCAST)
    if CHUNKS > 3:
        acc = _mma(a3, b3, acc, UPCAST)
    return acc


@triton.jit
def _grad_chunks(ds, b0, b1, b2, b3, g0, g1, g2, g3, CHUNKS: tl.constexpr, UPCAST: tl.constexpr):
    """``g_c + ds b_c`` for each chunk; ds is rounded to b's dtype (tensor cores for 16 bits)."""
    ds = ds.to(b0.dtype)
    g0 = _mma(ds, b0, g0, UPCAST)
    if CHUNKS > 1:
        g1 = _mma(ds, b1, g1, UPCAST)
    if CHUNKS > 2:
        g2 = _mma(ds, b2, g2, UPCAST)
    if CHUNKS > 3:
        g3 = _mma(ds, b3, g3, UPCAST)
    return g0, g1, g2, g3


@triton.jit
def _store_chunks(
    Out, rows, row_ok, stride, F, g0, g1, g2, g3, BLOCK_F: tl.constexpr, CHUNKS: tl.constexpr
):
    """Store chunk tiles of ``[len(rows), F]`` rows (in Out's dtype), masking rows and columns."""
    f = tl.arange(0, BLOCK_F)
    ptrs = Out + rows.to(tl.int64)[:, None] * stride + f[None, :]
    dtype = Out.dtype.element_ty
    tl.store(ptrs, g0.to(dtype), mask=row_ok[:, None] & (f < F)[None, :])
    if CHUNKS > 1:
        tl.store(ptrs + BLOCK_F, g1.to(dtype), mask=row_ok[:, None] & (f + BLOCK_F < F)[None, :])
    if CHUNKS > 2:
        mask = row_ok[:, None] & (f + 2 * BLOCK_F < F)[None, :]
        tl.store(ptrs + 2 * BLOCK_F, g2.to(dtype), mask=mask)
    if CHUNKS > 3:
        mask = row_ok[:, None] & (f + 3 * BLOCK_F < F)[None, :]
        tl.store(ptrs + 3 * BLOCK_F, g3.to(dtype), mask=mask)


@triton.jit
def _pce_fwd_rows(
    XS,
    WS,
    XT,
    WT,
    Bias,
    Stats,
    ColSum,
    R,
    K,
    F,
    blocks_per_split,
    stride_xs,
    stride_ws,
    stride_xt,
    stride_wt,
    scale_s,
    scale_t,
    inv_rows,
    LOSS_PASS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
    CHUNKS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Partial softmax statistics of one row block over one K split (see the module docstring).
    ``scale_s = log2(e)/τs``, ``scale_t = log2(e)/τt``: maxima are in log2 units."""
    pid_r = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    xt0, xt1, xt2, xt3 = _load_chunks(XT, rows, row_ok, stride_xt, F, BLOCK_F, CHUNKS)
    if LOSS_PASS:
        xs0, xs1, xs2, xs3 = _load_chunks(XS, rows, row_ok, stride_xs, F, BLOCK_F, CHUNKS)
    zeros = tl.zeros((BLOCK_R, BLOCK_K), tl.float32)
    m_t = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_t = tl.zeros((BLOCK_R,), tl.float32)
    m_s = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_s = tl.zeros((BLOCK_R,), tl.float32)
    cross = tl.zeros((BLOCK_R,), tl.float32)
    k_begin = split * blocks_per_split * BLOCK_K
    k_end = tl.minimum(K, k_begin + blocks_per_split * BLOCK_K)
    for k_start in range(k_begin, k_end, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        _, _, _, _, wt0, wt1, wt2, wt3 = _streamed_chunks(
            WT, ks, k_ok, stride_wt, F, BLOCK_F, CHUNKS, False, UPCAST
        )
        t = _dot_chunks(xt0, xt1, xt2, xt3, wt0, wt1, wt2, wt3, zeros, CHUNKS, UPCAST)
        if LOSS_PASS:
            # Padded rows read x = 0, so t = 0 there: they add nothing to the column sums.
            tl.store(ColSum + pid_r.to(tl.int64) * K + ks, tl.sum(t, 0) * inv_rows, mask=k_ok)
        bias = tl.load(Bias + ks, mask=k_ok, other=0.0)
        # Every K block holds at least one real prototype: the new maxima are finite.
        z = tl.where(k_ok[None, :], t * scale_t + (bias * _LOG2E)[None, :], float("-inf"))
        m_new = tl.maximum(m_t, tl.max(z, 1))
        alpha = tl.math.exp2(m_t - m_new)
        p = tl.math.exp2(z - m_new[:, None])
        l_t = l_t * alpha + tl.sum(p, 1)
        m_t = m_new
        if LOSS_PASS:
            _, _, _, _, ws0, ws1, ws2, ws3 = _streamed_chunks(
                WS, ks, k_ok, stride_ws, F, BLOCK_F, CHUNKS, False, UPCAST
            )
            s = _dot_chunks(xs0, xs1, xs2, xs3, ws0, ws1, ws2, ws3, zeros, CHUNKS, UPCAST)
            s = s * scale_s
            # p is 0 on padded prototypes, where s is 0 (zero weights): no mask needed for cross.
            cross = cross * alpha + tl.sum(p * s, 1)
            s = tl.where(k_ok[None, :], s, float("-inf"))
            ms_new = tl.maximum(m_s, tl.max(s, 1))
            l_s = l_s * tl.math.exp2(m_s - ms_new) + tl.sum(tl.math.exp2(s - ms_new[:, None]), 1)
            m_s = ms_new
    # Stats is [5, splits, R]: teacher max and sum, then student max and sum and Σ p·s.
    out = Stats + split * R + rows
    plane = splits * R
    tl.store(out, m_t, mask=row_ok)
    tl.store(out + plane, l_t, mask=row_ok)
    if LOSS_PASS:
        tl.store(out + 2 * plane, m_s, mask=row_ok)
        tl.store(out + 3 * plane, l_s, mask=row_ok)
        tl.store(out + 4 * plane, cross, mask=row_ok)


@triton.jit
def _merge_splits(Stats, rows, row_ok, R, splits, WHICH: tl.constexpr, BLOCK: tl.constexpr):
    """(max, rescaled sum, rescaled Σ p·s) over the splits of the max/sum planes ``WHICH``
    (0 teacher, 2 student); the third only for the teacher."""
    plane = splits * R
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    for j in range(0, splits):
        m = tl.maximum(m, tl.load(Stats + WHICH * plane + j * R + rows, mask=row_ok, other=0.0))
    total = tl.zeros((BLOCK,), tl.float32)
    cross = tl.zeros((BLOCK,), tl.float32)
    for j in range(0, splits):
        offsets = WHICH * plane + j * R + rows
        factor = tl.math.exp2(tl.load(Stats + offsets, mask=row_ok, other=0.0) - m)
        total += tl.load(Stats + offsets + plane, mask=row_ok, other=0.0) * factor
        if WHICH == 0:
            cross += tl.load(Stats + 4 * plane + j * R + rows, mask=row_ok, other=0.0) * factor
    return m, total, cross


@triton.jit
def _pce_fwd_combine(
    Stats,
    RowWeight,
    LseS,
    LseT,
    Loss,
    R,
    splits,
    LOSS_PASS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """lse_t (and in the loss pass lse_s and ``Σ_r w_r CE_r``) from the split statistics, in one
    program: a fixed order of additions."""
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, R, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        row_ok = rows < R
        m_t, l_t, cross = _merge_splits(Stats, rows, row_ok, R, splits, 0, BLOCK)
        l_t = tl.where(row_ok, l_t, 1.0)  # rows past the end: no log(0), no 0/0
        tl.store(LseT + rows, (m_t + tl.math.log2(l_t)) * _LN2, mask=row_ok)
        if LOSS_PASS:
            m_s, l_s, _unused = _merge_splits(Stats, rows, row_ok, R, splits, 2, BLOCK)
            l_s = tl.where(row_ok, l_s, 1.0)
            lse_s = (m_s + tl.math.log2(l_s)) * _LN2
            tl.store(LseS + rows, lse_s, mask=row_ok)
            # cross / l_t = Σ_k p_k s_k log2(e)/τs
            ce = lse_s - cross / l_t * _LN2
            weight = tl.load(RowWeight + rows, mask=row_ok, other=0.0)
            acc += tl.where(row_ok, weight * ce, 0.0)
    if LOSS_PASS:
        tl.store(Loss, tl.sum(acc, 0))


@triton.jit
def _pce_sinkhorn_cols(
    XT,
    WT,
    Shift,
    ColMax,
    ColSum,
    R,
    K,
    F,
    stride_xt,
    stride_wt,
    scale_t,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
    CHUNKS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """For each prototype of one K block: ``max_r`` and ``Σ_r exp(· − max)`` of
    ``t[r,k]/τt − shift_r`` over all rows; the max is stored in natural-log units."""
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    wt0, wt1, wt2, wt3 = _load_chunks(WT, ks, k_ok, stride_wt, F, BLOCK_F, CHUNKS)
    zeros = tl.zeros((BLOCK_K, BLOCK_R), tl.float32)
    m = tl.full((BLOCK_K,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_K,), tl.float32)
    for start in range(0, R, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        _, _, _, _, xt0, xt1, xt2, xt3 = _streamed_chunks(
            XT, rows, row_ok, stride_xt, F, BLOCK_F, CHUNKS, False, UPCAST
        )
        shift = tl.load(Shift + rows, mask=row_ok, other=0.0)
        t_t = _dot_chunks(wt0, wt1, wt2, wt3, xt0, xt1, xt2, xt3, zeros, CHUNKS, UPCAST)
        z = tl.where(row_ok[None, :], t_t * scale_t - (shift * _LOG2E)[None, :], float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 1))
        total = total * tl.math.exp2(m - m_new) + tl.sum(tl.math.exp2(z - m_new[:, None]), 1)
        m = m_new
    tl.store(ColMax + ks, m * _LN2, mask=k_ok)
    tl.store(ColSum + ks, total, mask=k_ok)


@triton.jit
def _pce_bwd_dfeats(
    XS,
    WS,
    XT,
    WT,
    Bias,
    LseS,
    LseT,
    Coef,
    DX,
    R,
    K,
    F,
    blocks_per_split,
    stride_xs,
    stride_ws,
    stride_xt,
    stride_wt,
    scale_s,
    scale_t,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
    CHUNKS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``DX[split] = dS ws`` (fp32 ``[splits, R, F]``, contiguous) for one row block over one K
    split, with ``dS = coef_r (softmax(s/τs) − softmax(t/τt + u))`` recomputed per K block."""
    pid_r = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    xs0, xs1, xs2, xs3 = _load_chunks(XS, rows, row_ok, stride_xs, F, BLOCK_F, CHUNKS)
    xt0, xt1, xt2, xt3 = _load_chunks(XT, rows, row_ok, stride_xt, F, BLOCK_F, CHUNKS)
    lse_s = tl.load(LseS + rows, mask=row_ok, other=0.0) * _LOG2E
    lse_t = tl.load(LseT + rows, mask=row_ok, other=0.0) * _LOG2E
    coef = tl.load(Coef + rows, mask=row_ok, other=0.0)
    zeros = tl.zeros((BLOCK_R, BLOCK_K), tl.float32)
    g0 = tl.zeros((BLOCK_R, BLOCK_F), tl.float32)
    g1 = tl.zeros((BLOCK_R, BLOCK_F), tl.float32)
    g2 = tl.zeros((BLOCK_R, BLOCK_F), tl.float32)
    g3 = tl.zeros((BLOCK_R, BLOCK_F), tl.float32)
    k_begin = split * blocks_per_split * BLOCK_K
    k_end = tl.minimum(K, k_begin + blocks_per_split * BLOCK_K)
    for k_start in range(k_begin, k_end, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        ws0, ws1, ws2, ws3, wst0, wst1, wst2, wst3 = _streamed_chunks(
            WS, ks, k_ok, stride_ws, F, BLOCK_F, CHUNKS, True, UPCAST
        )
        _, _, _, _, wt0, wt1, wt2, wt3 = _streamed_chunks(
            WT, ks, k_ok, stride_wt, F, BLOCK_F, CHUNKS, False, UPCAST
        )
        bias = tl.load(Bias + ks, mask=k_ok, other=0.0) * _LOG2E
        s = _dot_chunks(xs0, xs1, xs2, xs3, wst0, wst1, wst2, wst3, zeros, CHUNKS, UPCAST)
        t = _dot_chunks(xt0, xt1, xt2, xt3, wt0, wt1, wt2, wt3, zeros, CHUNKS, UPCAST)
        p_s = tl.math.exp2(s * scale_s - lse_s[:, None])
        p_t = tl.math.exp2(t * scale_t + bias[None, :] - lse_t[:, None])
        # Padded prototypes have zero weights, but their exp2 may overflow: inf · 0 is NaN.
        ds = tl.where(row_ok[:, None] & k_ok[None, :], (p_s - p_t) * coef[:, None], 0.0)
        g0, g1, g2, g3 = _grad_chunks(ds, ws0, ws1, ws2, ws3, g0, g1, g2, g3, CHUNKS, UPCAST)
    out_rows = split * R + rows
    _store_chunks(DX, out_rows, row_ok, F, F, g0, g1, g2, g3, BLOCK_F, CHUNKS)


@triton.jit
def _pce_bwd_dweight(
    XS,
    WS,
    XT,
    WT,
    Bias,
    LseS,
    LseT,
    Coef,
    DW,
    R,
    K,
    F,
    stride_xs,
    stride_ws,
    stride_xt,
    stride_wt,
    stride_dw,
    scale_s,
    scale_t,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr,
    CHUNKS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``DW = dSᵀ xs`` for one block of prototypes, held in registers over all row blocks (the
    transposed frame ``[BLOCK_K, BLOCK_R]``, so dW comes out with prototypes as rows)."""
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    ws0, ws1, ws2, ws3 = _load_chunks(WS, ks, k_ok, stride_ws, F, BLOCK_F, CHUNKS)
    wt0, wt1, wt2, wt3 = _load_chunks(WT, ks, k_ok, stride_wt, F, BLOCK_F, CHUNKS)
    bias = tl.load(Bias + ks, mask=k_ok, other=0.0) * _LOG2E
    zeros = tl.zeros((BLOCK_K, BLOCK_R), tl.float32)
    g0 = tl.zeros((BLOCK_K, BLOCK_F), tl.float32)
    g1 = tl.zeros((BLOCK_K, BLOCK_F), tl.float32)
    g2 = tl.zeros((BLOCK_K, BLOCK_F), tl.float32)
    g3 = tl.zeros((BLOCK_K, BLOCK_F), tl.float32)
    for start in range(0, R, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        row_ok = rows < R
        xs0, xs1, xs2, xs3, xst0, xst1, xst2, xst3 = _streamed_chunks(
            XS, rows, row_ok, stride_xs, F, BLOCK_F, CHUNKS, True, UPCAST
        )
        _, _, _, _, xt0, xt1, xt2, xt3 = _streamed_chunks(
            XT, rows, row_ok, stride_xt, F, BLOCK_F, CHUNKS, False, UPCAST
        )
        lse_s = tl.load(LseS + rows, mask=row_ok, other=0.0) * _LOG2E
        lse_t = tl.load(LseT + rows, mask=row_ok, other=0.0) * _LOG2E
        coef = tl.load(Coef + rows, mask=row_ok, other=0.0)
        s_t = _dot_chunks(ws0, ws1, ws2, ws3, xst0, xst1, xst2, xst3, zeros, CHUNKS, UPCAST)
        t_t = _dot_chunks(wt0, wt1, wt2, wt3, xt0, xt1, xt2, xt3, zeros, CHUNKS, UPCAST)
        p_s = tl.math.exp2(s_t * scale_s - lse_s[None, :])
        p_t = tl.math.exp2(t_t * scale_t + bias[:, None] - lse_t[None, :])
        ds_t = tl.where(k_ok[:, None] & row_ok[None, :], (p_s - p_t) * coef[None, :], 0.0)
        g0, g1, g2, g3 = _grad_chunks(ds_t, xs0, xs1, xs2, xs3, g0, g1, g2, g3, CHUNKS, UPCAST)
    _store_chunks(DW, ks, k_ok, stride_dw, F, g0, g1, g2, g3, BLOCK_F, CHUNKS)


# --- tile choice ---------------------------------------------------------------------------------

# Not measured (no GPU here); sized from the shared memory the ahead-of-time compiles report
# (tests/test_prototype_cross_entropy.py checks every configuration against the H100's limit).
# The row kernels (forward, dfeats) hold their rows' features, student and teacher, for the whole
# loop and stream the prototypes' weights [BLOCK_K, F] through shared memory (num_stages buffers);
# the prototype kernels (dweight, Sinkhorn columns) are their mirror image. So the held block
# shrinks with F and the streamed one with F and the stages, aiming at <= ~200 KB (sm_90):
#
#   F (padded)   16-bit: rows kernels BLOCK_R × BLOCK_K, prototype kernels BLOCK_K × BLOCK_R
#   <= 64        64 × 64, 4 warps, 3 stages     66 KB
#   128          64 × 64, 4 warps, 3 stages    133 KB
#   256          64 × 64, 8 warps, 2 stages    197-201 KB
#   384          64 × 32, 8 warps, 2 stages    197-201 KB (ViT-L/g heads: 3 chunks of 128, exact)
#   512          32 × 32, 4 warps, 2 stages    134 KB (mma.sync: wgmma needs 64-row tiles)
#
# GPUs with less shared memory per block than an H100 (an A100 has 163 KB) take one stage for
# F = 256 and 384 ("compact"), which the compile test checks against the A100's limit.
# fp32 (ieee dots on CUDA cores, the checking path rather than the fast one): 16 × 16, <= 133 KB
# (32 × 32 compiles five times slower, every fp32 product being unrolled per thread). The
# interpreter runs fewer, larger programs faster: there every dtype takes the 16-bit table.
_KERNELS = ("fwd", "cols", "dfeats", "dweight")
_MAX_BLOCK_F = 128
_H100_SHARED_MEMORY = 232448  # bytes per block (opt-in)


def feature_tile(width: int) -> tuple[int, int]:
    """(BLOCK_F, CHUNKS): rows of ``width`` features (1 to MAX_WIDTH) as CHUNKS column tiles of
    BLOCK_F (64 or 128): 256 = 2 × 128, 384 = 3 × 128, 7 -> 1 × 64."""
    tile = min(_MAX_BLOCK_F, max(_MIN_BLOCK_F, triton.next_power_of_2(width)))
    return tile, triton.cdiv(width, tile)


def _config(
    kernel: str,
    block_f: int,
    chunks: int,
    dtype: torch.dtype,
    interpreted: bool = INTERPRETED,
    compact: bool = False,
) -> tuple[int, int, int, int]:
    """(BLOCK_R, BLOCK_K, num_warps, num_stages) of one kernel for a feature tiling; ``compact``
    for GPUs with less shared memory than an H100."""
    padded = block_f * chunks
    if dtype == torch.float32 and not interpreted:
        return 16, 16, 4, 2
    if padded <= 128:
        held, streamed, warps, stages = 64, 64, 4, 3
    elif padded <= 256:
        held, streamed, warps, stages = 64, 64, 8, 1 if compact else 2
    elif padded <= 384:
        held, streamed, warps, stages = 64, 32, 8, 1 if compact else 2
    else:
        held, streamed, warps, stages = 32, 32, 4, 2
    if kernel in ("fwd", "dfeats"):  # rows held, prototypes streamed
        return held, streamed, warps, stages
    return streamed, held, warps, stages  # prototypes held, rows streamed


def _compact(device: torch.device) -> bool:
    """Whether ``device`` has less shared memory per block than the table's H100."""
    if device.type != "cuda":
        return False
    return _compact_cuda(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _compact_cuda(index: int) -> bool:
    properties = torch.cuda.get_device_properties(index)
    optin = getattr(properties, "shared_memory_per_block_optin", _H100_SHARED_MEMORY)
    return optin < _H100_SHARED_MEMORY


def _splits(row_blocks: int, k_blocks: int, device: torch.device, k_splits: int | None):
    """(splits, K blocks per split) of the row kernels: enough programs to fill the GPU (4 per
    SM; 2816 rows are only 44 row blocks, for 132 SMs), no empty split."""
    if k_splits is None:
        k_splits = triton.cdiv(max_programs(device), max(1, row_blocks))
    per_split = triton.cdiv(k_blocks, max(1, min(k_splits, k_blocks)))
    return triton.cdiv(k_blocks, per_split), per_split


# --- launchers -----------------------------------------------------------------------------------

_LOG2E_VALUE = 1.4426950408889634


def forward_rows(
    xs: torch.Tensor | None,
    ws: torch.Tensor | None,
    xt: torch.Tensor,
    wt: torch.Tensor,
    bias: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    row_weight: torch.Tensor | None = None,
    k_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One pass over all ``[R, K]`` logits, row blocks × K splits.

    Loss pass (``xs, ws, row_weight`` given): returns ``lse_t, lse_s: [R]`` (natural log of the
    softmax denominators of ``t/τt + bias`` and ``s/τs``), ``loss`` (0-d, ``Σ_r w_r CE_r``) and
    ``teacher_mean: [K]`` (the mean of t over the rows; zeros when R = 0), all fp32.
    Teacher-only pass (``xs = ws = row_weight = None``, Sinkhorn's row pass): returns ``lse_t``
    and three Nones.

    ``xs, xt: [R, F]``, ``ws, wt: [K, F]`` of one dtype with unit stride along F, 1 <= F <=
    MAX_WIDTH, K >= 1; ``bias: [K]`` and ``row_weight: [R]`` fp32 contiguous; temperatures > 0.
    ``k_splits`` overrides the number of K splits (tests)."""
    loss_pass = xs is not None
    rows, width = xt.shape
    prototypes = wt.shape[0]
    device = xt.device
    lse_t = torch.empty(rows, dtype=torch.float32, device=device)
    lse_s = torch.empty_like(lse_t) if loss_pass else None
    loss = torch.zeros((), dtype=torch.float32, device=device) if loss_pass else None
    mean = torch.zeros(prototypes, dtype=torch.float32, device=device) if loss_pass else None
    if rows == 0:
        return lse_t, lse_s, loss, mean
    tile_f, chunks = feature_tile(width)
    block_r, block_k, num_warps, num_stages = _config(
        "fwd", tile_f, chunks, xt.dtype, compact=_compact(xt.device)
    )
    row_blocks = triton.cdiv(rows, block_r)
    splits, per_split = _splits(row_blocks, triton.cdiv(prototypes, block_k), device, k_splits)
    stats = torch.empty((_STATS, splits, rows), dtype=torch.float32, device=device)
    col_sum = None
    if loss_pass:
        col_sum = torch.empty((row_blocks, prototypes), dtype=torch.float32, device=device)
    _pce_fwd_rows[(row_blocks, splits)](
        xs,
        ws,
        xt,
        wt,
        bias,
        stats,
        col_sum,
        rows,
        prototypes,
        width,
        per_split,
        xs.stride(0) if loss_pass else 0,
        ws.stride(0) if loss_pass else 0,
        xt.stride(0),
        wt.stride(0),
        _LOG2E_VALUE / student_temp,
        _LOG2E_VALUE / teacher_temp,
        1.0 / rows,
        LOSS_PASS=loss_pass,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        BLOCK_F=tile_f,
        CHUNKS=chunks,
        UPCAST=INTERPRETED,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    _pce_fwd_combine[(1,)](
        stats,
        row_weight,
        lse_s,
        lse_t,
        loss,
        rows,
        splits,
        LOSS_PASS=loss_pass,
        BLOCK=_COMBINE_BLOCK,
        num_warps=_COMBINE_WARPS,
    )
    if loss_pass:
        sum_partial_rows(col_sum, mean)
    return lse_t, lse_s, loss, mean


def sinkhorn_columns(
    xt: torch.Tensor, wt: torch.Tensor, shift: torch.Tensor, teacher_temp: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prototype over this process's rows: ``m_k = max_r (t[r,k]/τt − shift_r)`` and
    ``Σ_r exp(t[r,k]/τt − shift_r − m_k)``, both ``[K]`` fp32 (m = -inf and 0 when R = 0).
    ``shift: [R]`` fp32 contiguous; other arguments as for :func:`forward_rows`."""
    rows, width = xt.shape
    prototypes = wt.shape[0]
    col_max = torch.empty(prototypes, dtype=torch.float32, device=xt.device)
    col_sum = torch.empty_like(col_max)
    tile_f, chunks = feature_tile(width)
    block_r, block_k, num_warps, num_stages = _config(
        "cols", tile_f, chunks, xt.dtype, compact=_compact(xt.device)
    )
    _pce_sinkhorn_cols[(triton.cdiv(prototypes, block_k),)](
        xt,
        wt,
        shift,
        col_max,
        col_sum,
        rows,
        prototypes,
        width,
        xt.stride(0),
        wt.stride(0),
        _LOG2E_VALUE / teacher_temp,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        BLOCK_F=tile_f,
        CHUNKS=chunks,
        UPCAST=INTERPRETED,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return col_max, col_sum


def backward(
    coef: torch.Tensor,
    xs: torch.Tensor,
    ws: torch.Tensor,
    xt: torch.Tensor,
    wt: torch.Tensor,
    bias: torch.Tensor,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    need_feats: bool = True,
    need_weight: bool = True,
    k_splits: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``Σ_r coef_r τs CE_r`` (``coef: [R]`` fp32, grad · w_r / τs) with respect to
    ``xs`` and ``ws``: ``[R, F]`` and ``[K, F]`` in their dtypes (contiguous), or None where not
    needed. ``lse_s, lse_t`` from :func:`forward_rows`'s loss pass with the same ``bias``; other
    arguments as there."""
    rows, width = xs.shape
    prototypes = ws.shape[0]
    device = xs.device
    tile_f, chunks = feature_tile(width)
    compact = _compact(device)
    scales = (_LOG2E_VALUE / student_temp, _LOG2E_VALUE / teacher_temp)
    common = (bias, lse_s, lse_t, coef)
    strides = (xs.stride(0), ws.stride(0), xt.stride(0), wt.stride(0))
    dx = dw = None
    if need_feats:
        if rows == 0:
            dx = torch.empty((0, width), dtype=xs.dtype, device=device)
        else:
            block_r, block_k, num_warps, num_stages = _config(
                "dfeats", tile_f, chunks, xs.dtype, compact=compact
            )
            row_blocks = triton.cdiv(rows, block_r)
            k_blocks = triton.cdiv(prototypes, block_k)
            splits, per_split = _splits(row_blocks, k_blocks, device, k_splits)
            partial = torch.empty((splits, rows, width), dtype=torch.float32, device=device)
            _pce_bwd_dfeats[(row_blocks, splits)](
                xs, ws, xt, wt, *common, partial, rows, prototypes, width, per_split, *strides,
                *scales, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_F=tile_f, CHUNKS=chunks,
                UPCAST=INTERPRETED, num_warps=num_warps, num_stages=num_stages,
            )  # fmt: skip
            # The splits' partial rows, summed in a fixed order (a no-op for one split).
            dx = (partial[0] if splits == 1 else partial.sum(0)).to(xs.dtype)
    if need_weight:
        dw = torch.empty((prototypes, width), dtype=ws.dtype, device=device)
        if rows == 0:
            dw.zero_()
        else:
            block_r, block_k, num_warps, num_stages = _config(
                "dweight", tile_f, chunks, xs.dtype, compact=compact
            )
            _pce_bwd_dweight[(triton.cdiv(prototypes, block_k),)](
                xs, ws, xt, wt, *common, dw, rows, prototypes, width, *strides, dw.stride(0),
                *scales, BLOCK_R=block_r, BLOCK_K=block_k, BLOCK_F=tile_f, CHUNKS=chunks,
                UPCAST=INTERPRETED, num_warps=num_warps, num_stages=num_stages,
            )  # fmt: skip
    return dx, dw


# --- ahead-of-time compiles ----------------------------------------------------------------------

# A width for every feature tiling feature_tile() returns: 1-64, 65-128, then 2, 3 or 4 chunks
# of 128 up to 512.
AOT_WIDTHS = (64, 128, 256, 384, 512)
# The kernels' constexpr parameters.
_CONSTEXPRS = {"LOSS_PASS", "BLOCK", "BLOCK_R", "BLOCK_K", "BLOCK_F", "CHUNKS", "UPCAST"}
# The arguments the teacher-only row pass leaves out (None: constexprs).
_TEACHER_ONLY = ("XS", "WS", "ColSum")


def _signature(kernel, dtype: str, absent: tuple[str, ...] = ()) -> dict[str, str]:
    """Triton signature of one of our kernels: feature and weight tensors of ``dtype``, fp32
    statistics, i32 sizes and strides, fp32 scales; ``absent`` pointers (None) are constexprs."""
    pointers = {"XS", "WS", "XT", "WT", "DW"}
    fp32_pointers = {"Bias", "Stats", "ColSum", "ColMax", "Shift", "RowWeight", "LseS", "LseT",
                     "Loss", "Coef", "DX"}  # fmt: skip
    scalars = {"scale_s": "fp32", "scale_t": "fp32", "inv_rows": "fp32"}
    signature = {}
    for name in kernel.arg_names:
        if name in absent or name in _CONSTEXPRS:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = f"*{dtype}"
        elif name in fp32_pointers:
            signature[name] = "*fp32"
        elif name in scalars:
            signature[name] = scalars[name]
        else:
            signature[name] = "i32"
    return signature


def _divisible_by_16(signature: dict[str, str], wide: bool) -> tuple[str, ...]:
    """Pointers are 16-byte aligned; F and the row strides are multiples of 16 when the width is
    (the usual F = 256 or 384), as the JIT specializes them."""
    return tuple(
        name
        for name, kind in signature.items()
        if kind.startswith("*") or (wide and (name == "F" or name.startswith("stride_")))
    )


def aot_configurations():
    """Yield ``(kernel, signature, constexprs, num_warps, num_stages, divisible_by_16)`` for every
    configuration the launchers can pick on a GPU: each feature tiling × input dtype × kernel (the
    row pass with the student and without) × H100 or compact table, and the combine kernel with
    and without the loss, specialized as a usual call is."""
    for loss_pass in (True, False):
        absent = () if loss_pass else ("RowWeight", "LseS", "Loss")
        signature = _signature(_pce_fwd_combine, "fp32", absent)
        constexprs = {"LOSS_PASS": loss_pass, "BLOCK": _COMBINE_BLOCK, **dict.fromkeys(absent)}
        divisible = _divisible_by_16(signature, False)
        yield _pce_fwd_combine, signature, constexprs, _COMBINE_WARPS, 1, divisible
    kernels = {"fwd": _pce_fwd_rows, "cols": _pce_sinkhorn_cols, "dfeats": _pce_bwd_dfeats,
               "dweight": _pce_bwd_dweight}  # fmt: skip
    for width in AOT_WIDTHS:
        tile_f, chunks = feature_tile(width)
        for torch_dtype in (torch.float32, torch.float16, torch.bfloat16):
            dtype = AOT_DTYPE_NAMES[str(torch_dtype).removeprefix("torch.")]
            for name in _KERNELS:
                kernel = kernels[name]
                configs = {_config(name, tile_f, chunks, torch_dtype, False, c): None
                           for c in (False, True)}  # fmt: skip
                for block_r, block_k, num_warps, num_stages in configs:
                    tiles = {"BLOCK_R": block_r, "BLOCK_K": block_k, "BLOCK_F": tile_f,
                             "CHUNKS": chunks, "UPCAST": False}  # fmt: skip
                    variants = [({"LOSS_PASS": True}, ()), ({"LOSS_PASS": False}, _TEACHER_ONLY)]
                    for flags, absent in variants if name == "fwd" else [({}, ())]:
                        signature = _signature(kernel, dtype, absent)
                        yield (
                            kernel,
                            signature,
                            {**tiles, **flags, **dict.fromkeys(absent)},
                            num_warps,
                            num_stages,
                            _divisible_by_16(signature, width % 16 == 0),
                        )
