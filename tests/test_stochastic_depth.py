"""index_select_cat and scaled_index_add (the fused residual update): every backend against a
float64 reference, gradients, in-place safety, the op contract, bad inputs, AOT compiles.

backend="cuda" runs csrc/'s kernels: on a GPU when the extension is built, on the CPU through
tests/cuda_emulator (the ``emulated_cuda`` fixture, switched on for every test whose ``backend``
parameter is "cuda")."""

from __future__ import annotations

import json
import math

import pytest
import torch
from aot_compile import H100_SHARED_MEMORY, run_in_subprocesses
from reference import assert_close_to_reference

from dinov2_fast import _backend
from dinov2_fast.ops import index_select_cat, index_select_layer_norm, scaled_index_add

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _backends(op="scaled_index_add"):
    """The backends of ``op`` that run here ("cuda" on the CPU through the emulator)."""
    device = torch.device(DEVICE)
    backends = ["torch"]
    if not _backend.unavailable_reason("triton", device):
        backends.append("triton")
    if "cuda" in _backend.AUTO_PREFERENCE[op] and (
        DEVICE == "cpu" or not _backend.unavailable_reason("cuda", device)
    ):
        backends.append("cuda")
    return backends


@pytest.fixture(autouse=True)
def _emulate_cuda_backend(request):
    """Tests parametrized with backend="cuda" run the emulated kernels on the CPU."""
    callspec = getattr(request.node, "callspec", None)
    if DEVICE == "cpu" and callspec is not None and callspec.params.get("backend") == "cuda":
        request.getfixturevalue("emulated_cuda")


def _randn(shape, dtype, device=DEVICE):
    return torch.randn(shape, dtype=torch.float64).to(device, dtype)


def _subset(batch, kept, index_dtype=torch.int64, strided=False):
    index = torch.randperm(batch)[:kept].to(DEVICE, index_dtype)
    # strided: a view with element stride 2 (a column of a [kept, 2] tensor).
    return torch.stack([index, index], 1)[:, 0] if strided else index


def _in_layout(shape, dtype, layout):
    """Fresh random values of ``shape`` stored as ``layout``: "contiguous"; "offset" (one element
    into its storage: not 16-byte aligned, the CUDA kernels' scalar path); "padded" (rows of C + 8
    elements: row strides other than C, still 16-byte aligned for the vector path)."""
    if layout == "offset":
        return _randn(math.prod(shape) + 1, dtype)[1:].view(shape)
    if layout == "padded":
        return _randn((*shape[:-1], shape[-1] + 8), dtype)[..., : shape[-1]]
    return _randn(shape, dtype)


# --- index_select_cat ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_index_select_cat_matches_reference(backend, dtype, index_dtype):
    shapes = [(7, 5, 33), (4, 1000), (1, 2, 3, 7), (6,)]
    kept = [4, 4, 1, 0]
    sources = [_randn(s, dtype).requires_grad_() for s in shapes]
    indices = [_subset(s[0], k, index_dtype) for s, k in zip(shapes, kept)]
    out = index_select_cat(sources, indices, backend=backend)
    leaves = [s.detach().double().requires_grad_() for s in sources]
    expected = torch.cat([s[i.long()].flatten() for s, i in zip(leaves, indices)])
    assert out.dtype == dtype and out.shape == expected.shape
    assert torch.equal(out.double(), expected)  # a gather is exact
    grad = torch.randn_like(expected)
    out.backward(grad.to(dtype))
    expected.backward(grad.to(dtype).double())
    for i, (source, leaf) in enumerate(zip(sources, leaves)):
        assert torch.equal(source.grad.double(), leaf.grad), f"grad of sources[{i}]"


@pytest.mark.parametrize("backend", _backends())
def test_index_select_cat_reads_strided_sources(backend):
    base = _randn((5, 6, 3, 40), torch.float32)
    source = base[:, :, 1]  # [5, 6, 40], a slice of a qkv-like tensor
    index = _subset(5, 3)
    out = index_select_cat([source], [index], backend=backend)
    assert torch.equal(out, source[index].flatten())


def test_index_select_cat_bad_inputs():
    x = torch.randn(4, 3)
    good = torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r"indices\[0\] must hold values in \[0, 4\), got 4"):
        index_select_cat([x], [torch.tensor([1, 4])])
    with pytest.raises(ValueError, match=r"indices\[0\] must not repeat a value \(got 2"):
        index_select_cat([x], [torch.tensor([2, 0, 2])])
    with pytest.raises(ValueError, match="one tensor per source"):
        index_select_cat([x, x], [good])
    with pytest.raises(ValueError, match="at least one"):
        index_select_cat([], [])
    with pytest.raises(TypeError, match=r"sources\[1\] must have sources\[0\]'s dtype"):
        index_select_cat([x, x.half()], [good, good])
    with pytest.raises(TypeError, match=r"indices\[0\] must be int32 or int64"):
        index_select_cat([x], [good.float()])
    with pytest.raises(ValueError, match=r"indices\[0\] must be 1-D"):
        index_select_cat([x], [good.view(1, 2)])
    with pytest.raises(ValueError, match=r"sources\[1\] must be on the same device"):
        index_select_cat([x, x.to("meta")], [good, good])
    with pytest.raises(TypeError, match=r"sources\[0\] must be float32"):
        index_select_cat([x.long()], [good])
    with pytest.raises(ValueError, match="backend must be one of"):
        index_select_cat([x], [good], backend="fast")


# --- index_select_layer_norm --------------------------------------------------------------------


def _check_index_select_layer_norm(
    backend, dtype, shapes, kept, autocast=False, layout="contiguous"
):
    dim = shapes[0][-1]
    sources = [_in_layout(s, dtype, layout) for s in shapes]
    for source in sources:
        source.mul_(2).add_(0.5).requires_grad_()
    indices = [
        _subset(s[0], k, torch.int32 if i else torch.int64)
        for i, (s, k) in enumerate(zip(shapes, kept))
    ]
    param_dtype = torch.float32 if autocast else dtype
    weight = (_randn(dim, param_dtype) + 1).requires_grad_()
    bias = _randn(dim, param_dtype).requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        out = index_select_layer_norm(sources, indices, weight, bias, 1e-6, backend=backend)
    assert out.dtype == (torch.bfloat16 if autocast else dtype)
    leaves = [t.detach().double().requires_grad_() for t in (*sources, weight, bias)]
    gathered = torch.cat([s[i.long()].reshape(-1, dim) for s, i in zip(leaves, indices)])
    expected = torch.nn.functional.layer_norm(gathered, (dim,), leaves[-2], leaves[-1], 1e-6)
    assert_close_to_reference(out, expected, "out", condition=8.0)
    grad = torch.randn_like(expected).to(out.dtype)
    out.backward(grad)
    expected.backward(grad.double())
    for i, (t, leaf) in enumerate(zip((*sources, weight, bias), leaves)):
        rows = max(1, expected.shape[0]) if i >= len(sources) else 1
        assert_close_to_reference(t.grad, leaf.grad, f"grad {i}", condition=8.0 * rows)


@pytest.mark.parametrize("backend", _backends("index_select_layer_norm"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_index_select_layer_norm_matches_reference(backend, dtype):
    _check_index_select_layer_norm(backend, dtype, [(7, 9, 96), (5, 1, 96), (3, 4, 96)], [4, 5, 0])


@pytest.mark.parametrize("backend", _backends("index_select_layer_norm"))
def test_index_select_layer_norm_under_autocast_odd_width(backend):
    _check_index_select_layer_norm(backend, torch.float32, [(6, 5, 37), (2, 3, 37)], [3, 1], True)


@pytest.mark.parametrize("backend", _backends("index_select_layer_norm"))
@pytest.mark.parametrize("layout", ["offset", "padded"])
@pytest.mark.parametrize("dim", [7, 384, 1000, 4104])
def test_index_select_layer_norm_reads_any_layout(backend, layout, dim):
    # 4104 is over 4096: the kernels' layout for long rows.
    _check_index_select_layer_norm(
        backend, torch.bfloat16, [(5, 3, dim), (4, 1, dim)], [3, 2], False, layout
    )


def test_index_select_layer_norm_bad_inputs():
    x, good = torch.randn(4, 3, 8), torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r"indices\[0\] must not repeat"):
        index_select_layer_norm([x], [torch.tensor([1, 1])])
    with pytest.raises(ValueError, match=r"sources\[0\] must be \[B, N, C\]"):
        index_select_layer_norm([x[0]], [good])
    with pytest.raises(ValueError, match=r"sources\[1\] must have sources\[0\]'s C \(8\), got 9"):
        index_select_layer_norm([x, torch.randn(4, 3, 9)], [good, good])
    with pytest.raises(TypeError, match=r"sources\[1\] must have sources\[0\]'s dtype"):
        index_select_layer_norm([x, x.half()], [good, good])
    with pytest.raises(ValueError, match=r"weight must have shape \[8\]"):
        index_select_layer_norm([x], [good], torch.ones(9))
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        index_select_layer_norm([x], [good], eps=-1.0)


# --- scaled_index_add ----------------------------------------------------------------------------


def _scaled_index_add_reference(x, index, source, scaling, alpha):
    """float64 leaves and result: ``x.index_add(0, index, scaling * source, alpha)``."""
    leaves = [
        None if t is None else t.detach().double().requires_grad_() for t in (x, source, scaling)
    ]
    x64, source64, scaling64 = leaves
    added = source64 if scaling64 is None else source64 * scaling64
    return torch.index_add(x64, 0, index.long(), added, alpha=alpha), leaves


CASES = [
    # x shape, kept, x dtype, source dtype, scaling dtype (None: no scaling), alpha
    ((7, 9, 64), 4, torch.float32, torch.bfloat16, torch.float32, 7 / 4),
    ((5, 50, 384), 3, torch.bfloat16, torch.bfloat16, torch.bfloat16, 5 / 3),
    ((3, 1, 1000), 3, torch.float16, torch.float16, None, 1.0),
    ((1, 257, 7), 1, torch.float32, torch.float32, torch.float32, -0.5),
    ((6, 4), 2, torch.float32, torch.float16, torch.float32, 3.0),
    ((4, 3, 2, 8), 0, torch.float32, torch.float32, torch.float32, 2.0),
]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-k{c[1]}")
def test_scaled_index_add_matches_reference(backend, inplace, case):
    _check_scaled_index_add(backend, inplace, case)


def _check_scaled_index_add(backend, inplace, case, layout="contiguous"):
    shape, kept, x_dtype, source_dtype, scaling_dtype, alpha = case
    x = _in_layout(shape, x_dtype, layout).requires_grad_()
    index_dtype = torch.int32 if kept % 2 else torch.int64
    index = _subset(shape[0], kept, index_dtype, strided=layout == "padded")
    source = _in_layout((kept, *shape[1:]), source_dtype, layout).requires_grad_()
    scaling = None
    if scaling_dtype is not None:
        scaling = (torch.rand(shape[-1], dtype=torch.float64) + 0.5).to(DEVICE, scaling_dtype)
        scaling.requires_grad_()
    # In place needs a non-leaf: x copied into a buffer of the same layout.
    target = _in_layout(shape, x_dtype, layout).copy_(x) if inplace else x
    out = scaled_index_add(target, index, source, scaling, alpha, inplace=inplace, backend=backend)
    if inplace:
        assert out is target
    expected, (x64, source64, scaling64) = _scaled_index_add_reference(
        x, index, source, scaling, alpha
    )
    assert out.dtype == x_dtype and out.shape == x.shape
    # One rounding of the fp32 result to x's dtype; the product of two roundings' worth of inputs.
    assert_close_to_reference(out, expected, "out", condition=abs(alpha) * 4)
    grad = torch.randn_like(expected)
    out.backward(grad.to(x_dtype))
    expected.backward(grad.to(x_dtype).double())
    assert torch.equal(x.grad.double(), x64.grad), "the stream's gradient passes through"
    assert_close_to_reference(source.grad, source64.grad, "grad source", abs(alpha) * 4)
    if scaling is not None:
        rows = max(1, kept * math.prod(shape[1:-1]))
        assert_close_to_reference(scaling.grad, scaling64.grad, "grad scaling", abs(alpha) * rows)


@pytest.mark.parametrize("backend", _backends())
def test_scaled_index_add_strided_inputs_and_expanded_grad(backend):
    base = _randn((6, 5, 3, 32), torch.float32)
    x = base[:, :, 0].requires_grad_(False).clone()[:, ::1]  # contiguous copy
    x_strided = base[:, :, 2]  # [6, 5, 32], row stride 96
    index = _subset(6, 4)
    source = _randn((12, 5, 32), torch.float32)[::3].requires_grad_()  # [4, 5, 32], strided
    scaling = torch.rand(32, device=DEVICE, requires_grad=True)
    for target in (x, x_strided):
        out = scaled_index_add(target, index, source, scaling, 1.5, backend=backend)
        expected, _ = _scaled_index_add_reference(target, index, source, scaling, 1.5)
        assert_close_to_reference(out, expected, "out", 6.0)
    out.sum().backward()  # an expanded (stride 0) gradient
    expected_source_grad = (1.5 * scaling.detach()).expand(4, 5, 32)
    torch.testing.assert_close(source.grad, expected_source_grad)
    torch.testing.assert_close(scaling.grad, 1.5 * source.detach().sum((0, 1)))


# Odd widths (C = 384, 1000, 7, 1) with mixed dtypes, stored misaligned or with padded rows.
LAYOUT_CASES = [
    ((5, 6, 384), 3, torch.float32, torch.bfloat16, torch.float32, 5 / 3),
    ((4, 1000), 2, torch.bfloat16, torch.bfloat16, None, 2.0),
    ((6, 3, 7), 4, torch.float16, torch.float32, torch.bfloat16, 1.5),
    ((5, 2, 1), 3, torch.float32, torch.float16, torch.float16, -1.0),
]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("layout", ["offset", "padded"])
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=lambda c: "x".join(map(str, c[0])))
def test_scaled_index_add_reads_any_layout(backend, inplace, layout, case):
    _check_scaled_index_add(backend, inplace, case, layout)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["offset", "padded"])
def test_index_select_cat_reads_any_layout(backend, dtype, layout):
    shapes = [(7, 5, 384), (4, 1000), (3, 2, 7), (6, 1), (9,)]
    kept = [4, 4, 2, 0, 5]
    sources = [_in_layout(s, dtype, layout).requires_grad_() for s in shapes]
    indices = [
        _subset(s[0], k, torch.int32 if i % 2 else torch.int64, strided=layout == "padded")
        for i, (s, k) in enumerate(zip(shapes, kept))
    ]
    out = index_select_cat(sources, indices, backend=backend)
    leaves = [s.detach().double().requires_grad_() for s in sources]
    expected = torch.cat([s[i.long()].flatten() for s, i in zip(leaves, indices)])
    assert torch.equal(out.double(), expected)
    grad = torch.randn_like(expected).to(dtype)
    out.backward(grad)
    expected.backward(grad.double())
    for i, (source, leaf) in enumerate(zip(sources, leaves)):
        assert torch.equal(source.grad.double(), leaf.grad), f"grad of sources[{i}]"


@pytest.mark.parametrize("backend", _backends())
def test_many_indices(backend):
    # Over 512 indices the CUDA kernels first write the inverse index to a workspace.
    batch, kept = 700, 600
    source = _randn((batch, 2, 3), torch.float32).requires_grad_()
    index = _subset(batch, kept)
    out = index_select_cat([source], [index], backend=backend)
    assert torch.equal(out, source.detach()[index].flatten())
    out.backward(torch.ones_like(out))
    picked = torch.zeros(batch, dtype=torch.bool, device=DEVICE)
    picked[index] = True
    assert torch.equal(source.grad, picked.float()[:, None, None].expand(batch, 2, 3))
    case = ((batch, 1, 5), kept, torch.float32, torch.bfloat16, torch.float32, batch / kept)
    _check_scaled_index_add(backend, False, case)


@pytest.mark.parametrize("backend", _backends())
def test_scaled_index_add_inplace_is_safe_under_autograd(backend):
    x = torch.randn(5, 3, 8, device=DEVICE, requires_grad=True)
    index, source = _subset(5, 2), torch.randn(2, 3, 8, device=DEVICE)
    stream = x * 2
    saved = stream.square().sum()  # square saves stream's value for its backward
    scaled_index_add(stream, index, source, inplace=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()
    with pytest.raises(RuntimeError, match="leaf Variable"):
        scaled_index_add(x, index, source, inplace=True, backend=backend)
    transposed = torch.randn(8, 3, 5, device=DEVICE).transpose(0, 2)
    with pytest.raises(ValueError, match="inplace=True needs x viewable"):
        scaled_index_add(transposed, index, source, inplace=True, backend=backend)
    plain = torch.randn(5, 3, 8, device=DEVICE)  # no autograd: only the indexed samples change
    before = plain.clone()
    scaled_index_add(plain, index, source, None, 2.0, inplace=True, backend=backend)
    untouched = [b for b in range(5) if b not in index.tolist()]
    assert torch.equal(plain[untouched], before[untouched])
    torch.testing.assert_close(plain[index], before[index] + 2.0 * source)


def test_scaled_index_add_bad_inputs():
    x, source, index = torch.randn(4, 3, 8), torch.randn(2, 3, 8), torch.tensor([3, 1])
    with pytest.raises(ValueError, match=r"index must hold values in \[0, 4\), got -1"):
        scaled_index_add(x, torch.tensor([-1, 2]), source)
    with pytest.raises(ValueError, match=r"index must not repeat a value \(got 1"):
        scaled_index_add(x, torch.tensor([1, 1]), source)
    with pytest.raises(ValueError, match=r"source must have shape \[3, 3, 8\]"):
        scaled_index_add(x, torch.tensor([0, 1, 2]), source)
    with pytest.raises(ValueError, match=r"scaling must have shape \[8\]"):
        scaled_index_add(x, index, source, torch.ones(3))
    with pytest.raises(TypeError, match="scaling must be float32"):
        scaled_index_add(x, index, source, torch.ones(8, dtype=torch.int64))
    with pytest.raises(TypeError, match="source must be float32"):
        scaled_index_add(x, index, source.long())
    with pytest.raises(ValueError, match="source must be on the same device"):
        scaled_index_add(x, index, source.to("meta"))
    with pytest.raises(ValueError, match="alpha must be finite"):
        scaled_index_add(x, index, source, alpha=float("nan"))
    with pytest.raises(TypeError, match="alpha must be a float"):
        scaled_index_add(x, index, source, alpha="2")
    with pytest.raises(TypeError, match="index must be int32 or int64"):
        scaled_index_add(x, index.float(), source)


def test_cuda_launchers_reject_bad_arguments(emulated_cuda):
    # Tags are checked in the bindings, sizes in the launchers, both before any CUDA work.
    ext = emulated_cuda
    select = lambda index_dtype, dtype, k=1: ext.index_select_rows(  # noqa: E731
        0, 0, 0, index_dtype, 1, k, 1, 8, 8, 8, 8, 8, dtype, 0
    )
    with pytest.raises(ValueError, match=r"index_select_rows: unknown index dtype tag 2"):
        select(2, 0)
    with pytest.raises(ValueError, match=r"index_select_rows: unknown dtype tag 3 for dtype"):
        select(0, 3)
    with pytest.raises(RuntimeError, match=r"index_select_rows: CUDA error"):
        select(0, 0, k=-1)
    add = lambda batch, k, source_dtype=0: ext.scaled_index_add_fwd(  # noqa: E731
        0, 0, 0, 0, 0, 1, 1, 0, batch, k, 1, 8, 1.0, 8, 8, 8, 8, 8, 8, False, 0, source_dtype, 0, 0
    )
    with pytest.raises(ValueError, match=r"scaled_index_add_fwd: unknown dtype tag 3 for source"):
        add(4, 2, 3)
    with pytest.raises(RuntimeError, match=r"scaled_index_add_fwd: CUDA error"):
        add(4, 5)  # more indices than samples
    with pytest.raises(RuntimeError, match=r"index_select_layer_norm_fwd: CUDA error"):
        ext.index_select_layer_norm_fwd(
            0, 0, 1, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1e-6, 0, 0, 0
        )
    assert ext.inverse_index_workspace_size(512, 700) == 0
    assert ext.inverse_index_workspace_size(513, 700) == 700
    assert ext.scaled_index_add_bwd_partial_rows(0, 5, 8, 0) == 1


# The sizes of a DINOv2 ViT-L step at drop rate 0.4 (fp32 stream, bf16 branch, fp32 gamma).
VIT_L_CASES = [
    ((64, 257, 1024), 38, torch.float32, torch.bfloat16, torch.float32, 64 / 38),
    ((256, 50, 1024), 153, torch.bfloat16, torch.bfloat16, torch.float32, 256 / 153),
]


@pytest.mark.gpu
def test_gpu_ops_match_reference():
    for backend in _backends():
        for case in CASES + VIT_L_CASES:
            for inplace in (False, True):
                _check_scaled_index_add(backend, inplace, case)
        sources = [_randn((64, 257, 1024), torch.bfloat16), _randn((256, 50, 1024), torch.bfloat16)]
        indices = [_subset(64, 38), _subset(256, 153)]
        out = index_select_cat(sources, indices, backend=backend)
        assert torch.equal(out, torch.cat([s[i].flatten() for s, i in zip(sources, indices)]))
    for backend in _backends("index_select_layer_norm"):
        shapes = [(64, 257, 1024), (256, 50, 1024)]
        _check_index_select_layer_norm(backend, torch.float32, shapes, [38, 153], autocast=True)
        _check_index_select_layer_norm(backend, torch.bfloat16, shapes, [38, 153])


@pytest.mark.gpu
def test_gpu_backends_agree():
    """Every backend on the ViT-L step's sizes: the gather and its scatter bit for bit, the
    residual update and its gradients within rounding of torch's."""
    for shape, kept, x_dtype, source_dtype, scaling_dtype, alpha in VIT_L_CASES:
        x = _randn(shape, x_dtype).requires_grad_()
        source = _randn((kept, *shape[1:]), source_dtype).requires_grad_()
        gamma = _randn(shape[-1], scaling_dtype).requires_grad_()
        index, grad = _subset(shape[0], kept), _randn(shape, x_dtype)
        results = {}
        for backend in _backends():
            packed = index_select_cat([x], [index], backend=backend)
            (grad_x,) = torch.autograd.grad(packed, x, grad[index].flatten())
            out = scaled_index_add(x.detach(), index, source, gamma, alpha, backend=backend)
            results[backend] = (
                packed,
                grad_x,
                out,
                *torch.autograd.grad(out, (source, gamma), grad),
            )
        packed, grad_x, out, grad_source, grad_gamma = results["torch"]
        for backend, result in results.items():
            assert torch.equal(result[0], packed) and torch.equal(result[1], grad_x), backend
            torch.testing.assert_close(result[2], out, msg=backend)
            torch.testing.assert_close(result[3], grad_source, msg=backend)
            torch.testing.assert_close(result[4], grad_gamma, rtol=1e-4, atol=1e-3, msg=backend)


@pytest.mark.gpu
def test_gpu_gamma_gradient_is_deterministic():
    shape, kept = (64, 257, 1024), 38
    x = _randn(shape, torch.float32)
    source = _randn((kept, *shape[1:]), torch.bfloat16).requires_grad_()
    gamma = torch.rand(1024, device="cuda", requires_grad=True)
    index, grad = _subset(64, kept), _randn(shape, torch.float32)
    for backend in _backends():
        runs = []
        for _ in range(2):
            out = scaled_index_add(x, index, source, gamma, 64 / kept, backend=backend)
            runs.append(torch.autograd.grad(out, (source, gamma), grad))
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# --- the op contract -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", _backends())
def test_custom_ops_pass_opcheck(backend):
    x = torch.randn(5, 3, 16, device=DEVICE, requires_grad=True)
    source = torch.randn(2, 3, 16, device=DEVICE, requires_grad=True)
    scaling = torch.rand(16, device=DEVICE, requires_grad=True)
    index = _subset(5, 2)
    torch.library.opcheck(
        torch.ops.dinov2_fast.scaled_index_add.default, (x, index, source, scaling, 2.5, backend)
    )
    other = torch.randn(4, 2, 16, device=DEVICE, requires_grad=True)
    torch.library.opcheck(
        torch.ops.dinov2_fast.index_select_cat.default,
        ([x, other], [index, _subset(4, 3)], backend),
    )
    if backend not in _backends("index_select_layer_norm"):
        return
    weight = torch.rand(16, device=DEVICE, requires_grad=True)
    torch.library.opcheck(
        torch.ops.dinov2_fast.index_select_layer_norm_fwd.default,
        ([x, other], [index, _subset(4, 3)], weight, None, 1e-6, torch.float32, backend),
    )


@pytest.mark.parametrize("backend", _backends())
def test_compiles_without_graph_breaks(backend):
    def update(x, source, gamma, index, others, other_index):
        packed = index_select_cat(
            [x, others], [index, other_index], validate=False, backend=backend
        )
        out = scaled_index_add(
            x, index, source * packed[:1], gamma, 2.0, validate=False, backend=backend
        )
        return out.sum()

    args = (
        torch.randn(5, 3, 16, device=DEVICE, requires_grad=True),
        torch.randn(2, 3, 16, device=DEVICE, requires_grad=True),
        torch.rand(16, device=DEVICE, requires_grad=True),
        _subset(5, 2),
        torch.randn(4, 3, 16, device=DEVICE, requires_grad=True),
        _subset(4, 1),
    )
    expected = update(*args)
    torch.autograd.grad(expected, args[:3])
    compiled = torch.compile(update, fullgraph=True, backend="aot_eager")
    result = compiled(*args)
    torch.testing.assert_close(result, expected)
    torch.autograd.grad(result, args[:3])


# --- kernels compiled ahead of time for a GPU ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("module", ["index_select_cat", "scaled_index_add"])
@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_gpus(module, arch):
    pytest.importorskip("triton")
    out, err, returncode = run_in_subprocesses(module, (arch,))[arch]
    assert returncode == 0, err[-3000:]
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows, "no configurations compiled"
    assert max(row["shared"] for row in rows) <= H100_SHARED_MEMORY
