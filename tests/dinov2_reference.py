"""DINOv2's block and efficient stochastic depth in plain PyTorch, for equivalence tests.

Written from the description of dinov2/layers/{block,attention,layer_scale,drop_path,mlp}.py in
../shared/reference/dinov2.md (sections 1.1 to 1.10): the same module names, parameter names,
random draws (``torch.randperm`` per group and branch, in the same order) and arithmetic
(``index_add`` of ``(residual * gamma).to(x.dtype)`` with ``alpha = B / k``), with xFormers'
block-diagonal attention replaced by SDPA per packed sequence. Works in float64.

Below the block: DINOv2's backbone and head (dinov2/models/vision_transformer.py,
dinov2/layers/{patch_embed,dino_head}.py; sections 1.7, 1.12 and 2 of the reference notes), with
DINOv2's module and attribute names and its order of random draws at construction.
"""

from __future__ import annotations

import math
import warnings
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class RefAttention(nn.Module):
    def __init__(
        self, dim, num_heads=8, qkv_bias=False, proj_bias=True, attn_drop=0.0, proj_drop=0.0
    ):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5  # SDPA's default; DINOv2's attribute
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x, attn_bias=None):
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, channels // self.num_heads)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # [B, H, N, D]
        if attn_bias is None:
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # the packed [1, T, C] sequence: attention within each sequence
            parts, start = [], 0
            for length in attn_bias.seqlens:
                end = start + length
                parts.append(
                    F.scaled_dot_product_attention(
                        q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
                    )
                )
                start = end
            out = torch.cat(parts, dim=2)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, channels))


class RefLayerScale(nn.Module):
    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class RefDropPath(nn.Module):
    def __init__(self, drop_prob):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask.div_(keep)


class RefMlp(nn.Module):
    def __init__(self, in_features, hidden_features, act_layer=nn.GELU, drop=0.0, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefSwiGLUFFNFused(nn.Module):
    def __init__(self, in_features, hidden_features, act_layer=None, drop=0.0, bias=True):
        super().__init__()
        hidden = (int(hidden_features * 2 / 3) + 7) // 8 * 8
        self.w12 = nn.Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = nn.Linear(hidden, in_features, bias=bias)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def get_branges_scales(x, sample_drop_ratio):
    b = x.shape[0]
    keep = max(int(b * (1 - sample_drop_ratio)), 1)
    brange = torch.randperm(b, device=x.device)[:keep]
    return brange, b / keep


def drop_add_residual_stochastic_depth(x, residual_func, sample_drop_ratio):
    b = x.shape[0]
    brange, scale = get_branges_scales(x, sample_drop_ratio)
    residual = residual_func(x[brange])
    out = torch.index_add(x.flatten(1), 0, brange, residual.flatten(1).to(x.dtype), alpha=scale)
    return out.view_as(x) if b else out


def add_residual(x, brange, residual, scale, scaling_vector=None):
    if scaling_vector is None:
        out = torch.index_add(x.flatten(1), 0, brange, residual.flatten(1).to(x.dtype), alpha=scale)
    else:  # xFormers' scaled_index_add, out of place
        out = torch.index_add(x, 0, brange, (residual * scaling_vector).to(x.dtype), alpha=scale)
    return out.view_as(x)


class RefMask:
    """What the reference needs of a block-diagonal mask: the sequence lengths and the split."""

    def __init__(self, groups):
        self.groups = groups  # [(samples, tokens)]
        self.seqlens = [n for b, n in groups for _ in range(b)]

    def split(self, packed):
        parts, start = [], 0
        for b, n in self.groups:
            parts.append(packed[0, start : start + b * n].view(b, n, -1))
            start += b * n
        return parts


def drop_add_residual_stochastic_depth_list(x_list, residual_func, ratio, scaling_vector=None):
    draws = [get_branges_scales(x, ratio) for x in x_list]
    mask = RefMask([(len(brange), x.shape[1]) for (brange, _), x in zip(draws, x_list)])
    packed = torch.cat([x[brange].flatten() for (brange, _), x in zip(draws, x_list)])
    packed = packed.view(1, -1, x_list[0].shape[-1])
    residuals = mask.split(residual_func(packed, attn_bias=mask))
    return [
        add_residual(x, brange, residual, scale, scaling_vector)
        for x, (brange, scale), residual in zip(x_list, draws, residuals)
    ]


class RefBlock(nn.Module):
    """DINOv2's NestedTensorBlock (tensor path of Block, plus forward_nested)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, init_values=None,
                 drop_path=0.0, ffn_layer=RefMlp, eps=1e-5):  # fmt: skip
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = RefAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.ls1 = RefLayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = RefDropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = ffn_layer(dim, int(dim * mlp_ratio))
        self.ls2 = RefLayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = RefDropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.sample_drop_ratio = drop_path

    def forward(self, x):
        if isinstance(x, list):
            return self.forward_nested(x)

        def attn_residual_func(x):
            return self.ls1(self.attn(self.norm1(x)))

        def ffn_residual_func(x):
            return self.ls2(self.mlp(self.norm2(x)))

        if self.training and self.sample_drop_ratio > 0.1:
            x = drop_add_residual_stochastic_depth(x, attn_residual_func, self.sample_drop_ratio)
            x = drop_add_residual_stochastic_depth(x, ffn_residual_func, self.sample_drop_ratio)
        elif self.training and self.sample_drop_ratio > 0.0:
            x = x + self.drop_path1(attn_residual_func(x))
            x = x + self.drop_path1(ffn_residual_func(x))  # DINOv2's FIXME: drop_path1 twice
        else:
            x = x + attn_residual_func(x)
            x = x + ffn_residual_func(x)
        return x

    def forward_nested(self, x_list):
        if self.training and self.sample_drop_ratio > 0.0:

            def attn_residual_func(x, attn_bias=None):
                return self.attn(self.norm1(x), attn_bias=attn_bias)

            def ffn_residual_func(x, attn_bias=None):
                return self.mlp(self.norm2(x))

            gamma1 = self.ls1.gamma if isinstance(self.ls1, RefLayerScale) else None
            gamma2 = self.ls2.gamma if isinstance(self.ls2, RefLayerScale) else None
            x_list = drop_add_residual_stochastic_depth_list(
                x_list, attn_residual_func, self.sample_drop_ratio, gamma1
            )
            return drop_add_residual_stochastic_depth_list(
                x_list, ffn_residual_func, self.sample_drop_ratio, gamma2
            )
        mask = RefMask([(x.shape[0], x.shape[1]) for x in x_list])
        x = torch.cat([x.reshape(1, -1, x.shape[-1]) for x in x_list], dim=1)
        x = x + self.ls1(self.attn(self.norm1(x), attn_bias=mask))
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return mask.split(x)


class RefNestedBlock(RefBlock):
    """RefBlock with DINOv2's full Block constructor (what DinoVisionTransformer passes to its
    block_fn), children built in DINOv2's order."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, proj_bias=True,
                 ffn_bias=True, drop=0.0, attn_drop=0.0, init_values=None, drop_path=0.0,
                 act_layer=nn.GELU, norm_layer=nn.LayerNorm, attn_class=RefAttention,
                 ffn_layer=RefMlp):  # fmt: skip
        nn.Module.__init__(self)
        self.norm1 = norm_layer(dim)
        self.attn = attn_class(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
        )
        self.ls1 = RefLayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = RefDropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(
            in_features=dim,
            hidden_features=int(dim * mlp_ratio),
            act_layer=act_layer,
            drop=drop,
            bias=ffn_bias,
        )
        self.ls2 = RefLayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = RefDropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.sample_drop_ratio = drop_path


class RefPatchEmbed(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None,
                 flatten_embedding=True):  # fmt: skip
        super().__init__()
        pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)
        self.img_size, self.patch_size = pair(img_size), pair(patch_size)
        self.patches_resolution = tuple(i // p for i, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans, self.embed_dim = in_chans, embed_dim
        self.flatten_embedding = flatten_embedding
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, stride=self.patch_size)
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x):
        assert x.shape[2] % self.patch_size[0] == 0 and x.shape[3] % self.patch_size[1] == 0
        x = self.proj(x)
        rows, cols = x.shape[2], x.shape[3]
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x if self.flatten_embedding else x.reshape(-1, rows, cols, self.embed_dim)


class RefBlockChunk(nn.ModuleList):
    def forward(self, x):
        for module in self:
            x = module(x)
        return x


def _ref_identity_ffn(*args, **kwargs):
    return nn.Identity()


class RefDinoVisionTransformer(nn.Module):
    """DINOv2's DinoVisionTransformer: same constructor, attributes, keys and forwards."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, ffn_bias=True, proj_bias=True,
                 drop_path_rate=0.0, drop_path_uniform=False, init_values=None,
                 embed_layer=RefPatchEmbed, act_layer=nn.GELU, block_fn=RefNestedBlock,
                 ffn_layer="mlp", block_chunks=1, num_register_tokens=0,
                 interpolate_antialias=False, interpolate_offset=0.1):  # fmt: skip
        super().__init__()
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.patch_embed = embed_layer(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.register_tokens = None
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        if drop_path_uniform is True:
            rates = [drop_path_rate] * depth
        else:
            rates = np.linspace(0, drop_path_rate, depth).tolist()
        ffn = {
            "mlp": RefMlp,
            "swiglu": RefSwiGLUFFNFused,
            "swiglufused": RefSwiGLUFFNFused,
            "identity": _ref_identity_ffn,
        }[ffn_layer]
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
                ffn_layer=ffn,
                init_values=init_values,
            )
            for i in range(depth)
        ]
        self.chunked_blocks = block_chunks > 0
        if self.chunked_blocks:
            size = depth // block_chunks
            self.blocks = nn.ModuleList(
                RefBlockChunk([nn.Identity()] * i + blocks[i : i + size])
                for i in range(0, depth, size)
            )
        else:
            self.blocks = nn.ModuleList(blocks)
        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    def init_weights(self):
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)

        def visit(module):  # depth-first, children before their parent
            for child in module.children():
                visit(child)
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        visit(self)

    def interpolate_pos_encoding(self, x, w, h):
        dtype = x.dtype
        n_tokens, n_pos = x.shape[1] - 1, self.pos_embed.shape[1] - 1
        if n_tokens == n_pos and w == h:
            return self.pos_embed
        pos = self.pos_embed.float()
        side = int(math.sqrt(n_pos))
        assert side * side == n_pos
        rows, cols = w // self.patch_size, h // self.patch_size
        if self.interpolate_offset:
            size_or_scale = {
                "scale_factor": (
                    float(rows + self.interpolate_offset) / side,
                    float(cols + self.interpolate_offset) / side,
                )
            }
        else:
            size_or_scale = {"size": (rows, cols)}
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(
            grid, mode="bicubic", antialias=self.interpolate_antialias, **size_or_scale
        )
        assert grid.shape[-2:] == (rows, cols)
        grid = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat((pos[:, :1], grid), dim=1).to(dtype)

    def prepare_tokens_with_masks(self, x, masks=None):
        w, h = x.shape[2], x.shape[3]
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks[..., None], self.mask_token.to(x.dtype)[None], x)
        x = torch.cat((self.cls_token.expand(len(x), -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(len(x), -1, -1), x[:, 1:]), 1)
        return x

    def _dict(self, x, masks):
        normed = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1 : 1 + r],
            "x_norm_patchtokens": normed[:, 1 + r :],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features_list(self, x_list, masks_list):
        xs = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)]
        for blk in self.blocks:
            xs = blk(xs)
        return [self._dict(x, m) for x, m in zip(xs, masks_list)]

    def forward_features(self, x, masks=None):
        if isinstance(x, list):
            return self.forward_features_list(x, masks)
        x = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self._dict(x, masks)

    def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False,
                                norm=True):  # fmt: skip
        tokens = self.prepare_tokens_with_masks(x)
        wanted = range(self.n_blocks - n, self.n_blocks) if isinstance(n, int) else n
        outputs = []
        if self.chunked_blocks:  # walk each chunk past its Identity padding
            i = 0
            for chunk in self.blocks:
                for blk in chunk[i:]:
                    tokens = blk(tokens)
                    if i in wanted:
                        outputs.append(tokens)
                    i += 1
        else:
            for i, blk in enumerate(self.blocks):
                tokens = blk(tokens)
                if i in wanted:
                    outputs.append(tokens)
        assert len(outputs) == len(wanted)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        cls = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            b, _, height, width = x.shape
            outputs = [
                out.reshape(b, height // self.patch_size, width // self.patch_size, -1)
                .permute(0, 3, 1, 2)
                .contiguous()
                for out in outputs
            ]
        return tuple(zip(outputs, cls)) if return_class_token else tuple(outputs)

    def forward(self, *args, is_training=False, **kwargs):
        ret = self.forward_features(*args, **kwargs)
        return ret if is_training else self.head(ret["x_norm_clstoken"])


class RefDINOHead(nn.Module):
    """DINOv2's DINOHead, its last layer made with the deprecated torch.nn.utils.weight_norm."""

    def __init__(self, in_dim, out_dim, use_bn=False, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256, mlp_bias=True):  # fmt: skip
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim, bias=mlp_bias)
        else:
            layers, width = [], in_dim
            for _ in range(nlayers - 1):
                layers.append(nn.Linear(width, hidden_dim, bias=mlp_bias))
                layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
                layers.append(nn.GELU())
                width = hidden_dim
            layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=mlp_bias))
            self.mlp = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*weight_norm.*")
            self.last_layer = torch.nn.utils.weight_norm(
                nn.Linear(bottleneck_dim, out_dim, bias=False)
            )
        self.last_layer.weight_g.data.fill_(1)

    def forward(self, x):
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)
