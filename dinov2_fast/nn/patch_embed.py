"""``PatchEmbed``: images to patch tokens, with DINOv2's constructor, attributes and state_dict."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["PatchEmbed"]


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    """``(value, value)`` for an int, the pair itself for a pair of ints; else a ValueError."""
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        pair = tuple(value)
    else:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{name} must hold positive ints, got {value!r}")
    return pair


class PatchEmbed(nn.Module):
    """Non-overlapping patches of ``patch_size`` projected to ``embed_dim`` by a strided conv.

    ``forward(x)``: ``x: [B, in_chans, H, W]`` with H and W multiples of the patch size ->
    ``[B, (H/p)·(W/p), embed_dim]`` in row-major patch order, or ``[B, H/p, W/p, embed_dim]``
    when ``flatten_embedding`` is False. ``norm_layer(embed_dim)`` (if given) runs on the tokens.

    Attributes as in DINOv2: ``img_size`` and ``patch_size`` (pairs), ``patches_resolution``,
    ``num_patches``, ``in_chans``, ``embed_dim``, ``flatten_embedding``. Keys ``proj.weight
    [embed_dim, in_chans, p, p]``, ``proj.bias [embed_dim]`` (and ``norm.*`` with a norm).

    Raises:
        ValueError: ``x`` is not 4-D, has other than ``in_chans`` channels, or H or W is not
            divisible by the patch size (DINOv2 asserts); a size argument is not positive.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        norm_layer: Callable[..., nn.Module] | None = None,
        flatten_embedding: bool = True,
    ) -> None:
        super().__init__()
        self.img_size = _pair(img_size, "img_size")
        self.patch_size = _pair(patch_size, "patch_size")
        self.patches_resolution = (
            self.img_size[0] // self.patch_size[0],
            self.img_size[1] // self.patch_size[1],
        )
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.flatten_embedding = flatten_embedding
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size
        )
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"x must be [B, {self.in_chans}, H, W] (in_chans={self.in_chans}), "
                f"got shape {list(x.shape)}"
            )
        height, width = x.shape[-2:]
        patch_h, patch_w = self.patch_size
        if height % patch_h or width % patch_w:
            raise ValueError(
                f"x's height and width must be multiples of the patch size {patch_h}x{patch_w}, "
                f"got {height}x{width}"
            )
        x = self.proj(x)  # [B, D, h, w]
        grid_h, grid_w = x.shape[-2:]
        x = self.norm(x.flatten(2).transpose(1, 2))  # [B, h·w, D]
        if not self.flatten_embedding:
            x = x.reshape(-1, grid_h, grid_w, self.embed_dim)
        return x

    def extra_repr(self) -> str:
        return (
            f"img_size={self.img_size}, patch_size={self.patch_size}, "
            f"num_patches={self.num_patches}"
        )
