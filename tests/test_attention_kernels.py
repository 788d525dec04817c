"""Triton attention kernels (kernels/attention.py) against a float64 reference, under the
interpreter on CPU tensors without a GPU; and every kernel configuration compiled ahead of time for
sm_90 and sm_80.

The interpreter runs programs one by one in Python (about 16 ms for a program over 5 key blocks),
so shapes stay small: odd lengths around one or two blocks, few heads.
"""

from __future__ import annotations

import json

import pytest
import torch
from aot_compile import H100_SHARED_MEMORY, run_in_subprocesses
from reference import assert_close_to_reference

from dinov2_fast import _backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if _backend.unavailable_reason("triton", torch.device(DEVICE)):
    pytest.skip("Triton cannot run here", allow_module_level=True)

from dinov2_fast.kernels import attention  # noqa: E402  (after the skip: needs triton)

FP32, FP16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(autouse=True)
def _poisoned_allocations(monkeypatch):
    """Every float tensor the launchers allocate starts as NaN, so an element a kernel forgets to
    write shows up (the launchers allocate o, lse and delta with torch.empty / empty_like)."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: poison(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: poison(empty_like(*a, **kw)))


def _randn(*shape, dtype=FP32):
    return torch.randn(shape, dtype=torch.float64).to(DEVICE, dtype)


def _nan_like(t):
    return torch.full_like(t, float("nan"))


def _reference(q, k, v, do, scale):
    """float64 softmax(scale · q kᵀ) v for [B, N, H, D] inputs: o, lse [B, H, N], dq, dk, dv."""
    leaves = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    qh, kh, vh = (t.transpose(1, 2) for t in leaves)  # [B, H, N, D]
    scores = scale * qh @ kh.transpose(-1, -2)
    o = (torch.softmax(scores, -1) @ vh).transpose(1, 2)
    o.backward(do.double().cpu())
    return o.detach(), torch.logsumexp(scores, -1).detach(), *(t.grad for t in leaves)


def _check(name, actual, expected, amplification=1.0):
    """``amplification``: how much larger than 1 the scaled scores get; fp32 rounding of a score s
    changes exp(s) by |s|·eps relatively, so errors grow with it."""
    condition = amplification * expected.abs().max().item() if expected.numel() else 1.0
    assert_close_to_reference(actual.cpu(), expected, name, condition)


def _run_dense(q, k, v, do, scale, grads=None):
    """Forward and backward of the kernels; the gradients are written into ``grads`` (NaN-filled
    by the caller) or into fresh NaN tensors."""
    o, lse = attention.attention_fwd(q, k, v, scale)
    dq, dk, dv = grads if grads is not None else (_nan_like(t) for t in (q, k, v))
    attention.attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv)
    return o, lse, dq, dk, dv


def _check_dense(q, k, v, do, scale, amplification=1.0):
    o, lse, dq, dk, dv = _run_dense(q, k, v, do, scale)
    assert o.dtype == q.dtype and o.shape == q.shape and o.is_contiguous()
    batch, seqlen, heads, _ = q.shape
    assert lse.dtype == FP32 and lse.shape == (batch, heads, seqlen)
    expected = _reference(q, k, v, do, scale)
    for name, actual, ref in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, dq, dk, dv), expected):
        _check(name, actual, ref, amplification)


def _dense_inputs(batch, seqlen, heads, head_dim, dtype):
    return [_randn(batch, seqlen, heads, head_dim, dtype=dtype) for _ in range(4)]


# --- dense -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
@pytest.mark.parametrize("seqlen", [1, 2, 37, 50, 64, 197, 257, 261])
def test_sequence_lengths(seqlen, dtype):
    """Ragged last query and key blocks; 197 takes 128-row forward tiles, 257 and 261 64-row."""
    batch, heads = (3, 3) if seqlen <= 64 else (1, 3)
    _check_dense(*_dense_inputs(batch, seqlen, heads, 64, dtype), scale=64**-0.5)


@pytest.mark.parametrize("dtype", [FP32, FP16, BF16], ids=str)
@pytest.mark.parametrize("head_dim", attention.HEAD_DIMS)
def test_head_dims(head_dim, dtype):
    """80 and 96 are padded to 128 in registers only; 97 tokens = a whole and a ragged block."""
    _check_dense(*_dense_inputs(2, 97, 3, head_dim, dtype), scale=head_dim**-0.5)


@pytest.mark.parametrize("scale", [0.02, 1.0])
def test_scales(scale):
    """A large scale makes the softmax peaky: the running max changes between key blocks."""
    _check_dense(*_dense_inputs(1, 150, 2, 32, FP32), scale=scale)


# dK/dV programs compute (and never store) rows for the zero keys past a ragged end; with these
# scores their exp2(-lse) overflows, which numpy reports.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
def test_very_negative_scores():
    """Every score near -128: the softmax is still well defined, and no stored value may overflow
    (e.g. exp2(-lse) of keys past the end of the ragged last block in dQ)."""
    q, k, v, do = _dense_inputs(2, 70, 2, 64, FP32)
    _check_dense(4 + 0.1 * q, -4 + 0.1 * k, v, do, scale=0.125, amplification=150)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
def test_long_sequence_tiles(dtype):
    """From 1024 tokens on, D <= 64 uses 128-key dK/dV and 128-query dQ programs."""
    _check_dense(*_dense_inputs(1, 1030, 1, 64, dtype), scale=64**-0.5)


def _check_gradients_into(grads, q, k, v, do, scale, label):
    """Run forward and backward with the gradients written into the views ``grads``."""
    o, lse, *_ = _run_dense(q, k, v, do, scale, grads=grads)
    expected = _reference(q, k, v, do, scale)
    for name, actual, ref in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads), expected):
        _check(f"{label} {name}", actual, ref)


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
def test_strided_views_without_copies(dtype):
    """q, k, v as views of one packed [B, N, 3, H, D] tensor, dq/dk/dv written into one such
    tensor, dO expanded along the batch (stride 0); then every tensor in a layout of its own."""
    batch, seqlen, heads, head_dim = 3, 70, 3, 64
    qkv = _randn(batch, seqlen, 3, heads, head_dim, dtype=dtype)
    do = _randn(1, seqlen, heads, head_dim, dtype=dtype).expand(batch, -1, -1, -1)
    dqkv = torch.full_like(qkv, float("nan"))
    _check_gradients_into(dqkv.unbind(2), *qkv.unbind(2), do, 0.125, "packed")

    def bhnd():  # [B, H, N, D] storage seen as [B, N, H, D]
        return _randn(batch, heads, seqlen, head_dim, dtype=dtype).transpose(1, 2)

    kv = _randn(batch, seqlen, 2, heads, head_dim, dtype=dtype)
    q, k, v, do = bhnd(), kv[:, :, 0], _randn(batch, seqlen, heads, head_dim, dtype=dtype), bhnd()
    grads = (_nan_like(v), bhnd().fill_(float("nan")), _nan_like(kv)[:, :, 1])
    _check_gradients_into(grads, q, k, v, do, 0.125, "mixed layouts")


def test_backward_is_deterministic():
    q, k, v, do = _dense_inputs(2, 100, 3, 64, BF16)
    first = _run_dense(q, k, v, do, 0.125)
    second = _run_dense(q, k, v, do, 0.125)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# --- varlen ----------------------------------------------------------------------------------------


def _check_varlen(lengths, heads, head_dim, dtype, max_seqlen=None, packed=False):
    """All sequences in one call, each checked against the dense reference on its own."""
    total, scale = sum(lengths), head_dim**-0.5
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu_seqlens = cu_seqlens.to(DEVICE)
    max_seqlen = max_seqlen or max(lengths)
    if packed:  # views of [T, 3, H, D]; gradients into one such tensor
        qkv = _randn(total, 3, heads, head_dim, dtype=dtype)
        q, k, v = qkv.unbind(1)
        dqkv = torch.full_like(qkv, float("nan"))
        dq, dk, dv = dqkv.unbind(1)
    else:
        q, k, v = (_randn(total, heads, head_dim, dtype=dtype) for _ in range(3))
        dq, dk, dv = (_nan_like(t) for t in (q, k, v))
    do = _randn(total, heads, head_dim, dtype=dtype)

    o, lse = attention.attention_fwd(q, k, v, scale, cu_seqlens, max_seqlen)
    assert o.shape == q.shape and o.dtype == dtype and lse.shape == (heads, total)
    attention.attention_bwd(do, q, k, v, o, lse, scale, dq, dk, dv, cu_seqlens, max_seqlen)
    bounds = cu_seqlens.tolist()
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = [t[start:end].unsqueeze(0) for t in (q, k, v, do)]
        expected = _reference(*part, scale)
        actual = (o[start:end], lse[:, start:end], dq[start:end], dk[start:end], dv[start:end])
        for name, got, ref in zip(("o", "lse", "dq", "dk", "dv"), actual, expected):
            _check(f"sequence {i} (length {end - start}) {name}", got, ref.squeeze(0))


@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
def test_varlen_random_lengths(dtype):
    """Random lengths with 1 among them, and the multi-crop shape in small: long and short crops."""
    generator = torch.Generator().manual_seed(7)
    lengths = [1, 257, 50, *torch.randint(1, 140, (5,), generator=generator).tolist(), 2, 64]
    _check_varlen(lengths, heads=3, head_dim=64, dtype=dtype)


@pytest.mark.parametrize("head_dim", [32, 80])
def test_varlen_packed_views_and_spare_grid(head_dim):
    """Views of a packed [T, 3, H, D] tensor; max_seqlen above the longest sequence (programs past
    every sequence's end must exit), and 128-row forward tiles (max_seqlen 190)."""
    lengths = [37, 1, 129, 64, 90]
    _check_varlen(lengths, heads=2, head_dim=head_dim, dtype=FP16, max_seqlen=190, packed=True)


# --- tile table and ahead-of-time compiles ---------------------------------------------------------


def test_tile_table():
    fwd = attention._fwd_config
    assert fwd(64, BF16, 257)[0] == 64 and fwd(64, BF16, 261)[0] == 64  # 320 rows, not 384
    assert fwd(64, BF16, 197)[0] == 128 and fwd(64, BF16, 4096)[0] == 128
    assert fwd(64, BF16, 50)[0] == 64
    assert attention._bwd_config("dkdv", 64, BF16, 4096)[1] == 128


def _aot_key(kernel_name, constexprs, num_warps, num_stages):
    return kernel_name, tuple(sorted(constexprs.items())), num_warps, num_stages


def test_aot_configurations_cover_every_tile_the_launchers_pick():
    """Whatever sequence length comes, the GPU's tiles for it are among the compiled ones."""
    configured = {
        _aot_key(kernel.__name__, {k: v for k, v in cx.items() if v is not None}, warps, stages)
        for kernel, _signature, cx, warps, stages, _divisible in attention.aot_configurations()
    }
    for head_dim in attention.HEAD_DIMS:
        block_d = 1 << (head_dim - 1).bit_length()  # the next power of two
        for dtype in (FP32, FP16, BF16):
            for varlen in (False, True):
                common = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, IS_VARLEN=varlen, UPCAST=False)
                for seqlen in (1, 50, 64, 65, 127, 128, 197, 257, 1023, 1024, 1370, 4096, 5000):
                    choices = {
                        "_attn_fwd": attention._fwd_config(head_dim, dtype, seqlen, False),
                        "_attn_bwd_dkdv": attention._bwd_config(
                            "dkdv", head_dim, dtype, seqlen, False
                        ),
                        "_attn_bwd_dq": attention._bwd_config("dq", head_dim, dtype, seqlen, False),
                    }
                    for kernel, (block_m, block_n, warps, stages) in choices.items():
                        tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n)
                        key = _aot_key(kernel, {**common, **tiles}, warps, stages)
                        assert key in configured, key


@pytest.fixture(scope="module")
def aot_compiles():
    """Compile for sm_90 and sm_80 in two concurrent subprocesses (TRITON_INTERPRET unset)."""
    return run_in_subprocesses("attention", timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_every_triton_configuration_compiles_for(arch, aot_compiles):
    out, err, returncode = aot_compiles[arch]
    assert returncode == 0, err[-4000:]
    rows = [json.loads(line) for line in out.splitlines()]
    configurations = list(attention.aot_configurations())
    assert len(rows) == len(configurations)
    for kernel in ("_attn_fwd", "_attn_bwd_dkdv", "_attn_bwd_dq"):
        covered = {
            (row["constexprs"]["HEAD_DIM"], row["constexprs"]["IS_VARLEN"])
            for row in rows
            if row["kernel"] == kernel
        }
        assert covered == {(d, v) for d in attention.HEAD_DIMS for v in (False, True)}, kernel
    preprocess = {row["constexprs"]["HEAD_DIM"] for row in rows if "preprocess" in row["kernel"]}
    assert preprocess == set(attention.HEAD_DIMS)  # one kernel for dense and varlen
    for row, (_kernel, signature, *_) in zip(rows, configurations):
        assert row["shared"] <= H100_SHARED_MEMORY, row
        # fp16/bf16 dots run on the tensor cores, with Hopper's wgmma on sm_90; fp32 dots are
        # ieee on purpose (CUDA cores), and the preprocess has no dot.
        sixteen_bit = next(iter(signature.values())) in ("*fp16", "*bf16")  # Q's or O's type
        if sixteen_bit and row["kernel"] != "_attn_bwd_preprocess":
            assert row["wgmma"] if arch == 90 else row["mma"], row
