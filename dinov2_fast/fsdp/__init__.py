"""Sharded training on torch.distributed's public APIs: FSDP2 (``fully_shard``) and FSDP1
wrapping for our models and DINOv2's and timm's, teacher EMA and gradient clipping on shards,
and torch.distributed.checkpoint save, resume and export.

- :func:`shard_model`: FSDP2 with one unit per ViT block, mixed precision, DINOv2's precision
  split, activation checkpointing and per-block compilation; :func:`head_modules`;
  :func:`checkpoint_blocks` (activation checkpointing without sharding).
- FSDP1: :func:`wrap_policy`, :func:`mixed_precision`, :func:`split_mixed_precision`.
- :func:`ema_update_` (the teacher's EMA on local shards), :func:`clip_grad_norm_` and
  :func:`grad_norm` (DTensor-aware, a plain tensor back).
- :func:`memory_per_gpu` and :func:`memory_table`: memory per GPU of each sharding choice.
- :func:`save_checkpoint`, :func:`load_checkpoint`, :func:`latest_checkpoint`: atomic DCP
  checkpoints that resume on any world size; :func:`export_state_dict`: DINOv2's hub keys.

docs/distributed.md shows how to run on several GPUs and nodes.
"""

from dinov2_fast.fsdp.checkpoint import (
    export_state_dict,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from dinov2_fast.fsdp.ema import clip_grad_norm_, ema_update_, grad_norm
from dinov2_fast.fsdp.memory import (
    MemoryEstimate,
    ParameterCounts,
    memory_per_gpu,
    memory_table,
    parameter_counts,
)
from dinov2_fast.fsdp.sharding import (
    checkpoint_blocks,
    head_modules,
    mixed_precision,
    shard_model,
    split_mixed_precision,
    wrap_policy,
)

__all__ = [
    "MemoryEstimate",
    "ParameterCounts",
    "checkpoint_blocks",
    "clip_grad_norm_",
    "ema_update_",
    "export_state_dict",
    "grad_norm",
    "head_modules",
    "latest_checkpoint",
    "load_checkpoint",
    "memory_per_gpu",
    "memory_table",
    "mixed_precision",
    "parameter_counts",
    "save_checkpoint",
    "shard_model",
    "split_mixed_precision",
    "wrap_policy",
]
