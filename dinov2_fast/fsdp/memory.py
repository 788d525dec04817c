"""Memory per GPU of DINOv2 training state under each sharding choice, from parameter counts.

The model: AdamW on fp32 master weights, an fp32 EMA teacher of the same shape, bf16 compute with
the parameters gathered unit by unit (FSDP) and gradients reduced in fp32. Parameter counts come
from :mod:`dinov2_fast.models` built on the meta device (no memory, no weights) in DINOv2's
training configuration: patch 14, image 224, LayerScale, ``ffn_layer="mlp"`` (ViT-g:
"swiglufused").

What is counted, per GPU, with P parameters, S the shard group size (1, W, W or G), U the largest
FSDP unit (a block, or a head), R the root unit (patch embedding, tokens, final norm):

=============  ============  ================================================================
part           bytes         what it is
=============  ============  ================================================================
weights        4·P/S         fp32 master weights (the student), sharded
grads          4·P/S         fp32 gradients: FSDP keeps the reduced shards in the weights' dtype
AdamW          8·P/S         two fp32 states (exp_avg, exp_avg_sq)
teacher        4·P/S         the fp32 EMA copy, sharded like the student
gathered       see below     bf16 copies gathered for compute, and the unsharded gradient of the
                             unit being reduce-scattered (fp32)
=============  ============  ================================================================

gathered, by sharding choice:

- ``none`` (DDP-like replicas, bf16 autocast): 2·P, autocast's bf16 copies of all weights, cached
  through the forward and held for the backward.
- ``grad_op`` (``SHARD_GRAD_OP``, FSDP2 ``reshard_after_forward=False``): 2·P, every unit's bf16
  parameters, gathered in the forward and kept until its backward (the peak: the end of the
  forward), plus 4·U, one unit's unsharded fp32 gradient before its reduce-scatter.
- ``full`` (``FULL_SHARD``, FSDP2's default) and ``hybrid`` (HSDP, sharded within groups of G
  GPUs, replicated across groups): 2·(R + 2·U), the root (never resharded within a step) and two
  units (the one computing and the next one, prefetched), plus 4·U.

Not counted: activations (they depend on batch, crops, drop rate and activation checkpointing,
not on sharding; measure them with ``dinov2-fast bench model``), the teacher's transient gathered
copies (freed before the student's backward), communication buffers and allocator
fragmentation, the CUDA context (about 0.5 GB), and the data loader.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from dinov2_fast import models
from dinov2_fast.patch import vit_blocks

__all__ = [
    "ARCHS",
    "HEADS",
    "SHARDINGS",
    "MemoryEstimate",
    "ParameterCounts",
    "memory_per_gpu",
    "memory_table",
    "parameter_counts",
]

ARCHS = ("vit_small", "vit_base", "vit_large", "vit_giant2")
SHARDINGS = ("none", "grad_op", "full", "hybrid")
HEADS = ("none", "dino", "dino+ibot")

_LABELS = {
    "vit_small": "ViT-S/14",
    "vit_base": "ViT-B/14",
    "vit_large": "ViT-L/14",
    "vit_giant2": "ViT-g/14",
}
_FP32, _BF16 = 4, 2
_GB = 1e9


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a backbone (and heads): ``total``, ``units`` (each block's and each
    head's, the FSDP units below the root) and ``root`` (the rest: patch embedding, tokens,
    final norm)."""

    arch: str
    heads: str
    total: int
    units: tuple[int, ...]
    root: int


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@functools.cache
def parameter_counts(arch: str, heads: str = "none", img_size: int = 224) -> ParameterCounts:
    """Count the parameters of ``models.<arch>`` in DINOv2's training configuration (patch 14,
    LayerScale, "swiglufused" for ViT-g), built on the meta device, with ``heads``:

    - "none": the backbone alone;
    - "dino": one ``DINOHead(D, 65536)`` (DINOv2's default: DINO and iBOT share it);
    - "dino+ibot": ``DINOHead(D, 131072, bottleneck_dim=384)`` and a separate iBOT
      ``DINOHead(D, 131072)`` (the ViT-L/14 and ViT-g/14 training configs).

    ``img_size`` sizes ``pos_embed`` (224: training; 518: the hub checkpoints, e.g. ViT-L 304.37M).

    Raises:
        ValueError: an unknown ``arch`` or ``heads``, a bad ``img_size``.
    """
    _check_choice("arch", arch, ARCHS)
    _check_choice("heads", heads, HEADS)
    _positive_int("img_size", img_size)
    ffn = "swiglufused" if arch == "vit_giant2" else "mlp"
    with torch.device("meta"):
        backbone = getattr(models, arch)(
            patch_size=14, img_size=img_size, init_values=1e-5, ffn_layer=ffn, block_chunks=0
        )
        dim = backbone.embed_dim
        if heads == "dino":
            head_modules = [models.DINOHead(dim, 65536)]
        elif heads == "dino+ibot":
            head_modules = [
                models.DINOHead(dim, 131072, bottleneck_dim=384),
                models.DINOHead(dim, 131072),
            ]
        else:
            head_modules = []

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    blocks = [count(block) for _, block in vit_blocks(backbone)]
    head_counts = [count(head) for head in head_modules]
    backbone_total = count(backbone)
    return ParameterCounts(
        arch=arch,
        heads=heads,
        total=backbone_total + sum(head_counts),
        units=(*blocks, *head_counts),
        root=backbone_total - sum(blocks),
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of each part (see the module's docstring) and their ``total``."""

    arch: str
    heads: str
    sharding: str
    world_size: int
    shard_size: int
    params: int
    weights: float
    grads: float
    optimizer: float
    teacher: float
    gathered: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.teacher + self.gathered


def memory_per_gpu(
    arch: str,
    world_size: int,
    sharding: str = "full",
    *,
    heads: str = "none",
    hybrid_shard_size: int = 8,
    img_size: int = 224,
) -> MemoryEstimate:
    """Memory per GPU (bytes, in a :class:`MemoryEstimate`) of training ``arch`` on
    ``world_size`` GPUs with ``sharding``:

    - "none": replicas (DDP-like), nothing sharded;
    - "grad_op": weights, gradients and optimizer sharded over all GPUs, the bf16 parameters of
      every unit resident from its forward to its backward;
    - "full": everything sharded over all GPUs, two units' bf16 parameters gathered at a time;
    - "hybrid": as "full" within groups of ``hybrid_shard_size`` GPUs (G, e.g. the 8 GPUs of a
      node), replicated across groups; with fewer GPUs than G, sharded over all.

    Raises:
        ValueError: an unknown ``arch``, ``sharding`` or ``heads``; a ``world_size`` or
            ``hybrid_shard_size`` that is not a positive int, or a world size that is not a
            multiple of the hybrid shard size.
    """
    _check_choice("sharding", sharding, SHARDINGS)
    world_size = _positive_int("world_size", world_size)
    group = _positive_int("hybrid_shard_size", hybrid_shard_size)
    counts = parameter_counts(arch, heads, img_size)
    if sharding == "none":
        shards = 1
    elif sharding == "hybrid":
        shards = min(group, world_size)
        if world_size % shards:
            raise ValueError(
                f"world_size ({world_size}) must be a multiple of hybrid_shard_size ({group})"
            )
    else:
        shards = world_size
    total, unit = counts.total, max(counts.units)
    if sharding == "none":
        gathered = _BF16 * total
    elif sharding == "grad_op":
        gathered = _BF16 * total + _FP32 * unit
    else:
        gathered = _BF16 * (counts.root + 2 * unit) + _FP32 * unit
    return MemoryEstimate(
        arch=arch,
        heads=heads,
        sharding=sharding,
        world_size=world_size,
        shard_size=shards,
        params=total,
        weights=_FP32 * total / shards,
        grads=_FP32 * total / shards,
        optimizer=2 * _FP32 * total / shards,
        teacher=_FP32 * total / shards,
        gathered=gathered,
    )


def _gb(value: float) -> str:
    gb = value / _GB
    return "< 0.01" if 0 < gb < 0.005 else f"{gb:.2f}"


def memory_table(
    archs: tuple[str, ...] = ARCHS,
    world_sizes: tuple[int, ...] = (1, 8, 64),
    shardings: tuple[str, ...] = SHARDINGS,
    *,
    heads: str = "none",
    hybrid_shard_size: int = 8,
    img_size: int = 224,
) -> str:
    """:func:`memory_per_gpu` for every arch, sharding and world size, as a Markdown table (GB =
    1e9 bytes per GPU), one row per combination, ending with a newline.

    Raises:
        ValueError: as :func:`memory_per_gpu`.
    """
    header = (
        "| model | params | sharding | GPUs | weights | grads | AdamW | teacher | gathered "
        "| total |"
    )
    lines = [header, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arch in archs:
        for sharding in shardings:
            label = f"hybrid (G={hybrid_shard_size})" if sharding == "hybrid" else sharding
            for world_size in world_sizes:
                m = memory_per_gpu(
                    arch,
                    world_size,
                    sharding,
                    heads=heads,
                    hybrid_shard_size=hybrid_shard_size,
                    img_size=img_size,
                )
                cells = [
                    _LABELS[arch],
                    f"{m.params / 1e6:.1f}M",
                    label,
                    str(world_size),
                    *(_gb(v) for v in (m.weights, m.grads, m.optimizer, m.teacher, m.gathered)),
                    f"**{_gb(m.total)}**",
                ]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
