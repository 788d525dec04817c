"""k-NN evaluation of a backbone: the teacher's CLS features of a labelled train split against a
test split (DINO's weighted k-NN, :mod:`dinov2_fast.train.knn`). Used at the end of the demo and
by ``dinov2-fast eval knn``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from dinov2_fast.train.augment import IMAGENET_MEAN, IMAGENET_STD, to_rgb

__all__ = ["eval_transform", "evaluate_knn", "evaluate_knn_digits", "knn_splits"]


def eval_transform(image_size: int):
    """Resize the short side to ``image_size``, center crop, normalise (ImageNet statistics)."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.Lambda(to_rgb),
            v2.ToImage(),
            v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class _Transformed(Dataset):
    def __init__(self, dataset, transform) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return self.transform(image), int(label)


def evaluate_knn(
    backbone: nn.Module,
    train_set,
    test_set,
    *,
    image_size: int,
    device: torch.device | str = "cpu",
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int = 128,
    num_workers: int = 0,
) -> float:
    """Top-1 k-NN accuracy (%) of ``backbone(images)`` features; the sets yield (image, label)."""
    from dinov2_fast.train.knn import extract_features, knn_accuracy

    transform = eval_transform(image_size)
    device = torch.device(device)
    features = []
    was_training = backbone.training
    for split in (train_set, test_set):
        loader = DataLoader(
            _Transformed(split, transform),
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
        )
        features.append(extract_features(backbone, loader, device=device))
    backbone.train(was_training)
    (train_features, train_labels), (test_features, test_labels) = features
    return knn_accuracy(
        train_features, train_labels, test_features, test_labels, k=k, temperature=temperature
    )


def evaluate_knn_digits(backbone: nn.Module, *, image_size: int, **kwargs) -> float:
    """:func:`evaluate_knn` on scikit-learn's bundled digits (its fixed train/test split)."""
    from dinov2_fast.train.data import DigitsDataset

    return evaluate_knn(
        backbone,
        DigitsDataset("train"),
        DigitsDataset("test"),
        image_size=image_size,
        **kwargs,
    )


def knn_splits(root: str | Path | None, *, seed: int = 0, test_fraction: float = 0.2):
    """(train, test) labelled sets: the digits when ``root`` is None; ``root/train`` and
    ``root/val`` (or ``root/test``) when present; else one labelled folder split at random."""
    from dinov2_fast.train.data import DigitsDataset, ImageFolder

    if root is None:
        return DigitsDataset("train"), DigitsDataset("test")
    root = Path(root)
    test_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train, test = ImageFolder(root / "train"), ImageFolder(test_dir)
        _check_labelled(train, root / "train")
        _check_labelled(test, test_dir)
        return train, test
    folder = ImageFolder(root)
    _check_labelled(folder, root)
    order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = max(1, int(len(order) * test_fraction))
    return Subset(folder, order[cut:]), Subset(folder, order[:cut])


def _check_labelled(folder, root: Path) -> None:
    if min(folder.targets, default=-1) < 0:
        raise ValueError(
            f"{root} has no class subfolders: k-NN needs labels (<root>/<class>/<image>)"
        )
