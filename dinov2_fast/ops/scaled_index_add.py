"""``x[index] += alpha * scaling * source``: xFormers' ``scaled_index_add``, and the fused residual
update of a transformer block with stochastic depth.

In a block, x is the residual stream ``[B, N, C]``, index the kept samples, source the residual
branch computed on them only, scaling LayerScale's gamma and alpha ``B / k``. Out of place (the
default) one kernel pass reads x and source and writes every sample of the new stream: no separate
multiply, scatter and add. The backward passes the stream's gradient through unchanged and computes
the source's and gamma's gradients in one pass over the kept samples. Custom ops
``dinov2_fast::scaled_index_add``, ``scaled_index_add_`` (in place) and ``scaled_index_add_bwd``.
"""

from __future__ import annotations

import torch

from dinov2_fast import _backend, backend_table
from dinov2_fast.ops._checks import (
    DTYPE_TAGS,
    INDEX_DTYPE_TAGS,
    as_samples,
    check_finite_float,
    check_float_dtype,
    check_index,
    check_same_device,
    check_shape,
    check_tensor,
    samples_shape,
    with_unit_last_stride,
)

__all__ = ["scaled_index_add"]


def scaled_index_add(
    x: torch.Tensor,
    index: torch.Tensor,
    source: torch.Tensor,
    scaling: torch.Tensor | None = None,
    alpha: float = 1.0,
    *,
    inplace: bool = False,
    validate: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """``x`` with ``alpha * scaling * source[j]`` added to sample ``index[j]``, for every j.

    Args:
        x: ``[B, ...]``, float32, float16 or bfloat16 (the residual stream).
        index: 1-D int32/int64 ``[k]`` on x's device: values in ``[0, B)``, none twice.
        source: ``[k, *x.shape[1:]]``, any float dtype (a bf16 branch output added to an fp32
            stream is cast in the kernel).
        scaling: ``[C]`` with ``C = x.shape[-1]``, or None for 1 (LayerScale's gamma).
        alpha: a finite number (``B / k`` for stochastic depth).
        inplace: add into x itself, touching only the k indexed samples (fewer bytes). Safe under
            autograd: x is marked modified, so autograd raises if anything saved x's old value;
            x must have unit stride along its last dimension and a leaf that requires grad cannot
            be modified. Out of place (default) writes a new tensor.
        validate: check index's values on the host (a device sync for CUDA tensors); pass False
            for indices known to be valid. Unchecked bad indices give undefined results.
        backend: "auto", "triton", "cuda" or "torch".

    Returns:
        A tensor shaped and typed like x (x itself with ``inplace``). Math in fp32, rounded once.
        Saved for backward: index, and source and scaling when scaling is given (each gradient
        needs the other); the gradient of x is the incoming gradient itself, with no copy.

    Raises:
        TypeError: a tensor has an unsupported dtype, alpha is not a number.
        ValueError: source's shape is not ``[len(index), *x.shape[1:]]``, scaling's not ``[C]``,
            devices differ, index out of range or repeated (with ``validate``), x not writable in
            place as required, unknown backend.
        RuntimeError: the requested backend cannot run here.
    """
    check_tensor("x", x)
    check_float_dtype("x", x)
    if x.dim() == 0:
        raise ValueError("x must have a sample dimension ([B, ...]), got a 0-d tensor")
    check_tensor("source", source)
    check_float_dtype("source", source)
    check_same_device("source", source, x, "x")
    check_index("index", index, x.shape[0], x.device, validate=validate)
    expected = (index.shape[0], *x.shape[1:])
    if tuple(source.shape) != expected:
        raise ValueError(
            f"source must have shape {list(expected)} (len(index) samples shaped like x's), got "
            f"{list(source.shape)}"
        )
    if scaling is not None:
        check_tensor("scaling", scaling)
        check_float_dtype("scaling", scaling)
        check_same_device("scaling", scaling, x, "x")
        if x.dim() < 2:
            raise ValueError("scaling needs x with a channel dimension ([B, ..., C]); x is 1-D")
        check_shape("scaling", scaling, (x.shape[-1],), "x's last dimension")
    alpha = check_finite_float("alpha", alpha)
    width = x.shape[-1] if x.dim() > 1 else 1
    shape_class = backend_table.shape_class(
        "scaled_index_add",
        width=width,
        rows=x.numel() // max(width, 1),
        dtype=x.dtype,
        source_dtype=source.dtype,
    )
    chosen = _backend.resolve("scaled_index_add", backend, x.device, shape_class)
    samples = with_unit_last_stride(as_samples(source))
    if inplace:
        return _ScaledIndexAddInPlace.apply(x, index, samples, scaling, alpha, chosen)
    out = torch.ops.dinov2_fast.scaled_index_add(
        with_unit_last_stride(as_samples(x)), index, samples, scaling, alpha, chosen
    )
    return out.view(x.shape)


class _ScaledIndexAddInPlace(torch.autograd.Function):
    """The in-place form: ``mark_dirty`` bumps x's version, so autograd refuses any backward that
    would read a saved copy of x's old value instead of silently using the new one."""

    @staticmethod
    def forward(ctx, x, index, source, scaling, alpha, backend):
        try:
            samples = x.view(samples_shape(x))
        except RuntimeError:
            samples = None
        if samples is None or (samples.shape[-1] > 1 and samples.stride(-1) != 1):
            raise ValueError(
                "inplace=True needs x viewable as [B, N, C] with unit stride along C (no copy); "
                "use inplace=False for this x"
            )
        torch.ops.dinov2_fast.scaled_index_add_(samples, index, source, scaling, alpha, backend)
        ctx.mark_dirty(x)
        _save(ctx, index, source, scaling, alpha, backend)
        return x

    @staticmethod
    def backward(ctx, grad):
        # grad is shaped like x; the backward op reads it as samples [B, N, C].
        return _grads(ctx, grad, grad.reshape(samples_shape(grad)))


# --- the custom ops ------------------------------------------------------------------------------


@torch.library.custom_op("dinov2_fast::scaled_index_add", mutates_args=())
def _scaled_index_add(
    x: torch.Tensor,
    index: torch.Tensor,
    source: torch.Tensor,
    scaling: torch.Tensor | None,
    alpha: float,
    backend: str,
) -> torch.Tensor:
    """``x: [B, N, C]``, ``source: [k, N, C]`` (unit stride along C) -> new ``[B, N, C]``."""
    if backend == "torch":
        return _torch_add(x.to(torch.float32, copy=True), index, source, scaling, alpha).to(x.dtype)
    if backend == "cuda":
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _cuda_fwd(x, out, index, source, scaling, alpha, inplace=False)
        return out
    from dinov2_fast.kernels import scaled_index_add as kernels

    # The Triton kernels read the index as contiguous; the CUDA ones take its stride.
    return kernels.scaled_index_add_fwd(
        x, index.contiguous(), source, scaling, alpha, inplace=False
    )


@_scaled_index_add.register_fake
def _(x, index, source, scaling, alpha, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("dinov2_fast::scaled_index_add_", mutates_args=("x",))
def _scaled_index_add_inplace(
    x: torch.Tensor,
    index: torch.Tensor,
    source: torch.Tensor,
    scaling: torch.Tensor | None,
    alpha: float,
    backend: str,
) -> None:
    """Adds into ``x: [B, N, C]`` itself; only the k indexed samples are read and written."""
    if backend == "torch":
        picked = index.long()
        updated = _torch_add(x.index_select(0, picked).float(), None, source, scaling, alpha)
        x.index_copy_(0, picked, updated.to(x.dtype))
        return
    if backend == "cuda":
        _cuda_fwd(x, x, index, source, scaling, alpha, inplace=True)
        return
    from dinov2_fast.kernels import scaled_index_add as kernels

    kernels.scaled_index_add_fwd(x, index.contiguous(), source, scaling, alpha, inplace=True)


@_scaled_index_add_inplace.register_fake
def _(x, index, source, scaling, alpha, backend):
    return None


@torch.library.custom_op("dinov2_fast::scaled_index_add_bwd", mutates_args=())
def _scaled_index_add_bwd(
    grad: torch.Tensor,
    index: torch.Tensor,
    source: torch.Tensor,
    scaling: torch.Tensor | None,
    alpha: float,
    need_source: bool,
    need_scaling: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``grad_source: [k, N, C]`` (source's dtype) and ``grad_scaling: [C]`` (scaling's
    dtype); shape ``[0]`` for one not asked for (custom ops cannot return None)."""
    if backend == "torch":
        picked = grad.index_select(0, index.long()).float()
        factor = alpha if scaling is None else alpha * scaling.float()
        grad_source = (picked * factor).to(source.dtype) if need_source else None
        grad_scaling = None
        if need_scaling:
            grad_scaling = ((picked * source.float()).sum((0, 1)) * alpha).to(scaling.dtype)
    elif backend == "cuda":
        grad_source, grad_scaling = _cuda_bwd(
            grad, index, source, scaling, alpha, need_source, need_scaling
        )
    else:
        from dinov2_fast.kernels import scaled_index_add as kernels

        grad_source, grad_scaling = kernels.scaled_index_add_bwd(
            grad, index.contiguous(), source, scaling, alpha, need_source, need_scaling
        )
    absent = lambda g: source.new_empty(0) if g is None else g  # noqa: E731
    return absent(grad_source), absent(grad_scaling)


@_scaled_index_add_bwd.register_fake
def _(grad, index, source, scaling, alpha, need_source, need_scaling, backend):
    grad_source = torch.empty_like(source, memory_format=torch.contiguous_format)
    grad_scaling = scaling.new_empty(scaling.shape) if need_scaling else source.new_empty(0)
    return grad_source if need_source else source.new_empty(0), grad_scaling


def _setup_context(ctx, inputs, output):
    _x, index, source, scaling, alpha, backend = inputs
    _save(ctx, index, source, scaling, alpha, backend)


def _backward(ctx, grad):
    return _grads(ctx, grad, grad)


_scaled_index_add.register_autograd(_backward, setup_context=_setup_context)


# --- shared by both forms ------------------------------------------------------------------------


def _torch_add(x32, index, source, scaling, alpha):
    """The reference in fp32: ``x32`` plus the scaled source at ``index`` (all rows if None)."""
    added = source.float() if scaling is None else source.float() * scaling.float()
    if index is None:
        return x32.add_(added, alpha=alpha)
    return x32.index_add_(0, index.long(), added, alpha=alpha)


def _save(ctx, index, source, scaling, alpha, backend):
    # index to gather the output gradient; source for gamma's gradient and scaling for the source's,
    # so neither is kept without gamma (then grad_source = alpha * grad[index]).
    ctx.save_for_backward(index, source if scaling is not None else None, scaling)
    ctx.source_meta = (source.shape, source.dtype)
    ctx.alpha, ctx.backend = alpha, backend


def _grads(ctx, grad, grad_samples):
    """The gradients of (x, index, source, scaling, alpha, backend): ``grad`` itself for x, and
    those of source and scaling from ``grad_samples``, the same gradient as ``[B, N, C]``."""
    index, source, scaling = ctx.saved_tensors
    need_source, need_scaling = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
    grad_source = grad_scaling = None
    if need_source or need_scaling:
        if source is None:  # no scaling: only source's shape and dtype matter, not its values
            shape, dtype = ctx.source_meta
            source = grad.new_empty((), dtype=dtype).expand(shape)
        grad_source, grad_scaling = torch.ops.dinov2_fast.scaled_index_add_bwd(
            with_unit_last_stride(grad_samples),
            index,
            source,
            scaling,
            ctx.alpha,
            need_source,
            need_scaling and scaling is not None,
            ctx.backend,
        )
    return (
        grad if ctx.needs_input_grad[0] else None,
        None,
        grad_source if need_source else None,
        grad_scaling if need_scaling else None,
        None,
        None,
    )


# --- the CUDA backend (csrc/scaled_index_add.cu) -------------------------------------------------


def _cuda_fwd(x, out, index, source, scaling, alpha, *, inplace):
    """``out = x`` plus the scaled source at index; ``x, out: [B, N, C]``, ``source: [k, N, C]``,
    unit stride along C (16-byte vectors where pointers and strides allow). In place (``out`` is
    x) only the k indexed samples are written."""
    ext = _backend.cuda_extension()
    batch, tokens, dim = x.shape
    samples = index.shape[0]
    # Out of place with many indices only: the kernel otherwise finds each tile's partners itself.
    size = 0 if inplace else ext.inverse_index_workspace_size(samples, batch)
    workspace = x.new_empty(size, dtype=torch.int32)
    scaling = None if scaling is None else scaling.contiguous()
    with _backend.on_device(x.device):
        ext.scaled_index_add_fwd(
            x.data_ptr(), out.data_ptr(), source.data_ptr(), _backend.cuda_address(scaling),
            index.data_ptr(), INDEX_DTYPE_TAGS[index.dtype], index.stride(0),
            _backend.cuda_address(workspace), batch, samples, tokens, dim, alpha,
            x.stride(0), x.stride(1), out.stride(0), out.stride(1),
            source.stride(0), source.stride(1), inplace,
            DTYPE_TAGS[x.dtype], DTYPE_TAGS[source.dtype], _dtype_tag(scaling),
            _backend.cuda_stream(x.device),
        )  # fmt: skip


def _cuda_bwd(grad, index, source, scaling, alpha, need_source, need_scaling):
    """``(grad_source, grad_scaling)`` as the Triton backward returns them (None when not needed);
    grad_scaling's partial rows make it the same bits run to run."""
    ext = _backend.cuda_extension()
    samples, tokens, dim = source.shape
    need_scaling = need_scaling and scaling is not None
    grad_source = (
        torch.empty((samples, tokens, dim), dtype=source.dtype, device=source.device)
        if need_source
        else None
    )
    grad_scaling = scaling.new_empty(dim) if need_scaling else None
    if not (need_source or need_scaling):
        return None, None
    device = _backend.device_index(grad.device)
    partial = None
    if need_scaling:
        scaling = scaling.contiguous()
        rows = ext.scaled_index_add_bwd_partial_rows(samples, tokens, dim, device)
        partial = grad.new_empty(rows * dim, dtype=torch.float32)
    with _backend.on_device(grad.device):
        ext.scaled_index_add_bwd(
            grad.data_ptr(), source.data_ptr(), _backend.cuda_address(scaling),
            index.data_ptr(), INDEX_DTYPE_TAGS[index.dtype], index.stride(0),
            _backend.cuda_address(grad_source), _backend.cuda_address(grad_scaling),
            _backend.cuda_address(partial),
            samples, tokens, dim, alpha,
            grad.stride(0), grad.stride(1), source.stride(0), source.stride(1),
            *((grad_source.stride(0), grad_source.stride(1)) if need_source else (0, 0)),
            DTYPE_TAGS[grad.dtype], DTYPE_TAGS[source.dtype], _dtype_tag(scaling),
            device, _backend.cuda_stream(grad.device),
        )  # fmt: skip
    return grad_source, grad_scaling


def _dtype_tag(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else DTYPE_TAGS[tensor.dtype]
