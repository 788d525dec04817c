"""DINOv2's optimizer parameter groups: layer-wise learning-rate decay, no weight decay on biases,
norms and LayerScale, a smaller learning rate for the patch embedding, and the head's last layer
(frozen at first) in groups of its own.

Use per student part, as DINOv2 does (``SSLMetaArch.get_params_groups``)::

    groups = []
    for part in student.values():  # backbone, dino_head, ibot_head
        groups += fuse_params_groups(get_params_groups_with_decay(part, 0.9, 0.2))
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
    ...
    apply_optim_scheduler(optimizer, lr, wd, last_layer_lr)  # every iteration
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["apply_optim_scheduler", "fuse_params_groups", "get_params_groups_with_decay"]

logger = logging.getLogger(__name__)

# Name components that wrappers insert: FSDP1 (use_orig_params), activation checkpointing's
# wrapper, torch.compile's OptimizedModule. FSDP2 (fully_shard) leaves the names as they are.
_WRAPPER_PARTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
# Layer 0 (DINOv2's list, with the register tokens as in its later versions).
_EMBEDDING_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")


def _clean_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def _block_index(parts: list[str], chunked: bool) -> int | None:
    """The global block index of a parameter's name: ``blocks.{i}.*``, or with chunks
    ``blocks.{c}.{i}.*`` (chunks hold the global indices); None outside the blocks."""
    if "blocks" not in parts or "residual" in parts:
        return None
    at = parts.index("blocks")
    position = at + 2 if chunked else at + 1
    if position < len(parts) and parts[position].isdigit():
        return int(parts[position])
    return None


def _backbone_layout(model: nn.Module) -> tuple[int | None, bool]:
    """(``n_blocks`` if the model or its ``backbone`` says, ``chunked_blocks``)."""
    for candidate in (model, getattr(model, "backbone", None)):
        if candidate is not None and hasattr(candidate, "n_blocks"):
            return int(candidate.n_blocks), bool(getattr(candidate, "chunked_blocks", False))
    for candidate in (model, getattr(model, "backbone", None)):
        if candidate is not None and hasattr(candidate, "chunked_blocks"):
            return None, bool(candidate.chunked_blocks)
    return None, False


def get_params_groups_with_decay(
    model: nn.Module, lr_decay_rate: float = 1.0, patch_embed_lr_mult: float = 1.0
) -> list[dict[str, Any]]:
    """One group per trainable parameter, with DINOv2's multipliers.

    - n_blocks: ``model.n_blocks`` (or ``model.backbone.n_blocks``), else the number of blocks
      found in the parameter names (0 for a head).
    - layer id: 0 for names containing pos_embed, patch_embed, mask_token, cls_token or
      register_tokens; ``i + 1`` for ``blocks.{i}.*`` (chunked ``blocks.{c}.{i}.*``: the global
      index i); n_blocks + 1 for everything else (final norm, heads).
    - ``lr_multiplier = lr_decay_rate ** (n_blocks + 1 − layer_id)`` (1 for a model without
      blocks), times ``patch_embed_lr_mult`` for names containing patch_embed.
    - ``wd_multiplier`` 0 for names ending in ``.bias`` or containing ``norm`` or ``gamma``
      (LayerScale), else 1. Exactly DINOv2's rule: other 1-d or token parameters (cls_token,
      pos_embed, mask_token, register_tokens, the last layer's ``weight_g``) keep weight decay.
    - ``is_last_layer`` for names containing ``last_layer`` (they follow the last-layer lr).

    Wrapper components in the names (``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``,
    ``_orig_mod``) are ignored; FSDP2 keeps the names. Parameters without ``requires_grad`` are
    left out.

    Returns: dicts ``{"params": tensor, "name", "lr_multiplier", "wd_multiplier",
    "is_last_layer"}`` in ``named_parameters`` order.

    Raises:
        ValueError: ``lr_decay_rate`` or ``patch_embed_lr_mult`` negative.
    """
    for label, value in (
        ("lr_decay_rate", lr_decay_rate),
        ("patch_embed_lr_mult", patch_embed_lr_mult),
    ):
        if not float(value) >= 0:
            raise ValueError(f"{label} must be a number >= 0, got {value!r}")
    named = [(_clean_name(name), p) for name, p in model.named_parameters() if p.requires_grad]
    n_blocks, chunked = _backbone_layout(model)
    if n_blocks is None:
        indices = [_block_index(name.split("."), chunked) for name, _ in named]
        n_blocks = max((i + 1 for i in indices if i is not None), default=0)

    groups = []
    for name, param in named:
        layer_id = n_blocks + 1
        if n_blocks > 0:
            block = _block_index(name.split("."), chunked)
            if any(token in name for token in _EMBEDDING_NAMES):
                layer_id = 0
            elif block is not None:
                layer_id = block + 1
        lr_multiplier = lr_decay_rate ** (n_blocks + 1 - layer_id)
        if "patch_embed" in name:
            lr_multiplier *= patch_embed_lr_mult
        no_decay = name.endswith(".bias") or "norm" in name or "gamma" in name
        group = {
            "params": param,
            "name": name,
            "lr_multiplier": lr_multiplier,
            "wd_multiplier": 0.0 if no_decay else 1.0,
            "is_last_layer": "last_layer" in name,
        }
        logger.debug(
            "%s: lr_multiplier %s, wd_multiplier %s", name, lr_multiplier, group["wd_multiplier"]
        )
        groups.append(group)
    return groups


def fuse_params_groups(
    groups: Iterable[dict[str, Any]],
    keys: tuple[str, ...] = ("lr_multiplier", "wd_multiplier", "is_last_layer"),
) -> list[dict[str, Any]]:
    """Merge groups with equal ``keys`` (DINOv2's): ``[{**{k: value}, "params": [tensors]}]`` in
    order of first appearance, ready for a ``torch.optim`` optimizer."""
    fused: dict[tuple, dict[str, Any]] = {}
    for group in groups:
        identifier = tuple(group[key] for key in keys)
        if identifier not in fused:
            fused[identifier] = {**{key: group[key] for key in keys}, "params": []}
        params = group["params"]
        if isinstance(params, torch.Tensor):
            fused[identifier]["params"].append(params)
        else:
            fused[identifier]["params"].extend(params)
    return list(fused.values())


def apply_optim_scheduler(
    optimizer: torch.optim.Optimizer, lr: float, wd: float, last_layer_lr: float
) -> None:
    """Set every group's ``lr = (last_layer_lr if is_last_layer else lr) · lr_multiplier`` and
    ``weight_decay = wd · wd_multiplier`` (DINOv2's, once per iteration). A group without the
    keys counts as multipliers 1 and not the last layer."""
    for group in optimizer.param_groups:
        base = last_layer_lr if group.get("is_last_layer", False) else lr
        group["lr"] = base * group.get("lr_multiplier", 1.0)
        group["weight_decay"] = wd * group.get("wd_multiplier", 1.0)
