"""LayerNorm of the picked samples of several tensors, packed: the gather that starts a residual
branch under stochastic depth, fused with the branch's LayerNorm.

``layer_norm(index_select_cat(sources, indices).view(-1, C))`` reads the kept rows of the stream
twice (once to gather, once to normalise). Here one kernel reads each kept row once and writes
both the normalised row and the gathered row, which the backward needs (the same memory the
unfused pair saves: the kept rows, not the whole stream). The backward is LayerNorm's on the
gathered rows, then each source's gradient written once, zero where a sample was not picked.
Custom op ``dinov2_fast::index_select_layer_norm_fwd``; the backward reuses
``dinov2_fast::layer_norm_bwd`` and ``dinov2_fast::index_select_cat_bwd``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dinov2_fast import _backend, backend_table
from dinov2_fast.ops._checks import (
    DTYPE_TAGS,
    INDEX_DTYPE_TAGS,
    check_sources_and_indices,
    with_unit_last_stride,
)
from dinov2_fast.ops.layer_norm import (
    _torch_fwd,
    check_kernel_width,
    check_layer_norm_arguments,
)

__all__ = ["index_select_layer_norm"]


def index_select_layer_norm(
    sources: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-6,
    *,
    validate: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """``layer_norm(cat([s[i].reshape(-1, C) for s, i in zip(sources, indices)]), weight, bias)``
    with the gather fused into the LayerNorm's loads.

    Args:
        sources: S >= 1 tensors ``[B_i, N_i, C]`` (the residual streams of the crop groups) of one
            float dtype, one C and one device; unit stride along C is read in place.
        indices: S 1-D int32/int64 tensors: the picked samples of each source, values in
            ``[0, B_i)``, none twice.
        weight, bias, eps: as in :func:`dinov2_fast.ops.layer_norm` (``[C]``; x's dtype outside
            autocast, any float dtype under it).
        validate: check the index values on the host (a device sync for CUDA tensors); False for
            indices known to be valid.
        backend: "auto", "triton", "cuda" or "torch".

    Returns:
        ``[T, C]`` with ``T = sum_i len(indices[i]) * N_i``, in the sources' dtype or the autocast
        dtype. Saved for backward: the gathered rows ``[T, C]`` (sources' dtype), weight, the
        per-row mean and 1/std, the indices.

    Raises:
        TypeError, ValueError: as :func:`index_select_cat` for sources and indices (also a source
            that is not 3-D or whose C differs, or C = 0), as :func:`layer_norm` for weight, bias
            and eps.
        RuntimeError: the requested backend cannot run here.
    """
    sources, indices = check_sources_and_indices(sources, indices, validate=validate, samples=True)
    views = [with_unit_last_stride(source) for source in sources]
    first = sources[0]
    dim = first.shape[-1]
    if dim == 0:
        raise ValueError("the sources' last dimension (C) must be at least 1, got 0")
    out_dtype, eps = check_layer_norm_arguments(first, weight, bias, eps)
    shape_class = backend_table.shape_class(
        "index_select_layer_norm",
        width=dim,
        rows=sum(index.shape[0] * source.shape[1] for source, index in zip(sources, indices)),
        dtype=first.dtype,
        out_dtype=out_dtype,
    )
    chosen = check_kernel_width("index_select_layer_norm", dim, backend, first.device, shape_class)
    y, _, _, _ = torch.ops.dinov2_fast.index_select_layer_norm_fwd(
        views, [i.contiguous() for i in indices], weight, bias, eps, out_dtype, chosen
    )
    return y


# --- the custom op -------------------------------------------------------------------------------


@torch.library.custom_op("dinov2_fast::index_select_layer_norm_fwd", mutates_args=())
def _index_select_layer_norm_fwd(
    sources: list[torch.Tensor],
    indices: list[torch.Tensor],
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``y: [T, C]`` (out_dtype), the gathered rows ``[T, C]`` (sources' dtype) and the
    per-row ``mean, rstd: [T]`` (fp32)."""
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    if backend == "torch":
        dim = sources[0].shape[-1]
        gathered = torch.cat(
            [s.index_select(0, i).reshape(-1, dim) for s, i in zip(sources, indices)]
        )
        y, mean, rstd = _torch_fwd(gathered, weight, bias, eps, out_dtype)
        return y, gathered, mean, rstd
    y, gathered, mean, rstd = _new_outputs(sources, indices, out_dtype)
    if backend == "cuda":
        # The CUDA kernel reads fp32 parameters, as layer_norm's.
        weight = None if weight is None else weight.float()
        bias = None if bias is None else bias.float()
    start = 0
    for source, index in zip(sources, indices):
        rows = slice(start, start + index.shape[0] * source.shape[1])
        start = rows.stop
        if backend == "cuda":
            _cuda_fwd(
                source, index, weight, bias, eps, y[rows], gathered[rows], mean[rows], rstd[rows]
            )
            continue
        from dinov2_fast.kernels import layer_norm as kernels

        kernels.layer_norm_fwd(
            source,
            weight,
            bias,
            eps,
            out_dtype,
            index=index,
            y=y[rows],
            mean=mean[rows],
            rstd=rstd[rows],
            x_out=gathered[rows],
        )
    return y, gathered, mean, rstd


@_index_select_layer_norm_fwd.register_fake
def _(sources, indices, weight, bias, eps, out_dtype, backend):
    return _new_outputs(sources, indices, out_dtype)


def _new_outputs(sources, indices, out_dtype):
    rows = sum(i.shape[0] * s.shape[1] for s, i in zip(sources, indices))
    dim = sources[0].shape[-1]
    first = sources[0]
    stats = first.new_empty(rows, dtype=torch.float32)
    return (
        first.new_empty((rows, dim), dtype=out_dtype),
        first.new_empty((rows, dim)),
        stats,
        torch.empty_like(stats),
    )


def _setup_context(ctx, inputs, output):
    sources, indices, weight, bias, _eps, _out_dtype, backend = inputs
    _y, gathered, mean, rstd = output
    # The gathered rows (not the sources: only the kept samples stay alive), weight, the
    # statistics so the backward reads the rows once, and the indices to scatter dx back.
    ctx.save_for_backward(gathered, weight, mean, rstd, *indices)
    ctx.shapes = [size for s in sources for size in s.shape]
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.backend = backend
    ctx.mark_non_differentiable(gathered, mean, rstd)


def _backward(ctx, dy, _dgathered, _dmean, _drstd):
    gathered, weight, mean, rstd, *indices = ctx.saved_tensors
    dx, dweight, dbias = torch.ops.dinov2_fast.layer_norm_bwd(
        with_unit_last_stride(dy), gathered, weight, mean, rstd, ctx.bias_dtype, ctx.backend
    )
    grads = torch.ops.dinov2_fast.index_select_cat_bwd(
        dx.reshape(-1), indices, ctx.shapes, ctx.backend
    )
    return (
        list(grads),
        [None] * len(indices),
        dweight if weight is not None else None,
        dbias if ctx.bias_dtype is not None else None,
        None,
        None,
        None,
    )


_index_select_layer_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- the CUDA backend (csrc/index_select_layer_norm.cu) ------------------------------------------


def _cuda_fwd(source, index, weight32, bias32, eps, y, gathered, mean, rstd):
    """One source's picked rows: ``source: [B, N, C]`` (unit stride along C) normalised into ``y``
    and copied into ``gathered`` (``[k * N, C]``), statistics into ``mean, rstd: [k * N]``."""
    ext = _backend.cuda_extension()
    _, tokens, dim = source.shape
    with _backend.on_device(source.device):
        ext.index_select_layer_norm_fwd(
            source.data_ptr(), index.data_ptr(), INDEX_DTYPE_TAGS[index.dtype], index.stride(0),
            index.shape[0], tokens, dim, source.stride(0), source.stride(1),
            y.data_ptr(), y.stride(0), gathered.data_ptr(), gathered.stride(0),
            _backend.cuda_address(weight32), _backend.cuda_address(bias32),
            mean.data_ptr(), rstd.data_ptr(),
            eps, DTYPE_TAGS[source.dtype], DTYPE_TAGS[y.dtype], _backend.cuda_stream(source.device),
        )  # fmt: skip
