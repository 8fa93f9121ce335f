"""The second half of the preprocessing path: uint8 crops -> the float tensors the model takes.

:func:`normalize` runs next to the model, on its device, for eval and training crops alike;
:func:`eval_transform` and :func:`preprocess` are :mod:`skray.core.images`' eval crop followed
by it; :func:`train_transform` is :mod:`skray.core.augment`'s training crop followed by it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from PIL import Image

from skray.core.augment import train_augment
from skray.core.images import decode_for_eval, eval_crop
from skray.core.preprocessing import PreprocessingConfig
from skray.core.specs import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["eval_transform", "normalize", "preprocess", "train_transform"]


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


def train_transform(
    image_size: int = 224,
    *,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    **augment: Any,
) -> Callable[[Image.Image], torch.Tensor]:
    """:func:`skray.core.augment.train_augment` + :func:`normalize`: RGB PIL -> (3, S, S)
    float32."""
    crop = train_augment(image_size, **augment)
    return lambda image: normalize(torch.from_numpy(crop(image)), mean, std)


def preprocess(data: bytes, cfg: PreprocessingConfig = PreprocessingConfig()) -> torch.Tensor:
    """Encoded bytes -> model input (3, S, S) float32: decode, crop, normalise."""
    return normalize(torch.from_numpy(decode_for_eval(data, cfg)), cfg.mean, cfg.std)
