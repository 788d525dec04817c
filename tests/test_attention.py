"""Attention ops, the block-diagonal mask and the modules: every backend against float64, the op
contract, DINOv2 compatibility. The kernels themselves are tested in test_attention_kernels.py."""

from __future__ import annotations

import importlib

import pytest
import torch
from reference import assert_close_to_reference

import dinov2_fast
from dinov2_fast import _backend
from dinov2_fast.ops import (
    BlockDiagonalMask,
    attention,
    attention_qkvpacked,
    memory_efficient_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _backends():
    found = ["torch"]
    if not _backend.unavailable_reason("triton", torch.device(DEVICE)):
        found.append("triton")
    return found


def _reference(q, k, v, scale=None, seqlens=None, dtype=torch.float64):
    """softmax(scale q kᵀ) v over [B, N, H, D] (or [T, H, D] split by seqlens) in ``dtype``:
    float64 is the exact reference; a 16-bit dtype rounds every step to it (the softmax in fp32),
    which is the error plain torch makes in that dtype."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if seqlens is not None:
        parts = zip(*(t.split(list(seqlens)) for t in (q, k, v)))
        return torch.cat([_reference(*(t[None] for t in p), scale, dtype=dtype)[0] for p in parts])
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) * scale
    probs = scores.softmax(-1, dtype=torch.promote_types(dtype, torch.float32)).to(dtype)
    return torch.einsum("bhnm,bmhd->bnhd", probs, v)


def _qkv(shape, dtype=torch.float32, device=DEVICE):
    return [torch.randn(shape, dtype=torch.float64).to(device, dtype) for _ in range(3)]


def _check_with_gradients(run, inputs, reference_inputs, reference_fn, name):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = run(*leaves)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_leaves = [t.detach().double().requires_grad_() for t in reference_inputs(leaves)]
    ref = reference_fn(*ref_leaves)
    ref.backward(dout.double())
    assert_close_to_reference(out.detach(), ref.detach(), f"{name}: out")
    for i, (leaf, ref_leaf) in enumerate(zip(leaves, ref_leaves)):
        grad_ref = ref_leaf.grad if len(leaves) == len(ref_leaves) else None
        if grad_ref is not None:
            assert_close_to_reference(leaf.grad, grad_ref, f"{name}: grad {i}")
    return leaves, ref_leaves


# --- numerics of the ops ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("shape", [(2, 37, 3, 64), (1, 1, 1, 32), (3, 50, 2, 80)], ids=str)
def test_attention_matches_reference(shape, backend):
    inputs = _qkv(shape)
    _check_with_gradients(
        lambda q, k, v: attention(q, k, v, backend=backend),
        inputs,
        lambda leaves: leaves,
        _reference,
        backend,
    )


@pytest.mark.parametrize("backend", _backends())
def test_qkvpacked_reads_in_place_and_returns_one_gradient(backend):
    qkv = torch.randn(2, 37, 3, 3, 64, device=DEVICE)
    leaf = qkv.clone().requires_grad_()
    out = attention_qkvpacked(leaf, scale=0.1, backend=backend)
    assert out.shape == (2, 37, 3, 64)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_leaf = qkv.double().requires_grad_()
    ref = _reference(*ref_leaf.unbind(2), scale=0.1)
    ref.backward(dout.double())
    assert_close_to_reference(out.detach(), ref.detach(), "out")
    assert leaf.grad.shape == qkv.shape
    assert_close_to_reference(leaf.grad, ref_leaf.grad, "dqkv")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize(
    "seqlens", [[5, 1, 37, 2, 50], [4, 4, 4, 9, 9, 1, 4]], ids=["ragged", "runs"]
)
def test_packed_sequences_match_per_segment_reference(backend, seqlens):
    cu_seqlens = torch.tensor([0, *torch.tensor(seqlens).cumsum(0).tolist()], dtype=torch.int32)
    inputs = _qkv((sum(seqlens), 3, 32))
    _check_with_gradients(
        lambda q, k, v: attention(
            q, k, v, cu_seqlens=cu_seqlens.to(DEVICE), max_seqlen=64, backend=backend
        ),
        inputs,
        lambda leaves: leaves,
        lambda q, k, v: _reference(q, k, v, seqlens=seqlens),
        backend,
    )


@pytest.mark.parametrize("backend", _backends())
def test_memory_efficient_attention_with_mask_is_attention_per_group(backend):
    crops = [torch.randn(2, 17, 2, 32, device=DEVICE), torch.randn(3, 5, 2, 32, device=DEVICE)]
    mask, packed = BlockDiagonalMask.from_tensor_list(crops)
    out = memory_efficient_attention(packed, packed, packed, attn_bias=mask, backend=backend)
    assert out.shape == packed.shape
    for got, crop in zip(mask.split(out), crops):
        assert_close_to_reference(got, _reference(crop, crop, crop), "group")
    plain = memory_efficient_attention(crops[0], crops[0], crops[0], backend=backend)
    assert_close_to_reference(plain, _reference(*[crops[0]] * 3), "no mask")


@pytest.mark.parametrize("backend", _backends())
def test_low_precision(backend):
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = _qkv((2, 37, 2, 64), dtype)
        out = attention(q, k, v, backend=backend)
        assert out.dtype == dtype
        ref = _reference(q, k, v)
        error = (out.double() - ref).abs().max().item()
        assert error < 8 * torch.finfo(dtype).eps, f"{dtype}: {error}"


# --- the op contract -------------------------------------------------------------------------------


def _dense():
    return torch.randn(2, 5, 3, 32)


@pytest.mark.parametrize(
    "call, error, words",
    [
        (lambda: attention(_dense(), _dense()[:, :4], _dense()), ValueError, "k must have q's shape"),
        (lambda: attention(_dense(), _dense().half(), _dense()), TypeError, "k must have q's dtype"),
        (lambda: attention(_dense(), _dense(), _dense().to("meta")), ValueError, "v must be on the same device"),
        (lambda: attention(_dense()[0], _dense()[0], _dense()[0]), ValueError, r"q must have shape \[B, N, H, D\]"),
        (lambda: attention(_dense().long(), _dense(), _dense()), TypeError, "q must be float32"),
        (lambda: attention(_dense(), _dense(), _dense(), scale=0.0), ValueError, "scale must be"),
        (lambda: attention(_dense(), _dense(), _dense(), scale="x"), TypeError, "scale must be"),
        (lambda: attention(_dense(), _dense(), _dense(), max_seqlen=5), ValueError, "max_seqlen is only for packed"),
        (lambda: attention(_dense(), _dense(), _dense(), backend="cuda"), RuntimeError, "backend='cuda'"),
        (lambda: attention_qkvpacked(torch.randn(2, 5, 2, 3, 32)), ValueError, "3 in dim -3"),
        (lambda: memory_efficient_attention(_dense(), _dense(), _dense(), p=0.1), ValueError, "dropout"),
        (lambda: memory_efficient_attention(_dense(), _dense(), _dense(), attn_bias=torch.zeros(5, 5)), TypeError, "attn_bias must be"),
    ],
)  # fmt: skip
def test_bad_inputs_name_the_argument(call, error, words):
    with pytest.raises(error, match=words):
        call()


@pytest.mark.parametrize(
    "cu_seqlens, max_seqlen, error, words",
    [
        (torch.tensor([0, 4, 9], dtype=torch.int64), None, TypeError, "cu_seqlens must be int32"),
        (torch.tensor([0, 5, 4, 9], dtype=torch.int32), None, ValueError, "strictly increasing"),
        (torch.tensor([1, 4, 9], dtype=torch.int32), None, ValueError, "start at 0"),
        (torch.tensor([0, 4, 8], dtype=torch.int32), None, ValueError, "end at T = 9"),
        (torch.tensor([0], dtype=torch.int32), None, ValueError, r"shape \[S \+ 1\]"),
        (torch.tensor([0, 4, 9], dtype=torch.int32), 4, ValueError, "at least the longest segment"),
        (torch.tensor([0, 4, 9], dtype=torch.int32), 5.0, TypeError, "max_seqlen must be an int"),
    ],
)
def test_bad_cu_seqlens(cu_seqlens, max_seqlen, error, words):
    q = torch.randn(9, 2, 32)
    with pytest.raises(error, match=words):
        attention(q, q, q, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "torch"])
def test_unsupported_head_dim_is_refused_by_kernels(backend):
    q = torch.randn(1, 3, 1, 48)
    with pytest.raises(ValueError, match="head dim D must be one of 32, 64, 80, 96, 128"):
        attention(q, q, q, backend=backend)
    attention(q, q, q, backend="torch")  # the reference takes any


@pytest.mark.parametrize("backend", [b for b in _backends() if b != "torch"])
def test_opcheck(backend):
    q, k, v = _qkv((1, 5, 2, 32))
    ops = torch.ops.dinov2_fast
    torch.library.opcheck(ops.attention_fwd.default, (q, k, v, 0.2, None, None, backend))
    out, lse = ops.attention_fwd(q, k, v, 0.2, None, None, backend)
    dout = torch.randn_like(out)
    torch.library.opcheck(
        ops.attention_bwd.default, (dout, q, k, v, out, lse, 0.2, None, None, backend)
    )
    qkv = torch.randn(9, 3, 2, 32, device=DEVICE)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    torch.library.opcheck(ops.attention_qkvpacked_fwd.default, (qkv, 0.2, cu, 5, backend))
    out, lse = ops.attention_qkvpacked_fwd(qkv, 0.2, cu, 5, backend)
    torch.library.opcheck(
        ops.attention_qkvpacked_bwd.default,
        (torch.randn_like(out), qkv, out, lse, 0.2, cu, 5, backend),
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", [b for b in _backends() if b != "torch"])
def test_torch_compile_traces_without_graph_breaks(backend):
    torch._dynamo.reset()
    qkv = torch.randn(1, 9, 3, 2, 32, device=DEVICE, requires_grad=True)
    compiled = torch.compile(
        lambda t: attention_qkvpacked(t * 1.5, backend=backend).square(),
        fullgraph=True,
        backend="aot_eager",
    )
    out = compiled(qkv)
    out.sum().backward()
    eager = qkv.detach().clone().requires_grad_()
    attention_qkvpacked(eager * 1.5, backend=backend).square().sum().backward()
    torch.testing.assert_close(qkv.grad, eager.grad)


# --- the mask --------------------------------------------------------------------------------------


def test_mask_from_seqlens_and_split():
    mask = BlockDiagonalMask.from_seqlens([3, 3, 2])
    assert mask.seqlens == (3, 3, 2) and mask.max_seqlen == 3 and mask.total == 8
    assert mask.cu_seqlens("cpu").tolist() == [0, 3, 6, 8]
    assert mask.cu_seqlens("cpu") is mask.cu_seqlens("cpu")  # cached
    x = torch.arange(16.0).view(1, 8, 2)
    assert [t.shape for t in mask.split(x)] == [(1, 3, 2), (1, 3, 2), (1, 2, 2)]
    mask._batch_sizes = [2, 1]  # as DINOv2 sets it
    first, second = mask.split(x)
    assert first.shape == (2, 3, 2) and torch.equal(first.reshape(-1), x[0, :6].reshape(-1))
    assert second.shape == (1, 2, 2)
    dense = mask.materialize()
    assert dense.shape == (8, 8) and dense[0, 2] == 0 and dense[0, 3] == float("-inf")


def test_mask_from_tensor_list_round_trips():
    tensors = [torch.randn(2, 5, 4), torch.randn(3, 2, 4)]
    mask, packed = BlockDiagonalMask.from_tensor_list(tensors)
    assert packed.shape == (1, 16, 4) and mask._batch_sizes == [2, 3]
    for back, original in zip(mask.split(packed), tensors):
        assert torch.equal(back, original)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: BlockDiagonalMask([]), "at least one"),
        (lambda: BlockDiagonalMask([3, 0]), "positive ints"),
        (lambda: BlockDiagonalMask.from_seqlens([3], [4]), "kv_seqlen"),
        (lambda: BlockDiagonalMask.from_tensor_list([torch.randn(2, 3, 4), torch.randn(2, 3, 5)]), "trailing shape"),
        (lambda: BlockDiagonalMask([3, 2]).split(torch.randn(1, 4, 2)), "5 packed tokens"),
    ],
)  # fmt: skip
def test_mask_bad_inputs(make, words):
    with pytest.raises(ValueError, match=words):
        make()


def test_mask_length_must_match_inputs():
    mask = BlockDiagonalMask([3, 3])
    q = torch.randn(1, 7, 1, 32)
    with pytest.raises(ValueError, match=r"\[1, 6, H, D\]"):
        memory_efficient_attention(q, q, q, attn_bias=mask)


# --- the modules -----------------------------------------------------------------------------------


class _DinoV2Attention(torch.nn.Module):
    """DINOv2's Attention as its code computes it, for keys and numerics."""

    def __init__(self, dim, num_heads, qkv_bias):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = torch.nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = torch.nn.Dropout(0.0)
        self.proj = torch.nn.Linear(dim, dim)
        self.proj_drop = torch.nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        qkv = (
            self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        )
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("cls", [dinov2_fast.nn.Attention, dinov2_fast.nn.MemEffAttention])
def test_module_matches_dinov2_attention(cls, backend):
    reference = _DinoV2Attention(96, 3, qkv_bias=True).to(DEVICE)
    ours = cls(96, num_heads=3, qkv_bias=True, backend=backend).to(DEVICE)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 37, 96, device=DEVICE)
    torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", _backends())
def test_module_packed_crops_equal_separate_calls(backend):
    module = dinov2_fast.nn.MemEffAttention(64, num_heads=2, backend=backend).to(DEVICE)
    crops = [torch.randn(2, 13, 64, device=DEVICE), torch.randn(3, 5, 64, device=DEVICE)]
    mask, packed = BlockDiagonalMask.from_tensor_list(crops)
    for got, crop in zip(mask.split(module(packed, attn_bias=mask)), crops):
        torch.testing.assert_close(got, module(crop), atol=1e-5, rtol=1e-5)


def test_module_attention_dropout_is_never_ignored():
    fused = dinov2_fast.nn.Attention(64, num_heads=2, attn_drop=0.1, backend="triton").train()
    with pytest.raises(ValueError, match="attn_drop=0.1 in training needs backend='torch'"):
        fused(torch.randn(1, 4, 64))
    reference = dinov2_fast.nn.Attention(64, num_heads=2, attn_drop=0.5, backend="torch").train()
    x = torch.randn(1, 16, 64)
    assert not torch.equal(reference(x), reference.eval()(x))  # dropout did act in training


def test_module_rejects_bad_configuration():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        dinov2_fast.nn.Attention(100, num_heads=3)
    with pytest.raises(ValueError, match="backend"):
        dinov2_fast.nn.Attention(64, backend="nope")
    with pytest.raises(ValueError, match="packed"):
        dinov2_fast.nn.Attention(64, num_heads=2)(torch.randn(2, 3, 64), BlockDiagonalMask([3]))


# --- on a GPU --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "shape", [(64, 257, 16, 64), (256, 50, 16, 64), (2, 1370, 4, 64), (3, 261, 5, 80)], ids=str
)
def test_gpu_matches_sdpa(shape, dtype):
    qkv = torch.randn(*shape[:2], 3, *shape[2:], device="cuda", dtype=dtype, requires_grad=True)
    out = attention_qkvpacked(qkv, backend="triton")
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_qkv = qkv.detach().clone().requires_grad_()
    ref = attention_qkvpacked(ref_qkv, backend="torch")
    ref.backward(dout)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(qkv.grad, ref_qkv.grad, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
def test_gpu_packed_multicrop_and_determinism():
    crops = [torch.randn(64, 257, 3, 16, 64), torch.randn(256, 50, 3, 16, 64)]
    mask, qkv = BlockDiagonalMask.from_tensor_list([c.cuda().bfloat16() for c in crops])
    grads = []
    for _ in range(2):
        leaf = qkv[0].detach().clone().requires_grad_()
        q, k, v = leaf.unbind(1)
        out = memory_efficient_attention(
            q[None], k[None], v[None], attn_bias=mask, backend="triton"
        )
        out.backward(torch.ones_like(out))
        grads.append(leaf.grad)
    assert torch.equal(grads[0], grads[1])
    ref = memory_efficient_attention(q[None], k[None], v[None], attn_bias=mask, backend="torch")
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


def test_cu_seqlens_is_read_once_and_again_after_an_in_place_change():
    attention_module = importlib.import_module("dinov2_fast.ops.attention")  # not the function
    q = torch.randn(9, 2, 32)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    attention(q, q, q, cu_seqlens=cu)
    assert attention_module._read_offsets[id(cu)][2] == [0, 4, 9]
    cu[1] = 5  # bumps the version: read and checked again
    out = attention(q, q, q, cu_seqlens=cu)
    assert attention_module._read_offsets[id(cu)][2] == [0, 5, 9]
    assert_close_to_reference(out, _reference(q, q, q, seqlens=[5, 4]), "out")
    cu[2] = 4
    with pytest.raises(ValueError, match="strictly increasing"):
        attention(q, q, q, cu_seqlens=cu)
