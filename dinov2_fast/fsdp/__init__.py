"""Sharded training on torch.distributed's public APIs: FSDP2 (``fully_shard``) and FSDP1
wrapping for our models and DINOv2's and timm's, teacher EMA and gradient clipping on shards,
and torch.distributed.checkpoint save, resume and export."""
