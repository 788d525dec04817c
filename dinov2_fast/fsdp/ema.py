"""The teacher's EMA update and gradient clipping, on FSDP shards (DTensors) or plain modules.

Both work on each rank's local shards: the EMA needs no communication at all when the teacher and
the student are sharded alike, and the gradient norm one all-reduce of a scalar per device mesh.

Why not ``torch.nn.utils.clip_grad_norm_``: it takes DTensor gradients (each op dispatched through
DTensor, reduced with a partial-norm placement) but returns the norm as a DTensor, which the
caller must turn into a tensor (``full_tensor()``); a call that mixes DTensors with plain tensors
(parameters of a module left unsharded) fails (``_foreach_norm`` rejects the mix); its inf-norm
raises on a rank whose local shard of some parameter is empty (torch 2.14: a ``[1, 1, D]`` token
sharded over 2 ranks), and the other ranks then wait in the next collective; and it accumulates
in the gradients' dtype. :func:`clip_grad_norm_` here reduces the local shards' norms with one
all-reduce per mesh over the mesh dimensions that shard (replicated dimensions hold copies and are
not counted twice), takes any mix of DTensors and plain tensors, skips empty shards, accumulates
in float32, and returns a plain tensor, equal to torch's on the unsharded gradients.

FSDP1's parameters (``use_orig_params=True``) are plain tensors holding each rank's part of a flat
shard: :func:`clip_grad_norm_` would take them for whole replicated tensors, so FSDP1 models clip
with their own ``FullyShardedDataParallel.clip_grad_norm_``. :func:`ema_update_` works on them when
the teacher and the student are wrapped alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Shard

__all__ = ["clip_grad_norm_", "ema_update_", "grad_norm"]


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _grouped(pairs: Iterable[tuple[torch.Tensor, ...]]) -> dict[tuple, list[tuple]]:
    """Tuples of tensors grouped by the first one's (device, dtype), for foreach ops."""
    groups: dict[tuple, list[tuple]] = {}
    for pair in pairs:
        groups.setdefault((pair[0].device, pair[0].dtype), []).append(pair)
    return groups


# --- EMA --------------------------------------------------------------------------------------------


def _check_alike(name: str, teacher: torch.Tensor, student: torch.Tensor) -> None:
    """The teacher's and the student's parameter ``name`` hold the same local shard."""
    t_sharded, s_sharded = isinstance(teacher, DTensor), isinstance(student, DTensor)
    if t_sharded != s_sharded:
        which = "teacher" if t_sharded else "student"
        other = "student" if t_sharded else "teacher"
        raise ValueError(
            f"parameter {name!r} is sharded (a DTensor) in the {which} but not in the {other}: "
            f"shard both the same way (e.g. shard_model on each with the same mesh)"
        )
    if teacher.shape != student.shape:
        raise ValueError(
            f"parameter {name!r} has shape {list(teacher.shape)} in the teacher and "
            f"{list(student.shape)} in the student"
        )
    if not t_sharded:
        return
    if teacher.device_mesh != student.device_mesh:
        raise ValueError(
            f"parameter {name!r} is sharded on different meshes: teacher "
            f"{teacher.device_mesh}, student {student.device_mesh}"
        )
    if tuple(teacher.placements) != tuple(student.placements):
        raise ValueError(
            f"parameter {name!r} has placements {teacher.placements} in the teacher and "
            f"{student.placements} in the student"
        )
    t_local, s_local = teacher.to_local(), student.to_local()
    if t_local.shape != s_local.shape:
        raise ValueError(
            f"parameter {name!r} has local shards of shape {list(t_local.shape)} in the teacher "
            f"and {list(s_local.shape)} in the student"
        )


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``teacher ← momentum · teacher + (1 − momentum) · student`` for every parameter, matched by
    name, in place (DINOv2's ``update_teacher``; buffers are left alone).

    On FSDP2 models (DTensor parameters) the update runs on each rank's local shards, with no
    communication, when both models are sharded alike (the same mesh, placements and local
    shapes: shard the teacher and the student with the same call). Plain modules work the same
    way. One ``torch._foreach_lerp_`` per (device, dtype) group: the teacher read and written
    once, the student read once (DINOv2: ``_foreach_mul_`` then ``_foreach_add_``). A student of
    another dtype is cast to the teacher's.

    Args:
        teacher, student: modules with the same parameter names and shapes.
        momentum: in [0, 1]; 1 leaves the teacher as it is, 0 copies the student.

    Raises:
        TypeError: a model is not an nn.Module, or momentum is not a real number.
        ValueError: momentum outside [0, 1], parameter names or shapes that differ, or a
            parameter sharded in one model and not in the other, or sharded differently.
    """
    for label, module in (("teacher", teacher), ("student", student)):
        if not isinstance(module, nn.Module):
            raise TypeError(f"{label} must be a torch.nn.Module, got {type(module).__name__}")
    if isinstance(momentum, torch.Tensor) and momentum.numel() == 1:
        momentum = momentum.item()
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a real number, got {type(momentum).__name__}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    t_params = dict(teacher.named_parameters())
    s_params = dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        only_t = sorted(t_params.keys() - s_params.keys())
        only_s = sorted(s_params.keys() - t_params.keys())
        raise ValueError(
            "teacher and student parameters differ: only in the teacher "
            f"{only_t[:5] or 'none'}, only in the student {only_s[:5] or 'none'}"
        )
    pairs = []
    for name, t_param in t_params.items():
        s_param = s_params[name]
        _check_alike(name, t_param, s_param)
        t_local, s_local = _local(t_param), _local(s_param)
        if t_local.numel():
            pairs.append((t_local, s_local.to(device=t_local.device, dtype=t_local.dtype)))
    weight = 1.0 - float(momentum)
    for group in _grouped(pairs).values():
        t_locals, s_locals = zip(*group)
        torch._foreach_lerp_(list(t_locals), list(s_locals), weight)


# --- gradient norm and clipping ---------------------------------------------------------------------


def _norm_type(norm_type: float | str) -> float:
    if isinstance(norm_type, str) and norm_type.lower() == "inf":
        return math.inf
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)):
        raise TypeError(f"norm_type must be a positive number or inf, got {norm_type!r}")
    norm_type = float(norm_type)
    if not norm_type > 0:
        raise ValueError(f"norm_type must be positive (or inf), got {norm_type}")
    return norm_type


def _tensors(parameters: torch.Tensor | Iterable[torch.Tensor], what: str) -> list[torch.Tensor]:
    if isinstance(parameters, torch.Tensor):
        return [parameters]
    tensors = list(parameters)
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{what} must be tensors, got {type(tensor).__name__}")
    return tensors


def _local_norm_power(tensors: list[torch.Tensor], p: float) -> torch.Tensor:
    """Σ ||t||_p^p (or max ||t||_inf for p = inf) over local tensors, in float32 (a 0-dim tensor
    on the first tensor's device); 0 for none."""
    device = tensors[0].device
    parts = []
    for group in _grouped((t,) for t in tensors if t.numel()).values():
        norms = torch._foreach_norm([t for (t,) in group], p, dtype=torch.float32)
        parts.append(torch.stack([n.to(device) for n in norms]))
    if not parts:
        return torch.zeros((), device=device, dtype=torch.float32)
    norms = torch.cat(parts)
    return norms.max() if math.isinf(p) else norms.pow(p).sum()


def grad_norm(
    parameters: torch.Tensor | Iterable[torch.Tensor], norm_type: float | str = 2.0
) -> torch.Tensor:
    """The ``norm_type``-norm of all the gradients of ``parameters`` together (those with a
    gradient), as a float32 0-dim tensor on the gradients' device, the same on every rank.

    DTensor gradients (FSDP2, HSDP, or any placements) are reduced over the mesh dimensions they
    are sharded on (``Shard``), one all-reduce per (mesh, sharded dimensions) group in the order
    of first appearance; ``Replicate`` dimensions are not summed (their copies are equal).
    Plain gradients are taken as they are (the same on every rank, as with DDP or no sharding).
    Every rank must call it with the same parameters.

    Raises:
        TypeError / ValueError: a bad ``norm_type`` (a positive number or inf).
        NotImplementedError: a gradient with a ``Partial`` placement (not yet reduced).
    """
    p = _norm_type(norm_type)
    grads = [t.grad for t in _tensors(parameters, "parameters") if t.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float32)
    device = _local(grads[0]).device
    plain = [g for g in grads if not isinstance(g, DTensor)]
    sharded: dict[tuple, list[torch.Tensor]] = {}
    meshes: dict[tuple, object] = {}
    for grad in grads:
        if not isinstance(grad, DTensor):
            continue
        if any(isinstance(placement, Partial) for placement in grad.placements):
            raise NotImplementedError(
                f"a gradient with placements {grad.placements}: Partial (unreduced) gradients "
                f"are not supported; reduce them first"
            )
        dims = tuple(i for i, pl in enumerate(grad.placements) if isinstance(pl, Shard))
        key = (id(grad.device_mesh), dims)
        meshes.setdefault(key, grad.device_mesh)
        sharded.setdefault(key, []).append(grad.to_local())
    values = []
    if plain:
        values.append(_local_norm_power(plain, p).to(device))
    op = dist.ReduceOp.MAX if math.isinf(p) else dist.ReduceOp.SUM
    for key, locals_ in sharded.items():
        mesh, dims = meshes[key], key[1]
        value = _local_norm_power(locals_, p)
        for dim in dims:
            dist.all_reduce(value, op=op, group=mesh.get_group(dim))
        values.append(value.to(device))
    stacked = torch.stack(values)
    if math.isinf(p):
        return stacked.max()
    return stacked.sum().pow(1.0 / p)


@torch.no_grad()
def clip_grad_norm_(
    parameters: torch.Tensor | Iterable[torch.Tensor],
    max_norm: float,
    norm_type: float | str = 2.0,
    *,
    error_if_nonfinite: bool = False,
) -> torch.Tensor:
    """Scale the gradients of ``parameters`` in place so that their total ``norm_type``-norm is at
    most ``max_norm`` (``torch.nn.utils.clip_grad_norm_``'s arithmetic: the factor
    ``min(max_norm / (total + 1e-6), 1)``, applied without a host sync), on FSDP shards, HSDP,
    plain tensors or a mix. Returns the total norm before clipping as a plain float32 0-dim
    tensor (the same on every rank; :func:`grad_norm` says how it is reduced).

    DINOv2 clips each student submodel (backbone, DINO head, iBOT head) on its own, at 3.0.

    Raises:
        TypeError / ValueError: a bad ``norm_type`` or ``max_norm``.
        RuntimeError: ``error_if_nonfinite`` and the total norm is nan or inf (a host sync).
    """
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
        raise TypeError(f"max_norm must be a real number, got {type(max_norm).__name__}")
    parameters = _tensors(parameters, "parameters")
    total = grad_norm(parameters, norm_type)
    if error_if_nonfinite and not torch.isfinite(total).item():
        raise RuntimeError(
            f"The total norm of order {float(_norm_type(norm_type))} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable this error and "
            "scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    grads = [_local(t.grad) for t in parameters if t.grad is not None]
    for (device, _), group in _grouped((g,) for g in grads if g.numel()).items():
        torch._foreach_mul_([g for (g,) in group], coefficient.to(device))
    return total
