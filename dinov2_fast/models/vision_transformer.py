"""DINOv2's ``DinoVisionTransformer`` built from dinov2_fast.nn, with DINOv2's constructor,
attributes, forwards and state_dict keys (hub checkpoints load with ``strict=True``).

What differs from DINOv2 (none of it visible in the state_dict):

- The blocks are :class:`dinov2_fast.nn.Block` with our fused attention, LayerNorm and stochastic
  depth, so the list path (``forward_features_list``, the packed multi-crop forward) runs without
  xFormers. ``norm_layer`` and ``backend`` are extra keyword-only arguments.
- ``ffn_layer`` also takes a module class (called like DINOv2's FFN classes); an unknown string
  raises ``ValueError`` (DINOv2: a bare ``NotImplementedError``).
- Bad arguments raise ``ValueError``/``TypeError`` naming them where DINOv2 asserts.
- ``forward`` of a list of crop groups returns the list of head outputs (DINOv2 fails there).
- ``get_intermediate_layers`` stops after the last block it returns.

The hub builders (``dinov2_vits14`` ... ``dinov2_vitg14_reg``) build the torch.hub configurations
without downloading anything: pass the checkpoint as ``weights=``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dinov2_fast import _backend
from dinov2_fast.nn.attention import MemEffAttention
from dinov2_fast.nn.block import Block
from dinov2_fast.nn.layer_norm import LayerNorm
from dinov2_fast.nn.mlp import Mlp
from dinov2_fast.nn.patch_embed import PatchEmbed
from dinov2_fast.nn.swiglu_ffn import SwiGLUFFNFused

__all__ = [
    "BlockChunk",
    "DinoVisionTransformer",
    "dinov2_vitb14",
    "dinov2_vitb14_reg",
    "dinov2_vitg14",
    "dinov2_vitg14_reg",
    "dinov2_vitl14",
    "dinov2_vitl14_reg",
    "dinov2_vits14",
    "dinov2_vits14_reg",
    "hub_config",
    "init_weights_vit_timm",
    "load_weights",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
]


def _identity_ffn(*args: Any, **kwargs: Any) -> nn.Module:
    return nn.Identity()


# DINOv2's ffn_layer names.
_FFN_LAYERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": Mlp,
    "swiglu": SwiGLUFFNFused,
    "swiglufused": SwiGLUFFNFused,
    "identity": _identity_ffn,
}

# DINOv2's default block: the nested-tensor block with the memory-efficient attention. When this
# very object is the block_fn, the model's backend is passed to the blocks and their attention.
_DEFAULT_BLOCK_FN = partial(Block, attn_class=MemEffAttention)


class BlockChunk(nn.ModuleList):
    """A run of blocks (DINOv2's FSDP wrapping unit); ``forward`` runs them in order.

    Chunk ``j`` of ``block_chunks`` holds ``j·chunksize`` Identity modules in front of its blocks,
    so that every block keeps its global index in the state_dict keys: ``blocks.{j}.{i}.*``.
    """

    def forward(self, x):
        for block in self:
            x = block(x)
        return x


def init_weights_vit_timm(module: nn.Module, name: str = "") -> None:
    """timm's original ViT init, as DINOv2 applies it: trunc_normal(std 0.02) Linear weights,
    zero biases; other modules untouched."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class DinoVisionTransformer(nn.Module):
    """DINOv2's ViT backbone: patch embedding, CLS token, optional registers, blocks, final norm.

    Args (DINOv2's, in DINOv2's order):
        img_size, patch_size, in_chans: the trained image size (sets ``pos_embed``), the patch
            side (an int) and the input channels.
        embed_dim, depth, num_heads, mlp_ratio: width D, blocks, heads, FFN hidden / D.
        qkv_bias, ffn_bias, proj_bias: biases of the qkv, FFN and attention output Linears.
        drop_path_rate, drop_path_uniform: stochastic depth; the rates grow linearly from 0 at the
            first block to ``drop_path_rate`` at the last (``np.linspace``), or are all
            ``drop_path_rate`` when uniform.
        init_values: LayerScale's initial gamma; None or 0: no LayerScale.
        embed_layer, act_layer: the patch embedding class and the FFN activation.
        block_fn: the block class (default ``partial(nn.Block, attn_class=nn.MemEffAttention)``).
        ffn_layer: "mlp" (:class:`nn.Mlp`), "swiglu"/"swiglufused" (:class:`nn.SwiGLUFFNFused`),
            "identity", or (our extension) a module class called as ``ffn_layer(in_features=,
            hidden_features=, act_layer=, drop=, bias=)``.
        block_chunks: 0 for a flat ``blocks``, else that many :class:`BlockChunk` s (FSDP units).
        num_register_tokens: register tokens R after CLS (no positional embedding).
        interpolate_antialias, interpolate_offset: how ``pos_embed`` is resized for other image
            sizes (see :meth:`interpolate_pos_encoding`).

    Keyword-only extras:
        norm_layer: the norm of the blocks and of the final ``norm``; default
            ``partial(dinov2_fast.nn.LayerNorm, eps=1e-6, backend=backend)`` (DINOv2 hard-codes
            ``partial(torch.nn.LayerNorm, eps=1e-6)``; same parameters and keys).
        backend: "auto", "triton", "cuda" or "torch"; given to the default ``norm_layer`` and to
            the default ``block_fn`` (our blocks and their attention). A ``block_fn`` of your own
            is called exactly as DINOv2 calls it: ``block_fn(dim=, num_heads=, mlp_ratio=,
            qkv_bias=, proj_bias=, ffn_bias=, drop_path=, norm_layer=, act_layer=, ffn_layer=,
            init_values=)`` with ``ffn_layer`` a class, so DINOv2's or torch-only blocks build a
            model of the same layout.

    With the default modules the model runs in float32, float16 or bfloat16 (the fused attention
    takes no float64).

    Attributes: ``num_features`` (= ``embed_dim``), ``embed_dim``, ``num_tokens`` (1),
    ``n_blocks``, ``num_heads``, ``patch_size`` (int), ``num_register_tokens``,
    ``interpolate_antialias``, ``interpolate_offset``, ``chunked_blocks``, ``backend``.
    Parameters: ``cls_token [1, 1, D]``, ``pos_embed [1, 1 + num_patches, D]`` (a CLS slot, no
    register slots), ``register_tokens [1, R, D]`` (None when R is 0), ``mask_token [1, D]``;
    modules ``patch_embed``, ``blocks``, ``norm``, ``head`` (Identity).

    ``blocks``: with ``block_chunks = 0`` the blocks themselves (keys ``blocks.{i}.*``, the hub
    checkpoints' layout); with ``block_chunks = c > 0`` c :class:`BlockChunk` s padded with
    Identity modules (keys ``blocks.{j}.{i}.*``; the default 1 gives ``blocks.0.{i}.*``).

    Raises:
        ValueError: ``embed_dim`` not divisible by ``num_heads``, ``depth`` not divisible by
            ``block_chunks``, an unknown ``ffn_layer`` or ``backend``, a negative
            ``num_register_tokens`` or ``block_chunks``, a non-int ``patch_size``,
            ``drop_path_rate`` outside [0, 1], ``interpolate_offset`` outside [0, 1).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        embed_layer: Callable[..., nn.Module] = PatchEmbed,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        block_fn: Callable[..., nn.Module] = _DEFAULT_BLOCK_FN,
        ffn_layer: str | Callable[..., nn.Module] = "mlp",
        block_chunks: int = 1,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        *,
        norm_layer: Callable[..., nn.Module] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.backend = _backend.check_name(backend)
        patch_size = _positive_int(patch_size, "patch_size")
        embed_dim = _positive_int(embed_dim, "embed_dim")
        depth = _positive_int(depth, "depth")
        num_heads = _positive_int(num_heads, "num_heads")
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        if isinstance(block_chunks, bool) or not isinstance(block_chunks, int) or block_chunks < 0:
            raise ValueError(f"block_chunks must be an int >= 0, got {block_chunks!r}")
        if block_chunks and depth % block_chunks:
            raise ValueError(
                f"depth ({depth}) must be divisible by block_chunks ({block_chunks}); "
                f"block_chunks=0 keeps the blocks unchunked"
            )
        if (
            isinstance(num_register_tokens, bool)
            or not isinstance(num_register_tokens, int)
            or num_register_tokens < 0
        ):
            raise ValueError(
                f"num_register_tokens must be an int >= 0, got {num_register_tokens!r}"
            )
        if not 0.0 <= drop_path_rate <= 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1], got {drop_path_rate}")
        if not 0.0 <= interpolate_offset < 1.0:
            raise ValueError(f"interpolate_offset must be in [0, 1), got {interpolate_offset}")
        if isinstance(ffn_layer, str):
            if ffn_layer not in _FFN_LAYERS:
                raise ValueError(
                    f"ffn_layer must be one of {', '.join(map(repr, _FFN_LAYERS))} or a module "
                    f"class, got {ffn_layer!r}"
                )
            ffn_layer = _FFN_LAYERS[ffn_layer]
        elif not callable(ffn_layer):
            raise ValueError(f"ffn_layer must be a name or a module class, got {ffn_layer!r}")
        if norm_layer is None:
            norm_layer = partial(LayerNorm, eps=1e-6, backend=backend)
        if block_fn is _DEFAULT_BLOCK_FN:
            block_fn = partial(
                Block, attn_class=partial(MemEffAttention, backend=backend), backend=backend
            )

        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        # The construction order is DINOv2's, so that one seed gives DINOv2's initial weights.
        self.patch_embed = embed_layer(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
        )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + self.num_tokens, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
            if num_register_tokens
            else None
        )
        if drop_path_uniform is True:
            rates = [drop_path_rate] * depth
        else:
            rates = np.linspace(0, drop_path_rate, depth).tolist()
        blocks = [
            block_fn(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=rates[i],
                norm_layer=norm_layer,
                act_layer=act_layer,
                ffn_layer=ffn_layer,
                init_values=init_values,
            )
            for i in range(depth)
        ]
        self.chunked_blocks = block_chunks > 0
        if self.chunked_blocks:
            size = depth // block_chunks
            chunks = [
                BlockChunk([nn.Identity()] * start + blocks[start : start + size])
                for start in range(0, depth, size)
            ]
            self.blocks = nn.ModuleList(chunks)
        else:
            self.blocks = nn.ModuleList(blocks)
        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        """DINOv2's init: pos_embed trunc_normal(0.02), cls and register tokens normal(1e-6), every
        Linear by :func:`init_weights_vit_timm`; the patch conv, norms, LayerScale (its
        ``init_values``) and ``mask_token`` (zeros) keep their own. The random draws come in
        DINOv2's order."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.modules():
            init_weights_vit_timm(module)

    def _block_list(self) -> list[nn.Module]:
        """The blocks in order, without the chunks' Identity padding."""
        if not self.chunked_blocks:
            return list(self.blocks)
        out: list[nn.Module] = []
        for chunk in self.blocks:
            out.extend(chunk[len(out) :])
        return out

    def interpolate_pos_encoding(self, x: torch.Tensor, w: int, h: int) -> torch.Tensor:
        """The positional embedding for tokens ``x: [B, 1 + N, D]`` (CLS first, no registers) of an
        image of ``w`` x ``h`` pixels; DINOv2 passes ``x.shape[2]``, ``x.shape[3]`` (height, then
        width) as ``w``, ``h``.

        ``pos_embed`` itself when the token count is the trained one and ``w == h``. Otherwise the
        ``M x M`` grid is resized bicubically in float32 to ``(w // p, h // p)`` (with
        ``interpolate_offset > 0`` by the scale factor ``(w // p + offset) / M``, as DINOv2 does,
        else by size; ``interpolate_antialias`` as set), the CLS slot kept, and the result cast to
        x's dtype. Returns ``[1, 1 + N', D]``.

        Raises:
            ValueError: ``pos_embed``'s patch positions do not form a square grid.
        """
        previous_dtype = x.dtype
        npatch = x.shape[1] - 1
        trained = self.pos_embed.shape[1] - 1
        if npatch == trained and w == h:
            return self.pos_embed
        side = int(math.sqrt(trained))
        if side * side != trained:
            raise ValueError(
                f"pos_embed must hold 1 + M*M positions (a square grid) to be interpolated, "
                f"got {self.pos_embed.shape[1]}"
            )
        pos_embed = self.pos_embed.float()
        class_pos_embed = pos_embed[:, :1]
        grid = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # [1, D, M, M]
        out_h, out_w = w // self.patch_size, h // self.patch_size
        if self.interpolate_offset:
            # DINOv2's "historical kludge": a scale factor a little over the size ratio.
            scale = (
                float(out_h + self.interpolate_offset) / side,
                float(out_w + self.interpolate_offset) / side,
            )
            grid = F.interpolate(
                grid, scale_factor=scale, mode="bicubic", antialias=self.interpolate_antialias
            )
        else:
            grid = F.interpolate(
                grid, size=(out_h, out_w), mode="bicubic", antialias=self.interpolate_antialias
            )
        if tuple(grid.shape[-2:]) != (out_h, out_w):  # DINOv2 asserts the same
            raise RuntimeError(
                f"interpolated pos_embed grid {tuple(grid.shape[-2:])} != {(out_h, out_w)}"
            )
        patch_pos_embed = grid.permute(0, 2, 3, 1).reshape(1, out_h * out_w, -1)
        return torch.cat((class_pos_embed, patch_pos_embed), dim=1).to(previous_dtype)

    def prepare_tokens_with_masks(
        self, x: torch.Tensor, masks: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Images ``x: [B, C, H, W]`` -> tokens ``[B, 1 + R + N, D]``: the patch tokens (those where
        ``masks: [B, N]`` (bool) is True replaced by ``mask_token``), CLS in front, the positional
        embedding added, then the R register tokens inserted after CLS (they get no positional
        embedding).

        Raises:
            ValueError: bad ``x`` (see :class:`PatchEmbed`) or ``masks`` not a bool ``[B, N]``.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x must be [B, C, H, W], got shape {list(x.shape)}")
        w, h = x.shape[-2:]
        x = self.patch_embed(x)
        if masks is not None:
            if not isinstance(masks, torch.Tensor) or masks.dtype != torch.bool:
                what = masks.dtype if isinstance(masks, torch.Tensor) else type(masks).__name__
                raise ValueError(f"masks must be a bool tensor, got {what}")
            if tuple(masks.shape) != tuple(x.shape[:2]):
                raise ValueError(
                    f"masks must be [B, N] = {list(x.shape[:2])} (one flag per patch), "
                    f"got {list(masks.shape)}"
                )
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(x.shape[0], -1, -1)
            x = torch.cat((x[:, :1], registers, x[:, 1:]), dim=1)
        return x

    def _features(self, x: torch.Tensor, masks: torch.Tensor | None) -> dict[str, Any]:
        x_norm = self.norm(x)
        registers = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : registers + 1],
            "x_norm_patchtokens": x_norm[:, registers + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features_list(
        self,
        x_list: Sequence[torch.Tensor],
        masks_list: Sequence[torch.Tensor | None] | None,
    ) -> list[dict[str, Any]]:
        """Several crop groups (e.g. the global and the local crops, each ``[B_i, C, H_i, W_i]``)
        in one pass: each group's tokens are prepared on their own (their own positional
        embedding), then the list runs through every block as one packed sequence (block-diagonal
        attention; with drop path, each group keeps its own sample subset), and each group gets
        the final norm. ``masks_list``: one ``[B_i, N_i]`` bool tensor or None per group (or None
        for no masks). Returns one :meth:`forward_features` dict per group.

        Raises:
            ValueError: an empty ``x_list``, or a ``masks_list`` of another length.
        """
        if not isinstance(x_list, (list, tuple)) or not x_list:
            raise ValueError("x_list must be a non-empty list of image tensors")
        if masks_list is None:
            masks_list = [None] * len(x_list)
        if not isinstance(masks_list, (list, tuple)) or len(masks_list) != len(x_list):
            raise ValueError(
                f"masks_list must be a list with one entry (a mask or None) per crop group "
                f"({len(x_list)}), got {masks_list!r}"
            )
        x = [self.prepare_tokens_with_masks(t, m) for t, m in zip(x_list, masks_list)]
        for block in self.blocks:
            x = block(x)
        return [self._features(t, m) for t, m in zip(x, masks_list)]

    def forward_features(self, x, masks=None):
        """``x: [B, C, H, W]`` -> dict ``x_norm_clstoken [B, D]``, ``x_norm_regtokens [B, R, D]``,
        ``x_norm_patchtokens [B, N, D]``, ``x_prenorm [B, 1 + R + N, D]`` (before the final
        norm), ``masks`` (as given). A list of crop groups goes to :meth:`forward_features_list`
        (``masks`` then a list)."""
        if isinstance(x, (list, tuple)):
            return self.forward_features_list(x, masks)
        x = self.prepare_tokens_with_masks(x, masks)
        for block in self.blocks:
            x = block(x)
        return self._features(x, masks)

    def get_intermediate_layers(
        self,
        x: torch.Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Outputs of some blocks for ``x: [B, C, H, W]``: the last ``n`` blocks for an int ``n``,
        or the blocks of the indices in ``n`` (returned in block order, as DINOv2 does). Each is
        normed by the final norm if ``norm``, stripped of CLS and registers (``[B, N, D]``, or
        ``[B, D, H/p, W/p]`` with ``reshape``). Returns a tuple of them, or of
        ``(patch_tokens, class_token [B, D])`` pairs with ``return_class_token``.

        Raises:
            ValueError: ``n`` not in [1, depth], or an index not in [0, depth) or repeated.
        """
        depth = self.n_blocks
        if isinstance(n, int) and not isinstance(n, bool):
            if not 1 <= n <= depth:
                raise ValueError(f"n must be in [1, {depth}] (the depth), got {n}")
            take = set(range(depth - n, depth))
        else:
            indices = list(n)
            bad = [i for i in indices if isinstance(i, bool) or not isinstance(i, int)]
            bad += [i for i in indices if isinstance(i, int) and not 0 <= i < depth]
            if bad or len(set(indices)) != len(indices) or not indices:
                raise ValueError(
                    f"n must be an int or distinct block indices in [0, {depth}), got {n!r}"
                )
            take = set(indices)
        tokens = self.prepare_tokens_with_masks(x)
        outputs = []
        for i, block in enumerate(self._block_list()[: max(take) + 1]):
            tokens = block(tokens)
            if i in take:
                outputs.append(tokens)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            batch, _, height, width = x.shape
            grid = (height // self.patch_size, width // self.patch_size)
            outputs = [
                out.reshape(batch, *grid, -1).permute(0, 3, 1, 2).contiguous() for out in outputs
            ]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)

    def forward(self, *args, is_training: bool = False, **kwargs):
        """:meth:`forward_features`'s dict(s) when ``is_training``, else ``head`` of the normed CLS
        token (``[B, D]`` with the Identity head; a list of them for a list of crop groups)."""
        ret = self.forward_features(*args, **kwargs)
        if is_training:
            return ret
        if isinstance(ret, list):
            return [self.head(r["x_norm_clstoken"]) for r in ret]
        return self.head(ret["x_norm_clstoken"])


# DINOv2's architectures: (embed_dim, depth, num_heads), all with MLP ratio 4.
_ARCH_SIZES = {
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant2": (1536, 40, 24),
}


def _vit(arch: str, patch_size, num_register_tokens, kwargs) -> DinoVisionTransformer:
    embed_dim, depth, num_heads = _ARCH_SIZES[arch]
    return DinoVisionTransformer(
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4,
        num_register_tokens=num_register_tokens,
        **kwargs,
    )


def vit_small(
    patch_size: int = 16, num_register_tokens: int = 0, **kwargs
) -> DinoVisionTransformer:
    """ViT-S: 384 wide, 12 blocks, 6 heads, MLP ratio 4 (22.06M parameters in the hub config)."""
    return _vit("vit_small", patch_size, num_register_tokens, kwargs)


def vit_base(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-B: 768 wide, 12 blocks, 12 heads, MLP ratio 4 (86.58M parameters in the hub config)."""
    return _vit("vit_base", patch_size, num_register_tokens, kwargs)


def vit_large(
    patch_size: int = 16, num_register_tokens: int = 0, **kwargs
) -> DinoVisionTransformer:
    """ViT-L: 1024 wide, 24 blocks, 16 heads, MLP ratio 4 (304.37M in the hub config)."""
    return _vit("vit_large", patch_size, num_register_tokens, kwargs)


def vit_giant2(
    patch_size: int = 16, num_register_tokens: int = 0, **kwargs
) -> DinoVisionTransformer:
    """DINOv2's ViT-g: 1536 wide, 40 blocks, 24 heads (head dim 64), MLP ratio 4 (1136.48M with
    the hub's ``ffn_layer="swiglufused"``)."""
    return _vit("vit_giant2", patch_size, num_register_tokens, kwargs)


_HUB_ARCHS = {"s": "vit_small", "b": "vit_base", "l": "vit_large", "g": "vit_giant2"}
_HUB_NAME = re.compile(r"dinov2_vit([sblg])14(_reg)?")


def hub_config(name: str) -> dict[str, Any]:
    """The :class:`DinoVisionTransformer` keyword arguments of a DINOv2 torch.hub backbone,
    ``dinov2_vit{s,b,l,g}14`` or ``dinov2_vit{s,b,l,g}14_reg``: image 518, patch 14, LayerScale
    1.0, unchunked blocks, "swiglufused" for g; the ``_reg`` ones with 4 registers,
    ``interpolate_antialias=True`` and ``interpolate_offset=0.0``.
    ``DinoVisionTransformer(**hub_config(name))`` builds the model.

    Raises:
        ValueError: an unknown name.
    """
    match = _HUB_NAME.fullmatch(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(
            f"name must be dinov2_vit{{s,b,l,g}}14 or dinov2_vit{{s,b,l,g}}14_reg, got {name!r}"
        )
    arch = _HUB_ARCHS[match.group(1)]
    embed_dim, depth, num_heads = _ARCH_SIZES[arch]
    registers = match.group(2) is not None
    return {
        "img_size": 518,
        "patch_size": 14,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "mlp_ratio": 4,
        "init_values": 1.0,
        "ffn_layer": "swiglufused" if arch == "vit_giant2" else "mlp",
        "block_chunks": 0,
        "num_register_tokens": 4 if registers else 0,
        "interpolate_antialias": registers,
        "interpolate_offset": 0.0 if registers else 0.1,
    }


_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(?:(\d+)\.)?(.*)")


def _to_block_layout(state_dict: Mapping[str, torch.Tensor], model: DinoVisionTransformer):
    """``state_dict`` with its block keys in ``model``'s layout: flat ``blocks.{i}.*`` and chunked
    ``blocks.{j}.{i}.*`` keys are both read by their block index ``i``."""
    size = model.n_blocks // len(model.blocks) if model.chunked_blocks else 0
    out = {}
    for key, value in state_dict.items():
        match = _BLOCK_KEY.fullmatch(key)
        if match is not None:
            outer, inner, rest = match.groups()
            index = int(inner if inner is not None else outer)
            key = f"blocks.{index // size}.{index}.{rest}" if size else f"blocks.{index}.{rest}"
        out[key] = value
    return out


def load_weights(
    model: DinoVisionTransformer, weights: str | os.PathLike | Mapping[str, torch.Tensor]
) -> DinoVisionTransformer:
    """Load a DINOv2 state_dict (or a file of one, read with ``weights_only=True``) into ``model``
    with ``strict=True``; flat and chunked block keys are both mapped to the model's layout."""
    if isinstance(weights, (str, os.PathLike)):
        weights = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(weights, Mapping):
        raise TypeError(
            f"weights must be a state_dict or the path of one, got {type(weights).__name__}"
        )
    model.load_state_dict(_to_block_layout(weights, model), strict=True)
    return model


def _hub_model(name: str, weights, kwargs: dict[str, Any]) -> DinoVisionTransformer:
    config = hub_config(name)
    config.update(kwargs)
    model = DinoVisionTransformer(**config)
    if weights is not None:
        load_weights(model, weights)
    return model


def dinov2_vits14(*, weights=None, **kwargs) -> DinoVisionTransformer:
    """torch.hub's ``dinov2_vits14`` (:func:`hub_config`); ``weights``: the checkpoint (a
    state_dict or its file), loaded strictly; no download. ``kwargs`` override the config."""
    return _hub_model("dinov2_vits14", weights, kwargs)


def dinov2_vitb14(*, weights=None, **kwargs) -> DinoVisionTransformer:
    """torch.hub's ``dinov2_vitb14``; see :func:`dinov2_vits14`."""
    return _hub_model("dinov2_vitb14", weights, kwargs)


def dinov2_vitl14(*, weights=None, **kwargs) -> DinoVisionTransformer:
    """torch.hub's ``dinov2_vitl14``; see :func:`dinov2_vits14`."""
    return _hub_model("dinov2_vitl14", weights, kwargs)


def dinov2_vitg14(*, weights=None, **kwargs) -> DinoVisionTransformer:
    """torch.hub's ``dinov2_vitg14``; see :func:`dinov2_vits14`."""
    return _hub_model("dinov2_vitg14", weights, kwargs)


def dinov2_vits14_reg(*, weights=None, **kwargs) -> DinoVisionTransformer:
    """torch.hub's ``dinov2_vits14_reg`` (4 registers); see :func:`dinov2_vits14`."""
    return _hub_model("dinov2_vits14_reg", weights, kwargs)


def dinov2_vitb14_reg(*, weights=None, **kwargs) -> DinoVisionTransformer:
    """torch.hub's ``dinov2_vitb14_reg`` (4 registers); see :func:`dinov2_vits14`."""
    return _hub_model("dinov2_vitb14_reg", weights, kwargs)


def dinov2_vitl14_reg(*, weights=None, **kwargs) -> DinoVisionTransformer:
    """torch.hub's ``dinov2_vitl14_reg`` (4 registers); see :func:`dinov2_vits14`."""
    return _hub_model("dinov2_vitl14_reg", weights, kwargs)


def dinov2_vitg14_reg(*, weights=None, **kwargs) -> DinoVisionTransformer:
    """torch.hub's ``dinov2_vitg14_reg`` (4 registers); see :func:`dinov2_vits14`."""
    return _hub_model("dinov2_vitg14_reg", weights, kwargs)
