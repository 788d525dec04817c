"""Softmax attention (non-causal) for ViT shapes and packed multi-crop sequences.

Public functions: :func:`attention` (q, k, v), :func:`attention_qkvpacked` (one qkv tensor, as a
qkv Linear writes it) and :func:`memory_efficient_attention` (xFormers' signature, for porting
DINOv2 code). The kernel backends go through the custom ops ``dinov2_fast::attention_fwd/_bwd``
and ``dinov2_fast::attention_qkvpacked_fwd/_bwd`` (fake implementations give their shapes, so
``torch.compile`` traces them without graph breaks); the "torch" backend is the reference,
``F.scaled_dot_product_attention`` once per batch or once per packed segment.

Layouts (no copies: the kernels read by strides):
    dense:  q, k, v ``[B, N, H, D]``, qkv ``[B, N, 3, H, D]``, output ``[B, N, H, D]``
    packed: q, k, v ``[T, H, D]``,  qkv ``[T, 3, H, D]``,  output ``[T, H, D]``, with
            ``cu_seqlens`` (int32 ``[S + 1]`` offsets) and ``max_seqlen``
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F

from dinov2_fast import _backend, backend_table
from dinov2_fast.ops._checks import (
    DTYPE_TAGS,
    check_float_dtype,
    check_same_device,
    check_tensor,
    with_unit_last_stride,
)
from dinov2_fast.ops.block_diagonal_mask import BlockDiagonalMask

__all__ = ["attention", "attention_qkvpacked", "memory_efficient_attention", "HEAD_DIMS"]

# Head dims the kernels are built for (80 is ViT-H; it is padded to 128 in registers only).
HEAD_DIMS = (32, 64, 80, 96, 128)
# The CUDA kernels run on the tensor cores' 16-bit inputs only.
CUDA_DTYPES = (torch.float16, torch.bfloat16)
_MAX_GRID_AXIS = 65535


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``softmax(scale · q kᵀ) v`` per batch element (or packed segment) and head.

    Args:
        q, k, v: ``[B, N, H, D]``, or ``[T, H, D]`` with ``cu_seqlens``; one shape, one dtype
            (float32, float16 or bfloat16), one device. Any strides (a ``[B, N, 3, H, D]`` view
            is read in place); only a non-unit stride along D costs a copy.
        scale: the softmax scale, default ``D ** -0.5``.
        cu_seqlens: int32 ``[S + 1]`` offsets of S packed sequences, on q's device: 0 first,
            strictly increasing, T last. Checking it reads it on the host: a device sync for a
            CUDA tensor, once per tensor while it is not modified in place (a training loop
            reuses one); :class:`BlockDiagonalMask` with :func:`memory_efficient_attention` or
            :class:`dinov2_fast.nn.Attention` never syncs.
        max_seqlen: the longest segment (derived from cu_seqlens when None).
        backend: "auto", "triton", "cuda" or "torch". "cuda" (the compiled FlashAttention-2
            kernels) takes float16 and bfloat16 only; "auto" never picks it for float32.

    Returns:
        ``[B, N, H, D]`` (or ``[T, H, D]``) in q's dtype, ready for the output projection.

    Saved for backward (kernel backends): q, k, v, the output and the fp32 log-sum-exp of each
    query row (4 bytes a row and head). The backward has no atomics: it is deterministic.

    Raises:
        TypeError: a tensor argument is not a tensor or has an unsupported dtype, dtypes differ,
            cu_seqlens is not int32.
        ValueError: shapes differ or have the wrong rank, devices differ, a head dim the kernels
            do not support (32, 64, 80, 96, 128), bad cu_seqlens / max_seqlen / scale, unknown
            backend.
        RuntimeError: the backend cannot run here (the message says why).
    """
    packed = cu_seqlens is not None
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_input(name, t, q, 3 if packed else 4, "[T, H, D]" if packed else "[B, N, H, D]")
    return _run(q, k, v, None, scale, cu_seqlens, max_seqlen, backend)


def attention_qkvpacked(
    qkv: torch.Tensor,
    *,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`attention` of a packed ``qkv: [B, N, 3, H, D]`` (or ``[T, 3, H, D]`` with
    ``cu_seqlens``), as ``qkv_linear(x).view(B, N, 3, H, D)`` gives it. q, k and v are read in
    place and the backward writes one ``dqkv`` tensor of qkv's shape (no concatenation).
    Arguments, result and errors as for :func:`attention`."""
    packed = cu_seqlens is not None
    layout = "[T, 3, H, D]" if packed else "[B, N, 3, H, D]"
    _check_input("qkv", qkv, qkv, 4 if packed else 5, layout)
    if qkv.shape[-3] != 3:
        raise ValueError(f"qkv must have shape {layout} (3 in dim -3), got {list(qkv.shape)}")
    q, k, v = qkv.unbind(-3)
    return _run(q, k, v, qkv, scale, cu_seqlens, max_seqlen, backend)


def memory_efficient_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_bias: BlockDiagonalMask | None = None,
    p: float = 0.0,
    scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """xFormers' ``memory_efficient_attention`` for DINOv2's uses: q, k, v ``[B, M, H, K]``,
    ``attn_bias`` None or a :class:`BlockDiagonalMask` (then B must be 1 and M the mask's packed
    length). Dropout (``p > 0``) is not supported and raises; nothing is ignored silently."""
    if p != 0.0:
        raise ValueError(
            f"p (attention dropout) must be 0: the fused kernels have no dropout, got {p}"
        )
    if attn_bias is None:
        return attention(q, k, v, scale=scale, backend=backend)
    check_attn_bias(attn_bias)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_input(name, t, q, 4, "[1, T, H, D]")
    if q.shape[0] != 1 or q.shape[1] != attn_bias.total:
        raise ValueError(
            f"q must have shape [1, {attn_bias.total}, H, D] for this mask (its packed length), "
            f"got {list(q.shape)}"
        )
    out = _run(q[0], k[0], v[0], None, scale, attn_bias, None, backend)
    return out.unsqueeze(0)


# --- validation and dispatch ---------------------------------------------------------------------


def _check_input(name: str, t, reference, rank: int, layout: str) -> None:
    check_tensor(name, t)
    check_float_dtype(name, t)
    if t.dim() != rank:
        raise ValueError(f"{name} must have shape {layout}, got {list(t.shape)}")
    if t is reference:
        return
    if t.dtype != reference.dtype:
        raise TypeError(f"{name} must have q's dtype ({reference.dtype}), got {t.dtype}")
    check_same_device(name, t, reference, "q")
    if t.shape != reference.shape:
        raise ValueError(
            f"{name} must have q's shape {list(reference.shape)} (self-attention), "
            f"got {list(t.shape)}"
        )


def check_attn_bias(attn_bias: object) -> None:
    """A TypeError unless attn_bias is a BlockDiagonalMask (the one mask the kernels take)."""
    if not isinstance(attn_bias, BlockDiagonalMask):
        raise TypeError(
            f"attn_bias must be None or a dinov2_fast BlockDiagonalMask, got "
            f"{type(attn_bias).__name__}"
        )


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    return float(scale)


# Offsets of cu_seqlens tensors already read on the host, with the tensor's version counter: a
# training loop that reuses one cu_seqlens tensor pays the device sync of reading it once.
_read_offsets: dict[int, tuple[weakref.ref, int, list[int]]] = {}


def _host_offsets(cu_seqlens: torch.Tensor) -> list[int]:
    key = id(cu_seqlens)
    cached = _read_offsets.get(key)
    if cached is not None and cached[0]() is cu_seqlens and cached[1] == cu_seqlens._version:
        return cached[2]
    offsets = cu_seqlens.tolist()  # a host copy (a device sync for CUDA tensors)
    forget = weakref.ref(cu_seqlens, lambda _: _read_offsets.pop(key, None))
    _read_offsets[key] = (forget, cu_seqlens._version, offsets)
    return offsets


def _segments(cu_seqlens, max_seqlen, tokens: int, device: torch.device):
    """Checks cu_seqlens / max_seqlen; returns (seqlens, cu_seqlens tensor, max_seqlen)."""
    if isinstance(cu_seqlens, BlockDiagonalMask):
        if cu_seqlens.total != tokens:
            raise ValueError(
                f"the mask packs {cu_seqlens.total} tokens, the inputs hold {tokens} (dim 0 of q)"
            )
        return cu_seqlens.seqlens, cu_seqlens.cu_seqlens(device), cu_seqlens.max_seqlen
    check_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must have shape [S + 1] with S >= 1, got {list(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens must be on q's device ({device}), got {cu_seqlens.device}")
    offsets = _host_offsets(cu_seqlens)
    seqlens = tuple(b - a for a, b in zip(offsets, offsets[1:]))
    if offsets[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {offsets[0]}")
    if min(seqlens) < 1:
        raise ValueError(f"cu_seqlens must be strictly increasing, got {offsets[:12]}")
    if offsets[-1] != tokens:
        raise ValueError(f"cu_seqlens must end at T = {tokens} (dim 0 of q), got {offsets[-1]}")
    longest = max(seqlens)
    if max_seqlen is None:
        max_seqlen = longest
    elif isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
        raise TypeError(f"max_seqlen must be an int or None, got {type(max_seqlen).__name__}")
    elif max_seqlen < longest:
        raise ValueError(
            f"max_seqlen must be at least the longest segment ({longest}), got {max_seqlen}"
        )
    return seqlens, cu_seqlens, max_seqlen


def _run(q, k, v, qkv, scale, cu_seqlens, max_seqlen, backend: str) -> torch.Tensor:
    head_dim = q.shape[-1]
    scale = _check_scale(scale, head_dim)
    segments = None
    if cu_seqlens is not None:
        segments = _segments(cu_seqlens, max_seqlen, q.shape[0], q.device)
    elif max_seqlen is not None:
        raise ValueError("max_seqlen is only for packed input: pass cu_seqlens too")
    shape_class = backend_table.shape_class(
        "attention",
        head_dim=head_dim,
        seqlen=q.shape[1] if segments is None else segments[2],
        packed=segments is not None,
        dtype=q.dtype,
    )
    chosen = _backend.resolve("attention", backend, q.device, shape_class)
    if chosen == "cuda" and q.dtype not in CUDA_DTYPES:
        if backend != "auto":
            raise TypeError(
                f"backend='cuda' attention takes float16 or bfloat16 (tensor-core kernels), got "
                f"{q.dtype}; use backend='triton' or 'torch' for it"
            )
        chosen = "triton" if not _backend.unavailable_reason("triton", q.device) else "torch"
    if chosen != "torch" and head_dim not in HEAD_DIMS:
        raise ValueError(
            f"head dim D must be one of {', '.join(map(str, HEAD_DIMS))} for backend={chosen!r}, "
            f"got {head_dim}; backend='torch' takes any"
        )
    if chosen == "torch":
        return _torch_attention(q, k, v, scale, None if segments is None else segments[0])
    batch = q.shape[0] if segments is None else len(segments[0])
    if max(batch, q.shape[-2]) > _MAX_GRID_AXIS:  # batch (or segments) and heads are grid axes
        raise ValueError(
            f"backend={chosen!r} takes at most {_MAX_GRID_AXIS} sequences and {_MAX_GRID_AXIS} "
            f"heads, got {batch} and {q.shape[-2]}"
        )
    cu, longest = (None, None) if segments is None else (segments[1], segments[2])
    if qkv is not None and qkv.stride(-1) == 1:
        out, _ = torch.ops.dinov2_fast.attention_qkvpacked_fwd(qkv, scale, cu, longest, chosen)
    else:
        q, k, v = (with_unit_last_stride(t) for t in (q, k, v))
        out, _ = torch.ops.dinov2_fast.attention_fwd(q, k, v, scale, cu, longest, chosen)
    return out


def _torch_attention(q, k, v, scale, seqlens) -> torch.Tensor:
    """The reference: SDPA over ``[B, H, N, D]`` views. Packed, one SDPA call per run of
    consecutive segments of equal length (a crop group), as a batch of those segments."""
    if seqlens is None:
        heads_first = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(*heads_first, scale=scale)
        return out.transpose(1, 2).contiguous()
    runs = _equal_length_runs(seqlens)
    outs = []
    for parts in zip(*(t.split([count * length for count, length in runs]) for t in (q, k, v))):
        count, length = runs[len(outs)]
        batched = (t.view(count, length, *t.shape[1:]).transpose(1, 2) for t in parts)
        out = F.scaled_dot_product_attention(*batched, scale=scale)
        outs.append(out.transpose(1, 2).reshape(count * length, out.shape[1], out.shape[-1]))
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def _equal_length_runs(seqlens) -> list[tuple[int, int]]:
    """``(count, length)`` for each run of consecutive equal sequence lengths."""
    runs: list[tuple[int, int]] = []
    for length in seqlens:
        if runs and runs[-1][1] == length:
            runs[-1] = (runs[-1][0] + 1, length)
        else:
            runs.append((1, length))
    return runs


# --- the custom ops ------------------------------------------------------------------------------


def _lse_shape(q: torch.Tensor) -> tuple[int, ...]:
    # dense q [B, N, H, D] -> [B, H, N]; packed q [T, H, D] -> [H, T]
    return (q.shape[0], q.shape[2], q.shape[1]) if q.dim() == 4 else (q.shape[1], q.shape[0])


def _kernels(backend: str):
    """The launchers of ``backend``: Triton's module, or this module's CUDA glue (same API)."""
    if backend == "cuda":
        return _CudaLaunchers
    from dinov2_fast.kernels import attention as kernels

    return kernels


@torch.library.custom_op("dinov2_fast::attention_fwd", mutates_args=())
def _attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the output (q's shape, contiguous) and the fp32 log-sum-exp of each query row."""
    return _kernels(backend).attention_fwd(q, k, v, scale, cu_seqlens, max_seqlen)


@_attention_fwd.register_fake
def _(q, k, v, scale, cu_seqlens, max_seqlen, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        _lse_shape(q), dtype=torch.float32
    )


@torch.library.custom_op("dinov2_fast::attention_bwd", mutates_args=())
def _attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v)]
    _kernels(backend).attention_bwd(do, q, k, v, out, lse, scale, *grads, cu_seqlens, max_seqlen)
    return tuple(grads)


@_attention_bwd.register_fake
def _(do, q, k, v, out, lse, scale, cu_seqlens, max_seqlen, backend):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


@torch.library.custom_op("dinov2_fast::attention_qkvpacked_fwd", mutates_args=())
def _attention_qkvpacked_fwd(
    qkv: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v are read in place from qkv (dim -3)."""
    return _kernels(backend).attention_fwd(*qkv.unbind(-3), scale, cu_seqlens, max_seqlen)


@_attention_qkvpacked_fwd.register_fake
def _(qkv, scale, cu_seqlens, max_seqlen, backend):
    q = qkv.select(-3, 0)
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q), dtype=torch.float32)


@torch.library.custom_op("dinov2_fast::attention_qkvpacked_bwd", mutates_args=())
def _attention_qkvpacked_bwd(
    do: torch.Tensor,
    qkv: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    backend: str,
) -> torch.Tensor:
    """dq, dk and dv are written into one dqkv tensor of qkv's shape."""
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    _kernels(backend).attention_bwd(
        do, *qkv.unbind(-3), out, lse, scale, *dqkv.unbind(-3), cu_seqlens, max_seqlen
    )
    return dqkv


@_attention_qkvpacked_bwd.register_fake
def _(do, qkv, out, lse, scale, cu_seqlens, max_seqlen, backend):
    return torch.empty_like(qkv, memory_format=torch.contiguous_format)


def _setup_fwd(ctx, inputs, output):
    q, k, v, scale, cu_seqlens, max_seqlen, backend = inputs
    out, lse = output
    # q, k, v and the output to recompute the probabilities and rowsum(dO∘O); lse (fp32, one
    # value a row and head) so the softmax is not recomputed from scratch.
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.scale, ctx.max_seqlen, ctx.backend = scale, max_seqlen, backend
    ctx.mark_non_differentiable(lse)


def _backward_fwd(ctx, d_out, _d_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = torch.ops.dinov2_fast.attention_bwd(
        with_unit_last_stride(d_out), q, k, v, out, lse, ctx.scale, cu_seqlens,
        ctx.max_seqlen, ctx.backend,
    )  # fmt: skip
    return dq, dk, dv, None, None, None, None


def _setup_qkvpacked(ctx, inputs, output):
    qkv, scale, cu_seqlens, max_seqlen, backend = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, cu_seqlens)  # as for attention_fwd
    ctx.scale, ctx.max_seqlen, ctx.backend = scale, max_seqlen, backend
    ctx.mark_non_differentiable(lse)


def _backward_qkvpacked(ctx, d_out, _d_lse):
    qkv, out, lse, cu_seqlens = ctx.saved_tensors
    dqkv = torch.ops.dinov2_fast.attention_qkvpacked_bwd(
        with_unit_last_stride(d_out), qkv, out, lse, ctx.scale, cu_seqlens, ctx.max_seqlen,
        ctx.backend,
    )  # fmt: skip
    return dqkv, None, None, None, None


_attention_fwd.register_autograd(_backward_fwd, setup_context=_setup_fwd)
_attention_qkvpacked_fwd.register_autograd(_backward_qkvpacked, setup_context=_setup_qkvpacked)


# --- the CUDA backend's glue ---------------------------------------------------------------------


def _copyable(t: torch.Tensor) -> torch.Tensor:
    """t itself when the CUDA kernels can read it with 16-byte copies (aligned start, strides
    multiples of 8 elements), else a contiguous copy."""
    if t.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in t.stride()[:-1]):
        return t
    return t.contiguous()


def _token_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(b, n, h) strides of a [B, N, H, D] tensor, or (0, t, h) of a [T, H, D] one."""
    return (0, t.stride(0), t.stride(1)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _addresses_and_strides(tensors, varlen: bool) -> list:
    """``[t.data_ptr(), (b, n, h) strides]`` for each tensor, flattened: the launchers' order."""
    return [arg for t in tensors for arg in (t.data_ptr(), _token_strides(t, varlen))]


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    """(b, h) strides of lse [B, H, N], or (0, h) of [H, T]; unit stride along tokens."""
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _cuda_shape(q: torch.Tensor, cu_seqlens, max_seqlen, scale: float) -> dict:
    varlen = cu_seqlens is not None
    return dict(
        cu_seqlens=cu_seqlens.data_ptr() if varlen else 0,
        batch=cu_seqlens.shape[0] - 1 if varlen else q.shape[0],
        seqlen=max_seqlen if varlen else q.shape[1],
        heads=q.shape[-2],
        head_dim=q.shape[-1],
        scale=scale,
        dtype=DTYPE_TAGS[q.dtype],
        stream=_backend.cuda_stream(q.device),
    )


class _CudaLaunchers:
    """``attention_fwd`` / ``attention_bwd`` with the Triton launchers' signatures, running the
    kernels of csrc/attention_fwd.cu and csrc/attention_bwd.cu."""

    @staticmethod
    def attention_fwd(q, k, v, scale, cu_seqlens, max_seqlen):
        varlen = cu_seqlens is not None
        q, k, v = (_copyable(t) for t in (q, k, v))
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = q.new_empty(_lse_shape(q), dtype=torch.float32)
        ext = _backend.cuda_extension()
        with _backend.on_device(q.device):
            ext.attention_fwd(
                *_addresses_and_strides((q, k, v, out), varlen),
                lse.data_ptr(), _lse_strides(lse, varlen),
                **_cuda_shape(q, cu_seqlens, max_seqlen, scale),
            )  # fmt: skip
        return out, lse

    @staticmethod
    def attention_bwd(do, q, k, v, out, lse, scale, dq, dk, dv, cu_seqlens, max_seqlen):
        varlen = cu_seqlens is not None
        do, q, k, v, out = (_copyable(t) for t in (do, q, k, v, out))
        lse = lse.contiguous()  # as attention_fwd returns it: no copy
        delta = torch.empty_like(lse)
        ext = _backend.cuda_extension()
        with _backend.on_device(q.device):
            ext.attention_bwd(
                *_addresses_and_strides((do, q, k, v, out), varlen),
                lse.data_ptr(), delta.data_ptr(), _lse_strides(lse, varlen),
                *_addresses_and_strides((dq, dk, dv), varlen),
                **_cuda_shape(q, cu_seqlens, max_seqlen, scale),
            )  # fmt: skip
