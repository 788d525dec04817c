"""The ops of dinov2-fast: one module per op, each a validated public function over custom ops.

Every op takes ``backend="auto" | "triton" | "cuda" | "torch"``; "torch" is the reference.
"""

from dinov2_fast.ops.attention import (
    HEAD_DIMS as ATTENTION_HEAD_DIMS,
)
from dinov2_fast.ops.attention import (
    attention,
    attention_qkvpacked,
    memory_efficient_attention,
)
from dinov2_fast.ops.block_diagonal_mask import BlockDiagonalMask
from dinov2_fast.ops.index_select_cat import index_select_cat
from dinov2_fast.ops.index_select_layer_norm import index_select_layer_norm
from dinov2_fast.ops.layer_norm import MAX_DIM as LAYER_NORM_MAX_DIM
from dinov2_fast.ops.layer_norm import layer_norm
from dinov2_fast.ops.prototype_cross_entropy import MAX_WIDTH as PROTOTYPE_CROSS_ENTROPY_MAX_WIDTH
from dinov2_fast.ops.prototype_cross_entropy import prototype_cross_entropy
from dinov2_fast.ops.scaled_index_add import scaled_index_add

__all__ = [
    "ATTENTION_HEAD_DIMS",
    "BlockDiagonalMask",
    "LAYER_NORM_MAX_DIM",
    "PROTOTYPE_CROSS_ENTROPY_MAX_WIDTH",
    "attention",
    "attention_qkvpacked",
    "index_select_cat",
    "index_select_layer_norm",
    "layer_norm",
    "memory_efficient_attention",
    "prototype_cross_entropy",
    "scaled_index_add",
]
