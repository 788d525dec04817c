"""The CUDA attention kernels (csrc/attention_fwd.cu, csrc/attention_bwd.cu) behind
``backend="cuda"``: on the CPU through the emulator of tests/cuda_emulator (the same sources,
compiled by the host compiler, warp primitives emulated lane by lane), on a GPU against torch and
Triton.

The kernels take float16 and bfloat16 (tensor-core inputs), so they are checked the way
FlashAttention's tests do: their error against a float64 reference must stay within a small multiple
of the error of plain PyTorch doing the same math in the same dtype (plus a few ulps).
"""

from __future__ import annotations

import pytest
import torch
from test_attention import _qkv, _reference

from dinov2_fast.ops import (
    BlockDiagonalMask,
    attention,
    attention_qkvpacked,
    memory_efficient_attention,
)

LOW_PRECISION = (torch.float16, torch.bfloat16)


def _assert_as_close_as_torch(name, got, exact, torch_in_dtype):
    """|got - exact| <= 3 |torch_in_dtype - exact| + 4 ulps of the largest value."""
    eps = torch.finfo(got.dtype).eps
    torch_error = (torch_in_dtype.double() - exact).abs().max().item()
    floor = 4 * eps * max(1.0, exact.abs().max().item())
    error = (got.double() - exact).abs().max().item()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    assert error <= 3 * torch_error + floor, (
        f"{name}: max error {error:.3g} > 3 x torch's {torch_error:.3g} + {floor:.3g}"
    )


def _check(run, inputs, reference, name):
    """Forward and gradients of ``run(*inputs)`` against ``reference(*inputs, dtype=...)``."""
    dtype = inputs[0].dtype
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = run(*leaves)
    dout = torch.randn_like(out)
    out.backward(dout)
    results = {}
    for ref_dtype in (torch.float64, dtype):
        ref_leaves = [t.detach().to(ref_dtype).requires_grad_() for t in inputs]
        ref = reference(*ref_leaves, dtype=ref_dtype)
        ref.backward(dout.to(ref_dtype))
        results[ref_dtype] = (ref.detach(), [leaf.grad for leaf in ref_leaves])
    (exact, exact_grads), (low, low_grads) = results[torch.float64], results[dtype]
    _assert_as_close_as_torch(f"{name}: out", out.detach(), exact, low)
    for i, leaf in enumerate(leaves):
        _assert_as_close_as_torch(f"{name}: grad {i}", leaf.grad, exact_grads[i], low_grads[i])


# --- on the CPU, through the emulator --------------------------------------------------------------


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(
    "shape",
    [(2, 37, 3, 64), (1, 1, 1, 32), (1, 130, 2, 128), (2, 65, 1, 80), (1, 70, 2, 96)],
    ids=str,
)
def test_dense_matches_reference(emulated_cuda, shape, dtype):
    _check(
        lambda q, k, v: attention(q, k, v, backend="cuda"),
        _qkv(shape, dtype, "cpu"),
        _reference,
        "",
    )


@pytest.mark.parametrize("length", [15, 16, 17, 63, 64, 65, 128, 129, 257])
def test_lengths_around_the_tile_edges(emulated_cuda, length):
    # 64-row query and key tiles (32-key tiles in the backward above D = 64): full tiles, one
    # row over, one short, and DINOv2's 257 tokens (four full tiles and a single row).
    for head_dim in (32, 96) if length < 200 else (64,):
        inputs = _qkv((1, length, 1, head_dim), torch.float16, "cpu")
        _check(lambda q, k, v: attention(q, k, v, backend="cuda"), inputs, _reference, "")


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_qkvpacked_reads_in_place_and_writes_one_gradient(emulated_cuda, dtype):
    qkv = torch.randn(2, 67, 3, 2, 64).to(dtype)
    _check(
        lambda t: attention_qkvpacked(t, scale=0.3, backend="cuda"),
        [qkv],
        lambda t, dtype: _reference(*t.unbind(2), scale=0.3, dtype=dtype),
        "qkv",
    )


@pytest.mark.parametrize("head_dim", [64, 128])
def test_packed_ragged_sequences(emulated_cuda, head_dim):
    seqlens = [5, 1, 70, 2, 64]
    cu_seqlens = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    _check(
        lambda q, k, v: attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=80, backend="cuda"),
        _qkv((sum(seqlens), 2, head_dim), torch.bfloat16, "cpu"),
        lambda q, k, v, dtype: _reference(q, k, v, seqlens=seqlens, dtype=dtype),
        "packed",
    )


def test_block_diagonal_mask_of_crops(emulated_cuda):
    crops = [torch.randn(2, 17, 2, 64).half(), torch.randn(3, 5, 2, 64).half()]
    mask, packed = BlockDiagonalMask.from_tensor_list(crops)
    out = memory_efficient_attention(packed, packed, packed, attn_bias=mask, backend="cuda")
    for got, crop in zip(mask.split(out), crops):
        _assert_as_close_as_torch(
            "crop",
            got,
            _reference(crop, crop, crop),
            _reference(crop, crop, crop, dtype=crop.dtype),
        )


def test_log_sum_exp_is_saved_in_natural_log(emulated_cuda):
    q, k, v = _qkv((2, 45, 3, 64), torch.float16, "cpu")
    _, lse = torch.ops.dinov2_fast.attention_fwd(q, k, v, 0.2, None, None, "cuda")
    scores = torch.einsum("bnhd,bmhd->bhnm", q.double(), k.double()) * 0.2
    torch.testing.assert_close(lse.double(), scores.logsumexp(-1), atol=1e-4, rtol=1e-5)


def test_unaligned_and_strided_inputs_are_read_correctly(emulated_cuda):
    # A view starting one element into its storage cannot be read with 16-byte copies: the op
    # copies it. A transposed-head layout is read in place through its strides.
    base = torch.randn(3 * 2 * 40 * 2 * 64 + 1).half()
    q, k, v = base[1:].view(3, 2, 40, 2, 64).unbind(0)
    strided = [
        t.transpose(0, 1) for t in _qkv((40, 2, 2, 64), torch.half, "cpu")
    ]  # [B, N, H, D] view
    for inputs in ((q, k, v), strided):
        _check(lambda q, k, v: attention(q, k, v, backend="cuda"), list(inputs), _reference, "")


def test_float32_is_refused_with_the_alternatives(emulated_cuda):
    q = torch.randn(1, 8, 1, 64)
    with pytest.raises(TypeError, match="float16 or bfloat16.*triton"):
        attention(q, q, q, backend="cuda")


def test_launchers_reject_bad_arguments(emulated_cuda):
    """What Python's checks let through reaches the launchers' own checks, named."""
    q = torch.randn(1, 8, 1, 64).half()
    out, lse = torch.empty_like(q), torch.empty(1, 1, 8)
    strides = (512, 64, 64)

    def forward(**changes):
        args = dict(
            q=q.data_ptr(), q_strides=strides, k=q.data_ptr(), k_strides=strides,
            v=q.data_ptr(), v_strides=strides, o=out.data_ptr(), o_strides=strides,
            lse=lse.data_ptr(), lse_strides=(8, 8), cu_seqlens=0, batch=1, seqlen=8, heads=1,
            head_dim=64, scale=0.125, dtype=1, stream=0,
        )  # fmt: skip
        emulated_cuda.attention_fwd(**{**args, **changes})

    forward()  # the arguments above are valid
    for changes, error, words in (
        (dict(dtype=0), ValueError, "float16 or bfloat16"),
        (dict(dtype=5), ValueError, "unknown dtype tag"),
        (dict(head_dim=48), ValueError, "head_dim must be"),
        (dict(q=q.data_ptr() + 2), RuntimeError, "attention_fwd: CUDA error"),  # not 16-byte
        (dict(k_strides=(512, 60, 64)), RuntimeError, "attention_fwd: CUDA error"),
        (dict(scale=0.0), RuntimeError, "attention_fwd: CUDA error"),
    ):
        with pytest.raises(error, match=words):
            forward(**changes)


def test_backward_is_deterministic(emulated_cuda):
    qkv = torch.randn(1, 90, 3, 2, 32).bfloat16()
    grads = []
    for _ in range(2):
        leaf = qkv.clone().requires_grad_()
        attention_qkvpacked(leaf, backend="cuda").sum().backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])


def test_opcheck(emulated_cuda):
    ops = torch.ops.dinov2_fast
    q, k, v = _qkv((1, 21, 2, 64), torch.bfloat16, "cpu")
    torch.library.opcheck(ops.attention_fwd.default, (q, k, v, 0.2, None, None, "cuda"))
    out, lse = ops.attention_fwd(q, k, v, 0.2, None, None, "cuda")
    torch.library.opcheck(
        ops.attention_bwd.default,
        (torch.randn_like(out), q, k, v, out, lse, 0.2, None, None, "cuda"),
    )
    qkv = torch.randn(9, 3, 2, 32).half()
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    torch.library.opcheck(ops.attention_qkvpacked_fwd.default, (qkv, 0.2, cu, 5, "cuda"))
    out, lse = ops.attention_qkvpacked_fwd(qkv, 0.2, cu, 5, "cuda")
    torch.library.opcheck(
        ops.attention_qkvpacked_bwd.default,
        (torch.randn_like(out), qkv, out, lse, 0.2, cu, 5, "cuda"),
    )


def test_torch_compile_traces_without_graph_breaks(emulated_cuda):
    torch._dynamo.reset()
    qkv = torch.randn(1, 9, 3, 2, 32).half().requires_grad_()
    compiled = torch.compile(
        lambda t: attention_qkvpacked(t * 1.5, backend="cuda").square(),
        fullgraph=True,
        backend="aot_eager",
    )
    compiled(qkv).sum().backward()
    eager = qkv.detach().clone().requires_grad_()
    attention_qkvpacked(eager * 1.5, backend="cuda").square().sum().backward()
    torch.testing.assert_close(qkv.grad, eager.grad)


# --- on a GPU --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(
    "shape",
    [(64, 257, 16, 64), (256, 50, 16, 64), (2, 1370, 4, 64), (3, 261, 5, 80), (8, 197, 6, 128)],
    ids=str,
)
def test_gpu_matches_torch_and_triton(shape, dtype):
    qkv = torch.randn(*shape[:2], 3, *shape[2:], device="cuda", dtype=dtype)
    dout = torch.randn(*shape, device="cuda", dtype=dtype)
    results = {}
    for backend in ("cuda", "triton", "torch"):
        leaf = qkv.clone().requires_grad_()
        out = attention_qkvpacked(leaf, backend=backend)
        out.backward(dout)
        results[backend] = (out.detach(), leaf.grad)
    for other in ("triton", "torch"):
        torch.testing.assert_close(results["cuda"][0], results[other][0], atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(results["cuda"][1], results[other][1], atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
def test_gpu_packed_multicrop_against_float64_and_deterministic(head_dim):
    heads = 1024 // head_dim
    crops = [torch.randn(8, 257, 3, heads, head_dim), torch.randn(32, 50, 3, heads, head_dim)]
    mask, qkv = BlockDiagonalMask.from_tensor_list([c.cuda().bfloat16() for c in crops])
    grads = []
    for _ in range(2):
        leaf = qkv[0].detach().clone().requires_grad_()
        out = memory_efficient_attention(*(t[None] for t in leaf.unbind(1)), attn_bias=mask,
                                         backend="cuda")  # fmt: skip
        out.backward(torch.ones_like(out))
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])
    q, k, v = qkv[0].unbind(1)
    _assert_as_close_as_torch(
        "packed",
        out[0],
        _reference(q, k, v, seqlens=mask.seqlens),
        _reference(q, k, v, seqlens=mask.seqlens, dtype=q.dtype),
    )
