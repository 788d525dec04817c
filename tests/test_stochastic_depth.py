"""index_select_cat and scaled_index_add (the fused residual update): every backend against a
float64 reference, gradients, in-place safety, the op contract, bad inputs, AOT compiles."""

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


def _backends():
    backends = ["torch"]
    if not _backend.unavailable_reason("triton", torch.device(DEVICE)):
        backends.append("triton")
    return backends


def _randn(shape, dtype, device=DEVICE):
    return torch.randn(shape, dtype=torch.float64).to(device, dtype)


def _subset(batch, kept, index_dtype=torch.int64):
    return torch.randperm(batch)[:kept].to(DEVICE, index_dtype)


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


def _check_index_select_layer_norm(backend, dtype, shapes, kept, autocast=False):
    dim = shapes[0][-1]
    sources = [(_randn(s, dtype) * 2 + 0.5).requires_grad_() for s in shapes]
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


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", DTYPES)
def test_index_select_layer_norm_matches_reference(backend, dtype):
    _check_index_select_layer_norm(backend, dtype, [(7, 9, 96), (5, 1, 96), (3, 4, 96)], [4, 5, 0])


@pytest.mark.parametrize("backend", _backends())
def test_index_select_layer_norm_under_autocast_odd_width(backend):
    _check_index_select_layer_norm(backend, torch.float32, [(6, 5, 37), (2, 3, 37)], [3, 1], True)


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


def _check_scaled_index_add(backend, inplace, case):
    shape, kept, x_dtype, source_dtype, scaling_dtype, alpha = case
    x = _randn(shape, x_dtype).requires_grad_()
    index = _subset(shape[0], kept, torch.int32 if kept % 2 else torch.int64)
    source = _randn((kept, *shape[1:]), source_dtype).requires_grad_()
    scaling = None
    if scaling_dtype is not None:
        scaling = (torch.rand(shape[-1], dtype=torch.float64) + 0.5).to(DEVICE, scaling_dtype)
        scaling.requires_grad_()
    target = x * 1 if inplace else x  # in place needs a non-leaf
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
        shapes = [(64, 257, 1024), (256, 50, 1024)]
        _check_index_select_layer_norm(backend, torch.float32, shapes, [38, 153], autocast=True)
        _check_index_select_layer_norm(backend, torch.bfloat16, shapes, [38, 153])


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
