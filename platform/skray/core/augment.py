"""The training crop: torchvision's ``RandomResizedCrop`` and horizontal flip in Pillow + numpy.

Training's random counterpart of :func:`skray.core.images.eval_crop`, with the same output
(uint8 ``(3, S, S)``) and no torch: every read+decode task of a training run builds one, and
Ray starts such tasks in fresh worker processes whenever more run at once than the node has
CPUs, so an import of torch and torchvision (seconds of CPU) would be paid again and again,
mid-epoch. RandAugment alone comes from torchvision, imported only when asked for.
"""

from __future__ import annotations

import math
import random
from types import ModuleType
from typing import Callable

import numpy as np
from PIL import Image

from skray.core.images import RESAMPLING

__all__ = ["random_resized_box", "train_augment"]


def random_resized_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random | ModuleType,
) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a crop as torchvision's ``RandomResizedCrop`` draws it:
    ten tries at an area in ``scale`` of the image's and an aspect in ``ratio`` (log-uniform),
    then the largest centred crop inside ``ratio``."""
    area, log_ratio = width * height, (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def train_augment(
    image_size: int = 224,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    interpolation: str = "bicubic",
    hflip: float = 0.5,
    randaugment: bool = False,
    randaugment_magnitude: int = 9,
    rng: random.Random | None = None,
) -> Callable[[Image.Image], np.ndarray]:
    """Random-resized-crop (+ flip, + RandAugment): RGB PIL -> (3, S, S) uint8 array.

    The crop is cut before it is resized, as torchvision's is, so a sliver of an image costs
    what its crop costs; :func:`skray.core.transforms.normalize` finishes it next to the model.
    Boxes and flips are drawn from ``rng``, by default Python's global generator: ``random.seed``
    repeats them as ``torch.manual_seed`` repeats RandAugment's.
    """
    draw = rng or random  # the module's functions draw from its global generator
    resample = RESAMPLING[interpolation]
    rand_augment = None
    if randaugment:
        from torchvision.transforms import InterpolationMode, v2

        rand_augment = v2.RandAugment(
            magnitude=randaugment_magnitude, interpolation=InterpolationMode(interpolation)
        )

    def augment(image: Image.Image) -> np.ndarray:
        top, left, h, w = random_resized_box(*image.size, scale, ratio, draw)
        crop = image.crop((left, top, left + w, top + h))
        crop = crop.resize((image_size, image_size), resample=resample)
        if draw.random() < hflip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rand_augment is not None:
            crop = rand_augment(crop)
        return np.asarray(crop).transpose(2, 0, 1)  # a view: the batch it is copied into is CHW

    return augment
