"""LayerNorm over the last dimension: validation, backend choice, autograd, torch.library registration.

The public function is :func:`layer_norm`. It flattens ``x: [..., D]`` to rows ``[M, D]`` and calls
the custom op ``dinov2_fast::layer_norm_fwd``; its autograd formula calls
``dinov2_fast::layer_norm_bwd``. Both ops are opaque to ``torch.compile`` (fake implementations
give their shapes), so a compiled model traces through them without graph breaks.
"""

from __future__ import annotations

import warnings

import torch

from dinov2_fast import _backend, backend_table
from dinov2_fast.ops._checks import (
    DTYPE_TAGS,
    autocast_dtype,
    check_float_dtype,
    check_nonnegative_float,
    check_same_device,
    check_shape,
    check_tensor,
    with_unit_last_stride,
)

__all__ = ["layer_norm", "MAX_DIM"]

# Widest row the Triton and CUDA kernels hold in registers; the torch backend has no limit.
MAX_DIM = 16384


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Layer normalisation of ``x`` over its last dimension, with fp32 statistics.

    Args:
        x: ``[..., D]``, float32, float16 or bfloat16, any leading shape and strides (rows are read
            through their stride; only a non-unit stride along ``D`` costs a copy).
        weight, bias: ``[D]`` or None, on x's device. Outside autocast they have x's dtype; under
            ``torch.autocast`` any of the three float dtypes (fp32 master weights with bf16
            activations is the usual case). Bias must have the weight's dtype when both are given.
        eps: added to the variance, ``>= 0``.
        backend: "auto", "triton", "cuda" or "torch" ("auto": torch on CPU tensors, the fastest
            available kernel on CUDA tensors; ``DINOV2_FAST_BACKEND`` overrides it).

    Returns:
        ``y: [..., D]`` in x's dtype, or in the autocast dtype under ``torch.autocast`` (the next op
        is a Linear that would cast anyway; torch's own LayerNorm writes fp32 there).

    Saved for backward: x (as rows), weight, and the per-row mean and 1/std (fp32, 8 bytes a row);
    dweight and dbias are reduced deterministically (the same bits run to run).

    Raises:
        TypeError: x, weight or bias is not a tensor or not a supported float dtype, weight/bias
            dtype differs from x's outside autocast, eps is not a number.
        ValueError: weight/bias shape is not ``[D]`` or they sit on another device, ``D`` is 0 or
            over ``MAX_DIM`` (16384) for the triton and cuda backends, eps < 0, unknown backend.
        RuntimeError: the requested backend cannot run here (the message says why and how to fix).
    """
    check_tensor("x", x)
    check_float_dtype("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension ([..., D]), got a 0-d tensor")
    dim = x.shape[-1]
    if dim == 0:
        raise ValueError("x's last dimension (D) must be at least 1, got 0")
    out_dtype, eps = check_layer_norm_arguments(x, weight, bias, eps)
    shape_class = backend_table.shape_class(
        "layer_norm", width=dim, rows=x.numel() // dim, dtype=x.dtype, out_dtype=out_dtype
    )
    chosen = check_kernel_width("layer_norm", dim, backend, x.device, shape_class)
    rows = with_unit_last_stride(x.reshape(-1, dim))
    y, _, _ = torch.ops.dinov2_fast.layer_norm_fwd(rows, weight, bias, eps, out_dtype, chosen)
    return y.view(x.shape)


def check_layer_norm_arguments(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: object
) -> tuple[torch.dtype, float]:
    """Checks weight, bias (``[D]``, x's device, x's dtype outside autocast, one dtype) and eps
    against ``x: [..., D]``; returns the output dtype (the autocast dtype or x's) and eps."""
    dim = x.shape[-1]
    autocast_to = autocast_dtype(x.device)
    param_dtype = None
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            continue
        check_tensor(name, param)
        check_float_dtype(name, param)
        check_same_device(name, param, x, "x")
        check_shape(name, param, (dim,), "x's last dimension")
        if autocast_to is None and param.dtype != x.dtype:
            raise TypeError(
                f"{name} must have x's dtype ({x.dtype}) outside autocast, got {param.dtype}"
            )
        if param_dtype is not None and param.dtype != param_dtype:
            raise TypeError(f"bias must have weight's dtype ({param_dtype}), got {param.dtype}")
        param_dtype = param.dtype
    return autocast_to or x.dtype, check_nonnegative_float("eps", eps)


def check_kernel_width(
    op: str, dim: int, backend: str, device: torch.device, shape_class: str | None = None
) -> str:
    """The backend for ``op`` (a LayerNorm) on rows of width ``dim`` (of ``shape_class``, for the
    measured table): over MAX_DIM "auto" falls back to torch with a warning, a kernel backend
    asked for by name raises."""
    chosen = _backend.resolve(op, backend, device, shape_class)
    if dim > MAX_DIM and chosen in _backend.KERNEL_BACKENDS:
        if backend != "auto":
            raise ValueError(
                f"x's last dimension (D) must be at most {MAX_DIM} for backend={chosen!r}, got "
                f"{dim}; backend='torch' has no limit"
            )
        warnings.warn(
            f"{op}: D={dim} is over the kernels' limit of {MAX_DIM}; using torch", stacklevel=3
        )
        chosen = "torch"
    return chosen


# --- the custom ops ------------------------------------------------------------------------------


@torch.library.custom_op("dinov2_fast::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x: [M, D]`` (unit stride along D) -> ``y: [M, D]`` (out_dtype), ``mean, rstd: [M]`` fp32."""
    if weight is not None:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    if backend == "triton":
        from dinov2_fast.kernels import layer_norm as kernels

        return kernels.layer_norm_fwd(x, weight, bias, eps, out_dtype)
    if backend == "cuda":
        return _cuda_fwd(x, weight, bias, eps, out_dtype)
    return _torch_fwd(x, weight, bias, eps, out_dtype)


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps, out_dtype, backend):
    rows, dim = x.shape
    stats = x.new_empty(rows, dtype=torch.float32)
    return x.new_empty((rows, dim), dtype=out_dtype), stats, torch.empty_like(stats)


@torch.library.custom_op("dinov2_fast::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    bias_dtype: torch.dtype | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dx ``[M, D]`` (x's dtype), dweight and dbias ``[D]`` (the parameters' dtypes; shape
    ``[0]`` for a parameter that is absent: custom ops cannot return None)."""
    if weight is not None:
        weight = weight.contiguous()
    if backend == "triton":
        from dinov2_fast.kernels import layer_norm as kernels

        dx, dweight, dbias = kernels.layer_norm_bwd(
            dy, x, weight, mean, rstd, bias_dtype is not None, _param_dtype(weight, bias_dtype, x)
        )
    elif backend == "cuda":
        dx, dweight, dbias = _cuda_bwd(dy, x, weight, mean, rstd, bias_dtype)
    else:
        dx, dweight, dbias = _torch_bwd(dy, x, weight, mean, rstd, bias_dtype)
    absent = lambda grad: x.new_empty(0) if grad is None else grad  # noqa: E731
    return dx, absent(dweight), absent(dbias)


@_layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, bias_dtype, backend):
    dim = x.shape[1]
    dweight = x.new_empty(0) if weight is None else weight.new_empty(dim)
    dbias = x.new_empty(0) if bias_dtype is None else x.new_empty(dim, dtype=bias_dtype)
    return torch.empty_like(x, memory_format=torch.contiguous_format), dweight, dbias


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps, _out_dtype, backend = inputs
    _y, mean, rstd = output
    # x and weight to rebuild x̂ and w·dy; mean and rstd so that the backward reads x only once.
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.backend = backend
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    # A gradient from .sum() arrives expanded (stride 0): kernels need unit stride along D.
    dy = with_unit_last_stride(dy)
    dx, dweight, dbias = torch.ops.dinov2_fast.layer_norm_bwd(
        dy, x, weight, mean, rstd, ctx.bias_dtype, ctx.backend
    )
    return (
        dx,
        dweight if weight is not None else None,
        dbias if ctx.bias_dtype is not None else None,
        None,
        None,
        None,
    )


_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- backends ------------------------------------------------------------------------------------


def _param_dtype(weight, bias_dtype, x):
    return weight.dtype if weight is not None else (bias_dtype or x.dtype)


def _torch_fwd(x, weight, bias, eps, out_dtype):
    """The reference: aten's LayerNorm in fp32 (fp32 statistics for every input dtype)."""
    as_fp32 = lambda t: None if t is None else t.float()  # noqa: E731
    y, mean, rstd = torch.native_layer_norm(
        x.float(), [x.shape[1]], as_fp32(weight), as_fp32(bias), eps
    )
    return y.to(out_dtype), mean.view(-1), rstd.view(-1)


def _torch_bwd(dy, x, weight, mean, rstd, bias_dtype):
    rows, dim = x.shape
    has_weight, has_bias = weight is not None, bias_dtype is not None
    # aten wants a bias tensor to decide the dbias output; its values are not read.
    fake_bias = x.new_zeros(dim, dtype=torch.float32) if has_bias else None
    dx, dweight, dbias = torch.ops.aten.native_layer_norm_backward(
        dy.float(),
        x.float(),
        [dim],
        mean.view(rows, 1),
        rstd.view(rows, 1),
        None if weight is None else weight.float(),
        fake_bias,
        [True, has_weight, has_bias],
    )
    param_dtype = _param_dtype(weight, bias_dtype, x)
    if rows == 0:  # aten leaves the parameter gradients undefined for empty inputs
        dweight = x.new_zeros(dim, dtype=torch.float32) if has_weight else None
        dbias = x.new_zeros(dim, dtype=torch.float32) if has_bias else None
    return (
        dx.to(x.dtype),
        dweight.to(param_dtype) if has_weight else None,
        dbias.to(param_dtype) if has_bias else None,
    )


def _cuda_fwd(x, weight, bias, eps, out_dtype):
    ext = _backend.cuda_extension()
    rows, dim = x.shape
    y = x.new_empty((rows, dim), dtype=out_dtype)
    mean = x.new_empty(rows, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    # The CUDA kernels read fp32 parameters: one dtype to instantiate, D elements to convert.
    weight32 = None if weight is None else weight.float()
    bias32 = None if bias is None else bias.float()
    with _backend.on_device(x.device):
        ext.layer_norm_fwd(
            x.data_ptr(),
            y.data_ptr(),
            _backend.cuda_address(weight32),
            _backend.cuda_address(bias32),
            mean.data_ptr(),
            rstd.data_ptr(),
            rows,
            dim,
            x.stride(0),
            y.stride(0),
            eps,
            DTYPE_TAGS[x.dtype],
            DTYPE_TAGS[out_dtype],
            _backend.cuda_stream(x.device),
        )
    return y, mean, rstd


def _cuda_bwd(dy, x, weight, mean, rstd, bias_dtype):
    ext = _backend.cuda_extension()
    rows, dim = x.shape
    has_weight, has_bias = weight is not None, bias_dtype is not None
    dx = torch.empty((rows, dim), dtype=x.dtype, device=x.device)
    dweight32 = x.new_empty(dim, dtype=torch.float32) if has_weight else None
    dbias32 = x.new_empty(dim, dtype=torch.float32) if has_bias else None
    device = _backend.device_index(x.device)
    partial = None
    if has_weight or has_bias:
        parts = ext.layer_norm_bwd_partial_rows(rows, dim, DTYPE_TAGS[x.dtype], device)
        partial = x.new_empty(2 * parts * dim, dtype=torch.float32)
    weight32 = None if weight is None else weight.float()
    with _backend.on_device(x.device):
        ext.layer_norm_bwd(
            dy.data_ptr(),
            x.data_ptr(),
            _backend.cuda_address(weight32),
            mean.data_ptr(),
            rstd.data_ptr(),
            dx.data_ptr(),
            _backend.cuda_address(dweight32),
            _backend.cuda_address(dbias32),
            _backend.cuda_address(partial),
            rows,
            dim,
            dy.stride(0),
            x.stride(0),
            dx.stride(0),
            DTYPE_TAGS[x.dtype],
            DTYPE_TAGS[dy.dtype],
            device,
            _backend.cuda_stream(x.device),
        )
    param_dtype = _param_dtype(weight, bias_dtype, x)
    return (
        dx,
        None if dweight32 is None else dweight32.to(param_dtype),
        None if dbias32 is None else dbias32.to(param_dtype),
    )
