"""The training crop (skray.core.augment) is torchvision's RandomResizedCrop and flip, drawn and
cut the same way, without torch."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as F

from skray.core.augment import random_resized_box, train_augment

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    noise = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(noise)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize("size", [(120, 90), (31, 200), (640, 480)])
def test_the_crop_is_torchvisions_resized_crop_of_the_box_it_draws_to_the_bit(interpolation, size):
    image = photo(*size)
    for seed in range(5):
        top, left, h, w = random_resized_box(*size, SCALE, RATIO, random.Random(seed))
        expected = F.pil_to_tensor(
            F.resized_crop(image, top, left, h, w, [48, 48], InterpolationMode(interpolation))
        )

        crop = train_augment(48, interpolation=interpolation, hflip=0.0, rng=random.Random(seed))

        assert np.array_equal(crop(image), expected.numpy())


def test_a_flip_mirrors_the_crop_and_half_the_crops_are_flipped():
    image = photo(120, 90)
    unflipped = train_augment(48, hflip=0.0, rng=random.Random(3))(image)
    flipped = train_augment(48, hflip=1.0, rng=random.Random(3))(image)
    assert np.array_equal(flipped, unflipped[:, :, ::-1])

    # Drawn from the same sequence, a crop with hflip 0.5 is the unflipped one or its mirror.
    half, never = (train_augment(48, hflip=p, rng=random.Random(0)) for p in (0.5, 0.0))
    flips = 0
    for _ in range(400):
        maybe, plain = half(image), never(image)
        assert np.array_equal(maybe, plain) or np.array_equal(maybe, plain[:, :, ::-1])
        flips += not np.array_equal(maybe, plain)
    assert 150 < flips < 250


def test_boxes_fall_inside_the_image_with_the_area_and_aspect_torchvision_draws():
    rng, ours, theirs = random.Random(0), [], []
    transform = v2.RandomResizedCrop(48, scale=SCALE, ratio=RATIO)
    image = photo(300, 200)
    torch.manual_seed(0)
    for _ in range(3000):
        top, left, h, w = random_resized_box(300, 200, SCALE, RATIO, rng)
        assert 0 <= top and top + h <= 200 and 0 <= left and left + w <= 300
        ours.append((h * w / 60000, w / h))
        p = transform.make_params([image])
        theirs.append((p["height"] * p["width"] / 60000, p["width"] / p["height"]))
    for i in (0, 1):  # the mean area fraction and the mean aspect of the two samplers agree
        assert np.mean([o[i] for o in ours]) == pytest.approx(
            np.mean([t[i] for t in theirs]), abs=0.02
        )


@pytest.mark.parametrize("size", [(1, 65_000), (65_000, 1), (10, 1_000)])
def test_an_image_no_draw_fits_falls_back_to_torchvisions_centre_crop(size):
    """Ten failed draws (a sliver) end in the largest centred crop inside the aspect range,
    a few pixels: the sliver costs nothing to resize."""
    torch.manual_seed(0)
    expected = v2.RandomResizedCrop(48, scale=(1.0, 1.0), ratio=RATIO).make_params([photo(*size)])

    box = random_resized_box(*size, (1.0, 1.0), RATIO, random.Random(0))

    assert box == (expected["top"], expected["left"], expected["height"], expected["width"])
