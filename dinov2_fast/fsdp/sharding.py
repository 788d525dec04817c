"""Sharding a ViT with FSDP2 (``fully_shard``), and FSDP1's wrapping policy and mixed precision.

:func:`shard_model` makes every transformer block its own FSDP2 unit (ours, DINOv2's and timm's,
found by :func:`dinov2_fast.patch.vit_blocks`), then the heads, then the rest. One unit per block,
where DINOv2 wraps chunks of blocks (``BlockChunk``, 4 chunks of 6 blocks for ViT-L): the
all-gather of the next block overlaps the current block's compute at every block, and only a
block's parameters (not a chunk's) are gathered at a time.

FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``) users take :func:`wrap_policy` and
:func:`mixed_precision` / :func:`split_mixed_precision` instead.

Only public torch APIs: ``torch.distributed.fsdp``, ``torch.distributed.device_mesh``,
``torch.utils.checkpoint``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecision,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.utils.checkpoint import checkpoint

from dinov2_fast.models.dino_head import DINOHead
from dinov2_fast.nn.block import Block
from dinov2_fast.patch import subclass_keeping_name, vit_blocks

__all__ = [
    "RECOGNISED_BLOCKS",
    "checkpoint_blocks",
    "head_modules",
    "mixed_precision",
    "shard_model",
    "split_mixed_precision",
    "wrap_policy",
]

RECOGNISED_BLOCKS = (
    "dinov2_fast.nn.Block (= NestedTensorBlock), DINOv2's Block and NestedTensorBlock, timm's "
    "Block: a class of one of those names in the MRO, with norm1, attn, norm2 and mlp; patched by "
    "dinov2_fast.patch or not"
)

# The methods of a backbone that run its parameters outside ``forward``: FSDP2 hooks only
# ``__call__``, so these are registered with register_fsdp_forward_method.
_FORWARD_METHODS = ("forward_features", "forward_features_list", "get_intermediate_layers")
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

# A checkpointed class's attribute naming the class it wraps.
_CHECKPOINTED = "_dinov2_fast_checkpointed"


# --- activation checkpointing without new state_dict keys ------------------------------------------


class _CheckpointedForward(nn.Module):
    """Mixin: the block's own forward, recomputed in the backward (non-reentrant checkpoint with
    the RNG state preserved, so that stochastic depth redraws the same sample subsets)."""

    def forward(self, *args, **kwargs):
        forward = super().forward
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **kwargs)


def _checkpoint_block(block: nn.Module) -> None:
    """Swap ``block``'s class for its checkpointed subclass in place (idempotent): parameters,
    hooks, ``isinstance`` and the state_dict keys stay as they are."""
    if not isinstance(block, _CheckpointedForward):
        block.__class__ = subclass_keeping_name(type(block), _CheckpointedForward, _CHECKPOINTED)


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Activation checkpointing for every ViT block of ``model``, in place, without sharding
    (:func:`shard_model` does the same with ``activation_checkpointing=True``): each block's
    forward is recomputed in the backward (non-reentrant ``torch.utils.checkpoint``, the RNG
    state preserved, so stochastic depth redraws the same subsets; skipped where gradients are
    off, e.g. for the teacher). Each block gets a subclass of its own class (same name) whose
    forward checkpoints the original: parameters, hooks, ``isinstance`` and state_dict keys do
    not change. Idempotent; apply :func:`dinov2_fast.patch` before, not after. Returns ``model``.

    Raises:
        TypeError: ``model`` is not an nn.Module.
        ValueError: no blocks found (the message lists the recognised classes).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    blocks = vit_blocks(model)
    if not blocks:
        raise ValueError(
            f"no transformer blocks found in {type(model).__name__}; recognised: "
            f"{RECOGNISED_BLOCKS}"
        )
    for _, block in blocks:
        _checkpoint_block(block)
    return model


# --- finding the units ------------------------------------------------------------------------------


def _inside(name: str, outer: str) -> bool:
    return outer == "" or name == outer or name.startswith(f"{outer}.")


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def head_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the projection heads in ``model``, outermost first and not nested:
    a :class:`dinov2_fast.models.DINOHead`, a module with a ``last_layer`` module (DINO/iBOT
    heads of other code bases), or a module whose attribute name ends with "head" and that holds
    parameters (timm's classifier ``head``; DINOv2's Identity ``head`` holds none). The model
    itself, modules inside a ViT block and modules holding blocks are never heads."""
    blocks = [name for name, _ in vit_blocks(model)]
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name == "" or any(_inside(name, outer) for outer, _ in found):
            continue
        if any(_inside(name, block) or _inside(block, name) for block in blocks):
            continue
        is_head = (
            isinstance(module, DINOHead)
            or isinstance(getattr(module, "last_layer", None), nn.Module)
            or (name.rsplit(".", 1)[-1].lower().endswith("head") and _has_parameters(module))
        )
        if is_head and _has_parameters(module):
            found.append((name, module))
    return found


def _backbones(model: nn.Module, blocks: list[str]) -> list[tuple[str, nn.Module]]:
    """The modules that hold the blocks, below the model: for each block, its nearest ancestor
    that is not a ModuleList / ModuleDict / Sequential (DINOv2's BlockChunk is a ModuleList)."""
    modules = dict(model.named_modules())
    found: dict[str, nn.Module] = {}
    for block in blocks:
        parts = block.split(".")
        for end in range(len(parts) - 1, -1, -1):
            name = ".".join(parts[:end])
            if not isinstance(modules[name], _CONTAINERS):
                break
        if name and name not in found:
            found[name] = modules[name]
    return list(found.items())


# --- checks -----------------------------------------------------------------------------------------


def _is_plain_container(module: nn.Module) -> bool:
    return (
        isinstance(module, (nn.ModuleList, nn.ModuleDict))
        and type(module).forward is nn.Module.forward
    )


def _check_dtype(name: str, dtype: object, allow_none: bool = True) -> None:
    if dtype is None and allow_none:
        return
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype or None, got {type(dtype).__name__}")
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be a floating dtype ({', '.join(map(str, _FLOAT_DTYPES))}), got {dtype}"
        )


def _check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _default_device_type(model: nn.Module) -> str:
    """The parameters' device type when they are on an accelerator; else "cuda" when CUDA is
    there and the process group is not gloo-only, else "cpu"."""
    for param in model.parameters():
        if param.device.type not in ("cpu", "meta"):
            return param.device.type
        break
    if torch.cuda.is_available() and dist.get_backend() != "gloo":
        return "cuda"
    return "cpu"


def _default_mesh(model: nn.Module) -> DeviceMesh:
    return init_device_mesh(_default_device_type(model), (dist.get_world_size(),))


# --- shard_model ------------------------------------------------------------------------------------


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh | None = None,
    *,
    param_dtype: torch.dtype | None = torch.bfloat16,
    reduce_dtype: torch.dtype | None = torch.float32,
    reshard_after_forward: bool | int = True,
    activation_checkpointing: bool = False,
    split_precision: bool = False,
    compile_blocks: bool | Mapping[str, object] = False,
) -> nn.Module:
    """Shard ``model`` with FSDP2 in place: each ViT block its own ``fully_shard`` unit, then each
    head, then each backbone below the model, then the model itself. Returns ``model``, now also
    an ``FSDPModule`` (except a plain ModuleList / ModuleDict, see below).

    Units: every block :func:`dinov2_fast.patch.vit_blocks` finds (ours, DINOv2's, timm's;
    inside DINOv2's BlockChunks too: each block its own unit, which overlaps communication with
    compute better than DINOv2's chunk units, and gathers one block at a time); every
    :func:`head_modules` module (DINO / iBOT heads: their own units, gathered only while they
    run); the module that holds the blocks when it is not ``model`` (e.g. ``student.backbone``,
    so that it can be called on its own); ``model`` last, holding what remains (patch
    embedding, tokens, final norm). A ``ModuleList`` / ``ModuleDict`` without a forward
    (DINOv2's student and teacher are ModuleDicts) is not a unit itself: its children become
    the roots, as DINOv2 wraps them. Parameters become DTensors sharded on dim 0; parameter
    names and state_dict keys do not change. ``forward_features``, ``forward_features_list``
    and ``get_intermediate_layers`` of the backbones and the model are registered with
    ``register_fsdp_forward_method``, so they can be called directly, not only ``forward``.

    Every rank must hold the same initial weights (the same seed, or a loaded checkpoint):
    ``fully_shard`` keeps each rank's slice of its own copy and broadcasts nothing.

    Args:
        model: the module to shard (a backbone, or a container of a backbone and heads). Apply
            :func:`dinov2_fast.patch` before, not after.
        mesh: a 1-D DeviceMesh (FSDP: shard over all its ranks) or a 2-D one (HSDP: replicate
            over dim 0, shard over dim 1). Default: all ranks, 1-D, on the parameters' device
            type when they are on an accelerator, else "cuda" when CUDA is present and the
            process group is not gloo-only, else "cpu". FSDP2 moves the parameters to the mesh's
            device (for "cuda": the current device; call ``torch.cuda.set_device(local_rank)``).
        param_dtype: the dtype the parameters are gathered and computed in (bfloat16); None: the
            parameters' own (float32) compute. The sharded master weights stay in their dtype.
        reduce_dtype: the dtype gradients are reduce-scattered in (float32); None: param_dtype.
        reshard_after_forward: True frees each unit's gathered parameters after its forward and
            gathers again for the backward (ZeRO-3, ``FULL_SHARD``); False keeps them to the
            backward (``SHARD_GRAD_OP``, DINOv2's choice); an int reshards to groups of that size.
            With True, ``model`` itself gets FSDP2's default for a root (its small remainder kept
            from forward to backward); a model that runs without a backward (the teacher) frees
            it with ``module.reshard()`` after the forward, as DINOv2's ``reshard_fsdp_model``.
        activation_checkpointing: each block recomputes its forward in the backward
            (``torch.utils.checkpoint``, non-reentrant, RNG state preserved so the stochastic-depth
            subsets redraw identically). Done by giving each block a subclass of its own class
            whose forward checkpoints the original (the way :mod:`dinov2_fast.patch` swaps
            classes), so no ``_checkpoint_wrapped_module`` enters the state_dict keys.
        split_precision: DINOv2's precision split: the heads reduce their gradients in
            ``reduce_dtype`` (float32: "MLP heads gradients are reduced in float32 to avoid
            training instabilities"), the blocks and the rest in ``param_dtype``. Without it
            every unit reduces in ``reduce_dtype``.
        compile_blocks: ``block.compile()`` each block after sharding (``nn.Module.compile``,
            in place: no ``_orig_mod.`` in the state_dict keys; our kernels are custom ops that
            trace); True for torch.compile's defaults, or a mapping of its keyword arguments,
            e.g. ``{"backend": "aot_eager"}`` where inductor has no C++ compiler.

    Raises:
        TypeError: ``model`` is not an nn.Module, ``mesh`` not a DeviceMesh, a dtype not a
            torch.dtype, a flag of the wrong type.
        ValueError: no blocks found (the message lists the recognised classes), a mesh of more
            than 2 dimensions, a non-floating dtype, ``model`` already sharded.
        RuntimeError: the default process group is not initialised.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    sharded = [name or "(model)" for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    if sharded:
        raise ValueError(f"model is already sharded with fully_shard (at {', '.join(sharded[:3])})")
    _check_dtype("param_dtype", param_dtype)
    _check_dtype("reduce_dtype", reduce_dtype)
    _check_bool("activation_checkpointing", activation_checkpointing)
    _check_bool("split_precision", split_precision)
    if isinstance(reshard_after_forward, int) and not isinstance(reshard_after_forward, bool):
        if reshard_after_forward < 1:
            raise ValueError(
                f"reshard_after_forward must be a bool or a positive int, got "
                f"{reshard_after_forward}"
            )
    elif not isinstance(reshard_after_forward, bool):
        raise TypeError(
            f"reshard_after_forward must be a bool or an int, got "
            f"{type(reshard_after_forward).__name__}"
        )
    if isinstance(compile_blocks, bool):
        compile_kwargs = {} if compile_blocks else None
    elif isinstance(compile_blocks, Mapping):
        compile_kwargs = dict(compile_blocks)
    else:
        raise TypeError(
            f"compile_blocks must be a bool or a mapping of torch.compile keyword arguments, got "
            f"{type(compile_blocks).__name__}"
        )
    if mesh is not None and not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh must be a DeviceMesh or None, got {type(mesh).__name__}")
    if mesh is not None and mesh.ndim not in (1, 2):
        raise ValueError(
            f"mesh must be 1-D (FSDP) or 2-D (HSDP: replicate, shard), got {mesh.ndim} dimensions"
        )
    blocks = vit_blocks(model)
    if not blocks:
        raise ValueError(
            f"no transformer blocks found in {type(model).__name__}; recognised: "
            f"{RECOGNISED_BLOCKS}"
        )
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "shard_model needs the default process group: call "
            "torch.distributed.init_process_group() first (under torchrun: 'nccl' on GPUs, "
            "'gloo' on the CPU)"
        )
    if mesh is None:
        mesh = _default_mesh(model)

    full = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    body = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=param_dtype or reduce_dtype)
    body = body if split_precision else full

    def shard(module: nn.Module, policy: MixedPrecisionPolicy, root: bool = False) -> None:
        options = {"mesh": mesh, "mp_policy": policy}
        if not (root and reshard_after_forward is True):
            # The model itself: FSDP2's default keeps a root's parameters from the forward to
            # the backward (they would be gathered again at once).
            options["reshard_after_forward"] = reshard_after_forward
        fully_shard(module, **options)

    for _, block in blocks:
        if activation_checkpointing:
            _checkpoint_block(block)
        shard(block, body)
        if compile_kwargs is not None:
            block.compile(**compile_kwargs)
    for _, head in head_modules(model):
        shard(head, full)
    backbones = _backbones(model, [name for name, _ in blocks])
    for _, backbone in backbones:
        shard(backbone, body)
    if _is_plain_container(model):
        # fully_shard takes no ModuleList / ModuleDict without a forward (DINOv2's student is a
        # ModuleDict): each child with parameters outside the units becomes a root of its own.
        for _, child in model.named_children():
            if not isinstance(child, FSDPModule) and _has_parameters(child):
                shard(child, body)
    else:
        shard(model, body, root=True)
    for _, module in [*backbones, ("", model)]:
        for method in _FORWARD_METHODS:
            if callable(getattr(module, method, None)):
                register_fsdp_forward_method(module, method)
    return model


# --- FSDP1 -----------------------------------------------------------------------------------------


def _known_block_classes() -> set[type[nn.Module]]:
    """Our Block, and DINOv2's and timm's block classes where those packages import."""
    classes: set[type[nn.Module]] = {Block}
    try:
        from timm.models.vision_transformer import Block as TimmBlock

        classes.add(TimmBlock)
    except ImportError:
        pass
    try:
        from dinov2.layers.block import Block as Dinov2Block
        from dinov2.layers.block import NestedTensorBlock

        classes.update((Dinov2Block, NestedTensorBlock))
    except Exception:  # not installed, or failing to import (DINOv2's training needs xFormers)
        pass
    return classes


def wrap_policy(model: nn.Module | None = None) -> ModuleWrapPolicy:
    """FSDP1's ``auto_wrap_policy`` with one unit per ViT block.

    Without ``model``: our :class:`dinov2_fast.nn.Block` (= ``NestedTensorBlock``), timm's
    ``Block`` (when timm imports) and DINOv2's ``Block`` / ``NestedTensorBlock`` (when the
    ``dinov2`` package imports). ``ModuleWrapPolicy`` matches by ``isinstance``, so subclasses
    (patched classes included) are wrapped too. With ``model``: exactly the classes of the blocks
    :func:`dinov2_fast.patch.vit_blocks` finds in it (copies of DINOv2's classes in other code
    bases included).

    Use with ``FullyShardedDataParallel(model, auto_wrap_policy=wrap_policy(model),
    mixed_precision=mixed_precision(), use_orig_params=True, device_id=...)``; DINOv2's heads
    are wrapped separately, as DINOv2 does (each its own FSDP root with
    :func:`split_mixed_precision`'s head policy).

    Raises:
        TypeError: ``model`` is not an nn.Module.
        ValueError: no blocks found in ``model``.
    """
    if model is None:
        return ModuleWrapPolicy(_known_block_classes())
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    classes = {type(block) for _, block in vit_blocks(model)}
    if not classes:
        raise ValueError(
            f"no transformer blocks found in {type(model).__name__}; recognised: "
            f"{RECOGNISED_BLOCKS}"
        )
    return ModuleWrapPolicy(classes)


def mixed_precision(
    param_dtype: torch.dtype | None = torch.bfloat16,
    reduce_dtype: torch.dtype | None = torch.float32,
    buffer_dtype: torch.dtype | None = torch.float32,
) -> MixedPrecision:
    """FSDP1's ``MixedPrecision``: compute in ``param_dtype``, reduce gradients in
    ``reduce_dtype``, buffers in ``buffer_dtype`` (None: the tensors' own dtype).

    Raises:
        TypeError / ValueError: a dtype that is not a floating torch.dtype.
    """
    _check_dtype("param_dtype", param_dtype)
    _check_dtype("reduce_dtype", reduce_dtype)
    _check_dtype("buffer_dtype", buffer_dtype)
    return MixedPrecision(
        param_dtype=param_dtype, reduce_dtype=reduce_dtype, buffer_dtype=buffer_dtype
    )


def split_mixed_precision(
    param_dtype: torch.dtype = torch.bfloat16,
) -> tuple[MixedPrecision, MixedPrecision]:
    """DINOv2's precision split for FSDP1, as ``(backbone, head)``: both compute in
    ``param_dtype`` with float32 buffers; the backbone (and the whole teacher) reduces gradients
    in ``param_dtype``, the student's heads in float32. DINOv2 uses float16 with a gradient
    scaler; bfloat16 (the default here) needs none."""
    _check_dtype("param_dtype", param_dtype, allow_none=False)
    return (
        mixed_precision(param_dtype, param_dtype, torch.float32),
        mixed_precision(param_dtype, torch.float32, torch.float32),
    )
