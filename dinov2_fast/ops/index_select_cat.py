"""Gather samples of several tensors into one flat buffer: xFormers' ``index_select_cat``.

Stochastic depth runs a residual branch on a random subset of the samples of each crop group and
packs the kept samples of all groups into one sequence; this is that gather, in one pass per group,
with a backward that writes each source's gradient (zero for the dropped samples) in one pass.
Custom ops ``dinov2_fast::index_select_cat`` and ``dinov2_fast::index_select_cat_bwd``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dinov2_fast import _backend, backend_table
from dinov2_fast.ops._checks import (
    DTYPE_TAGS,
    INDEX_DTYPE_TAGS,
    as_samples,
    check_sources_and_indices,
    with_unit_last_stride,
)

__all__ = ["index_select_cat"]


def index_select_cat(
    sources: Sequence[torch.Tensor],
    indices: Sequence[torch.Tensor],
    *,
    validate: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """``torch.cat([s[i].flatten() for s, i in zip(sources, indices)])`` in one pass per source.

    Args:
        sources: S >= 1 tensors ``[B_i, ...]`` of one float dtype (float32, float16, bfloat16) on
            one device; shapes may differ between sources.
        indices: S 1-D int32/int64 tensors on the sources' device; ``indices[i]`` picks samples
            (dim 0) of ``sources[i]``: values in ``[0, B_i)``, none twice (the backward scatters).
        validate: check the index values (range, no repeats). This reads them on the host, a
            device sync for CUDA tensors; pass False for indices known to be valid (e.g. from
            ``torch.randperm``). Unchecked bad indices give undefined results.
        backend: "auto", "triton", "cuda" or "torch".

    Returns:
        1-D tensor of ``sum_i len(indices[i]) * sources[i][0].numel()`` elements, the sources'
        dtype. Saved for backward: the indices and the sources' shapes (not the sources).

    Raises:
        TypeError: a source is not a float tensor, dtypes differ, an index is not int32/int64.
        ValueError: empty or unequal-length lists, a 0-d source, devices differ, an index is not
            1-D or (with ``validate``) out of range or repeated, unknown backend.
        RuntimeError: the requested backend cannot run here.
    """
    sources, indices = check_sources_and_indices(sources, indices, validate=validate, samples=False)
    views = [with_unit_last_stride(as_samples(source)) for source in sources]
    first = sources[0]
    shape_class = backend_table.shape_class(
        "index_select_cat",
        width=views[0].shape[-1],
        rows=sum(index.shape[0] * view.shape[1] for view, index in zip(views, indices)),
        dtype=first.dtype,
    )
    chosen = _backend.resolve("index_select_cat", backend, first.device, shape_class)
    return torch.ops.dinov2_fast.index_select_cat(views, indices, chosen)


# --- the custom ops ------------------------------------------------------------------------------


@torch.library.custom_op("dinov2_fast::index_select_cat", mutates_args=())
def _index_select_cat(
    sources: list[torch.Tensor], indices: list[torch.Tensor], backend: str
) -> torch.Tensor:
    """``sources[i]: [B_i, N_i, D_i]`` (unit stride along D) -> 1-D ``sum_i k_i N_i D_i``."""
    if backend == "torch":
        return torch.cat([s.index_select(0, i).reshape(-1) for s, i in zip(sources, indices)])
    out = sources[0].new_empty(_total(sources, indices))
    for source, index, part in zip(sources, indices, _parts(out, sources, indices)):
        if backend == "cuda":
            _cuda_select_rows(source, index, part)
        else:
            from dinov2_fast.kernels import index_select_cat as kernels

            # The Triton kernels read the index as contiguous; the CUDA ones take its stride.
            kernels.index_select_rows(source, index.contiguous(), part)
    return out


@_index_select_cat.register_fake
def _(sources, indices, backend):
    return sources[0].new_empty(_total(sources, indices))


@torch.library.custom_op("dinov2_fast::index_select_cat_bwd", mutates_args=())
def _index_select_cat_bwd(
    grad: torch.Tensor,
    indices: list[torch.Tensor],
    shapes: list[int],
    backend: str,
) -> list[torch.Tensor]:
    """``grad``: 1-D, as the forward wrote it; ``shapes``: ``[B_i, N_i, D_i]`` of every source,
    flattened. Returns one contiguous ``[B_i, N_i, D_i]`` gradient per source, zero where a sample
    was not picked."""
    grads = []
    for index, part, (batch, tokens, dim) in zip(
        indices, _parts(grad, _shapes(shapes), indices), _shapes(shapes)
    ):
        part = with_unit_last_stride(part)
        if backend == "torch":
            full = grad.new_zeros((batch, tokens, dim))
            grads.append(full.index_copy_(0, index.long(), part))
        elif backend == "cuda":
            grads.append(_cuda_scatter_rows(part, index, batch))
        else:
            from dinov2_fast.kernels import index_select_cat as kernels

            grads.append(kernels.index_scatter_rows(part, index.contiguous(), batch))
    return grads


@_index_select_cat_bwd.register_fake
def _(grad, indices, shapes, backend):
    return [grad.new_empty(shape) for shape in _shapes(shapes)]


def _setup_context(ctx, inputs, output):
    sources, indices, backend = inputs
    # Only the indices and the shapes: the backward scatters and never reads the sources.
    ctx.save_for_backward(*indices)
    ctx.shapes = [size for s in sources for size in s.shape]
    ctx.backend = backend


def _backward(ctx, grad):
    indices = list(ctx.saved_tensors)
    grads = torch.ops.dinov2_fast.index_select_cat_bwd(
        grad.contiguous(), indices, ctx.shapes, ctx.backend
    )
    return list(grads), [None] * len(indices), None


_index_select_cat.register_autograd(_backward, setup_context=_setup_context)


# --- helpers -------------------------------------------------------------------------------------


def _shapes(flat: list[int]) -> list[tuple[int, int, int]]:
    return [tuple(flat[i : i + 3]) for i in range(0, len(flat), 3)]


def _total(sources, indices) -> int:
    return sum(i.shape[0] * s.shape[1] * s.shape[2] for s, i in zip(sources, indices))


def _parts(flat: torch.Tensor, shapes, indices) -> list[torch.Tensor]:
    """Views ``[k_i, N_i, D_i]`` of the flat buffer, one per source, in order."""
    parts, offset = [], 0
    for shape, index in zip(shapes, indices):
        _, tokens, dim = shape.shape if isinstance(shape, torch.Tensor) else shape
        size = index.shape[0] * tokens * dim
        parts.append(flat[offset : offset + size].view(index.shape[0], tokens, dim))
        offset += size
    return parts


# --- the CUDA backend (csrc/index_select_cat.cu) -------------------------------------------------


def _cuda_select_rows(source: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """``out[j] = source[index[j]]``; ``source: [B, N, D]``, ``out: [k, N, D]``, both with unit
    stride along D (the kernel picks 16-byte vectors when pointers and strides allow)."""
    ext = _backend.cuda_extension()
    samples, tokens, dim = out.shape
    with _backend.on_device(source.device):
        ext.index_select_rows(
            source.data_ptr(), out.data_ptr(),
            index.data_ptr(), INDEX_DTYPE_TAGS[index.dtype], index.stride(0),
            samples, tokens, dim,
            source.stride(0), source.stride(1), out.stride(0), out.stride(1),
            DTYPE_TAGS[source.dtype], _backend.cuda_stream(source.device),
        )  # fmt: skip


def _cuda_scatter_rows(grad: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """A new contiguous ``[size, N, D]``: ``grad[j]`` at sample ``index[j]``, zero elsewhere."""
    ext = _backend.cuda_extension()
    samples, tokens, dim = grad.shape
    out = grad.new_empty((size, tokens, dim))
    # Only for large k: the kernel otherwise finds each tile's partners itself.
    workspace = grad.new_empty(ext.inverse_index_workspace_size(samples, size), dtype=torch.int32)
    with _backend.on_device(grad.device):
        ext.index_scatter_rows(
            grad.data_ptr(), out.data_ptr(),
            index.data_ptr(), INDEX_DTYPE_TAGS[index.dtype], index.stride(0),
            samples, size, tokens, dim,
            grad.stride(0), grad.stride(1), out.stride(0), out.stride(1),
            _backend.cuda_address(workspace),
            DTYPE_TAGS[grad.dtype], _backend.cuda_stream(grad.device),
        )  # fmt: skip
    return out
