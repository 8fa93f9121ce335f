"""The second half of the preprocessing path: uint8 crops -> the float tensors the model takes.

:func:`normalize` runs next to the model, on its device, for eval and training crops alike;
:func:`eval_transform` and :func:`preprocess` are :mod:`skray.core.images`' eval crop followed
by it. :func:`train_augment` is training's random counterpart of the eval crop, torchvision's
transforms, imported only where it is built: torchvision's import runs ``torch._dynamo``, over a
second of CPU in every process that would not use it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from PIL import Image

from skray.core.images import decode_for_eval, eval_crop
from skray.core.preprocessing import PreprocessingConfig
from skray.core.specs import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["eval_transform", "normalize", "preprocess", "train_augment", "train_transform"]


def normalize(
    crops: torch.Tensor,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 crops (..., 3, S, S) -> float32 scaled to [0, 1] and normalised, on their device.

    Eval and training crops both end here, next to the model.
    """
    mean_t = torch.tensor(mean, device=crops.device).view(3, 1, 1)
    std_t = torch.tensor(std, device=crops.device).view(3, 1, 1)
    return (crops.float() / 255.0 - mean_t) / std_t


def eval_transform(
    cfg: PreprocessingConfig = PreprocessingConfig(),
) -> Callable[[Image.Image], torch.Tensor]:
    """The card's eval transform: RGB PIL -> (3, S, S) float32
    (:func:`skray.core.images.eval_crop` + :func:`normalize`)."""
    crop = eval_crop(cfg)
    return lambda image: normalize(torch.from_numpy(crop(image)), cfg.mean, cfg.std)


def train_augment(
    image_size: int = 224,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: str = "bicubic",
    hflip: float = 0.5,
    randaugment: bool = False,
    randaugment_magnitude: int = 9,
) -> Callable[[Image.Image], torch.Tensor]:
    """Random-resized-crop (+ flip, + RandAugment): RGB PIL -> (3, S, S) uint8.

    The training counterpart of :func:`skray.core.images.eval_crop`; :func:`normalize` finishes
    both.
    """
    from torchvision.transforms import InterpolationMode, v2

    mode = InterpolationMode(interpolation)
    steps: list[Callable] = [
        v2.RandomResizedCrop(
            image_size, scale=scale, ratio=ratio, interpolation=mode, antialias=True
        )
    ]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if randaugment:
        steps.append(v2.RandAugment(magnitude=randaugment_magnitude, interpolation=mode))
    return v2.Compose([*steps, v2.PILToTensor(), v2.ToPureTensor()])


def train_transform(
    image_size: int = 224,
    *,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    **augment: Any,
) -> Callable[[Image.Image], torch.Tensor]:
    """:func:`train_augment` + :func:`normalize`: RGB PIL -> (3, S, S) float32."""
    crop = train_augment(image_size, **augment)
    return lambda image: normalize(crop(image), mean, std)


def preprocess(data: bytes, cfg: PreprocessingConfig = PreprocessingConfig()) -> torch.Tensor:
    """Encoded bytes -> model input (3, S, S) float32: decode, crop, normalise."""
    return normalize(torch.from_numpy(decode_for_eval(data, cfg)), cfg.mean, cfg.std)
