"""iBOT's block masking and DINOv2's multi-crop batch collation.

``MaskingGenerator`` masks random rectangles of patches (BEiT / iBOT block masking) until a
requested count is reached. ``collate_data_and_cast`` stacks a list of multi-crop samples into
DINOv2's batch dict: crops crop-major, masks for a ``mask_probability`` share of the global crops
with ratios spread evenly over ``mask_ratio_tuple``, the masked indices, per-token loss weights and
the static ``upperbound`` that sizes the trainer's head buffers. ``MultiCropCollate`` is the
picklable collate function for DataLoader workers: it seeds the masks from the batch's samples, so
a batch's masks are the same in every run, with any number of workers and after a resume.

All randomness comes from a ``torch.Generator`` passed in (never Python's or NumPy's global RNG).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .data import derive_seed

__all__ = ["MaskingGenerator", "MultiCropCollate", "collate_data_and_cast", "mask_upperbound"]


def _seed_from(generator: torch.Generator | None) -> int:
    """A 63-bit seed drawn from ``generator`` (torch's global RNG when None)."""
    return int(torch.randint(0, 2**63 - 1, (), generator=generator, dtype=torch.int64))


class MaskingGenerator:
    """Block masking of a ``height x width`` patch grid (BEiT / iBOT / DINOv2).

    Each call places random rectangles, of area uniform in ``[min_num_patches, remaining]``
    (capped by ``max_num_patches``) and aspect ratio log-uniform in ``[min_aspect, max_aspect]``,
    at most 10 tries per rectangle; a rectangle is kept when it masks between 1 and ``remaining``
    new patches. It stops when the requested count is reached or a rectangle makes no progress, so
    the count is at most the request and usually equal to it.

    Args:
        input_size: the patch grid, ``G`` or ``(height, width)``.
        num_masking_patches: the default count for ``__call__`` (0 when None).
        min_num_patches: smallest rectangle area tried.
        max_num_patches: largest rectangle area; None means half the grid (DINOv2's trainer
            intends ``0.5 * G * G``; its expression ``0.5 * img_size // patch_size * img_size //
            patch_size`` evaluates to 128 for a 14 x 14 grid, pass that to match it exactly).
        min_aspect, max_aspect: aspect ratio range (``max_aspect`` None means ``1 / min_aspect``).

    Raises:
        ValueError: a non-positive grid, ``min_aspect <= 0`` or ``max_aspect < min_aspect``.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        height, width = (int(s) for s in input_size)
        if height < 1 or width < 1:
            raise ValueError(f"input_size: expected positive sizes, got {input_size!r}")
        if min_aspect <= 0:
            raise ValueError(f"min_aspect: expected > 0, got {min_aspect}")
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if max_aspect < min_aspect:
            raise ValueError(f"max_aspect: expected >= min_aspect {min_aspect}, got {max_aspect}")
        self.height, self.width = height, width
        self.num_patches = height * width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = (
            0.5 * self.num_patches if max_num_patches is None else max_num_patches
        )
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size=({self.height}, {self.width}), "
            f"min_num_patches={self.min_num_patches}, max_num_patches={self.max_num_patches}, "
            f"log_aspect_ratio=({self.log_aspect_ratio[0]:.3f}, {self.log_aspect_ratio[1]:.3f}))"
        )

    def _mask(self, mask: np.ndarray, max_mask_patches: float, rng: random.Random) -> int:
        """Masks one rectangle in place; returns how many patches it newly masked (0: none)."""
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                window = mask[top : top + h, left : left + w]
                new = h * w - int(window.sum())
                if 0 < new <= max_mask_patches:
                    window[...] = True
                    delta += new
            if delta > 0:
                break
        return delta

    def __call__(
        self, num_masking_patches: int | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A mask of at most ``num_masking_patches`` patches: torch.bool ``[height, width]``.

        One 63-bit seed is drawn from ``generator`` (torch's global RNG when None) per call with
        a non-zero count, and the rectangles come from a ``random.Random`` seeded with it, so the
        result is a function of the generator's state. A count of 0 draws nothing.

        Raises:
            ValueError: a count below 0 or above the grid's size.
        """
        if num_masking_patches is None:
            num_masking_patches = self.num_masking_patches or 0
        num_masking_patches = int(num_masking_patches)
        if not 0 <= num_masking_patches <= self.num_patches:
            raise ValueError(
                f"num_masking_patches: expected 0 to {self.num_patches} for a "
                f"{self.height}x{self.width} grid, got {num_masking_patches}"
            )
        mask = np.zeros((self.height, self.width), dtype=bool)
        if num_masking_patches > 0:
            rng = random.Random(_seed_from(generator))
            count = 0
            while count < num_masking_patches:
                limit = min(num_masking_patches - count, self.max_num_patches)
                delta = self._mask(mask, limit, rng)
                if delta == 0:
                    break
                count += delta
        return torch.from_numpy(mask)


def mask_upperbound(
    n_global_crops: int, n_tokens: int, mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5
) -> int:
    """DINOv2's ``upperbound``: the most masked tokens a batch of ``n_global_crops`` can have.

    ``sum(int(N * probs[i + 1]) for i < n_masked)`` with ``n_masked = int(2B * p)`` and
    ``probs = torch.linspace(min, max, n_masked + 1)`` in float32, as DINOv2 computes it
    (3771 for 2B=128, N=196; 2496 for 64 and 256; 967 for 24 and 256).
    """
    n_masked = int(n_global_crops * mask_probability)
    probs = torch.linspace(*mask_ratio_tuple, n_masked + 1)
    return sum(int(n_tokens * probs[i + 1]) for i in range(n_masked))


def _unpack(sample: Any) -> tuple[Mapping[str, Any], Any]:
    """(crops dict, label or None) from our dict samples or DINOv2's ``(crops, target)`` tuples."""
    if isinstance(sample, Mapping):
        return sample, sample.get("label")
    if isinstance(sample, Sequence) and len(sample) == 2 and isinstance(sample[0], Mapping):
        return sample[0], sample[1]
    raise TypeError(
        "samples: expected dicts with 'global_crops' and 'local_crops' (as SSLDataset returns) "
        f"or (dict, label) pairs, got {type(sample).__name__}"
    )


def collate_data_and_cast(
    samples: Sequence[Any],
    *,
    mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    dtype: torch.dtype | None = None,
    n_tokens: int,
    mask_generator: MaskingGenerator,
    generator: torch.Generator | None = None,
) -> dict[str, Any]:
    """DINOv2's batch from B multi-crop samples.

    Args:
        samples: dicts ``{"global_crops": [G x [3, H, W]], "local_crops": [L x [3, h, w]],
            "label"?: int, "unreadable"?: {path: error}}`` (``SSLDataset``'s items), or DINOv2's
            ``(crops dict, label)`` pairs.
        mask_ratio_tuple: (min, max) masked share of a masked crop's tokens.
        mask_probability: share of the G·B global crops that get a mask.
        dtype: the crops' dtype (None keeps it).
        n_tokens: N, patch tokens per global crop; must equal the mask generator's grid size.
        mask_generator: draws each mask.
        generator: all randomness (mask ratios, rectangles, order); None uses torch's global RNG.

    Returns a dict:
        ``collated_global_crops`` ``[G·B, 3, H, W]`` crop-major (all samples' crop 0, then crop 1);
        ``collated_local_crops`` ``[L·B, 3, h, w]`` crop-major (``[0, 3, 0, 0]`` when L = 0);
        ``collated_masks`` bool ``[G·B, N]``: ``n = int(G·B·mask_probability)`` crops masked, crop
        ``i < n`` with ``int(N·U(probs[i], probs[i+1]))`` patches (``probs`` = ``linspace(min,
        max, n + 1)``), the rest unmasked, then shuffled over the G·B crops;
        ``mask_indices_list`` int64 ``[M]``: flat indices of the masked tokens in ``[G·B·N]``;
        ``masks_weight`` float32 ``[M]``: ``1 / (masked tokens of its crop)`` per masked token;
        ``upperbound`` int: ``mask_upperbound(G·B, N, ...)`` >= M, constant for a batch size;
        ``n_masked_patches`` int64 ``[1]``: M;
        ``labels`` int64 ``[B]`` when every sample carries a label;
        ``unreadable`` ``{path: error}`` when samples carry it (files skipped while loading).

    Raises:
        ValueError: no samples, inconsistent crop counts, ``n_tokens`` not the mask grid's size,
            ratios or probability out of ``[0, 1]``.
    """
    if len(samples) == 0:
        raise ValueError("samples: expected at least one sample, got an empty batch")
    lo, hi = (float(r) for r in mask_ratio_tuple)
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(
            f"mask_ratio_tuple: expected 0 <= min <= max <= 1, got {tuple(mask_ratio_tuple)}"
        )
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability: expected a value in [0, 1], got {mask_probability}")
    if n_tokens != mask_generator.num_patches:
        raise ValueError(
            f"n_tokens: expected the mask generator's {mask_generator.height}x"
            f"{mask_generator.width} = {mask_generator.num_patches} patches, got {n_tokens}"
        )
    crops, labels = zip(*(_unpack(s) for s in samples))
    n_global = len(crops[0]["global_crops"])
    n_local = len(crops[0]["local_crops"])
    for c in crops:
        if len(c["global_crops"]) != n_global or len(c["local_crops"]) != n_local:
            raise ValueError(
                f"samples: expected {n_global} global and {n_local} local crops in every sample, "
                f"got {len(c['global_crops'])} and {len(c['local_crops'])}"
            )
    if n_global < 1:
        raise ValueError("samples: expected at least one global crop per sample")

    def stack(key: str, n: int) -> torch.Tensor:
        out = torch.stack([c[key][i] for i in range(n) for c in crops])
        return out if dtype is None else out.to(dtype)

    global_crops = stack("global_crops", n_global)
    if n_local > 0:
        local_crops = stack("local_crops", n_local)
    else:
        local_crops = torch.empty(0, global_crops.shape[1], 0, 0, dtype=global_crops.dtype)

    n_crops = global_crops.shape[0]
    n_masked = int(n_crops * mask_probability)
    probs = torch.linspace(lo, hi, n_masked + 1)  # float32, as DINOv2
    masks = []
    for i in range(n_masked):
        p_min, p_max = float(probs[i]), float(probs[i + 1])
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        masks.append(mask_generator(int(n_tokens * (p_min + (p_max - p_min) * u)), generator))
    empty = torch.zeros(mask_generator.get_shape(), dtype=torch.bool)
    masks.extend(empty for _ in range(n_masked, n_crops))
    order = torch.randperm(n_crops, generator=generator)
    collated_masks = torch.stack([masks[j] for j in order.tolist()]).flatten(1)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    masks_weight = (
        (1.0 / collated_masks.sum(-1, dtype=torch.float32).clamp(min=1.0))
        .unsqueeze(-1)
        .expand_as(collated_masks)[collated_masks]
    )
    out: dict[str, Any] = {
        "collated_global_crops": global_crops,
        "collated_local_crops": local_crops,
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": mask_upperbound(n_crops, n_tokens, (lo, hi), mask_probability),
        "n_masked_patches": torch.full((1,), mask_indices_list.shape[0], dtype=torch.long),
    }
    if all(label is not None for label in labels):
        out["labels"] = torch.as_tensor([int(label) for label in labels], dtype=torch.long)
    if any(isinstance(c, Mapping) and "unreadable" in c for c in crops):
        unreadable: dict[str, str] = {}
        for c in crops:
            unreadable.update(c.get("unreadable") or {})
        out["unreadable"] = unreadable
    return out


class MultiCropCollate:
    """A picklable ``collate_fn`` for DataLoader workers: ``collate_data_and_cast`` with its
    generator seeded from the batch's item seeds.

    Every sample must carry ``"seed"`` (``SSLDataset`` sets it from ``(seed, epoch, index)``);
    the masks are then a function of the batch's items only, identical across runs, worker counts
    and resumes.

    Args:
        mask_generator: the ``MaskingGenerator`` of the global crops' patch grid (N = its size).
        mask_ratio_tuple, mask_probability, dtype: as ``collate_data_and_cast``.
        n_tokens: optional; checked against the mask generator's grid (N is taken from it).
        seed: mixed into every batch's seed (e.g. to decorrelate masks from the augmentation).

    Raises:
        ValueError: ``n_tokens`` that is not the grid's size; on call, a sample without ``"seed"``.
    """

    def __init__(
        self,
        mask_generator: MaskingGenerator,
        *,
        mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
        mask_probability: float = 0.5,
        dtype: torch.dtype | None = None,
        n_tokens: int | None = None,
        seed: int = 0,
    ) -> None:
        if n_tokens is not None and n_tokens != mask_generator.num_patches:
            raise ValueError(
                f"n_tokens: expected the mask generator's {mask_generator.height}x"
                f"{mask_generator.width} = {mask_generator.num_patches} patches, got {n_tokens}"
            )
        self.mask_generator = mask_generator
        self.n_tokens = mask_generator.num_patches
        self.mask_ratio_tuple = tuple(mask_ratio_tuple)
        self.mask_probability = mask_probability
        self.dtype = dtype
        self.seed = seed

    def __call__(self, samples: Sequence[Any]) -> dict[str, Any]:
        seeds = []
        for s in samples:
            crops = _unpack(s)[0]
            if "seed" not in crops:
                raise ValueError(
                    "MultiCropCollate: every sample needs a 'seed' (SSLDataset adds it); "
                    "use collate_data_and_cast with a generator otherwise"
                )
            seeds.append(int(crops["seed"]))
        generator = torch.Generator().manual_seed(derive_seed("collate", self.seed, *seeds))
        return collate_data_and_cast(
            samples,
            mask_ratio_tuple=self.mask_ratio_tuple,
            mask_probability=self.mask_probability,
            dtype=self.dtype,
            n_tokens=self.n_tokens,
            mask_generator=self.mask_generator,
            generator=generator,
        )
