"""DINOv2-compatible backbones and heads built from dinov2_fast.nn.

- :class:`DinoVisionTransformer` (with :class:`BlockChunk`) and DINOv2's builders ``vit_small``,
  ``vit_base``, ``vit_large``, ``vit_giant2``; the torch.hub configurations (:func:`hub_config`,
  ``dinov2_vit{s,b,l,g}14[_reg]``, no downloads: pass ``weights=``) and :func:`load_weights`.
- :class:`DINOHead` (with :class:`WeightNormLinear`, the last layer's weight-normalized Linear).
- timm: :func:`convert_timm_state_dict` and :func:`from_timm` for timm's DINOv2 ViTs.
"""

from dinov2_fast.models.dino_head import DINOHead, WeightNormLinear
from dinov2_fast.models.timm_convert import convert_timm_state_dict, from_timm
from dinov2_fast.models.vision_transformer import (
    BlockChunk,
    DinoVisionTransformer,
    dinov2_vitb14,
    dinov2_vitb14_reg,
    dinov2_vitg14,
    dinov2_vitg14_reg,
    dinov2_vitl14,
    dinov2_vitl14_reg,
    dinov2_vits14,
    dinov2_vits14_reg,
    hub_config,
    init_weights_vit_timm,
    load_weights,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
)

__all__ = [
    "BlockChunk",
    "DINOHead",
    "DinoVisionTransformer",
    "WeightNormLinear",
    "convert_timm_state_dict",
    "dinov2_vitb14",
    "dinov2_vitb14_reg",
    "dinov2_vitg14",
    "dinov2_vitg14_reg",
    "dinov2_vitl14",
    "dinov2_vitl14_reg",
    "dinov2_vits14",
    "dinov2_vits14_reg",
    "from_timm",
    "hub_config",
    "init_weights_vit_timm",
    "load_weights",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
]
