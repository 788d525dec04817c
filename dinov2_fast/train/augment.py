"""DINOv2's multi-crop augmentation (``DataAugmentationDINO``) with torchvision's v2 transforms.

Two global crops and ``local_crops_number`` local crops per image, each an independent random
view: random resized crop (bicubic) and horizontal flip, colour jitter, random grayscale,
Gaussian blur (probability 1.0 on global crop 1, 0.1 on global crop 2, 0.5 on each local crop),
solarization (global crop 2 only), then ``[0, 1]`` scaling and ImageNet normalisation.

The randomness comes from torch's global RNG (torchvision draws from it); ``SSLDataset`` in
``dinov2_fast.train.data`` seeds it per sample, which makes the views a pure function of
``(seed, epoch, index)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MultiCropAugmentation", "to_rgb"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_rgb(image: Image.Image | torch.Tensor) -> Image.Image | tv_tensors.Image:
    """An RGB PIL image, or a uint8 ``tv_tensors.Image`` ``[3, H, W]``, from either input kind.

    PIL images in any mode (``L``, ``RGBA``, ``P``, ``I;16``, ...) are converted with
    ``Image.convert("RGB")``. Tensors must be uint8 ``[H, W]``, ``[1, H, W]``, ``[3, H, W]`` or
    ``[4, H, W]`` (alpha is dropped; one channel is repeated three times).

    Raises:
        TypeError: neither a PIL image nor a tensor, or a tensor that is not uint8.
        ValueError: a tensor of another shape.
    """
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if not isinstance(image, torch.Tensor):
        raise TypeError(
            f"image: expected a PIL image or a uint8 tensor, got {type(image).__name__}"
        )
    if image.dtype != torch.uint8:
        raise TypeError(f"image: expected a uint8 tensor, got dtype {image.dtype}")
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(
            f"image: expected a uint8 tensor [H, W] or [C, H, W] with C in (1, 3, 4), "
            f"got shape {tuple(image.shape)}"
        )
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    elif image.shape[0] == 4:
        image = image[:3]
    return tv_tensors.Image(image.contiguous())


def _check_scale(name: str, scale: Sequence[float]) -> tuple[float, float]:
    if len(scale) != 2 or not 0.0 < float(scale[0]) <= float(scale[1]) <= 1.0:
        raise ValueError(f"{name}: expected (min, max) with 0 < min <= max <= 1, got {scale!r}")
    return float(scale[0]), float(scale[1])


def _check_size(name: str, size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"{name}: expected a positive int, got {size!r}")
    return size


def _maybe(transform: v2.Transform, p: float) -> v2.Transform:
    """``transform`` applied with probability ``p`` (itself when p == 1)."""
    return transform if p >= 1.0 else v2.RandomApply([transform], p=p)


class MultiCropAugmentation:
    """DINOv2's multi-crop views of one image.

    Args:
        global_crops_scale: area fraction range of the two global crops.
        local_crops_scale: area fraction range of the local crops.
        local_crops_number: local crops per image (0 allowed).
        global_crops_size: side of the square global crops, pixels.
        local_crops_size: side of the square local crops, pixels.
        mean, std: per-channel normalisation after scaling to ``[0, 1]``.

    ``__call__(image)`` takes a PIL image (any mode; converted to RGB) or a uint8 tensor
    (``[H, W]`` or ``[C, H, W]``, C in 1, 3, 4) and returns
    ``{"global_crops": [2 x float32 [3, G, G]], "local_crops": [n x float32 [3, L, L]]}``,
    plain ``torch.Tensor``s. PIL inputs are transformed as PIL images until the final
    conversion (as DINOv2 does); tensor inputs as uint8 tensors.

    Raises:
        ValueError: a scale outside ``0 < min <= max <= 1``, a size or a crop count out of range.
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float] = (0.32, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.32),
        local_crops_number: int = 8,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.global_crops_scale = _check_scale("global_crops_scale", global_crops_scale)
        self.local_crops_scale = _check_scale("local_crops_scale", local_crops_scale)
        if (
            isinstance(local_crops_number, bool)
            or not isinstance(local_crops_number, int)
            or local_crops_number < 0
        ):
            raise ValueError(
                f"local_crops_number: expected an int >= 0, got {local_crops_number!r}"
            )
        self.local_crops_number = local_crops_number
        self.global_crops_size = _check_size("global_crops_size", global_crops_size)
        self.local_crops_size = _check_size("local_crops_size", local_crops_size)
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean, std: expected 3 values each (std > 0), got {mean!r}, {std!r}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

        def geometric(size: int, scale: tuple[float, float]) -> list[v2.Transform]:
            return [
                v2.RandomResizedCrop(
                    size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True
                ),
                v2.RandomHorizontalFlip(p=0.5),
            ]

        color = [
            v2.RandomApply(
                [v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8
            ),
            v2.RandomGrayscale(p=0.2),
        ]

        def blur(p: float) -> v2.Transform:
            return _maybe(v2.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0)), p)

        normalize = [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=self.mean, std=self.std),
        ]
        global_geometric = geometric(self.global_crops_size, self.global_crops_scale)
        self.global_transform_1 = v2.Compose([*global_geometric, *color, blur(1.0), *normalize])
        self.global_transform_2 = v2.Compose(
            [
                *global_geometric,
                *color,
                blur(0.1),
                v2.RandomSolarize(threshold=128, p=0.2),
                *normalize,
            ]
        )
        self.local_transform = v2.Compose(
            [
                *geometric(self.local_crops_size, self.local_crops_scale),
                *color,
                blur(0.5),
                *normalize,
            ]
        )

    def __call__(self, image: Image.Image | torch.Tensor) -> dict[str, list[torch.Tensor]]:
        image = to_rgb(image)
        global_crops = [
            self.global_transform_1(image).as_subclass(torch.Tensor),
            self.global_transform_2(image).as_subclass(torch.Tensor),
        ]
        local_crops = [
            self.local_transform(image).as_subclass(torch.Tensor)
            for _ in range(self.local_crops_number)
        ]
        return {"global_crops": global_crops, "local_crops": local_crops}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global_crops_scale={self.global_crops_scale}, "
            f"local_crops_scale={self.local_crops_scale}, "
            f"local_crops_number={self.local_crops_number}, "
            f"global_crops_size={self.global_crops_size}, "
            f"local_crops_size={self.local_crops_size})"
        )
