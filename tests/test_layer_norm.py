"""LayerNorm: every backend against a float64 reference, the op contract, the module, the kernels
compiled ahead of time for sm_90 and sm_80."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cuda_emulator
import pytest
import torch
import torch.nn.functional as F
from aot_compile import H100_SHARED_MEMORY, run_in_subprocesses
from reference import assert_close_to_reference

import dinov2_fast
from dinov2_fast import _backend
from dinov2_fast.ops import LAYER_NORM_MAX_DIM, layer_norm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROWS = [1, 3, 37, 257]
DIMS = [1, 7, 384, 1000, 1024, 1536, 4096]
REPO = Path(__file__).resolve().parents[1]
# Without a GPU, backend="cuda" runs csrc/'s kernels in the CPU emulator (tests/cuda_emulator).
EMULATED_CUDA = DEVICE == "cpu" and cuda_emulator.enabled()


def _cpu_backends():
    backends = ["torch"]
    if not _backend.unavailable_reason("triton", torch.device(DEVICE)):
        backends.append("triton")
    if EMULATED_CUDA:
        backends.append("cuda")
    return backends


@pytest.fixture(autouse=True)
def _cuda_backend_on_cpu(request):
    """Installs the emulated CUDA extension for the tests that may use backend="cuda": those
    parametrized with it and those that loop over _cpu_backends()."""
    callspec = getattr(request.node, "callspec", None)
    if EMULATED_CUDA and (callspec is None or callspec.params.get("backend", "cuda") == "cuda"):
        request.getfixturevalue("emulated_cuda")


def _gpu_backends():
    return [
        b
        for b in ("torch", "triton", "cuda")
        if not _backend.unavailable_reason(b, torch.device("cuda"))
    ]


def _inputs(shape, dtype, weight=True, bias=True, device=DEVICE):
    dim = shape[-1]
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(device, dtype)
    w = (torch.randn(dim, dtype=torch.float64) + 1).to(device, dtype) if weight else None
    b = torch.randn(dim, dtype=torch.float64).to(device, dtype) if bias else None
    return x, w, b


def _reference(x, w, b, dy, eps, dim):
    """float64 LayerNorm and its gradients by autograd."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = F.layer_norm(leaves[0], (dim,), leaves[1], leaves[2], eps)
    y.backward(dy.double())
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def _condition(x, w, dy, eps):
    """How far fp32 rounding of x - mean is amplified: |x|·rstd·|w|·|dy| (the row count for the
    parameter gradients); large only for rows with (almost) no variance, such as D = 1."""
    x64 = x.detach().double().reshape(-1, x.shape[-1])
    if x64.numel() == 0:
        return 1.0
    rstd = (x64.var(-1, unbiased=False) + eps).rsqrt()
    amplified = (x64.abs().amax(-1) * rstd).max().item()
    w_max = 1.0 if w is None else w.double().abs().max().item()
    return amplified * w_max * dy.double().abs().max().item() * x64.shape[0]


def _check_against_reference(x, w, b, backend, eps=1e-6):
    dim = x.shape[-1]
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    y = layer_norm(leaves[0], leaves[1], leaves[2], eps, backend=backend)
    assert y.dtype == x.dtype and y.shape == x.shape
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, grads_ref = _reference(x, w, b, dy, eps, dim)
    condition = _condition(x, w, dy, eps) if x.shape[-1] == 1 else 1.0
    assert_close_to_reference(y.detach(), y_ref, "y", condition)
    for name, leaf, grad_ref in zip(("dx", "dweight", "dbias"), leaves, grads_ref):
        if leaf is not None:
            assert leaf.grad.dtype == leaf.dtype
            assert_close_to_reference(leaf.grad, grad_ref, name, condition)


# --- numerics --------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("rows", ROWS)
def test_matches_float64_reference(rows, dim, dtype, backend):
    _check_against_reference(*_inputs((rows, dim), dtype), backend)


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_optional_weight_and_bias(weight, bias, dtype, backend):
    _check_against_reference(*_inputs((37, 1000), dtype, weight, bias), backend)


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.5])
def test_eps(eps, backend):
    _check_against_reference(*_inputs((3, 384), torch.float32), backend, eps=eps)


@pytest.mark.parametrize("backend", _cpu_backends())
def test_leading_shapes_and_strides(backend):
    dim = 257
    base, w, b = _inputs((4, 9, 2 * dim), torch.float32)
    w, b = w[:dim], b[::2]  # a strided bias too
    views = {
        "4d": base.view(4, 3, 3, 2 * dim)[..., :dim],  # row stride 2*dim, no copy needed
        "transposed": base[..., :dim].transpose(0, 1),  # leading dims out of order
        "last_dim_strided": base[..., ::2],  # non-unit stride along D: copied
        "empty_rows": base[:0, :, :dim],
    }
    for name, x in views.items():
        assert not x.is_contiguous() or name == "empty_rows", name
        leaf = x.detach().requires_grad_()
        y = layer_norm(leaf, w, b, backend=backend)
        dy = torch.randn_like(y)
        y.backward(dy)
        y_ref, grads_ref = _reference(x, w, b, dy, 1e-6, x.shape[-1])
        assert_close_to_reference(y.detach(), y_ref, f"{name}: y")
        assert_close_to_reference(leaf.grad, grads_ref[0], f"{name}: dx")


@pytest.mark.parametrize("backend", _cpu_backends())
def test_gradient_from_sum_is_expanded(backend):
    x, w, b = _inputs((5, 33), torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    layer_norm(*leaves, backend=backend).sum().backward()
    _, grads_ref = _reference(x, w, b, torch.ones(5, 33), 1e-6, 33)
    for leaf, grad_ref in zip(leaves, grads_ref):
        assert_close_to_reference(leaf.grad, grad_ref, "grad")


@pytest.mark.parametrize("backend", _cpu_backends())
def test_parameter_gradients_are_deterministic(backend):
    x, w, b = _inputs((257, 384), torch.float32)
    dy = torch.randn(257, 384)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)]
        layer_norm(*leaves, backend=backend).backward(dy)
        grads.append([leaf.grad for leaf in leaves])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", _cpu_backends())
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_writes_the_autocast_dtype(backend, param_dtype):
    x, _, _ = _inputs((37, 384), torch.float32)
    w = (torch.randn(384) + 1).to(DEVICE, param_dtype)
    b = torch.randn(384).to(DEVICE, param_dtype)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = layer_norm(*leaves, backend=backend)
    assert y.dtype == torch.bfloat16
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, grads_ref = _reference(x, w, b, dy, 1e-6, 384)
    assert_close_to_reference(y.detach(), y_ref, "y")
    assert leaves[0].grad.dtype == torch.float32
    assert leaves[1].grad.dtype == param_dtype
    for name, leaf, grad_ref in zip(("dx", "dweight", "dbias"), leaves, grads_ref):
        assert_close_to_reference(leaf.grad, grad_ref, name)


def test_backends_agree_on_autocast_with_bf16_activations():
    """The usual mixed case: bf16 activations, fp32 master weights, under autocast."""
    x = torch.randn(9, 64).to(DEVICE, torch.bfloat16)
    w, b = torch.randn(64, device=DEVICE), torch.randn(64, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        outputs = [layer_norm(x, w, b, backend=be) for be in _cpu_backends()]
    for y in outputs:
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, outputs[0], atol=2e-2, rtol=2e-2)


# --- the op contract -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_args, error, words",
    [
        (lambda: (torch.arange(6).view(2, 3), None, None), TypeError, "x must be"),
        (lambda: (torch.randn(2, 3, dtype=torch.float64), None, None), TypeError, "x must be"),
        (lambda: ([1.0, 2.0], None, None), TypeError, "x must be a torch.Tensor"),
        (lambda: (torch.randn(2, 3), torch.randn(4), None), ValueError, "weight must have shape [3]"),
        (lambda: (torch.randn(2, 3), None, torch.randn(3, 1)), ValueError, "bias must have shape"),
        (lambda: (torch.randn(2, 3), torch.randn(3).half(), None), TypeError, "weight must have x's dtype"),
        (lambda: (torch.randn(2, 3), torch.randn(3), torch.randn(3).double()), TypeError, "bias must be"),
        (lambda: (torch.randn(2, 3), torch.randn(3, device="meta"), None), ValueError, "weight must be on the same device"),
        (lambda: (torch.randn(2, 0), None, None), ValueError, "at least 1"),
        (lambda: (torch.tensor(1.0), None, None), ValueError, "at least one dimension"),
    ],
)  # fmt: skip
def test_bad_inputs_name_the_argument(make_args, error, words):
    x, w, b = make_args()
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        layer_norm(x, w, b)


def test_bias_dtype_must_match_weight_under_autocast():
    x = torch.randn(2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="bias must"):
        layer_norm(x, torch.randn(3), torch.randn(3).bfloat16())


@pytest.mark.parametrize(
    "eps, error", [(-1.0, ValueError), (float("nan"), ValueError), ("1e-6", TypeError)]
)
def test_bad_eps(eps, error):
    with pytest.raises(error, match="eps"):
        layer_norm(torch.randn(2, 3), eps=eps)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        layer_norm(torch.randn(2, 3), backend="fast")


def test_dim_over_the_kernel_limit():
    x = torch.randn(1, LAYER_NORM_MAX_DIM + 1)
    for backend in _cpu_backends():
        if backend == "torch":
            layer_norm(x, backend=backend)  # the reference has no limit
        else:
            with pytest.raises(ValueError, match=f"at most {LAYER_NORM_MAX_DIM}"):
                layer_norm(x, backend=backend)


def test_cuda_backend_without_extension_says_how_to_build():
    module, _ = _backend._import_extension()
    if module is not None and torch.cuda.is_available():
        pytest.skip("the extension is built and a GPU is present")
    with (
        _backend.emulate_cuda_extension(None),
        pytest.raises(RuntimeError, match="pip install|CUDA tensors"),
    ):
        layer_norm(torch.randn(2, 3), backend="cuda")


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    code = (
        "import torch, dinov2_fast\n"
        "try:\n"
        "    dinov2_fast.ops.layer_norm(torch.randn(2, 3), backend='triton')\n"
        "except RuntimeError as e:\n"
        "    print('ERROR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert "ERROR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def test_environment_override_applies_to_cuda_tensors_only(monkeypatch):
    monkeypatch.setenv(_backend.ENV_BACKEND, "cuda")
    assert _backend.resolve("layer_norm", "auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv(_backend.ENV_BACKEND, "bogus")
    with pytest.raises(ValueError, match=_backend.ENV_BACKEND):
        _backend.resolve("layer_norm", "auto", torch.device("cuda"))


@pytest.mark.parametrize("backend", _cpu_backends())
def test_opcheck(backend):
    x, w, b = _inputs((5, 48), torch.float32)
    for args in [
        (x, w, b, 1e-6, torch.float32, backend),
        (x, None, None, 1e-5, torch.float32, backend),
    ]:
        torch.library.opcheck(torch.ops.dinov2_fast.layer_norm_fwd.default, args)
    y, mean, rstd = torch.ops.dinov2_fast.layer_norm_fwd(x, w, b, 1e-6, torch.float32, backend)
    dy = torch.randn_like(y)
    torch.library.opcheck(
        torch.ops.dinov2_fast.layer_norm_bwd.default, (dy, x, w, mean, rstd, torch.float32, backend)
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", _cpu_backends())
def test_torch_compile_traces_without_graph_breaks(backend):
    torch._dynamo.reset()
    x, w, b = _inputs((6, 40), torch.float32)
    compiled = torch.compile(
        lambda x, w, b: layer_norm(x * 2, w, b, backend=backend).relu(),
        fullgraph=True,
        backend="aot_eager",
    )
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    y = compiled(*leaves)
    dy = torch.randn_like(y)
    y.backward(dy)
    eager = [t.clone().requires_grad_() for t in (x, w, b)]
    y_eager = layer_norm(eager[0] * 2, eager[1], eager[2], backend=backend).relu()
    y_eager.backward(dy)
    torch.testing.assert_close(y, y_eager)
    for leaf, ref in zip(leaves, eager):
        torch.testing.assert_close(leaf.grad, ref.grad)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):  # the autocast check is traced too
        assert compiled(*leaves).dtype == torch.bfloat16


# --- the module ------------------------------------------------------------------------------------


def test_module_is_a_drop_in_for_torch_layer_norm():
    ours, theirs = dinov2_fast.nn.LayerNorm(96, eps=1e-6), torch.nn.LayerNorm(96, eps=1e-6)
    assert isinstance(ours, torch.nn.LayerNorm)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 96, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = ours(x), theirs(x2)
    torch.testing.assert_close(y, y2)
    dy = torch.randn_like(y)
    y.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)


def test_swapping_into_a_model_changes_nothing_but_the_class():
    def block(norm):
        return torch.nn.Sequential(
            torch.nn.Linear(32, 64), norm(64, eps=1e-6), torch.nn.GELU(), torch.nn.Linear(64, 8)
        )

    reference = block(torch.nn.LayerNorm)
    swapped = block(dinov2_fast.nn.LayerNorm)
    swapped.load_state_dict(reference.state_dict())
    x = torch.randn(4, 7, 32)
    torch.testing.assert_close(swapped(x), reference(x))


@pytest.mark.parametrize(
    "kwargs",
    [dict(elementwise_affine=False), dict(bias=False), dict(normalized_shape=(4, 6))],
    ids=["no_affine", "no_bias", "two_dims"],
)
def test_module_options(kwargs):
    shape = kwargs.pop("normalized_shape", 24)
    ours, theirs = dinov2_fast.nn.LayerNorm(shape, **kwargs), torch.nn.LayerNorm(shape, **kwargs)
    if ours.weight is not None:
        with torch.no_grad():
            theirs.weight.normal_()
        ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 4, 6) if isinstance(shape, tuple) else torch.randn(3, 24)
    torch.testing.assert_close(ours(x), theirs(x))
    with pytest.raises(ValueError, match="normalized_shape"):
        ours(torch.randn(3, 5))


def test_module_takes_float64_through_torch():
    x = torch.randn(3, 8, dtype=torch.float64)
    norm = dinov2_fast.nn.LayerNorm(8, dtype=torch.float64)
    torch.testing.assert_close(norm(x), F.layer_norm(x, (8,), norm.weight, norm.bias, norm.eps))


def test_module_rejects_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        dinov2_fast.nn.LayerNorm(8, backend="nope")


# --- ahead-of-time compile of every Triton configuration -------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_every_triton_configuration_compiles_for(arch):
    out, err, returncode = run_in_subprocesses("layer_norm", (arch,))[arch]
    assert returncode == 0, err[-4000:]
    rows = [json.loads(line) for line in out.splitlines()]
    kernels = {row["kernel"] for row in rows}
    assert kernels == {"_layer_norm_fwd", "_layer_norm_bwd_dx", "_layer_norm_bwd_dwdb"}
    widths = {row["constexprs"]["BLOCK_D"] for row in rows if row["kernel"] == "_layer_norm_fwd"}
    assert widths == {2**i for i in range(15)}  # every tile the launcher can pick, up to 16384
    for row in rows:
        assert row["shared"] <= H100_SHARED_MEMORY, row


# --- on a GPU --------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(1, 1), (3, 7), (37, 1000), (257, 1536), (257, 4096), (16448, 1024), (5, 16384)]
)
def test_gpu_backends_match_reference(shape, dtype):
    for backend in _gpu_backends():
        _check_against_reference(*_inputs(shape, dtype, device="cuda"), backend)


@pytest.mark.gpu
@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)])
def test_gpu_optional_parameters_and_strides(weight, bias):
    for backend in _gpu_backends():
        _check_against_reference(
            *_inputs((257, 1000), torch.bfloat16, weight, bias, "cuda"), backend
        )
        x, w, b = _inputs((64, 2 * 768), torch.bfloat16, weight, bias, "cuda")
        _check_against_reference(
            x[:, :768], w[:768] if weight else None, b[:768] if bias else None, backend
        )


@pytest.mark.gpu
def test_gpu_autocast_and_determinism():
    x, _, _ = _inputs((16448, 1024), torch.float32, device="cuda")
    w, b = torch.randn(1024, device="cuda"), torch.randn(1024, device="cuda")
    dy = torch.randn(16448, 1024, device="cuda", dtype=torch.bfloat16)
    for backend in _gpu_backends():
        grads = []
        for _ in range(2):
            leaves = [t.clone().requires_grad_() for t in (x, w, b)]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = layer_norm(*leaves, backend=backend)
            assert y.dtype == torch.bfloat16
            y.backward(dy)
            grads.append([leaf.grad for leaf in leaves])
        y_ref, grads_ref = _reference(x, w, b, dy, 1e-6, 1024)
        assert_close_to_reference(y.detach(), y_ref, f"{backend}: y")
        for name, grad, grad_ref in zip(("dx", "dweight", "dbias"), grads[0], grads_ref):
            assert_close_to_reference(grad, grad_ref, f"{backend}: {name}")
        for first, second in zip(*grads):
            assert torch.equal(first, second), f"{backend}: not deterministic"


@pytest.mark.gpu
def test_gpu_compile_and_side_stream():
    x, w, b = _inputs((257, 1024), torch.bfloat16, device="cuda")
    for backend in _gpu_backends():
        compiled = torch.compile(
            lambda x, w, b, backend=backend: layer_norm(x, w, b, backend=backend), fullgraph=True
        )
        torch.testing.assert_close(
            compiled(x, w, b), layer_norm(x, w, b, backend="torch"), atol=2e-2, rtol=2e-2
        )
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            y = layer_norm(x, w, b, backend=backend)
        torch.cuda.current_stream().wait_stream(stream)
        torch.testing.assert_close(y, layer_norm(x, w, b, backend="torch"), atol=2e-2, rtol=2e-2)
