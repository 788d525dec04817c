"""Soft-target cross-entropy over K prototypes: the DINO / iBOT head's last layer and loss, fused.

The public function is :func:`prototype_cross_entropy`. DINOv2's heads project every CLS token and
every masked patch token onto K = 65536 or 131072 prototypes and take the cross-entropy of the
student's softmax against the teacher's (centered or Sinkhorn-Knopp) probabilities. Plain PyTorch
materialises four ``[R, K]`` fp32 tensors for that (student and teacher logits, probabilities,
their gradient): 6.47 GiB for a 32-image ViT-L step (R = 2816 rows, K = 131072). The kernels
recompute the logits tile by tile from the ``[R, F]`` features and ``[K, F]`` prototype weights
(F the head's bottleneck, 256 or 384) and keep only per-row and per-prototype statistics.

Custom ops: ``dinov2_fast::prototype_cross_entropy_fwd`` and ``..._bwd`` (fake implementations
give their shapes, so ``torch.compile`` traces through them without graph breaks).

Work, with one logits matmul ``M = 2·R·K·F`` FLOPs (R = 2816, K = 131072, F = 256: 189 GFLOP):

- forward: the student and teacher logits, 2M, and 2·R·K exponentials (online softmax of both);
- backward: two kernels, each recomputing both logits (2M) and doing one gradient matmul (M):
  ``d feats = dS · W`` (row blocks, looping over K) and ``d weight = dSᵀ · feats`` (prototype
  blocks, looping over the rows), 6M and 4·R·K exponentials;
- Sinkhorn-Knopp, n iterations: n column passes and n − 1 row passes over the teacher logits
  (the last row normalisation is the forward's softmax), each recomputing the teacher's logits:
  (2n − 1)·M, i.e. 5M for DINOv2's n = 3.

So forward + backward is 8M = 1.51 TFLOP with centering and 13M = 2.46 TFLOP with Sinkhorn-Knopp
(3 iterations), against 4M for plain PyTorch (which stores the logits instead of recomputing them).
Bytes that must move: the weights, ``2·K·F·2`` = 134 MB in bf16, read once by the forward, once by
each backward kernel and half of it by each Sinkhorn pass, plus dW written (67 MB): about 0.5 GB
(0.8 GB with Sinkhorn), ~0.2 ms at the 3 TB/s an H100 copies; the features and statistics are
a few MB. At about 3000 FLOP per HBM byte the op is bound by the tensor cores (771 TFLOP/s
measured for bf16 matmuls: ≥ 2.0 ms with centering, ≥ 3.2 ms with Sinkhorn at F = 256), then by
the exponentials (3.9 T/s on the MUFU: 6·R·K = 2.2 G with centering, ~0.6 ms, 11·R·K with
Sinkhorn; they overlap the matmuls only partly) and by the weight tiles re-read from L2: every row
block streams all of W, so a tile's intensity is BLOCK_R (rows held) FLOP per L2 byte, and BLOCK_K
for the prototype kernels. Extra memory is a few vectors and fp32 partial sums: ``lse`` of both
softmaxes per row and the teacher bias per prototype (saved), the teacher's column sums per row
block (``R/64 × K``) and the feature gradient per K split (``splits × R × F``), tens of MB at
R = 2816, K = 131072 against the 6.47 GiB of the plain version; plus the gradients themselves.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import torch
import torch.distributed as dist

from dinov2_fast import _backend
from dinov2_fast.ops._checks import (
    autocast_dtype,
    check_float_dtype,
    check_positive_float,
    check_same_device,
    check_tensor,
    with_unit_last_stride,
)

__all__ = ["prototype_cross_entropy", "MAX_WIDTH"]

# Widest feature row (F) the Triton kernels take; the torch backend has no limit.
MAX_WIDTH = 512
_OP = "prototype_cross_entropy"
_NAMES = ("student_feats", "student_weight", "teacher_feats", "teacher_weight")


def prototype_cross_entropy(
    student_feats: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_feats: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_temp: float = 0.1,
    teacher_temp: float = 0.07,
    center: torch.Tensor | None = None,
    sinkhorn_iters: int = 0,
    row_weight: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-target cross-entropy of student logits against teacher probabilities over K prototypes,
    without materialising any ``[R, K]`` tensor (kernel backends).

    With ``s = student_feats @ student_weight.T`` and ``t = teacher_feats @ teacher_weight.T``
    (``[R, K]``, never stored), the teacher probabilities ``p`` per row are

    - ``sinkhorn_iters == 0``: ``softmax((t − center) / teacher_temp)`` (no centering when
      ``center`` is None), DINOv2's ``softmax_center_teacher``;
    - ``sinkhorn_iters = n > 0``: DINOv2's Sinkhorn-Knopp with n iterations over all rows of all
      processes (``torch.distributed``, when initialised with more than one process: every
      process must call with the same K, temperatures and n). It equals
      ``DINOLoss.sinkhorn_knopp_teacher`` and ``iBOTPatchLoss.sinkhorn_knopp_teacher`` (whose
      scalar normalisations, by the total and by B and K, cancel: B need not be passed).

    and the loss is ``Σ_r w_r Σ_k p[r,k] · (−log_softmax(s[r] / student_temp)[k])``.

    Args:
        student_feats, teacher_feats: ``[R, F]`` rows (the head's bottleneck features, the
            teacher's rows matching the student's one to one).
        student_weight, teacher_weight: ``[K, F]`` prototypes (the last layer's weight, e.g. a
            weight-normed Linear's ``weight``).
            The four have one dtype (float32, float16 or bfloat16) and one device. Under
            ``torch.autocast`` for their device they are cast to the autocast dtype instead (as
            the head's Linear would be). Any strides; only a non-unit stride along F costs a copy.
        student_temp, teacher_temp: softmax temperatures, > 0.
        center: ``[K]`` float tensor or None (DINOLoss keeps ``[1, K]``: pass
            ``center.reshape(-1)``); read in fp32. Exclusive with ``sinkhorn_iters > 0``.
        sinkhorn_iters: 0 for softmax centering, else the Sinkhorn-Knopp iterations (DINOv2: 3).
        row_weight: ``[R]`` float weights ``w_r`` (read in fp32); default ``1/R`` (this process's
            mean). For a mean over the rows of all processes, as one process holding every row
            would compute, pass ``1/R_total`` on every process and sum the losses (or, with DDP or
            FSDP averaging gradients over W processes, ``W/R_total``). For iBOT pass DINOv2's
            ``masks_weight / n_images``.
        backend: "auto", "triton" or "torch" ("auto": torch on CPU tensors, Triton on CUDA
            tensors; F over MAX_WIDTH (512) falls back to torch with a warning).

    Returns:
        ``(loss, teacher_logit_mean)``: the loss, a 0-d float32 tensor; and the mean of t over
        this process's rows, ``[K]`` float32 without gradient (zeros when R = 0): the batch
        statistic of DINOv2's center EMA (all-reduce it over processes as ``update_center``
        does). Gradients flow to ``student_feats`` and ``student_weight`` only, in their dtypes;
        the teacher tensors, ``center`` and ``row_weight`` get none.

    Saved for backward: the four inputs (no copies), and per row the log-sum-exp of ``s/τs`` and
    of the teacher's ``t/τt + u``, per prototype the teacher bias ``u`` (``−center/τt``, or
    Sinkhorn-Knopp's log column scaling, or 0), all fp32: 8 bytes a row and 4 a prototype, from
    which both backward kernels recompute ``dS = w_r (softmax(s/τs) − p) / τs`` tile by tile.
    Deterministic: no atomics, every reduction in a fixed order.

    Raises:
        TypeError: a non-tensor, an unsupported or mismatched dtype, a temperature that is not a
            number, ``sinkhorn_iters`` not an int.
        ValueError: shapes that do not match (names the argument and the expected shape), K or F
            of 0, devices that differ, a temperature <= 0, ``sinkhorn_iters < 0``, ``center``
            together with ``sinkhorn_iters > 0``, F over MAX_WIDTH for ``backend="triton"``,
            an unknown backend.
        RuntimeError: the requested backend cannot run here (the message says why).
    """
    xs, ws, xt, wt = _check_matrices(student_feats, student_weight, teacher_feats, teacher_weight)
    rows, width = xs.shape
    prototypes = ws.shape[0]
    student_temp = check_positive_float("student_temp", student_temp)
    teacher_temp = check_positive_float("teacher_temp", teacher_temp)
    if isinstance(sinkhorn_iters, bool) or not isinstance(sinkhorn_iters, int):
        raise TypeError(f"sinkhorn_iters must be an int, got {type(sinkhorn_iters).__name__}")
    if sinkhorn_iters < 0:
        raise ValueError(
            f"sinkhorn_iters must be >= 0 (0: softmax centering), got {sinkhorn_iters}"
        )
    if center is not None:
        if sinkhorn_iters > 0:
            raise ValueError(
                "center and sinkhorn_iters > 0 exclude each other (DINOv2 centers the teacher "
                "either by the EMA center or by Sinkhorn-Knopp): pass center=None with "
                f"sinkhorn_iters={sinkhorn_iters}, or sinkhorn_iters=0 with the center"
            )
        center = _check_vector("center", center, prototypes, "K, student_weight's rows", xs)
    if row_weight is not None:
        row_weight = _check_vector("row_weight", row_weight, rows, "R, student_feats's rows", xs)
    else:
        row_weight = torch.full((rows,), 1.0 / max(rows, 1), dtype=torch.float32, device=xs.device)
    chosen = _backend.resolve(_OP, backend, xs.device)
    if width > MAX_WIDTH and chosen in _backend.KERNEL_BACKENDS:
        if backend != "auto":
            raise ValueError(
                f"the feature width F must be at most {MAX_WIDTH} for backend={chosen!r}, got "
                f"{width}; backend='torch' has no limit"
            )
        warnings.warn(
            f"{_OP}: F={width} is over the kernels' {MAX_WIDTH}; using torch", stacklevel=2
        )
        chosen = "torch"
    loss, teacher_mean, _, _, _ = torch.ops.dinov2_fast.prototype_cross_entropy_fwd(
        xs, ws, xt, wt, center, row_weight, student_temp, teacher_temp, sinkhorn_iters, chosen
    )
    return loss, teacher_mean


# --- validation ----------------------------------------------------------------------------------


def _check_matrices(*matrices: object) -> list[torch.Tensor]:
    """The four ``[R, F]`` / ``[K, F]`` tensors: one dtype (or the autocast dtype), one device,
    matching shapes; returned with unit stride along F."""
    for name, matrix in zip(_NAMES, matrices):
        check_tensor(name, matrix)
        check_float_dtype(name, matrix)
        if matrix.dim() != 2:
            kind = "[R, F]" if name.endswith("feats") else "[K, F]"
            raise ValueError(f"{name} must be 2-D {kind}, got shape {list(matrix.shape)}")
    xs, ws, xt, wt = matrices
    for name, matrix in zip(_NAMES[1:], (ws, xt, wt)):
        check_same_device(name, matrix, xs, "student_feats")
    rows, width = xs.shape
    prototypes = ws.shape[0]
    if width == 0:
        raise ValueError("student_feats must have a feature width F >= 1, got shape [R, 0]")
    if prototypes == 0:
        raise ValueError("student_weight must have at least one prototype (K >= 1), got [0, F]")
    expected = {
        "student_weight": ((prototypes, width), f"[K, F] with student_feats's F = {width}"),
        "teacher_feats": ((rows, width), f"[R, F] = student_feats's shape {[rows, width]}"),
        "teacher_weight": ((prototypes, width), f"[K, F] = student_weight's shape "
                           f"{[prototypes, width]}"),
    }  # fmt: skip
    for name, matrix in zip(_NAMES[1:], (ws, xt, wt)):
        shape, what = expected[name]
        if tuple(matrix.shape) != shape:
            raise ValueError(f"{name} must have shape {what}, got {list(matrix.shape)}")
    cast_to = autocast_dtype(xs.device)
    if cast_to is None:
        for name, matrix in zip(_NAMES[1:], (ws, xt, wt)):
            if matrix.dtype != xs.dtype:
                raise TypeError(
                    f"{name} must have student_feats's dtype ({xs.dtype}), got {matrix.dtype}: "
                    f"the four tensors share one dtype (cast them, or run under torch.autocast)"
                )
    elif cast_to not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"autocast dtype must be float32, float16 or bfloat16, got {cast_to}")
    return [with_unit_last_stride(m if cast_to is None else m.to(cast_to)) for m in matrices]


def _check_vector(
    name: str, vector: object, size: int, what: str, like: torch.Tensor
) -> torch.Tensor:
    """A float ``[size]`` tensor on ``like``'s device, as contiguous fp32."""
    check_tensor(name, vector)
    check_float_dtype(name, vector)
    check_same_device(name, vector, like, "student_feats")
    if tuple(vector.shape) != (size,):
        raise ValueError(f"{name} must have shape [{size}] ({what}), got {list(vector.shape)}")
    return vector.detach().to(torch.float32).contiguous()


# --- the custom ops ------------------------------------------------------------------------------


@torch.library.custom_op("dinov2_fast::prototype_cross_entropy_fwd", mutates_args=())
def _prototype_cross_entropy_fwd(
    student_feats: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_feats: torch.Tensor,
    teacher_weight: torch.Tensor,
    center: torch.Tensor | None,
    row_weight: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    sinkhorn_iters: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (fp32) the loss ``[]``, the teacher-logit mean ``[K]``, ``lse_s`` and ``lse_t``
    ``[R]`` (log-sum-exp of ``s/τs`` and of ``t/τt + u``) and the teacher bias ``u: [K]``.
    ``center`` (if any) and ``row_weight`` are fp32 contiguous."""
    args = (student_feats, student_weight, teacher_feats, teacher_weight)
    if center is None:
        bias = student_feats.new_zeros(student_weight.shape[0], dtype=torch.float32)
    else:
        bias = center * (-1.0 / teacher_temp)
    if backend == "triton":
        return _triton_fwd(*args, bias, row_weight, student_temp, teacher_temp, sinkhorn_iters)
    return _torch_fwd(*args, bias, row_weight, student_temp, teacher_temp, sinkhorn_iters)


@_prototype_cross_entropy_fwd.register_fake
def _(xs, ws, xt, wt, center, row_weight, student_temp, teacher_temp, sinkhorn_iters, backend):
    rows, prototypes = xs.shape[0], ws.shape[0]
    scalar = xs.new_empty((), dtype=torch.float32)
    per_prototype = xs.new_empty(prototypes, dtype=torch.float32)
    per_row = xs.new_empty(rows, dtype=torch.float32)
    return (
        scalar,
        per_prototype,
        per_row,
        torch.empty_like(per_row),
        torch.empty_like(per_prototype),
    )


@torch.library.custom_op("dinov2_fast::prototype_cross_entropy_bwd", mutates_args=())
def _prototype_cross_entropy_bwd(
    grad_loss: torch.Tensor,
    student_feats: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_feats: torch.Tensor,
    teacher_weight: torch.Tensor,
    bias: torch.Tensor,
    row_weight: torch.Tensor,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
    need_feats: bool,
    need_weight: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``d student_feats [R, F]`` and ``d student_weight [K, F]`` in their dtypes
    (contiguous; shape ``[0]`` when not needed: custom ops cannot return None)."""
    # dloss/ds[r,k] = grad · w_r (softmax(s/τs) − p)[k] / τs: the per-row factor, on the device.
    coef = row_weight * (grad_loss.to(torch.float32) / student_temp)
    args = (student_feats, student_weight, teacher_feats, teacher_weight, bias, lse_s, lse_t)
    if backend == "triton":
        dx, dw = _kernels().backward(
            coef, *args, student_temp, teacher_temp, need_feats, need_weight
        )
    else:
        dx, dw = _torch_bwd(coef, *args, student_temp, teacher_temp, need_feats, need_weight)
    absent = student_feats.new_empty(0)
    return (dx if dx is not None else absent), (dw if dw is not None else absent)


@_prototype_cross_entropy_bwd.register_fake
def _(grad_loss, xs, ws, xt, wt, bias, row_weight, lse_s, lse_t, ts, tt, need_x, need_w, backend):
    dx = torch.empty_like(xs, memory_format=torch.contiguous_format) if need_x else xs.new_empty(0)
    dw = torch.empty_like(ws, memory_format=torch.contiguous_format) if need_w else xs.new_empty(0)
    return dx, dw


def _setup_context(ctx, inputs, output):
    xs, ws, xt, wt, _center, row_weight, student_temp, teacher_temp, _iters, backend = inputs
    _loss, teacher_mean, lse_s, lse_t, bias = output
    # The inputs to recompute both logits tile by tile; lse_s, lse_t (per row) and the bias (per
    # prototype) so that neither softmax nor Sinkhorn-Knopp (with its collectives) is redone.
    ctx.save_for_backward(xs, ws, xt, wt, bias, row_weight, lse_s, lse_t)
    ctx.temps = (student_temp, teacher_temp)
    ctx.backend = backend
    ctx.mark_non_differentiable(teacher_mean, lse_s, lse_t, bias)


def _backward(ctx, grad_loss, _d_mean, _d_lse_s, _d_lse_t, _d_bias):
    xs, ws, xt, wt, bias, row_weight, lse_s, lse_t = ctx.saved_tensors
    need_feats, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = torch.ops.dinov2_fast.prototype_cross_entropy_bwd(
        grad_loss, xs, ws, xt, wt, bias, row_weight, lse_s, lse_t, *ctx.temps, need_feats,
        need_weight, ctx.backend,
    )  # fmt: skip
    return (
        dx if need_feats else None,
        dw if need_weight else None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


_prototype_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


# --- Sinkhorn-Knopp across processes ---------------------------------------------------------------


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _log_column_sums(col_max: torch.Tensor, col_sum: torch.Tensor) -> torch.Tensor:
    """``log Σ_r exp(x[r,k])`` over the rows of every process, from each process's per-column
    ``max`` and ``Σ exp(x − max)`` (two all-reduces of [K] when there are several processes)."""
    if _world_size() > 1:
        global_max = col_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX)
        # A process without rows has max -inf and sum 0: it adds 0 (not exp(nan)).
        col_sum = torch.where(col_sum > 0, col_sum * torch.exp(col_max - global_max), 0.0)
        dist.all_reduce(col_sum)
        col_max = global_max
    return col_max + torch.log(col_sum)


def _sinkhorn_bias(column_stats, row_lse, rows: int, device: torch.device, iters: int):
    """DINOv2's Sinkhorn-Knopp as a teacher bias ``u: [K]``, with ``p = softmax(t/τt + u)`` per row.

    DINOv2 scales ``Q = exp(t/τ)ᵀ`` by a factor per prototype (its rows) and per sample (its
    columns) in turn; so ``Q[k, r] = exp(t[r,k]/τ + u_k + v_r)``, and after the last column
    normalisation each sample's probabilities are ``softmax_k(t[r,k]/τ + u_k)``. In log space
    each iteration is ``u_k = −log Σ_r exp(t[r,k]/τ + v_r)`` over all processes' rows (the prototype
    normalisation; ``column_stats(−v)``), then ``v_r = −log Σ_k exp(t[r,k]/τ + u_k)`` (the sample
    normalisation, this process's rows; ``row_lse(u)``), which the last iteration leaves to the
    caller's softmax. The constant factors (the total, 1/K, 1/B, ×B) shift u or v by constants,
    which no later step sees; the online maxima of the passes replace DINOv2's overflow shift,
    so no prototype underflows to 0 where DINOv2 would return NaN."""
    shift = torch.zeros(rows, dtype=torch.float32, device=device)  # −v, v = 0 before the first
    bias = None
    for iteration in range(iters):
        bias = -_log_column_sums(*column_stats(shift))
        if iteration + 1 < iters:
            shift = row_lse(bias)
    return bias


# --- backends ------------------------------------------------------------------------------------


def _kernels():
    from dinov2_fast.kernels import prototype_cross_entropy as kernels

    return kernels


def _triton_fwd(xs, ws, xt, wt, bias, row_weight, student_temp, teacher_temp, iters):
    kernels = _kernels()
    if iters:
        bias = _sinkhorn_bias(
            lambda shift: kernels.sinkhorn_columns(xt, wt, shift, teacher_temp),
            lambda b: kernels.forward_rows(None, None, xt, wt, b, student_temp, teacher_temp)[0],
            xs.shape[0],
            xs.device,
            iters,
        )
    lse_t, lse_s, loss, mean = kernels.forward_rows(
        xs, ws, xt, wt, bias, student_temp, teacher_temp, row_weight
    )
    return loss, mean, lse_s, lse_t, bias


def _no_autocast(device: torch.device):
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _torch_logits(xs, ws, xt, wt):
    """The reference's fp32 logits ``s, t: [R, K]`` (materialised)."""
    return xs.float() @ ws.float().T, xt.float() @ wt.float().T


def _torch_fwd(xs, ws, xt, wt, bias, row_weight, student_temp, teacher_temp, iters):
    """The reference: fp32 logits, softmaxes and Sinkhorn-Knopp on materialised ``[R, K]``."""
    rows, prototypes = xs.shape[0], ws.shape[0]
    with _no_autocast(xs.device):
        s, t = _torch_logits(xs, ws, xt, wt)
        z = t / teacher_temp
        if iters:

            def column_stats(shift):
                if rows == 0:
                    return torch.full_like(bias, -math.inf), torch.zeros_like(bias)
                x = z - shift[:, None]
                col_max = x.amax(0)
                return col_max, torch.exp(x - col_max).sum(0)

            bias = _sinkhorn_bias(
                column_stats, lambda b: torch.logsumexp(z + b, 1), rows, xs.device, iters
            )
        z = z + bias
        lse_t = torch.logsumexp(z, 1)
        scaled = s / student_temp
        lse_s = torch.logsumexp(scaled, 1)
        cross = (torch.exp(z - lse_t[:, None]) * scaled).sum(1)
        loss = (row_weight * (lse_s - cross)).sum()
        mean = t.mean(0) if rows else t.new_zeros(prototypes)
    return loss, mean, lse_s, lse_t, bias


def _torch_bwd(
    coef, xs, ws, xt, wt, bias, lse_s, lse_t, student_temp, teacher_temp, need_x, need_w
):
    with _no_autocast(xs.device):
        s, t = _torch_logits(xs, ws, xt, wt)
        p_s = torch.exp(s / student_temp - lse_s[:, None])
        p_t = torch.exp(t / teacher_temp + bias - lse_t[:, None])
        ds = (p_s - p_t) * coef[:, None]
        dx = (ds @ ws.float()).to(xs.dtype) if need_x else None
        dw = (ds.T @ xs.float()).to(ws.dtype) if need_w else None
    return dx, dw
