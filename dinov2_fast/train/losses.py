"""DINOv2's training losses: DINO (CLS tokens), iBOT (masked patch tokens) and KoLeo.

The math is DINOv2's (``dinov2/loss/*.py``), computed in float32 whatever the inputs' dtype (float64
inputs stay float64) and with autocast off. The teacher targets come from centering
(``softmax_center_teacher`` then ``update_center``) or from Sinkhorn-Knopp
(``sinkhorn_knopp_teacher``); both work on one process and under ``torch.distributed``, where they
all-reduce over the default group (only when it is initialised with more than one process).

Centering, as DINOv2 does it: ``update_center(logits)`` starts an asynchronous all-reduce of the
batch statistics and the EMA ``center = m·center + (1 − m)·batch_mean`` is applied lazily, at the
next ``softmax_center_teacher`` (so the reduction overlaps the student's forward). The center used
at step n is therefore the EMA of the batch means of steps 0 … n−1. Unlike DINOv2, a pending update
is also applied before the loss's state is saved (``state_dict``), so a checkpoint taken between
``update_center`` and the next step carries the up-to-date center; ``apply_center_update()`` applies
it on demand, and loading a state dict drops a pending one.
"""

from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dinov2_fast.ops._checks import check_positive_float

__all__ = ["DINOLoss", "KoLeoLoss", "iBOTPatchLoss"]

# ---- helpers ------------------------------------------------------------------------------------


def _world_size() -> int:
    """Processes in the default group; 1 without an initialised ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_reduce(tensor: torch.Tensor, op: str = "sum", async_op: bool = False):
    """In-place all-reduce (``op`` "sum" or "max") over the default group when it has more than
    one process; returns the async work handle (or None)."""
    if _world_size() == 1:
        return None
    reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
    return dist.all_reduce(tensor, op=reduce_op, async_op=async_op)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for float32/16/bf16 inputs; float64 inputs keep float64."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _no_autocast(device: torch.device):
    if device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _check_logits(name: str, value: object, width: int | None = None) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.dim() < 1:
        raise ValueError(f"{name} must have a last dimension of size K, got a 0-d tensor")
    if width is not None and value.shape[-1] != width:
        raise ValueError(
            f"{name} must have K = {width} prototypes in its last dimension, "
            f"got shape {list(value.shape)}"
        )
    return value


def _check_width(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_momentum(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"center_momentum must be a number, got {type(value).__name__}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"center_momentum must be in [0, 1], got {value}")
    return float(value)


def _check_iterations(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"n_iterations must be an int >= 1, got {value!r}")
    return value


def _as_list(name: str, value: object) -> list[torch.Tensor]:
    """A list/tuple of tensors, or one tensor whose first dimension is the list (DINOv2 passes
    the teacher's ``[2, B, K]`` probabilities that way)."""
    items = list(value.unbind(0)) if isinstance(value, torch.Tensor) else list(value)
    if not items:
        raise ValueError(f"{name} must hold at least one tensor, got none")
    return items


def _cross_entropy_terms(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """``Σ_k t·log_softmax(s / student_temp)`` over the last dimension: [..., K] -> [...]."""
    dtype = _compute_dtype(student_logits)
    log_probs = F.log_softmax(student_logits.to(dtype) / student_temp, dim=-1)
    return torch.sum(teacher_probs.to(dtype) * log_probs, dim=-1)


def _sinkhorn_knopp(
    logits: torch.Tensor, teacher_temp: float, n_samples, n_iterations: int
) -> torch.Tensor:
    """DINOv2's Sinkhorn-Knopp on ``logits [R, K]`` (this process's rows of a global ``[B, K]``):
    ``Q = exp(logits / temp)ᵀ`` normalised to total 1, then ``n_iterations`` times rows (per
    prototype, summed over all processes) to 1/K and columns (per sample) to 1/B; returns
    ``(Q·B)ᵀ [R, K]``, whose rows sum to 1.

    ``n_samples`` is B (an int or a tensor). Only where DINOv2's ``exp`` would overflow (the largest
    ``logits / temp`` over all processes above log(max float) − 24) is everything shifted down by
    a common constant first; the first normalisation makes the result independent of it. As in
    DINOv2, a prototype whose every ``exp`` underflows to 0 (logits / temp spread over more than
    about 150) makes the result NaN."""
    dtype = _compute_dtype(logits)
    scaled = logits.to(dtype) / teacher_temp
    if scaled.numel():
        largest = scaled.max().reshape(1)
    else:
        largest = torch.full((1,), -math.inf, dtype=dtype, device=scaled.device)
    _all_reduce(largest, op="max")
    shift = (largest - (math.log(torch.finfo(dtype).max) - 24.0)).clamp_min(0.0)
    q = scaled.sub_(shift).exp_().t()  # [K, R]: DINOv2's (and the paper's) orientation
    n_prototypes = q.shape[0]

    total = torch.sum(q)
    _all_reduce(total)
    q /= total
    for _ in range(n_iterations):
        # each prototype's total weight (over all processes) to 1/K
        per_prototype = torch.sum(q, dim=1, keepdim=True)
        _all_reduce(per_prototype)
        q /= per_prototype
        q /= n_prototypes
        # each sample's total weight to 1/B
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= n_samples
    q *= n_samples  # each sample's weights sum to 1: an assignment
    return q.t()


# ---- centering ----------------------------------------------------------------------------------


class _CenteredLoss(nn.Module):
    """The teacher-centering state shared by the DINO and iBOT losses: the ``center`` buffer
    (training state, in ``state_dict``), and its lazily applied EMA update."""

    center: torch.Tensor

    def __init__(self, center_shape: tuple[int, ...], student_temp: float, center_momentum: float):
        super().__init__()
        self.student_temp = check_positive_float("student_temp", student_temp)
        self.center_momentum = _check_momentum(center_momentum)
        self.register_buffer("center", torch.zeros(center_shape))
        # (the batch statistics [K + 1]: sum of the means and their count, the all-reduce's handle)
        self._pending: tuple[torch.Tensor, object] | None = None

    @property
    def width(self) -> int:
        return self.center.shape[-1]

    def _batch_statistics(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """``[K + 1]``: this process's sum of batch means, then how many it summed."""
        raise NotImplementedError

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """Start the center's EMA update with this step's teacher logits (DINOv2's semantics: the
        reduction is asynchronous and the update is applied at the next
        :meth:`softmax_center_teacher`, :meth:`apply_center_update` or ``state_dict``). A pending
        update is applied first, so two calls in a row both count (DINOv2 drops the first)."""
        teacher_logits = _check_logits("teacher_logits", teacher_logits, self.width)
        self.apply_center_update()
        statistics = self._batch_statistics(teacher_logits)
        work = _all_reduce(statistics, async_op=True)
        self._pending = (statistics, work)

    @torch.no_grad()
    def update_center_from_mean(self, row_mean: torch.Tensor, rows: int) -> None:
        """:meth:`update_center` for a caller that has the mean of its teacher logits over its
        ``rows`` rows instead of the logits (``ops.prototype_cross_entropy`` returns that mean and
        never stores the logits); the same update as ``update_center`` of those logits."""
        row_mean = _check_logits("row_mean", row_mean, self.width).reshape(-1)
        self.apply_center_update()
        statistics = self._statistics_from_mean(row_mean.float(), int(rows))
        work = _all_reduce(statistics, async_op=True)
        self._pending = (statistics, work)

    def _statistics_from_mean(self, row_mean: torch.Tensor, rows: int) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Apply a pending :meth:`update_center`: ``center = m·center + (1 − m)·mean``, the mean
        over every process's batch. A batch with no rows at all leaves the center as it is."""
        if self._pending is None:
            return
        statistics, work = self._pending
        self._pending = None
        if work is not None:
            work.wait()
        statistics = statistics.to(self.center.device)
        count = statistics[-1]
        batch_center = (statistics[:-1] / count.clamp_min(1.0)).view_as(self.center)
        momentum = self.center_momentum
        updated = self.center * momentum + batch_center * (1 - momentum)
        self.center.copy_(torch.where(count > 0, updated, self.center))

    def _centered_softmax(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        teacher_logits = _check_logits("teacher_logits", teacher_logits, self.width)
        teacher_temp = check_positive_float("teacher_temp", teacher_temp)
        self.apply_center_update()
        dtype = _compute_dtype(teacher_logits)
        center = self.center.to(device=teacher_logits.device, dtype=dtype).reshape(-1)
        with _no_autocast(teacher_logits.device):
            return F.softmax((teacher_logits.to(dtype) - center) / teacher_temp, dim=-1)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        self.apply_center_update()  # checkpoints carry the center of every update so far
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self._pending is not None:  # the loaded center replaces any update in flight
            work = self._pending[1]
            if work is not None:
                work.wait()
            self._pending = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"K={self.width}, student_temp={self.student_temp}, "
            f"center_momentum={self.center_momentum}"
        )


class DINOLoss(_CenteredLoss):
    """DINOv2's DINO loss on the CLS tokens after the head.

    ``forward(student_output_list, teacher_probs_list)`` =
    ``−Σ_s Σ_t mean_rows(Σ_k t·log_softmax(s / student_temp))``: every student output ``[..., K]``
    against every teacher target of the same shape (DINOv2 divides by the number of pairs outside).

    Teacher targets: :meth:`softmax_center_teacher` (``softmax((t − center) / temp)``, then
    :meth:`update_center` with the same logits) or :meth:`sinkhorn_knopp_teacher`.

    Buffer: ``center [1, K]`` (float32; training state, saved in checkpoints). See the module's
    docstring for when its EMA update is applied.

    Raises:
        ValueError: ``out_dim`` not a positive int; a temperature <= 0; ``center_momentum`` outside
            [0, 1]; a tensor whose last dimension is not K; student and teacher shapes that differ;
            an empty list.
        TypeError: a non-tensor or non-floating input; a temperature that is not a number.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__((1, _check_width("out_dim", out_dim)), student_temp, center_momentum)

    @torch.no_grad()
    def softmax_center_teacher(
        self, teacher_logits: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """``softmax((teacher_logits − center) / teacher_temp)`` over K, after applying a pending
        center update: ``[..., K]`` (any dtype) -> float32 ``[..., K]``."""
        return self._centered_softmax(teacher_logits, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self, teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3
    ) -> torch.Tensor:
        """DINOv2's Sinkhorn-Knopp targets: ``[..., K]`` (this process's rows) -> float32
        ``[..., K]``, every row summing to 1; over all processes each prototype gets about B/K.
        B = rows on this process × world size (DINOv2's: every process must hold as many rows).
        Collectives: 2 + n_iterations all-reduces (the first a 1-element MAX)."""
        teacher_logits = _check_logits("teacher_logits", teacher_logits, self.width)
        teacher_temp = check_positive_float("teacher_temp", teacher_temp)
        n_iterations = _check_iterations(n_iterations)
        rows = teacher_logits.reshape(-1, self.width)
        with _no_autocast(teacher_logits.device):
            probs = _sinkhorn_knopp(rows, teacher_temp, rows.shape[0] * _world_size(), n_iterations)
        return probs.reshape(teacher_logits.shape)

    def forward(self, student_output_list, teacher_probs_list) -> torch.Tensor:
        """The loss (a 0-d float32 tensor) of every student output against every teacher target.

        Args:
            student_output_list: student logits ``[..., K]`` (a list/tuple, or one tensor whose
                first dimension is the list), any floating dtype.
            teacher_probs_list: teacher probabilities of the same shape as each student output.
        """
        students = _as_list("student_output_list", student_output_list)
        teachers = _as_list("teacher_probs_list", teacher_probs_list)
        shape = None
        for kind, items in (("student_output_list", students), ("teacher_probs_list", teachers)):
            for i, item in enumerate(items):
                _check_logits(f"{kind}[{i}]", item, self.width)
                if shape is None:
                    shape = item.shape
                elif item.shape != shape:
                    raise ValueError(
                        f"{kind}[{i}] has shape {list(item.shape)}, but the first student output "
                        f"has {list(shape)}: every student output and teacher target must match"
                    )
        device = students[0].device
        with _no_autocast(device):
            # Σ_t mean_rows(t·ls) = mean_rows((Σ_t t)·ls) as every target has the same rows.
            dtype = _compute_dtype(students[0])
            targets = teachers[0].to(dtype)
            for teacher in teachers[1:]:
                targets = targets + teacher.to(dtype)
            total = torch.zeros((), dtype=dtype, device=device)
            for student in students:
                total = total - _cross_entropy_terms(student, targets, self.student_temp).mean()
        return total

    def _batch_statistics(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        rows = teacher_logits.reshape(-1, self.width)
        dtype = _compute_dtype(rows)
        count = torch.full((1,), rows.shape[0], dtype=dtype, device=rows.device)
        return torch.cat([rows.to(dtype).sum(dim=0), count])

    def _statistics_from_mean(self, row_mean: torch.Tensor, rows: int) -> torch.Tensor:
        count = torch.full((1,), rows, dtype=row_mean.dtype, device=row_mean.device)
        return torch.cat([row_mean * rows, count])


class iBOTPatchLoss(_CenteredLoss):  # noqa: N801 (DINOv2's name)
    """DINOv2's iBOT loss on the masked patch tokens after the head.

    ``forward_masked(s [M, K], t [M, K], masks [B, N] bool, n_masked_patches, masks_weight)`` =
    ``−Σ_tokens (Σ_k t·log_softmax(s / student_temp))·masks_weight / B``: each image's masked
    tokens weigh 1/(its number of masked tokens) by default, and the sum is divided by all B
    images, masked or not (DINOv2's).

    Teacher targets: :meth:`softmax_center_teacher` then :meth:`update_center`, or
    :meth:`sinkhorn_knopp_teacher` with the global number of masked tokens.

    Buffer: ``center [1, 1, K]`` (float32; training state, saved in checkpoints).

    Raises: as :class:`DINOLoss`; also TypeError for non-bool masks, ValueError for weights whose
    length is not the number of masked tokens.
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        width = _check_width("patch_out_dim", patch_out_dim)
        super().__init__((1, 1, width), student_temp, center_momentum)

    @torch.no_grad()
    def softmax_center_teacher(
        self, teacher_logits: torch.Tensor, teacher_temp: float
    ) -> torch.Tensor:
        """``softmax((teacher_logits − center) / teacher_temp)`` over K: ``[..., K]`` -> float32
        ``[..., K]`` (the input's shape; DINOv2 broadcasts a 2-d input to ``[1, M, K]``)."""
        return self._centered_softmax(teacher_logits, teacher_temp)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(
        self,
        teacher_logits: torch.Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: torch.Tensor | int,
        n_iterations: int = 3,
    ) -> torch.Tensor:
        """DINOv2's Sinkhorn-Knopp targets for the masked tokens: ``[..., K]`` (this process's
        masked tokens only, no padding rows) -> float32 ``[..., K]``. B is
        ``n_masked_patches_tensor`` (this process's count, an int or a 1-element tensor) summed
        over all processes; unlike DINOv2 the caller's tensor is not modified."""
        teacher_logits = _check_logits("teacher_logits", teacher_logits, self.width)
        teacher_temp = check_positive_float("teacher_temp", teacher_temp)
        n_iterations = _check_iterations(n_iterations)
        if isinstance(n_masked_patches_tensor, torch.Tensor):
            if n_masked_patches_tensor.numel() != 1:
                raise ValueError(
                    f"n_masked_patches_tensor must hold one number, "
                    f"got shape {list(n_masked_patches_tensor.shape)}"
                )
        elif isinstance(n_masked_patches_tensor, bool) or not isinstance(
            n_masked_patches_tensor, int
        ):
            raise TypeError(
                f"n_masked_patches_tensor must be an int or a tensor, "
                f"got {type(n_masked_patches_tensor).__name__}"
            )
        dtype = _compute_dtype(teacher_logits)
        n_samples = torch.as_tensor(n_masked_patches_tensor, device=teacher_logits.device)
        n_samples = n_samples.to(dtype).reshape(1).clone()
        _all_reduce(n_samples)
        rows = teacher_logits.reshape(-1, self.width)
        with _no_autocast(teacher_logits.device):
            probs = _sinkhorn_knopp(rows, teacher_temp, n_samples, n_iterations)
        return probs.reshape(teacher_logits.shape)

    def forward_masked(
        self,
        student_logits_masked: torch.Tensor,
        teacher_probs_masked: torch.Tensor,
        student_masks_flat: torch.Tensor,
        n_masked_patches: int | torch.Tensor | None = None,
        masks_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The iBOT loss (a 0-d float32 tensor).

        Args:
            student_logits_masked: ``[M, K]`` student logits of the masked tokens (any float).
            teacher_probs_masked: ``[M, K]`` teacher targets of the same tokens.
            student_masks_flat: ``[B, N]`` bool masks of the global crops (B divides the sum).
            n_masked_patches: if given, only the first that many tokens count (DINOv2 passes the
                true count when the inputs carry padding rows); an int or a 1-element tensor.
            masks_weight: ``[n]`` per-token weights for the counted tokens; default (DINOv2's)
                ``1 / (masked tokens of the token's image)``, taken from the masks.
        """
        s = _check_logits("student_logits_masked", student_logits_masked, self.width)
        t = _check_logits("teacher_probs_masked", teacher_probs_masked, self.width)
        if s.shape != t.shape:
            raise ValueError(
                f"student_logits_masked {list(s.shape)} and teacher_probs_masked "
                f"{list(t.shape)} must have the same shape"
            )
        if not isinstance(student_masks_flat, torch.Tensor):
            raise TypeError(
                f"student_masks_flat must be a torch.Tensor, got {type(student_masks_flat).__name__}"
            )
        if student_masks_flat.dtype != torch.bool:
            raise TypeError(f"student_masks_flat must be bool, got {student_masks_flat.dtype}")
        if student_masks_flat.dim() != 2 or student_masks_flat.shape[0] == 0:
            raise ValueError(
                f"student_masks_flat must have shape [B, N] with B >= 1, "
                f"got {list(student_masks_flat.shape)}"
            )
        with _no_autocast(s.device):
            loss = _cross_entropy_terms(s, t, self.student_temp).reshape(-1)
            if masks_weight is None:
                per_image = 1 / student_masks_flat.sum(-1).clamp(min=1.0)
                masks_weight = per_image.unsqueeze(-1).expand_as(student_masks_flat)[
                    student_masks_flat
                ]
            if n_masked_patches is not None:
                loss = loss[: int(n_masked_patches)]
            if masks_weight.shape != loss.shape:
                raise ValueError(
                    f"masks_weight must have one weight per counted masked token "
                    f"({list(loss.shape)}), got {list(masks_weight.shape)}"
                )
            loss = loss * masks_weight.to(device=loss.device, dtype=loss.dtype)
            return -loss.sum() / student_masks_flat.shape[0]

    def _batch_statistics(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        # DINOv2: sum over dim 0 of the means over dim 1, divided by len × world, i.e. the mean
        # over processes (and groups) of each group's mean over its tokens. A [M, K] input is one
        # group; DINOv2 takes it as [1, M, K].
        if teacher_logits.dim() == 1:
            groups = teacher_logits.reshape(1, 1, -1)
        elif teacher_logits.dim() == 2:
            groups = teacher_logits.unsqueeze(0)
        else:
            groups = teacher_logits.flatten(0, -3)
        dtype = _compute_dtype(groups)
        if groups.shape[1] == 0:  # no tokens here: contribute nothing to the mean
            total = torch.zeros(self.width, dtype=dtype, device=groups.device)
            count = 0
        else:
            total = groups.to(dtype).mean(dim=1).sum(dim=0)
            count = groups.shape[0]
        count_tensor = torch.full((1,), count, dtype=dtype, device=groups.device)
        return torch.cat([total, count_tensor])

    def _statistics_from_mean(self, row_mean: torch.Tensor, rows: int) -> torch.Tensor:
        # One group (this process's masked tokens), as _batch_statistics takes a [M, K] input.
        groups = 1 if rows > 0 else 0
        count = torch.full((1,), groups, dtype=row_mean.dtype, device=row_mean.device)
        return torch.cat([row_mean * groups, count])


class KoLeoLoss(nn.Module):
    """DINOv2's KoLeo regulariser (Sablayrolles et al. 2018) on one process's features.

    ``forward(features [B, D], eps=1e-8)``: L2-normalise the rows, find each row's nearest other
    row by the largest inner product, return ``−mean(log(‖x_i − x_nn(i) + eps‖ + eps))`` (DINOv2's
    ``PairwiseDistance(eps)`` adds eps to the difference). float32 math, autocast off; the
    neighbour search takes no gradient. The diagonal is excluded with −inf (DINOv2 writes −1,
    which can pick a row itself when its only neighbour is antipodal).

    Raises:
        ValueError: not a 2-d tensor, or fewer than 2 rows (DINOv2 returns inf/NaN there,
            issue #314); a negative eps.
        TypeError: a non-tensor or non-floating input.
    """

    def forward(self, features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        features = _check_logits("features", features)
        if features.dim() != 2 or features.shape[0] < 2:
            raise ValueError(
                f"features must have shape [B, D] with B >= 2 rows (KoLeo needs a nearest "
                f"neighbour), got {list(features.shape)}"
            )
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
            raise ValueError(f"eps must be a number >= 0, got {eps!r}")
        with _no_autocast(features.device):
            x = F.normalize(features.to(_compute_dtype(features)), p=2, dim=-1, eps=eps)
            with torch.no_grad():
                dots = x @ x.t()
                dots.fill_diagonal_(-math.inf)
                neighbours = dots.argmax(dim=1)
            distances = F.pairwise_distance(x, x[neighbours], p=2, eps=eps)
            return -torch.log(distances + eps).mean()
