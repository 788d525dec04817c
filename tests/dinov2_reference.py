"""DINOv2's block and efficient stochastic depth in plain PyTorch, for equivalence tests.

Written from the description of dinov2/layers/{block,attention,layer_scale,drop_path,mlp}.py in
../shared/reference/dinov2.md (sections 1.1 to 1.10): the same module names, parameter names,
random draws (``torch.randperm`` per group and branch, in the same order) and arithmetic
(``index_add`` of ``(residual * gamma).to(x.dtype)`` with ``alpha = B / k``), with xFormers'
block-diagonal attention replaced by SDPA per packed sequence. Works in float64.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RefAttention(nn.Module):
    def __init__(
        self, dim, num_heads=8, qkv_bias=False, proj_bias=True, attn_drop=0.0, proj_drop=0.0
    ):
        super().__init__()
        self.num_heads = num_heads
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
