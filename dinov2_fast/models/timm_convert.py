"""timm's DINOv2 ViTs (``vit_*_patch14_dinov2``, ``vit_*_patch14_reg4_dinov2``) to our
:class:`DinoVisionTransformer`: the state_dict conversion (the reverse of timm's
``_convert_dinov2``) and a builder that reads a timm model's configuration.

timm's names differ from DINOv2's in four places: ``reg_token`` (DINOv2: ``register_tokens``);
in the register models a ``pos_embed`` without the CLS slot and a ``cls_token`` that already holds
that slot's embedding (``no_embed_class``); the packed SwiGLU's ``mlp.fc1/fc2`` (DINOv2:
``mlp.w12/w3``); no ``mask_token``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from dinov2_fast.models.vision_transformer import (
    DinoVisionTransformer,
    _to_block_layout,
)
from dinov2_fast.nn.mlp import Mlp
from dinov2_fast.nn.swiglu_ffn import SwiGLUFFN, SwiGLUFFNFused

__all__ = ["convert_timm_state_dict", "from_timm"]

# The keys of a DINOv2 backbone (flat blocks); anything else cannot be mapped.
_DINOV2_KEY = re.compile(
    r"(cls_token|pos_embed|register_tokens|mask_token|patch_embed\.proj\.(weight|bias)"
    r"|norm\.(weight|bias)"
    r"|blocks\.\d+\.((norm1|norm2|attn\.qkv|attn\.proj)\.(weight|bias)|ls[12]\.gamma"
    r"|mlp\.(fc1|fc2|w12|w3)\.(weight|bias)))"
)
_HEAD_KEY = re.compile(r"(head|fc_norm|attn_pool)\..*")
_MLP_KEY = re.compile(r"(blocks\.\d+\.mlp\.)(fc1|fc2|fc1_g|fc1_x)\.(weight|bias)")


def _square(n: int) -> bool:
    return n >= 0 and math.isqrt(n) ** 2 == n


def convert_timm_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    *,
    drop_head: bool = False,
    num_patches: int | None = None,
) -> dict[str, torch.Tensor]:
    """A timm DINOv2 ViT's state_dict with DINOv2's keys (flat ``blocks.{i}``), loadable into a
    :class:`DinoVisionTransformer` of the same configuration.

    - ``reg_token`` -> ``register_tokens``;
    - a ``pos_embed`` without a CLS slot (timm's ``no_embed_class``: its length is
      ``num_patches``) gets a zero CLS row; timm's ``cls_token`` already includes the slot's
      embedding, so the sum DINOv2 computes is timm's token. ``num_patches`` (the model's patch
      count) tells the layouts apart; without it the patches are taken to form a square grid
      (as DINOv2's position interpolation needs): a square length has no CLS slot;
    - SwiGLU MLPs: timm's packed ``mlp.fc1/fc2`` (``fc1`` twice as wide as ``fc2``'s input) ->
      ``mlp.w12/w3``; timm's unpacked ``mlp.fc1_g/fc1_x/fc2`` -> ``w12 = [fc1_g; fc1_x]``, ``w3``;
    - a zero ``mask_token [1, D]`` is added when there is none.
    DINOv2 keys pass through unchanged, so converting twice gives the same result.

    ``drop_head``: drop timm's pooling and classifier (``head.*``, ``fc_norm.*``,
    ``attn_pool.*``; a DINOv2 backbone has none of them); without it, such keys raise.

    Raises:
        ValueError: keys that have no DINOv2 counterpart (listed), e.g. a trained classifier
            head, qk-norm or pre-norm weights; a ``pos_embed`` that is not a square grid with or
            without a CLS slot (e.g. timm's register models without ``no_embed_class``, whose
            registers have positions DINOv2 has not), or of a length other than ``num_patches``
            (+1).
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
    source = dict(state_dict)
    if drop_head:
        source = {k: v for k, v in source.items() if not _HEAD_KEY.fullmatch(k)}
    out: dict[str, torch.Tensor] = {}
    gates: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in source.items():
        if key == "reg_token":
            key = "register_tokens"
        match = _MLP_KEY.fullmatch(key)
        if match is not None:
            prefix, name, kind = match.groups()
            if name in ("fc1_g", "fc1_x"):
                gates.setdefault(f"{prefix}w12.{kind}", {})[name] = value
                continue
            if _is_packed_swiglu(source, prefix):
                key = f"{prefix}{'w12' if name == 'fc1' else 'w3'}.{kind}"
        out[key] = value
    for key, halves in gates.items():
        if set(halves) != {"fc1_g", "fc1_x"}:
            raise ValueError(f"{key}: timm's SwiGLU needs both fc1_g and fc1_x, got {set(halves)}")
        out[key] = torch.cat((halves["fc1_g"], halves["fc1_x"]), dim=0)
        prefix = key.rsplit("w12.", 1)[0]
        for kind in ("weight", "bias"):
            if f"{prefix}fc2.{kind}" in out:
                out[f"{prefix}w3.{kind}"] = out.pop(f"{prefix}fc2.{kind}")

    unknown = sorted(k for k in out if not _DINOV2_KEY.fullmatch(k))
    if unknown:
        hint = (
            " (drop_head=True drops a classifier head)"
            if any(_HEAD_KEY.fullmatch(k) for k in unknown)
            else ""
        )
        raise ValueError(f"state_dict has keys with no DINOv2 counterpart{hint}: {unknown}")
    for required in ("cls_token", "pos_embed"):
        if required not in out:
            raise ValueError(f"state_dict has no {required!r}: not a DINOv2-style ViT")

    out["pos_embed"] = _with_cls_slot(out["pos_embed"], _registers(out), num_patches)
    if "mask_token" not in out:
        out["mask_token"] = out["cls_token"].new_zeros(1, out["cls_token"].shape[-1])
    return out


def _registers(state_dict: Mapping[str, torch.Tensor]) -> int:
    tokens = state_dict.get("register_tokens")
    return 0 if tokens is None else tokens.shape[1]


def _with_cls_slot(pos_embed: torch.Tensor, registers: int, num_patches: int | None):
    """``pos_embed`` with DINOv2's CLS slot: a zero row in front when it has none."""
    length = pos_embed.shape[1]
    if num_patches is None:  # a square grid of patches, with or without the CLS slot
        has_slot = not _square(length) and _square(length - 1)
        no_slot = _square(length)
        with_registers = registers > 0 and _square(length - 1 - registers)
        num_patches = length if no_slot else length - 1 if has_slot else None
    else:
        with_registers = registers > 0 and length == num_patches + 1 + registers
    if num_patches is not None and length == num_patches:  # timm's no_embed_class
        zero = pos_embed.new_zeros(pos_embed.shape[0], 1, pos_embed.shape[2])
        return torch.cat((zero, pos_embed), dim=1)
    if num_patches is not None and length == num_patches + 1:
        return pos_embed
    if with_registers:
        raise ValueError(
            f"pos_embed holds positions for the {registers} register tokens ({length} rows); "
            f"DINOv2's registers have none, so this model cannot be represented"
        )
    grid = "a square grid" if num_patches is None else f"{num_patches}"
    raise ValueError(
        f"pos_embed must hold M*M patch positions ({grid}), with or without a CLS slot; "
        f"got {length}"
    )


def _is_packed_swiglu(state_dict: Mapping[str, torch.Tensor], prefix: str) -> bool:
    """Whether timm's ``{prefix}fc1/fc2`` is a packed SwiGLU (GluMlp): fc1's output twice as wide
    as fc2's input (a GELU Mlp has them equal)."""
    fc1, fc2 = state_dict.get(f"{prefix}fc1.weight"), state_dict.get(f"{prefix}fc2.weight")
    if fc1 is None or fc2 is None:
        return False
    return fc1.shape[0] == 2 * fc2.shape[1]


def _fixed_hidden(cls, hidden: int):
    """An FFN class called as DINOv2 calls it that ignores the asked hidden width for ``hidden``
    (timm's widths need not follow DINOv2's rounding)."""

    def build(
        in_features, hidden_features=None, out_features=None, act_layer=None, drop=0.0, bias=True
    ):
        kwargs = {} if act_layer is None else {"act_layer": act_layer}
        return cls(in_features, hidden, out_features, drop=drop, bias=bias, **kwargs)

    return build


def _activation(module: nn.Module, where: str):
    if isinstance(module, nn.GELU):
        return nn.GELU if module.approximate == "none" else partial(nn.GELU, approximate="tanh")
    raise ValueError(f"{where} must be GELU to map to DINOv2's Mlp, got {type(module).__name__}")


def _require_identity(module: object, where: str) -> None:
    if module is not None and not isinstance(module, nn.Identity):
        raise ValueError(f"{where} must be Identity (DINOv2 has none), got {type(module).__name__}")


def _timm_config(model: nn.Module) -> dict[str, Any]:
    """DinoVisionTransformer keyword arguments for a timm VisionTransformer, checking that every
    part of it has a DINOv2 counterpart."""
    try:
        from timm.models.vision_transformer import Block as TimmBlock
        from timm.models.vision_transformer import VisionTransformer
    except ImportError as error:
        raise ImportError(f"from_timm needs timm (pip install timm): {error}") from error

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"timm_model must be a timm VisionTransformer, got {type(model).__name__}")
    if getattr(model, "cls_token", None) is None:
        raise ValueError("timm_model must have a class token (DINOv2 always has one)")
    if getattr(model, "pos_embed", None) is None:
        raise ValueError("timm_model must have a learned pos_embed")
    _require_identity(getattr(model, "norm_pre", None), "timm_model.norm_pre")
    _require_identity(getattr(model.patch_embed, "norm", None), "timm_model.patch_embed.norm")
    if model.patch_embed.proj.bias is None:
        raise ValueError("timm_model.patch_embed.proj must have a bias (DINOv2's has one)")
    norms = [("timm_model.norm", model.norm)]
    norms += [
        (f"timm_model.blocks[{i}].{n}", getattr(b, n))
        for i, b in enumerate(model.blocks)
        for n in ("norm1", "norm2")
    ]
    for where, norm in norms:
        if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
            raise ValueError(f"{where} must be an affine LayerNorm with bias, got {norm}")
        if norm.eps != model.norm.eps:
            raise ValueError(f"{where}.eps must be timm_model.norm.eps ({model.norm.eps})")
    patch = tuple(model.patch_embed.patch_size)
    if patch[0] != patch[1]:
        raise ValueError(f"timm_model's patch size must be square, got {patch}")
    embed_dim = model.embed_dim
    blocks = list(model.blocks)
    first = blocks[0]
    for i, block in enumerate(blocks):
        # A block dinov2_fast.patch changed is a subclass of timm's Block: its original class.
        if getattr(type(block), "_dinov2_fast_original", type(block)) is not TimmBlock:
            raise ValueError(
                f"timm_model.blocks[{i}] must be timm's pre-norm Block, got {type(block).__name__}"
            )
        attn = block.attn
        for name in ("q_norm", "k_norm", "norm"):
            _require_identity(getattr(attn, name, None), f"timm_model.blocks[{i}].attn.{name}")
        if getattr(attn, "gate", None) is not None:
            raise ValueError(f"timm_model.blocks[{i}].attn has a gate, which DINOv2 has not")
        if attn.qkv.out_features != 3 * embed_dim:
            raise ValueError(f"timm_model.blocks[{i}].attn.qkv must be {embed_dim} -> 3x that")
        _require_identity(getattr(block.mlp, "norm", None), f"timm_model.blocks[{i}].mlp.norm")
        if getattr(block.mlp, "gate_last", False):
            raise ValueError(
                f"timm_model.blocks[{i}].mlp gates with the second half (gate_last=True); "
                f"DINOv2's SwiGLU gates with the first"
            )

    mlp = first.mlp
    if hasattr(mlp, "fc1_g"):  # timm's unpacked SwiGLU
        hidden, swiglu, bias = mlp.fc1_g.out_features, True, mlp.fc1_g.bias is not None
    else:
        hidden, bias = mlp.fc2.in_features, mlp.fc1.bias is not None
        swiglu = mlp.fc1.out_features == 2 * hidden
    if swiglu:
        if not isinstance(mlp.act, nn.SiLU):
            raise ValueError(f"a SwiGLU MLP must use SiLU, got {type(mlp.act).__name__}")
        act_layer = nn.GELU  # ignored by the SwiGLU FFNs
        with torch.device("meta"):  # only its width is read
            fused_hidden = SwiGLUFFNFused(embed_dim, 4 * embed_dim).w3.in_features
        if fused_hidden == hidden:
            ffn_layer, mlp_ratio = "swiglufused", 4.0
        else:
            ffn_layer, mlp_ratio = _fixed_hidden(SwiGLUFFN, hidden), hidden / embed_dim
    else:
        act_layer = _activation(mlp.act, "timm_model.blocks[0].mlp.act")
        mlp_ratio = hidden / embed_dim
        ffn_layer = "mlp" if int(embed_dim * mlp_ratio) == hidden else _fixed_hidden(Mlp, hidden)

    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in blocks]
    uniform = len(blocks) > 1 and rates[0] > 0 and all(r == rates[0] for r in rates)
    registers = getattr(model, "num_reg_tokens", 0)
    return {
        "img_size": tuple(model.patch_embed.img_size),
        "patch_size": patch[0],
        "in_chans": model.patch_embed.proj.in_channels,
        "embed_dim": embed_dim,
        "depth": len(blocks),
        "num_heads": first.attn.num_heads,
        "mlp_ratio": mlp_ratio,
        "qkv_bias": first.attn.qkv.bias is not None,
        "ffn_bias": bias,
        "proj_bias": first.attn.proj.bias is not None,
        "drop_path_rate": rates[-1],
        "drop_path_uniform": uniform,
        "init_values": 1.0 if hasattr(first.ls1, "gamma") else None,
        "act_layer": act_layer,
        "ffn_layer": ffn_layer,
        "block_chunks": 0,
        "num_register_tokens": registers,
        # DINOv2's hub settings: the register models were trained with these.
        "interpolate_antialias": registers > 0,
        "interpolate_offset": 0.0 if registers else 0.1,
        "eps": model.norm.eps,
    }


def from_timm(timm_model: nn.Module, *, drop_head: bool = False, **kwargs) -> DinoVisionTransformer:
    """Our :class:`DinoVisionTransformer` with a timm DINOv2-style ``VisionTransformer``'s
    configuration and weights (loaded with ``strict=True``).

    Read from the timm model: image and patch size, input channels, width, depth, heads, MLP width
    and kind (GELU ``Mlp``, or packed/unpacked SwiGLU), qkv/proj/FFN biases, LayerScale or none,
    registers, LayerNorm eps, drop path rates. Chosen: ``block_chunks=0`` (the hub layout) and the
    hub's interpolation settings (antialias and offset 0 with registers, else offset 0.1).
    ``kwargs`` override any of these or add others (``backend``, ``block_chunks``, ...);
    ``norm_layer`` replaces our LayerNorm with timm's eps. ``drop_head`` as in
    :func:`convert_timm_state_dict`. The returned model's ``forward`` gives the normed CLS token,
    timm's ``forward_head`` with ``global_pool="token"`` and no head.

    Raises:
        TypeError: not a timm VisionTransformer.
        ValueError: a part without a DINOv2 counterpart (qk-norm, pre-norm, a non-GELU MLP
            activation, a post-norm or parallel block, no class token, ...), or state_dict keys
            that cannot be mapped (see :func:`convert_timm_state_dict`).
    """
    from dinov2_fast.nn.layer_norm import LayerNorm

    config = _timm_config(timm_model)
    eps = config.pop("eps")
    backend = kwargs.get("backend", "auto")
    config["norm_layer"] = partial(LayerNorm, eps=eps, backend=backend)
    state_dict = convert_timm_state_dict(
        timm_model.state_dict(),
        drop_head=drop_head,
        num_patches=timm_model.patch_embed.num_patches,
    )
    config.update(kwargs)
    device = timm_model.cls_token.device
    dtype = timm_model.cls_token.dtype
    model = DinoVisionTransformer(**config)
    model.load_state_dict(_to_block_layout(state_dict, model), strict=True)
    return model.to(device=device, dtype=dtype)
