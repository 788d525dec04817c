"""The ViT block with DINOv2's efficient stochastic depth, for a batch and for packed crop groups.

DINOv2's stochastic depth does not compute a residual branch and then mask it: it draws
``k = max(int(B·(1 - p)), 1)`` samples, runs the branch on them only and adds the result back
scaled by ``B / k`` and LayerScale's gamma. Here the gather is fused with the branch's LayerNorm
(``ops.index_select_layer_norm``: the kept rows are read once), and the scale, gamma and
scatter-add are one pass (``ops.scaled_index_add``, out of place), whose backward passes the
stream's gradient through and computes the branch's and gamma's gradients in one pass.

The module-level functions keep DINOv2's names and signatures (``drop_add_residual_stochastic_depth``,
``get_branges_scales``, ``add_residual``, ``get_attn_bias_and_cat``,
``drop_add_residual_stochastic_depth_list``), computed with our ops; the extra ``scaling_vector``
folds LayerScale into the update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from dinov2_fast import _backend
from dinov2_fast.nn.attention import MemEffAttention
from dinov2_fast.nn.drop_path import DropPath
from dinov2_fast.nn.layer_norm import LayerNorm
from dinov2_fast.nn.layer_scale import LayerScale
from dinov2_fast.nn.mlp import Mlp
from dinov2_fast.ops._checks import FLOAT_DTYPES
from dinov2_fast.ops.block_diagonal_mask import BlockDiagonalMask
from dinov2_fast.ops.index_select_cat import index_select_cat
from dinov2_fast.ops.index_select_layer_norm import index_select_layer_norm
from dinov2_fast.ops.scaled_index_add import scaled_index_add

__all__ = [
    "Block",
    "BlockLayout",
    "NestedTensorBlock",
    "add_residual",
    "drop_add_residual_stochastic_depth",
    "drop_add_residual_stochastic_depth_list",
    "get_attn_bias_and_cat",
    "get_branges_scales",
]

# Block-diagonal masks by ((samples, tokens), ...) of the packed groups: the kept counts depend only
# on the batch sizes and the drop rate, so a training run builds a handful and reuses them (their
# cu_seqlens stay on the device).
_MASK_CACHE: dict[tuple[tuple[int, int], ...], BlockDiagonalMask] = {}
_MASK_CACHE_SIZE = 64


def get_branges_scales(
    x: torch.Tensor, sample_drop_ratio: float = 0.0
) -> tuple[torch.Tensor, float]:
    """The kept samples of ``x: [B, ...]`` (``k = max(int(B·(1-p)), 1)`` of them, a random subset
    drawn with ``torch.randperm`` on x's device, as DINOv2 draws it) and the rescale ``B / k``."""
    batch = x.shape[0]
    kept = max(int(batch * (1 - sample_drop_ratio)), 1)
    brange = torch.randperm(batch, device=x.device)[:kept]
    return brange, batch / kept


def add_residual(
    x: torch.Tensor,
    brange: torch.Tensor,
    residual: torch.Tensor,
    residual_scale_factor: float,
    scaling_vector: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``x`` with ``residual_scale_factor · scaling_vector · residual`` added at the samples
    ``brange``: one pass, out of place. ``brange`` is trusted (from :func:`get_branges_scales`)."""
    return scaled_index_add(
        x,
        brange,
        residual.view(len(brange), *x.shape[1:]),
        scaling_vector,
        residual_scale_factor,
        validate=False,
        backend=backend,
    )


def drop_add_residual_stochastic_depth(
    x: torch.Tensor,
    residual_func: Callable[[torch.Tensor], torch.Tensor],
    sample_drop_ratio: float = 0.0,
    scaling_vector: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """DINOv2's subset stochastic depth on ``x: [B, N, C]``: ``residual_func`` runs on the kept
    samples only; its output, times ``scaling_vector`` (if given) and ``B / k``, is added back."""
    brange, scale = get_branges_scales(x, sample_drop_ratio)
    residual = residual_func(x.index_select(0, brange))
    return add_residual(x, brange, residual, scale, scaling_vector, backend=backend)


def get_attn_bias_and_cat(
    x_list: Sequence[torch.Tensor],
    branges: Sequence[torch.Tensor] | None = None,
    *,
    backend: str = "auto",
) -> tuple[BlockDiagonalMask, torch.Tensor]:
    """Packs the groups ``[B_i, N_i, C]`` (or their samples ``branges[i]``) into one ``[1, T, C]``
    sequence; returns it with the cached mask that keeps attention within each sample."""
    batch_sizes = [len(b) for b in branges] if branges is not None else [x.shape[0] for x in x_list]
    mask = _mask([(b, x.shape[1]) for b, x in zip(batch_sizes, x_list)])
    channels = x_list[0].shape[-1]
    if branges is not None:
        flat = [x.flatten(1) for x in x_list]
        packed = index_select_cat(flat, branges, validate=False, backend=backend)
        return mask, packed.view(1, -1, channels)
    return mask, torch.cat([x.reshape(1, -1, channels) for x in x_list], dim=1)


def drop_add_residual_stochastic_depth_list(
    x_list: Sequence[torch.Tensor],
    residual_func: Callable[..., torch.Tensor],
    sample_drop_ratio: float = 0.0,
    scaling_vector: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """The packed form: a subset per group, all kept samples through ``residual_func(packed,
    attn_bias=mask)`` in one pass, each group's result added back with its own ``B_i / k_i``."""
    draws = [get_branges_scales(x, sample_drop_ratio) for x in x_list]
    branges = [brange for brange, _ in draws]
    attn_bias, x_cat = get_attn_bias_and_cat(x_list, branges, backend=backend)
    residuals = attn_bias.split(residual_func(x_cat, attn_bias=attn_bias))
    return [
        add_residual(x, brange, residual, scale, scaling_vector, backend=backend).view_as(x)
        for x, (brange, scale), residual in zip(x_list, draws, residuals)
    ]


def _mask(groups: list[tuple[int, int]]) -> BlockDiagonalMask:
    key = tuple(groups)
    mask = _MASK_CACHE.get(key)
    if mask is None:
        if len(_MASK_CACHE) >= _MASK_CACHE_SIZE:
            _MASK_CACHE.clear()
        mask = BlockDiagonalMask.from_seqlens([tokens for b, tokens in groups for _ in range(b)])
        mask._batch_sizes = [b for b, _ in groups]
        _MASK_CACHE[key] = mask
    return mask


def _layer_scale_gamma(ls: nn.Module) -> torch.Tensor | None:
    """gamma of a LayerScale (ours, DINOv2's or timm's: found by its attributes) that can be folded
    into the residual update; None for anything else, which then runs as a module."""
    gamma = getattr(ls, "gamma", None)
    if isinstance(gamma, torch.Tensor) and gamma.dim() == 1 and not getattr(ls, "inplace", False):
        return gamma
    return None


class BlockLayout(nn.Module):
    """The children of a DINOv2 (and timm) pre-norm block, built with DINOv2's constructor:
    ``norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2`` and ``sample_drop_ratio``; no
    forward. :class:`Block` (ours) and the trainer's stock blocks share it, so that they have the
    same keys and the same initial weights from one seed."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | torch.Tensor | None = None,
        drop_path: float = 0.0,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        norm_layer: Callable[..., nn.Module] = LayerNorm,
        attn_class: Callable[..., nn.Module] = MemEffAttention,
        ffn_layer: Callable[..., nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = attn_class(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            proj_bias=proj_bias,
            attn_drop=attn_drop,
            proj_drop=drop,
        )
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(
            in_features=dim,
            hidden_features=int(dim * mlp_ratio),
            act_layer=act_layer,
            drop=drop,
            bias=ffn_bias,
        )
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.sample_drop_ratio = drop_path


class Block(BlockLayout):
    """A pre-norm ViT block with DINOv2's constructor, children and state_dict.

    Children: ``norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2``; attribute
    ``sample_drop_ratio``. Keys: ``norm1.*``, ``attn.qkv.*``, ``attn.proj.*``, ``ls1.gamma``,
    ``norm2.*``, ``mlp.fc1.*``/``mlp.fc2.*`` (or ``mlp.w12.*``/``mlp.w3.*``), ``ls2.gamma``.

    ``forward(x)`` with ``x: [B, N, C]``:
        - training, ``sample_drop_ratio > 0.1``: each branch runs on a random subset of
          ``max(int(B·(1-p)), 1)`` samples, added back scaled by ``B / k`` and gamma in one pass;
        - training, ``0 < p <= 0.1``: the per-sample mask (``drop_path1``, ``drop_path2``);
        - otherwise: ``x + γ1·attn(norm1(x))``, then ``+ γ2·mlp(norm2(x))``.
    ``forward(list_of_tensors)`` with groups ``[B_i, N_i, C]`` (the crops of one resolution each):
    all groups run as one packed sequence through norm, qkv, attention (block-diagonal mask),
    projection and MLP; in training with ``p > 0`` each group keeps its own subset and LayerScale
    is folded into the update. Returns the list.

    Constructor: DINOv2's (:class:`BlockLayout`: ``dim, num_heads, mlp_ratio=4.0,
    qkv_bias=False, proj_bias=True, ffn_bias=True, drop=0.0, attn_drop=0.0, init_values=None,
    drop_path=0.0, act_layer=nn.GELU, norm_layer, attn_class, ffn_layer=Mlp``). Defaults differ
    from DINOv2's in two places, neither visible in the state_dict:
    ``norm_layer`` is our fused :class:`LayerNorm`, ``attn_class`` our :class:`MemEffAttention`
    (so that the packed path works out of the box). Any norm, attention (taking ``attn_bias``
    for lists) and FFN module of the same call signatures can be passed. Extra keyword:
    ``backend`` for the stochastic-depth ops.
    """

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.backend = _backend.check_name(backend)

    # The residual branches without LayerScale (it is applied by the update).
    def _attn_branch(self, x: torch.Tensor, attn_bias: BlockDiagonalMask | None = None):
        return self._attn_after_norm(self.norm1(x), attn_bias)

    def _ffn_branch(self, x: torch.Tensor, attn_bias: BlockDiagonalMask | None = None):
        return self._ffn_after_norm(self.norm2(x), attn_bias)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor]):
        if isinstance(x, torch.Tensor):
            return self._forward_tensor(x)
        if isinstance(x, (list, tuple)):
            return self.forward_nested(list(x))
        raise TypeError(f"x must be a tensor or a list of tensors, got {type(x).__name__}")

    def _forward_tensor(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must be [B, N, C], got shape {list(x.shape)}")
        ratio = self.sample_drop_ratio
        if self.training and ratio > 0.1:
            x = self._drop_add_residual([x], self.norm1, self._attn_after_norm, self.ls1, False)[0]
            return self._drop_add_residual([x], self.norm2, self._ffn_after_norm, self.ls2, False)[
                0
            ]
        if self.training and ratio > 0.0:
            x = x + self.drop_path1(self.ls1(self._attn_branch(x)))
            return x + self.drop_path2(self.ls2(self._ffn_branch(x)))
        x = _add_scaled(x, self.ls1, self._attn_branch(x))
        return _add_scaled(x, self.ls2, self._ffn_branch(x))

    def _attn_after_norm(self, normed: torch.Tensor, attn_bias: BlockDiagonalMask | None):
        return self.attn(normed) if attn_bias is None else self.attn(normed, attn_bias=attn_bias)

    def _ffn_after_norm(self, normed: torch.Tensor, attn_bias: BlockDiagonalMask | None):
        return self.mlp(normed)

    def _drop_add_residual(self, x_list, norm, branch, ls, packed: bool) -> list[torch.Tensor]:
        """One residual branch on a random subset of each group's samples: the kept rows gathered
        and normalised in one pass, the branch run once (packed with a block-diagonal mask, or as
        a batch for one group), each group updated in one pass with ``B_i / k_i`` and gamma."""
        draws = [get_branges_scales(x, self.sample_drop_ratio) for x in x_list]
        branges = [brange for brange, _ in draws]
        channels = x_list[0].shape[-1]
        normed = self._gathered_norm(norm, x_list, branges)  # [T, C]
        if packed:
            mask = _mask([(len(b), x.shape[1]) for b, x in zip(branges, x_list)])
            residuals = mask.split(branch(normed.view(1, -1, channels), mask))
        else:
            residuals = [branch(normed.view(len(branges[0]), -1, channels), None)]
        gamma = _layer_scale_gamma(ls)
        if gamma is None:
            residuals = [ls(r) for r in residuals]
        return [
            add_residual(x, brange, residual, scale, gamma, backend=self.backend)
            for x, (brange, scale), residual in zip(x_list, draws, residuals)
        ]

    def _gathered_norm(self, norm, x_list, branges) -> torch.Tensor:
        """``norm`` of the kept samples, packed ``[T, C]``: fused for our LayerNorm, else a
        gather then the module."""
        channels = x_list[0].shape[-1]
        fusable = (
            isinstance(norm, LayerNorm)
            and tuple(norm.normalized_shape) == (channels,)
            and x_list[0].dtype in FLOAT_DTYPES
        )
        if fusable:
            return index_select_layer_norm(
                x_list, branges, norm.weight, norm.bias, norm.eps, validate=False,
                backend=norm.backend,
            )  # fmt: skip
        flat = [x.flatten(1) for x in x_list]
        gathered = index_select_cat(flat, branges, validate=False, backend=self.backend)
        return norm(gathered.view(-1, channels))

    def forward_nested(self, x_list: list[torch.Tensor]) -> list[torch.Tensor]:
        """The packed multi-crop path; ``x_list``: groups ``[B_i, N_i, C]`` of one C, dtype and
        device. Returns the groups after the block, in order."""
        if not x_list:
            raise ValueError("x must hold at least one tensor, got an empty list")
        for i, t in enumerate(x_list):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"x[{i}] must be a [B, N, C] tensor, got {shape}")
            if t.shape[-1] != x_list[0].shape[-1] or t.dtype != x_list[0].dtype:
                raise ValueError(
                    f"x[{i}] must have x[0]'s channels and dtype ({x_list[0].shape[-1]}, "
                    f"{x_list[0].dtype}), got ({t.shape[-1]}, {t.dtype})"
                )
        if self.training and self.sample_drop_ratio > 0.0:
            x_list = self._drop_add_residual(
                x_list, self.norm1, self._attn_after_norm, self.ls1, True
            )
            return self._drop_add_residual(x_list, self.norm2, self._ffn_after_norm, self.ls2, True)
        attn_bias, x = get_attn_bias_and_cat(x_list, backend=self.backend)
        x = _add_scaled(x, self.ls1, self._attn_branch(x, attn_bias))
        x = _add_scaled(x, self.ls2, self._ffn_branch(x, attn_bias))
        return list(attn_bias.split(x))


NestedTensorBlock = Block
"""DINOv2's name for the block that also takes a list of crop groups; the same class here."""


def _add_scaled(x: torch.Tensor, ls: nn.Module, branch: torch.Tensor) -> torch.Tensor:
    """``x + ls(branch)``; with a foldable LayerScale one fused multiply-add (no ``γ·branch``
    intermediate): ``addcmul`` computes in x's dtype, the fp32 stream under autocast."""
    gamma = _layer_scale_gamma(ls)
    if gamma is None:
        return x + ls(branch)
    return torch.addcmul(x, branch, gamma)
