"""Drop-in modules with DINOv2's and timm's names and state_dict keys."""

from dinov2_fast.nn.attention import Attention, MemEffAttention
from dinov2_fast.nn.layer_norm import LayerNorm

__all__ = ["Attention", "LayerNorm", "MemEffAttention"]
