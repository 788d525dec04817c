"""DINO's weighted k-NN classifier on frozen features: feature extraction and top-1 accuracy.

Each test feature votes with its ``k`` most cosine-similar train features, each weighted by
``exp(similarity / temperature)``, for the neighbour's class; the class with the largest total is
the prediction (DINO's ``knn_classifier``; DINOv2's softmax of the same values gives the same
argmax).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["extract_features", "knn_accuracy"]


def _images_and_labels(batch: Any) -> tuple[torch.Tensor, Any]:
    if isinstance(batch, Mapping):
        images = batch.get("images", batch.get("image"))
        labels = batch.get("labels", batch.get("label"))
        if images is not None and labels is not None:
            return images, labels
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        "loader: expected batches of (images, labels) or dicts with 'images' and 'labels', got "
        f"{type(batch).__name__}"
    )


def extract_features(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features of every image in ``loader``, and their labels.

    Args:
        model: called as ``model(images)`` and returning CLS features ``[B, D]``; run in eval mode
            under ``torch.no_grad`` (its train/eval mode is restored afterwards).
        loader: yields ``(images [B, 3, H, W], labels [B])`` or dicts with ``images``/``labels``.
        device: where the model runs and the results stay.
        dtype: run the model under ``torch.autocast`` with this dtype (None or float32: no
            autocast).

    Returns:
        ``features`` float32 ``[n, D]`` with unit rows and ``labels`` int64 ``[n]``, on ``device``.

    Raises:
        ValueError: the loader is empty, or the model does not return ``[B, D]``.
        TypeError: a batch of another kind.
    """
    device = torch.device(device)
    autocast = dtype is not None and dtype != torch.float32
    was_training = model.training
    model.eval()
    features, labels = [], []
    try:
        with torch.no_grad():
            for batch in loader:
                images, targets = _images_and_labels(batch)
                images = images.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                    out = model(images)
                if not isinstance(out, torch.Tensor) or out.dim() != 2:
                    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out)
                    raise ValueError(f"model: expected CLS features [B, D], got {shape}")
                features.append(F.normalize(out.float(), dim=-1))
                labels.append(torch.as_tensor(targets, dtype=torch.long).to(device))
    finally:
        model.train(was_training)
    if not features:
        raise ValueError("loader: expected at least one batch, got none")
    return torch.cat(features), torch.cat(labels)


def _check_split(name: str, features: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(features, torch.Tensor) or features.dim() != 2 or features.shape[0] == 0:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features)
        raise ValueError(f"{name}_features: expected a non-empty [n, D] tensor, got {shape}")
    if not features.is_floating_point():
        raise TypeError(f"{name}_features: expected a floating tensor, got {features.dtype}")
    if not isinstance(labels, torch.Tensor) or labels.shape != features.shape[:1]:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels)
        raise ValueError(
            f"{name}_labels: expected [{features.shape[0]}] to match {name}_features, got {shape}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"{name}_labels: expected an integer tensor, got {labels.dtype}")
    if int(labels.min()) < 0:
        raise ValueError(
            f"{name}_labels: expected class indices >= 0, got {int(labels.min())} "
            "(unlabelled images cannot be scored)"
        )


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int | None = None,
) -> float:
    """Top-1 accuracy (percent) of DINO's weighted k-NN classifier.

    Args:
        train_features: ``[n_train, D]``; rows are L2-normalised here (cosine similarity).
        train_labels: integer ``[n_train]``, class indices >= 0.
        test_features: ``[n_test, D]``, moved to the train features' device.
        test_labels: integer ``[n_test]``.
        k: neighbours per test row. Larger than ``n_train``: clamped to ``n_train`` with a
            ``UserWarning`` (every train row votes).
        temperature: the votes' ``exp(similarity / temperature)`` weights.
        num_classes: the number of classes (default: largest label + 1).
        chunk_size: test rows per similarity block (default: about 2^24 similarities a block),
            so memory stays bounded for any test set.

    Ties between classes go to the smallest class index.

    Raises:
        ValueError: features not ``[n, D]`` or empty, widths or label lengths that differ,
            negative labels, ``k < 1``, ``temperature <= 0``, ``num_classes`` not above every
            label.
        TypeError: non-floating features or non-integer labels.
    """
    _check_split("train", train_features, train_labels)
    _check_split("test", test_features, test_labels)
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"test_features: expected width {train_features.shape[1]} like train_features, "
            f"got {test_features.shape[1]}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected an int >= 1, got {k!r}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    n_train = train_features.shape[0]
    if k > n_train:
        warnings.warn(
            f"knn_accuracy: k={k} is larger than the {n_train} train features; using k={n_train}",
            stacklevel=2,
        )
        k = n_train
    largest = max(int(train_labels.max()), int(test_labels.max()))
    if num_classes is None:
        num_classes = largest + 1
    elif num_classes <= largest:
        raise ValueError(
            f"num_classes: expected more than the largest label {largest}, got {num_classes}"
        )

    device = train_features.device
    train = F.normalize(train_features.float(), dim=-1)
    train_labels = train_labels.to(device=device, dtype=torch.long)
    test = F.normalize(test_features.to(device).float(), dim=-1)
    test_labels = test_labels.to(device=device, dtype=torch.long)
    if chunk_size is None:
        chunk_size = max(1, (1 << 24) // n_train)
    correct = 0
    for start in range(0, test.shape[0], chunk_size):
        block = test[start : start + chunk_size]
        similarity, neighbours = (block @ train.T).topk(k, dim=1)  # [c, k]
        weights = (similarity / temperature).exp()
        votes = torch.zeros(block.shape[0], num_classes, device=device)
        votes.scatter_add_(1, train_labels[neighbours], weights)
        correct += int((votes.argmax(dim=1) == test_labels[start : start + chunk_size]).sum())
    return 100.0 * correct / test.shape[0]
