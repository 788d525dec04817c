"""The ops of dinov2-fast: one module per op, each a validated public function over custom ops.

Every op takes ``backend="auto" | "triton" | "cuda" | "torch"``; "torch" is the reference.
"""

from dinov2_fast.ops.layer_norm import MAX_DIM as LAYER_NORM_MAX_DIM
from dinov2_fast.ops.layer_norm import layer_norm

__all__ = ["layer_norm", "LAYER_NORM_MAX_DIM"]
