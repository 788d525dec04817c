"""The trainer's data: image datasets, a seeded multi-crop wrapper, an infinite sharded sampler and
the DataLoader.

Reproducibility: every random choice is a function of ``(seed, epoch, index)``.
``InfiniteShardedSampler`` yields ``(epoch, index)`` pairs from per-epoch permutations of
``(seed, epoch)``; ``SSLDataset`` seeds torch's and Python's RNGs from ``(seed, epoch, index)``
before augmenting and passes the item's seed on, so ``MultiCropCollate`` can seed the masks from
the batch. The same steps therefore see the same crops and masks with any number of workers and
after a resume (``start = step * batch_size_per_rank``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "DigitsDataset",
    "ImageFolder",
    "InfiniteShardedSampler",
    "SSLDataset",
    "SyntheticDataset",
    "UnreadableImageWarning",
    "derive_seed",
    "make_data_loader",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".pgm",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
)

# What PIL raises for a missing, truncated, corrupt or hostile file.
_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def derive_seed(*values: int | str) -> int:
    """A 63-bit seed from a tuple of ints and strings: stable across runs, processes, platforms
    and library versions (BLAKE2b of its repr), and unrelated for different tuples."""
    digest = hashlib.blake2b(repr(tuple(values)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class UnreadableImageWarning(UserWarning):
    """An image file could not be read and was skipped."""


def _load_rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")  # decodes fully: truncated files raise here


class ImageFolder(torch.utils.data.Dataset):
    """The images under ``root``, recursively, with labels from the first-level subfolders.

    When ``root`` has subfolders holding images, ``classes`` are their sorted names and an image's
    label is its first-level subfolder's index; images directly in ``root`` are then labelled -1,
    as are all images when there are no such subfolders (``classes == []``). Files are sorted by
    path, so indices are stable.

    ``__getitem__(i)`` returns ``(image, label)``: an RGB PIL image (grayscale, RGBA and palette
    files converted), passed through ``transform`` when given. A file that cannot be read is never
    skipped silently: it is recorded in ``unreadable`` (path -> error), reported once with an
    ``UnreadableImageWarning``, and the next readable item (``i + 1``, ``i + 2``, ... wrapping
    around) is returned in its place, so a batch keeps its size and the choice is deterministic.
    DataLoader workers record into their own copies; ``SSLDataset`` carries each item's new
    records into the batch (``"unreadable"``) for the trainer's report. ``verify=True`` reads every
    file at construction and drops the unreadable ones up front (recorded the same way).

    Args:
        root: the folder.
        transform: applied to each PIL image.
        extensions: file name endings (case-insensitive) that count as images.
        verify: read every file now (slow for large folders).

    Raises:
        FileNotFoundError: ``root`` does not exist, or holds no file with one of ``extensions``.
        NotADirectoryError: ``root`` is not a folder.
        RuntimeError: every file is unreadable.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        transform: Callable[[Image.Image], Any] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        verify: bool = False,
    ) -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"ImageFolder: the folder {str(self.root)!r} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"ImageFolder: {str(self.root)!r} is not a folder")
        self.transform = transform
        self.extensions = tuple(e.lower() for e in extensions)
        files: list[Path] = []
        for folder, dirs, names in os.walk(self.root, followlinks=True):
            dirs.sort()
            files.extend(
                Path(folder, n) for n in sorted(names) if n.lower().endswith(self.extensions)
            )
        files.sort()
        if not files:
            raise FileNotFoundError(
                f"ImageFolder: no images under {str(self.root)!r} (looked for files ending in "
                f"{', '.join(self.extensions)})"
            )
        first_level = [f.relative_to(self.root).parts for f in files]
        self.classes: list[str] = sorted({p[0] for p in first_level if len(p) > 1})
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = [
            (str(f), self.class_to_idx[p[0]] if len(p) > 1 else -1)
            for f, p in zip(files, first_level)
        ]
        self.unreadable: dict[str, str] = {}
        if verify:
            self.verify()

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    @property
    def unreadable_count(self) -> int:
        """How many files this copy of the dataset found unreadable."""
        return len(self.unreadable)

    def __len__(self) -> int:
        return len(self.samples)

    def _record(self, path: str, error: BaseException) -> None:
        message = f"{type(error).__name__}: {error}"
        self.unreadable[path] = message
        warnings.warn(
            f"ImageFolder: skipping unreadable image {path!r} ({message})",
            UnreadableImageWarning,
            stacklevel=3,
        )

    def verify(self) -> dict[str, str]:
        """Reads every file; drops and records the unreadable ones. Returns ``unreadable``."""
        kept = []
        for path, label in self.samples:
            try:
                _load_rgb(path)
            except _READ_ERRORS as error:
                self._record(path, error)
            else:
                kept.append((path, label))
        if not kept:
            raise RuntimeError(
                f"ImageFolder: none of the images under {str(self.root)!r} can be read"
            )
        self.samples = kept
        return self.unreadable

    def __getitem__(self, index: int) -> tuple[Any, int]:
        n = len(self.samples)
        if not -n <= index < n:
            raise IndexError(f"ImageFolder: index {index} out of range for {n} images")
        for step in range(n):
            path, label = self.samples[(index + step) % n]
            if path in self.unreadable:
                continue
            try:
                image = _load_rgb(path)
            except _READ_ERRORS as error:
                self._record(path, error)
                continue
            return (self.transform(image) if self.transform else image), label
        raise RuntimeError(f"ImageFolder: none of the images under {str(self.root)!r} can be read")


class DigitsDataset(torch.utils.data.Dataset):
    """scikit-learn's bundled handwritten digits, upscaled: the default data, no download needed.

    The data: 1797 labelled 8x8 grey images (values 0..16) of the digits 0-9, the test part of the
    UCI "Optical Recognition of Handwritten Digits" data set (Alpaydin and Kaynak, 1998), shipped
    inside scikit-learn (``sklearn/datasets/data/digits.csv.gz``, read by
    ``sklearn.datasets.load_digits`` from the installed package; scikit-learn is BSD-3-Clause
    licensed; the UCI data is CC BY 4.0).

    Each image is scaled to 0..255 and upscaled to ``image_size`` with bicubic interpolation (smooth
    strokes rather than 8x8 blocks, so crops and patches see shapes), as an RGB PIL image.

    The split is fixed and deterministic: per class, the images are ordered by a hash of their
    index and the first 20% (rounded) go to ``"test"``, the rest to ``"train"`` (1438 / 359);
    ``"all"`` is all 1797 in file order.

    ``__getitem__(i)`` returns ``(image, label)``: the PIL image (through ``transform`` if given)
    and an int in 0..9. ``targets`` lists the labels, ``classes`` the names ``"0"``..``"9"``.

    Raises:
        ValueError: an unknown split or ``image_size < 1``.
    """

    TEST_FRACTION = 0.2

    def __init__(
        self,
        split: str = "train",
        *,
        image_size: int = 32,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        if split not in ("train", "test", "all"):
            raise ValueError(f"split: expected 'train', 'test' or 'all', got {split!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size: expected a positive int, got {image_size!r}")
        from sklearn.datasets import load_digits  # the train extra; imported only when used

        digits = load_digits()
        images = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        targets = digits.target.astype(np.int64)
        indices = self.split_indices(targets)[split]
        self.split = split
        self.image_size = image_size
        self.transform = transform
        self.classes = [str(c) for c in range(10)]
        self.targets: list[int] = [int(targets[i]) for i in indices]
        self.indices = indices  # positions in load_digits()'s order
        self.images = np.stack(
            [
                np.asarray(
                    Image.fromarray(images[i], mode="L").resize(
                        (image_size, image_size), Image.Resampling.BICUBIC
                    )
                )
                for i in indices
            ]
        )  # uint8 [n, S, S]

    @classmethod
    def split_indices(cls, targets: np.ndarray) -> dict[str, list[int]]:
        """The fixed split: ``{"train", "test", "all"}`` -> sorted indices into ``targets``."""
        test: list[int] = []
        for c in np.unique(targets):
            members = sorted(
                np.flatnonzero(targets == c).tolist(), key=lambda i: derive_seed("digits", i)
            )
            test.extend(members[: round(cls.TEST_FRACTION * len(members))])
        test_set = set(test)
        return {
            "train": [i for i in range(len(targets)) if i not in test_set],
            "test": sorted(test_set),
            "all": list(range(len(targets))),
        }

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.images[index], mode="L").convert("RGB")
        return (self.transform(image) if self.transform else image), self.targets[index]


class SyntheticDataset(torch.utils.data.Dataset):
    """Random images for benchmarking: ``(uint8 tensor [3, H, W], label)``, a pure function of
    ``(seed, index)``. Cheap (no decoding); nothing to learn.

    Raises:
        ValueError: ``length < 1``, a non-positive size or ``num_classes < 1``.
    """

    def __init__(
        self,
        length: int,
        image_size: int | tuple[int, int],
        *,
        num_classes: int = 1000,
        seed: int = 0,
    ) -> None:
        if length < 1:
            raise ValueError(f"length: expected >= 1, got {length}")
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size: expected a positive int or (H, W), got {image_size!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes: expected >= 1, got {num_classes}")
        self.length = length
        self.image_size = (int(size[0]), int(size[1]))
        self.num_classes = num_classes
        self.seed = seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(f"SyntheticDataset: index {index} out of range for {self.length}")
        g = torch.Generator().manual_seed(derive_seed("synthetic", self.seed, index))
        label = int(torch.randint(self.num_classes, (), generator=g))
        image = torch.randint(0, 256, (3, *self.image_size), dtype=torch.uint8, generator=g)
        return image, label


class SSLDataset(torch.utils.data.Dataset):
    """Multi-crop views of a labelled dataset, a pure function of ``(seed, epoch, index)``.

    ``__getitem__`` takes an ``(epoch, index)`` pair (what ``InfiniteShardedSampler`` yields) or a
    plain index (then the epoch is the one set with ``set_epoch``, 0 by default; note that a
    ``set_epoch`` in the main process does not reach persistent workers, so prefer the pairs).
    It draws ``item_seed = derive_seed(seed, epoch, index)``, seeds torch's CPU generator and
    Python's ``random`` with it, applies ``transform`` to the base item's image, and restores both
    RNG states afterwards (so the caller's random stream is untouched when ``num_workers=0``).

    Returns ``{"global_crops": [...], "local_crops": [...], "label": int, "seed": int,
    "unreadable": {path: error}}`` (the crops from ``transform``, e.g. ``MultiCropAugmentation``;
    ``"unreadable"``: files the base dataset newly found unreadable while fetching this item,
    usually empty).

    Raises:
        TypeError: the transform does not return a dict with ``global_crops``.
    """

    def __init__(self, dataset: Any, transform: Callable[[Any], dict], *, seed: int) -> None:
        self.dataset = dataset
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def item_seed(self, epoch: int, index: int) -> int:
        return derive_seed("ssl", self.seed, epoch, index)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(item, (tuple, list)):
            epoch, index = (int(v) for v in item)
        else:
            epoch, index = self.epoch, int(item)
        seen = getattr(self.dataset, "unreadable", None)
        n_seen = len(seen) if seen is not None else 0
        image, label = self.dataset[index]
        seed = self.item_seed(epoch, index)
        python_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)  # CPU only: CUDA's RNG is not touched
                random.seed(seed)
                crops = self.transform(image)
        finally:
            random.setstate(python_state)
        if not isinstance(crops, dict) or "global_crops" not in crops:
            raise TypeError(
                "SSLDataset: transform must return a dict with 'global_crops' and 'local_crops' "
                f"(like MultiCropAugmentation), got {type(crops).__name__}"
            )
        new = dict(list(seen.items())[n_seen:]) if seen is not None and len(seen) > n_seen else {}
        return {**crops, "label": int(label), "seed": seed, "unreadable": new}


class InfiniteShardedSampler(torch.utils.data.Sampler):
    """An endless stream of ``(epoch, index)`` pairs for one rank (DINOv2's sharded infinite
    sampler, made resumable).

    The global stream is the concatenation of per-epoch permutations of ``range(length)``, epoch
    ``e``'s from ``derive_seed(seed, e)``; rank ``r`` takes global positions ``r, r + W, r + 2W,
    ...`` (``W = world_size``), so the ranks' streams are disjoint and together cover every epoch
    exactly. Iteration starts at this rank's position ``start``: a run resumed at step ``s`` with
    ``b`` samples per rank and step passes ``start = s * b`` and continues exactly where it stopped.

    Yields ``(epoch, index)`` (``SSLDataset`` accepts the pair and seeds the augmentation with the
    epoch); ``with_epoch=False`` yields the plain index for other datasets.

    Raises:
        ValueError: ``length < 1``, ``world_size < 1``, a rank outside ``[0, world_size)`` or
            ``start < 0``.
    """

    def __init__(
        self,
        length: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        with_epoch: bool = True,
    ) -> None:
        if length < 1:
            raise ValueError(f"length: expected >= 1, got {length}")
        if world_size < 1:
            raise ValueError(f"world_size: expected >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
        if start < 0:
            raise ValueError(f"start: expected >= 0, got {start}")
        self.length = length
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.start = start
        self.with_epoch = with_epoch

    def permutation(self, epoch: int) -> torch.Tensor:
        """Epoch ``epoch``'s order of the whole dataset: int64 ``[length]``."""
        g = torch.Generator().manual_seed(derive_seed("sampler", self.seed, epoch))
        return torch.randperm(self.length, generator=g)

    def epoch_at(self, position: int) -> int:
        """The epoch of this rank's ``position``-th sample."""
        return (position * self.world_size + self.rank) // self.length

    def __iter__(self) -> Iterator[tuple[int, int] | int]:
        epoch, offset = divmod(self.start * self.world_size + self.rank, self.length)
        perm = self.permutation(epoch).numpy()
        while True:
            index = int(perm[offset])
            yield (epoch, index) if self.with_epoch else index
            offset += self.world_size
            if offset >= self.length:
                skip, offset = divmod(offset, self.length)
                epoch += skip
                perm = self.permutation(epoch).numpy()


def make_data_loader(
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    sampler: torch.utils.data.Sampler | None,
    collate_fn: Callable[[list[Any]], Any] | None,
    drop_last: bool = True,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader that keeps the GPU fed.

    With ``num_workers > 0``: worker processes stay alive across iterators
    (``persistent_workers`` defaults to True) and each keeps ``prefetch_factor`` batches ready
    (default 4). ``pin_memory`` pins batches in page-locked memory (for ``non_blocking`` copies)
    when CUDA is available and is ignored otherwise (logged). ``num_workers=0`` loads in the main
    process (tests, CI). ``sampler=None`` reads the dataset in order.

    Raises:
        ValueError: ``batch_size < 1``, ``num_workers < 0``, or ``persistent_workers`` /
            ``prefetch_factor`` given with ``num_workers=0``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers: expected >= 0, got {num_workers}")
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = True if persistent_workers is None else persistent_workers
        kwargs["prefetch_factor"] = 4 if prefetch_factor is None else prefetch_factor
    elif persistent_workers or prefetch_factor is not None:
        raise ValueError(
            "persistent_workers and prefetch_factor need num_workers > 0, got num_workers=0"
        )
    if pin_memory and not torch.cuda.is_available():
        logger.info("make_data_loader: no CUDA device, so batches are not pinned")
        pin_memory = False
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        drop_last=drop_last,
        # The loader draws its workers' base seed from this generator, not from torch's global
        # RNG: making an iterator must not move the stream the training step draws from.
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
