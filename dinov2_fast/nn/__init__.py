"""Drop-in modules with DINOv2's and timm's names and state_dict keys."""

from dinov2_fast.nn.attention import Attention, MemEffAttention
from dinov2_fast.nn.block import Block, NestedTensorBlock
from dinov2_fast.nn.drop_path import DropPath
from dinov2_fast.nn.layer_norm import LayerNorm
from dinov2_fast.nn.layer_scale import LayerScale
from dinov2_fast.nn.mlp import Mlp
from dinov2_fast.nn.patch_embed import PatchEmbed
from dinov2_fast.nn.swiglu_ffn import SwiGLUFFN, SwiGLUFFNFused

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "LayerNorm",
    "LayerScale",
    "MemEffAttention",
    "Mlp",
    "NestedTensorBlock",
    "PatchEmbed",
    "SwiGLUFFN",
    "SwiGLUFFNFused",
]
