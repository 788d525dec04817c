"""Fused softmax attention in Triton (FlashAttention-2 style): forward, and a deterministic backward.

``o = softmax(scale · q kᵀ) v`` per sequence and head, non-causal, never materialising the scores.

Layouts, read through their strides (unit stride along ``D`` only, so views such as
``qkv[:, :, 0]`` of a packed ``[B, N, 3, H, D]`` tensor are used without copies):

- dense: ``q, k, v, o: [B, N, H, D]``, ``lse: [B, H, N]``;
- varlen: ``q, k, v, o: [T, H, D]`` holding S sequences back to back, ``cu_seqlens: [S + 1]``
  int32 offsets, ``lse: [H, T]``; a token attends only to the keys of its own sequence (a
  block-diagonal mask, as ``flash_attn_varlen_func``). Every kernel takes the sequence's start and
  length from ``cu_seqlens``; dense inputs are the special case of equal lengths, addressed through
  the batch stride instead.

Programs: the forward and ``_attn_bwd_dq`` own one block of query rows each and loop over the key
blocks of their sequence; ``_attn_bwd_dkdv`` owns one block of keys and loops over the query
blocks. Grids are ``(cdiv(max_seqlen, BLOCK), H, B or S)``; a program whose block starts past its
sequence's end exits at once. Only the last, ragged block of a loop is masked. The backward
recomputes the probabilities from the saved ``lse`` (natural log, as flash-attn's softmax_lse) and
has no atomics, so it returns the same bits on every run.

Numerics: exponentials are ``exp2`` with log2(e) folded into the scale; the softmax statistics,
``lse``, ``delta`` and every accumulator are fp32. fp16/bf16 dots take 16-bit operands (P and dS
rounded to the input dtype, as in FlashAttention) and accumulate in fp32 on the tensor cores; fp32
dots use ``input_precision="ieee"`` (true fp32 products, no TF32), so fp32 results match an fp32
reference. ``scale`` must be positive (row maxima are taken before scaling, as in flash-attn).

Head dims up to 128 that are not a power of two (80, 96) are padded to ``BLOCK_D`` in registers
only: loads and stores mask the ``D`` axis, memory is never padded. Under the Triton interpreter
(``TRITON_INTERPRET=1``) dot operands are upcast to fp32, because the interpreter multiplies bf16
bit patterns. Tiles come from a small table (``_fwd_config``, ``_bwd_config``), not
``@triton.autotune``, which cannot run in the interpreter; there fp32 takes the 16-bit tiles.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import AOT_DTYPE_NAMES, INTERPRETED

HEAD_DIMS = (32, 64, 80, 96, 128)
# Rows per program of _attn_bwd_preprocess: a [64, BLOCK_D] tile of dO and O, 4 warps.
_PREPROCESS_BLOCK_M = 64
_PREPROCESS_WARPS = 4
_LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x · log2(e))
_LN2 = tl.constexpr(0.6931471805599453)


# --- device helpers --------------------------------------------------------------------------------


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b, accumulated in fp32; fp32 operands multiply exactly ("ieee", no TF32). The
    interpreter gets fp32 operands (UPCAST): it would multiply bf16 bit patterns."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _sequence(CuSeqlens, seq, N, IS_VARLEN: tl.constexpr):
    """(first token along the token axis, length) of sequence ``seq``."""
    if IS_VARLEN:
        start = tl.load(CuSeqlens + seq)
        return start, tl.load(CuSeqlens + seq + 1) - start
    else:
        return 0, N


@triton.jit
def _tile_ptrs(X, seq, head, rows, stride_b, stride_n, stride_h, BLOCK_D: tl.constexpr):
    """Pointers to the [len(rows), BLOCK_D] tile of tokens ``rows`` (int64) of one sequence and
    head. 64-bit offsets: B·N·H·D may exceed 2**31."""
    cols = tl.arange(0, BLOCK_D)
    return X + seq * stride_b + head * stride_h + rows[:, None] * stride_n + cols[None, :]


@triton.jit
def _load_rows(ptrs, rows_left, d_ok, BLOCK: tl.constexpr, MASK_ROWS: tl.constexpr):
    """A [BLOCK, BLOCK_D] tile; rows from ``rows_left`` on and padded columns read as zeros."""
    if MASK_ROWS:
        row_ok = tl.arange(0, BLOCK) < rows_left
        return tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        return tl.load(ptrs, mask=d_ok[None, :], other=0.0)


# --- forward -------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd_block(
    acc,
    l_i,
    m_i,
    q,
    k_ptrs,
    v_ptrs,
    keys_left,
    qk_scale,
    d_ok,
    BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One key block of the online softmax: rescale the running sum and output to the new row max."""
    k = _load_rows(k_ptrs, keys_left, d_ok, BLOCK_N, MASK_KEYS)
    v = _load_rows(v_ptrs, keys_left, d_ok, BLOCK_N, MASK_KEYS)
    s = _mma(q, tl.trans(k), tl.zeros((q.shape[0], BLOCK_N), tl.float32), UPCAST)
    if MASK_KEYS:
        s = tl.where((tl.arange(0, BLOCK_N) < keys_left)[None, :], s, float("-inf"))
    # Every block holds at least one real key: m_new is finite, no row computes inf - inf.
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc, l_i, m_new


@triton.jit
def _attn_fwd(
    Q,
    K,
    V,
    Out,
    Lse,
    CuSeqlens,
    scale,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_ob,
    stride_on,
    stride_oh,
    stride_lb,
    stride_lh,
    N,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """O = softmax(scale · Q Kᵀ) V and its log-sum-exp for one block of query rows."""
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2)
    start, seqlen = _sequence(CuSeqlens, seq, N, IS_VARLEN)
    if start_m >= seqlen:  # the grid is sized for the longest sequence
        return
    seq = seq.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    d_ok = tl.arange(0, BLOCK_D) < HEAD_DIM
    rows_m = (start + start_m + offs_m).to(tl.int64)
    rows_n = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
    q_ptrs = _tile_ptrs(Q, seq, head, rows_m, stride_qb, stride_qn, stride_qh, BLOCK_D)
    k_ptrs = _tile_ptrs(K, seq, head, rows_n, stride_kb, stride_kn, stride_kh, BLOCK_D)
    v_ptrs = _tile_ptrs(V, seq, head, rows_n, stride_vb, stride_vn, stride_vh, BLOCK_D)
    q = _load_rows(q_ptrs, seqlen - start_m, d_ok, BLOCK_M, True)

    qk_scale = scale * _LOG2E
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # Whole key blocks without a key mask, then the ragged last one with it.
    full_end = seqlen - seqlen % BLOCK_N
    for _ in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attn_fwd_block(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, BLOCK_N, qk_scale, d_ok, BLOCK_N, False, UPCAST
        )
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    if full_end < seqlen:
        keys_left = seqlen - full_end
        acc, l_i, m_i = _attn_fwd_block(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, keys_left, qk_scale, d_ok, BLOCK_N, True, UPCAST
        )

    row_ok = start_m + offs_m < seqlen
    o = (acc / l_i[:, None]).to(Out.dtype.element_ty)
    o_ptrs = _tile_ptrs(Out, seq, head, rows_m, stride_ob, stride_on, stride_oh, BLOCK_D)
    tl.store(o_ptrs, o, mask=row_ok[:, None] & d_ok[None, :])
    lse = (m_i + tl.math.log2(l_i)) * _LN2  # from log2 units to the natural log
    tl.store(Lse + seq * stride_lb + head * stride_lh + rows_m, lse, mask=row_ok)


# --- backward ------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_preprocess(
    Out,
    DO,
    Delta,
    stride_ob,
    stride_on,
    stride_oh,
    stride_dob,
    stride_don,
    stride_doh,
    stride_lb,
    stride_lh,
    N,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO ∘ O) in fp32 (= rowsum(P ∘ dP), needed for dS), laid out like lse.

    Rows are independent: varlen inputs come as one sequence of N = T tokens."""
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    d_ok = tl.arange(0, BLOCK_D) < HEAD_DIM
    rows = (start_m + offs_m).to(tl.int64)
    o_ptrs = _tile_ptrs(Out, seq, head, rows, stride_ob, stride_on, stride_oh, BLOCK_D)
    do_ptrs = _tile_ptrs(DO, seq, head, rows, stride_dob, stride_don, stride_doh, BLOCK_D)
    rows_left = N - start_m
    o = _load_rows(o_ptrs, rows_left, d_ok, BLOCK_M, True).to(tl.float32)
    do = _load_rows(do_ptrs, rows_left, d_ok, BLOCK_M, True).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(Delta + seq * stride_lb + head * stride_lh + rows, delta, mask=offs_m < rows_left)


@triton.jit
def _attn_bwd_dkdv_block(
    dk,
    dv,
    k,
    v,
    q_ptrs,
    do_ptrs,
    lse_ptrs,
    delta_ptrs,
    rows_left,
    qk_scale,
    d_ok,
    BLOCK_M: tl.constexpr,
    MASK_ROWS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One query block's contribution to dK (before the scale) and dV, in the transposed
    [keys, queries] frame so that dK and dV come out with keys as rows."""
    q = _load_rows(q_ptrs, rows_left, d_ok, BLOCK_M, MASK_ROWS)
    do = _load_rows(do_ptrs, rows_left, d_ok, BLOCK_M, MASK_ROWS)
    if MASK_ROWS:
        # Rows past the end read q = dO = delta = 0, and lse = +inf makes their P exactly 0.
        row_ok = tl.arange(0, BLOCK_M) < rows_left
        lse = tl.load(lse_ptrs, mask=row_ok, other=float("inf"))
        delta = tl.load(delta_ptrs, mask=row_ok, other=0.0)
    else:
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    zeros = tl.zeros((k.shape[0], BLOCK_M), tl.float32)
    s_t = _mma(k, tl.trans(q), zeros, UPCAST)
    p_t = tl.math.exp2(s_t * qk_scale - (lse * _LOG2E)[None, :])
    dv = _mma(p_t.to(do.dtype), do, dv, UPCAST)
    dp_t = _mma(v, tl.trans(do), zeros, UPCAST)
    ds_t = p_t * (dp_t - delta[None, :])
    dk = _mma(ds_t.to(q.dtype), q, dk, UPCAST)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q,
    K,
    V,
    DO,
    DK,
    DV,
    Lse,
    Delta,
    CuSeqlens,
    scale,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_dob,
    stride_don,
    stride_doh,
    stride_dkb,
    stride_dkn,
    stride_dkh,
    stride_dvb,
    stride_dvn,
    stride_dvh,
    stride_lb,
    stride_lh,
    N,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """dK = scale · dSᵀ Q and dV = Pᵀ dO for one key block, held in registers over all query blocks."""
    start_n = tl.program_id(0) * BLOCK_N
    head = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2)
    start, seqlen = _sequence(CuSeqlens, seq, N, IS_VARLEN)
    if start_n >= seqlen:
        return
    seq = seq.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = tl.arange(0, BLOCK_D) < HEAD_DIM
    rows_n = (start + start_n + offs_n).to(tl.int64)
    rows_m = (start + tl.arange(0, BLOCK_M)).to(tl.int64)
    keys_left = seqlen - start_n
    k_ptrs = _tile_ptrs(K, seq, head, rows_n, stride_kb, stride_kn, stride_kh, BLOCK_D)
    v_ptrs = _tile_ptrs(V, seq, head, rows_n, stride_vb, stride_vn, stride_vh, BLOCK_D)
    k = _load_rows(k_ptrs, keys_left, d_ok, BLOCK_N, True)
    v = _load_rows(v_ptrs, keys_left, d_ok, BLOCK_N, True)
    q_ptrs = _tile_ptrs(Q, seq, head, rows_m, stride_qb, stride_qn, stride_qh, BLOCK_D)
    do_ptrs = _tile_ptrs(DO, seq, head, rows_m, stride_dob, stride_don, stride_doh, BLOCK_D)
    row_offsets = seq * stride_lb + head * stride_lh + rows_m
    lse_ptrs = Lse + row_offsets
    delta_ptrs = Delta + row_offsets

    qk_scale = scale * _LOG2E
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    # Whole query blocks without a row mask, then the ragged last one with it.
    full_end = seqlen - seqlen % BLOCK_M
    for _ in range(0, full_end, BLOCK_M):
        dk, dv = _attn_bwd_dkdv_block(
            dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, BLOCK_M, qk_scale, d_ok, BLOCK_M,
            False, UPCAST,
        )  # fmt: skip
        q_ptrs += BLOCK_M * stride_qn
        do_ptrs += BLOCK_M * stride_don
        lse_ptrs += BLOCK_M
        delta_ptrs += BLOCK_M
    if full_end < seqlen:
        rows_left = seqlen - full_end
        dk, dv = _attn_bwd_dkdv_block(
            dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, rows_left, qk_scale, d_ok,
            BLOCK_M, True, UPCAST,
        )  # fmt: skip

    # Rows of keys past the end hold garbage from zero keys: they are not stored.
    mask = (offs_n < keys_left)[:, None] & d_ok[None, :]
    dk_ptrs = _tile_ptrs(DK, seq, head, rows_n, stride_dkb, stride_dkn, stride_dkh, BLOCK_D)
    dv_ptrs = _tile_ptrs(DV, seq, head, rows_n, stride_dvb, stride_dvn, stride_dvh, BLOCK_D)
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq_block(
    dq,
    q,
    do,
    lse2,
    delta,
    k_ptrs,
    v_ptrs,
    keys_left,
    qk_scale,
    d_ok,
    BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One key block's contribution to dQ (before the scale)."""
    k = _load_rows(k_ptrs, keys_left, d_ok, BLOCK_N, MASK_KEYS)
    v = _load_rows(v_ptrs, keys_left, d_ok, BLOCK_N, MASK_KEYS)
    zeros = tl.zeros((q.shape[0], BLOCK_N), tl.float32)
    s = _mma(q, tl.trans(k), zeros, UPCAST)
    if MASK_KEYS:
        # Zero keys past the end add ds · 0 to dQ, but their P = exp2(-lse) overflows to inf
        # (and inf · 0 = NaN) when every real score is very negative.
        s = tl.where((tl.arange(0, BLOCK_N) < keys_left)[None, :], s, float("-inf"))
    p = tl.math.exp2(s * qk_scale - lse2[:, None])
    dp = _mma(do, tl.trans(v), zeros, UPCAST)
    ds = p * (dp - delta[:, None])
    return _mma(ds.to(k.dtype), k, dq, UPCAST)


@triton.jit
def _attn_bwd_dq(
    Q,
    K,
    V,
    DO,
    DQ,
    Lse,
    Delta,
    CuSeqlens,
    scale,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_dob,
    stride_don,
    stride_doh,
    stride_dqb,
    stride_dqn,
    stride_dqh,
    stride_lb,
    stride_lh,
    N,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """dQ = scale · dS K for one query block, looping over the key blocks of its sequence."""
    start_m = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1).to(tl.int64)
    seq = tl.program_id(2)
    start, seqlen = _sequence(CuSeqlens, seq, N, IS_VARLEN)
    if start_m >= seqlen:
        return
    seq = seq.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    d_ok = tl.arange(0, BLOCK_D) < HEAD_DIM
    rows_m = (start + start_m + offs_m).to(tl.int64)
    rows_n = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
    rows_left = seqlen - start_m
    row_ok = offs_m < rows_left
    q_ptrs = _tile_ptrs(Q, seq, head, rows_m, stride_qb, stride_qn, stride_qh, BLOCK_D)
    do_ptrs = _tile_ptrs(DO, seq, head, rows_m, stride_dob, stride_don, stride_doh, BLOCK_D)
    q = _load_rows(q_ptrs, rows_left, d_ok, BLOCK_M, True)
    do = _load_rows(do_ptrs, rows_left, d_ok, BLOCK_M, True)
    # Rows past the end: lse = +inf gives P = 0 (they are not stored, but stay finite).
    row_offsets = seq * stride_lb + head * stride_lh + rows_m
    lse = tl.load(Lse + row_offsets, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + row_offsets, mask=row_ok, other=0.0)
    k_ptrs = _tile_ptrs(K, seq, head, rows_n, stride_kb, stride_kn, stride_kh, BLOCK_D)
    v_ptrs = _tile_ptrs(V, seq, head, rows_n, stride_vb, stride_vn, stride_vh, BLOCK_D)

    qk_scale = scale * _LOG2E
    lse2 = lse * _LOG2E
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    full_end = seqlen - seqlen % BLOCK_N
    for _ in range(0, full_end, BLOCK_N):
        dq = _attn_bwd_dq_block(
            dq, q, do, lse2, delta, k_ptrs, v_ptrs, BLOCK_N, qk_scale, d_ok, BLOCK_N, False, UPCAST
        )
        k_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    if full_end < seqlen:
        keys_left = seqlen - full_end
        dq = _attn_bwd_dq_block(
            dq, q, do, lse2, delta, k_ptrs, v_ptrs, keys_left, qk_scale, d_ok, BLOCK_N, True, UPCAST
        )

    dq_ptrs = _tile_ptrs(DQ, seq, head, rows_m, stride_dqb, stride_dqn, stride_dqh, BLOCK_D)
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# --- tile choice ---------------------------------------------------------------------------------

# Not measured here (no GPU): a small table from configurations known to do well on A100/H100 for
# D <= 128 (the Triton tutorial's autotune winners, FlashAttention-2's kernel traits), tuned for
# ViT sequence lengths, where a 257-token sequence is only a few blocks long:
#
# - forward: BLOCK_N = 64 key columns, 3 stages to overlap the K/V loads with the math. BLOCK_M is
#   128 query rows (the tutorial's and FA2's choice), or 64 when that pads the sequence less:
#   257 = 2·128 + 1 would compute 384 rows with 128 but 320 with 64, and a 50-token crop 128 vs 64
#   (also the case for packed crops, whose max_seqlen is the global crop's). 4 warps up to D = 64;
#   8 warps for D > 64 with 128-row tiles keep the fp32 [128, 128] accumulator out of spills.
# - backward: 64 × 64 tiles for both kernels (short sequences waste least on the ragged last
#   block), 4 warps up to D = 64 and 8 above (dK and dV are two fp32 [BLOCK_N, BLOCK_D]
#   accumulators held across the whole loop), 2 stages. For long sequences at D <= 64 the dK/dV
#   kernel takes 128 keys per program (FA2 uses 128-wide blocks there) to halve the Q/dO re-reads,
#   and dQ 128 queries, with 8 warps.
# - fp32 (ieee dots on CUDA cores, the checking path rather than the fast one): every product is
#   unrolled per thread, so tiles stay small (forward 32 × 16, backward 16 × 16): at 64 × 32 and
#   D = 128 the dK/dV kernel needs 107 KB of shared memory and 10 s to compile. The interpreter has
#   no such limits and runs fewer, larger programs faster: there fp32 takes the 16-bit table.
#
# Shared memory, compiled for sm_90 with aligned inputs: at most 128 KB (forward, D = 128, 128 × 64
# tiles, 3 stages), under the 227 KB of an H100 and the 163 KB of an A100.
_LONG_SEQUENCE = 1024


def _padded(length: int, block: int) -> int:
    return triton.cdiv(length, block) * block


def _fwd_config(
    head_dim: int, dtype: torch.dtype, max_seqlen: int, interpreted: bool = INTERPRETED
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward."""
    if dtype == torch.float32 and not interpreted:
        return 32, 16, 4, 2
    block_m = 128 if _padded(max_seqlen, 128) <= _padded(max_seqlen, 64) else 64
    num_warps = 8 if block_m == 128 and head_dim > 64 else 4
    return block_m, 64, num_warps, 3


def _bwd_config(
    kernel: str, head_dim: int, dtype: torch.dtype, max_seqlen: int, interpreted: bool = INTERPRETED
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of ``_attn_bwd_dkdv`` or ``_attn_bwd_dq``."""
    if dtype == torch.float32 and not interpreted:
        return 16, 16, 4, 2
    if head_dim <= 64 and max_seqlen >= _LONG_SEQUENCE:
        return (64, 128, 8, 2) if kernel == "dkdv" else (128, 64, 8, 2)
    return 64, 64, 4 if head_dim <= 64 else 8, 2


# --- launchers -----------------------------------------------------------------------------------


def _bnh_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides of a [B, N, H, D] or [T, H, D] tensor (batch 0 for varlen)."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _row_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    """(batch, head) strides of lse/delta, [B, H, N] or [H, T] with unit stride along tokens."""
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _shape(q: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int | None):
    """(sequences, N or max_seqlen, heads, head_dim) of dense or varlen inputs."""
    if cu_seqlens is None:
        batch, seqlen, heads, head_dim = q.shape
        return batch, seqlen, heads, head_dim
    _, heads, head_dim = q.shape
    return cu_seqlens.numel() - 1, max_seqlen, heads, head_dim


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention forward.

    Dense: ``q, k, v: [B, N, H, D]``; returns ``o: [B, N, H, D]`` (contiguous, q's dtype) and
    ``lse: [B, H, N]`` (fp32, natural log of the softmax denominator of the scaled scores).
    Varlen: ``q, k, v: [T, H, D]``, ``cu_seqlens: [S + 1]`` int32 on q's device, ``max_seqlen`` a
    Python int >= the longest sequence; returns ``o: [T, H, D]`` and ``lse: [H, T]``.
    Any strides with unit stride along D; D in HEAD_DIMS; fp32, fp16 or bf16; ``scale > 0``;
    B (or S) and H at most 65535 (grid axes). Inputs are not validated here (``dinov2_fast.ops``
    does that): a sequence longer than ``max_seqlen`` would be cut short.
    """
    varlen = cu_seqlens is not None
    seqs, seqlen, heads, head_dim = _shape(q, cu_seqlens, max_seqlen)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse_shape = (heads, q.shape[0]) if varlen else (seqs, heads, seqlen)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    if o.numel() == 0 or seqs == 0 or seqlen == 0:
        return o, lse
    block_m, block_n, num_warps, num_stages = _fwd_config(head_dim, q.dtype, seqlen)
    _attn_fwd[(triton.cdiv(seqlen, block_m), heads, seqs)](
        q,
        k,
        v,
        o,
        lse,
        cu_seqlens,
        scale,
        *_bnh_strides(q, varlen),
        *_bnh_strides(k, varlen),
        *_bnh_strides(v, varlen),
        *_bnh_strides(o, varlen),
        *_row_strides(lse, varlen),
        seqlen,
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        IS_VARLEN=varlen,
        UPCAST=INTERPRETED,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return o, lse


def attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    dq: torch.Tensor,
    dk: torch.Tensor,
    dv: torch.Tensor,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> None:
    """Attention backward: writes ``dq, dk, dv`` (preallocated, shapes of q/k/v, any strides with
    unit stride along D, e.g. views into one ``[B, N, 3, H, D]`` gradient).

    ``do`` has o's shape (any strides with unit stride along D, stride 0 allowed in leading dims);
    ``o`` and ``lse`` as returned by :func:`attention_fwd` for the same inputs. Three launches:
    delta = rowsum(dO ∘ O), then dK/dV, then dQ. Deterministic: no atomics.
    """
    varlen = cu_seqlens is not None
    seqs, seqlen, heads, head_dim = _shape(q, cu_seqlens, max_seqlen)
    if q.numel() == 0 or seqs == 0 or seqlen == 0:
        return
    block_d = triton.next_power_of_2(head_dim)
    lse = lse.contiguous()  # as attention_fwd returns it: no copy; delta gets its layout
    delta = torch.empty_like(lse)
    row_strides = _row_strides(lse, varlen)
    q_s, k_s, v_s = (_bnh_strides(t, varlen) for t in (q, k, v))
    do_s = _bnh_strides(do, varlen)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, IS_VARLEN=varlen)

    tokens = q.shape[0] if varlen else seqlen
    _attn_bwd_preprocess[(triton.cdiv(tokens, _PREPROCESS_BLOCK_M), heads, 1 if varlen else seqs)](
        o,
        do,
        delta,
        *_bnh_strides(o, varlen),
        *do_s,
        *row_strides,
        tokens,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=_PREPROCESS_BLOCK_M,
        num_warps=_PREPROCESS_WARPS,
    )
    block_m, block_n, num_warps, num_stages = _bwd_config("dkdv", head_dim, q.dtype, seqlen)
    _attn_bwd_dkdv[(triton.cdiv(seqlen, block_n), heads, seqs)](
        q,
        k,
        v,
        do,
        dk,
        dv,
        lse,
        delta,
        cu_seqlens,
        scale,
        *q_s,
        *k_s,
        *v_s,
        *do_s,
        *_bnh_strides(dk, varlen),
        *_bnh_strides(dv, varlen),
        *row_strides,
        seqlen,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        UPCAST=INTERPRETED,
        num_warps=num_warps,
        num_stages=num_stages,
        **common,
    )
    block_m, block_n, num_warps, num_stages = _bwd_config("dq", head_dim, q.dtype, seqlen)
    _attn_bwd_dq[(triton.cdiv(seqlen, block_m), heads, seqs)](
        q,
        k,
        v,
        do,
        dq,
        lse,
        delta,
        cu_seqlens,
        scale,
        *q_s,
        *k_s,
        *v_s,
        *do_s,
        *_bnh_strides(dq, varlen),
        *row_strides,
        seqlen,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        UPCAST=INTERPRETED,
        num_warps=num_warps,
        num_stages=num_stages,
        **common,
    )


# --- ahead-of-time compiles ----------------------------------------------------------------------

# Sequence lengths that reach every row of the tile tables: both forward BLOCK_M choices (257 pads
# less with 64 rows, 197 does not) and the long-sequence backward tiles.
_AOT_SEQLENS = (257, 197, _LONG_SEQUENCE)


def _signature(kernel, dtype: str, varlen: bool) -> dict[str, str]:
    """Triton signature of one of our kernels: tensors of ``dtype`` (lse/delta fp32), i32 strides."""
    types = {"scale": "fp32", "Lse": "*fp32", "Delta": "*fp32", "N": "i32"}
    types.update((name, f"*{dtype}") for name in ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV"))
    types["CuSeqlens"] = "*i32" if varlen else "constexpr"
    return {
        name: "i32" if name.startswith("stride_") else types.get(name, "constexpr")
        for name in kernel.arg_names
    }


def _divisible_by_16(kernel) -> tuple[str, ...]:
    """The arguments that are multiples of 16 in the usual call, as the JIT specializes them:
    torch's allocations are 16-byte aligned and the token and head strides of [.., D] tensors are
    multiples of D. (Not lse's strides, multiples of N.)"""
    tensors = ("Q", "K", "V", "Out", "DO", "DQ", "DK", "DV", "Lse", "Delta")
    return tuple(
        name
        for name in kernel.arg_names
        if name in tensors or (name.startswith("stride_") and not name.startswith("stride_l"))
    )


def aot_configurations():
    """Yield ``(kernel, signature, constexprs, num_warps, num_stages, divisible_by_16)`` for every
    configuration the launchers can pick, for ahead-of-time compiles without a GPU: each head dim ×
    dtype × dense or varlen × tile choice of the GPU's table (the delta preprocess is the same for
    both layouts), specialized as a usual call is (aligned tensors; with that the loads of the
    loops are software-pipelined, which is what costs shared memory)."""
    for head_dim in HEAD_DIMS:
        block_d = triton.next_power_of_2(head_dim)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            name = AOT_DTYPE_NAMES[str(dtype).removeprefix("torch.")]
            yield (
                _attn_bwd_preprocess,
                _signature(_attn_bwd_preprocess, name, False),
                {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "BLOCK_M": _PREPROCESS_BLOCK_M},
                _PREPROCESS_WARPS,
                1,
                _divisible_by_16(_attn_bwd_preprocess),
            )
            for varlen in (False, True):
                choices = {}  # a dict keeps the order and drops repeats
                for seqlen in _AOT_SEQLENS:
                    choices[(_attn_fwd, *_fwd_config(head_dim, dtype, seqlen, False))] = None
                    for kernel, key in ((_attn_bwd_dkdv, "dkdv"), (_attn_bwd_dq, "dq")):
                        config = _bwd_config(key, head_dim, dtype, seqlen, False)
                        choices[(kernel, *config)] = None
                for kernel, block_m, block_n, num_warps, num_stages in choices:
                    constexprs = {
                        "HEAD_DIM": head_dim,
                        "BLOCK_D": block_d,
                        "BLOCK_M": block_m,
                        "BLOCK_N": block_n,
                        "IS_VARLEN": varlen,
                        "UPCAST": False,
                        **({} if varlen else {"CuSeqlens": None}),
                    }
                    signature = _signature(kernel, name, varlen)
                    yield (
                        kernel,
                        signature,
                        constexprs,
                        num_warps,
                        num_stages,
                        _divisible_by_16(kernel),
                    )
