"""The single image preprocessing path, its first half: bytes -> RGB PIL image -> uint8 eval crop.

Training evaluation, bulk labeling and serving all call into this module (and
:mod:`skray.core.transforms` for the float tensor the model takes), so a given image yields the
same crop everywhere; a second, slightly different copy of this logic would make offline
accuracy and served predictions drift apart.

Decoding is defensive because serving decodes untrusted uploads: only a fixed set
of formats is opened, the pixel counts of the image and of its eval resize are
checked from the header before any pixel is decoded, so memory is bounded by
``max_pixels`` whatever the aspect ratio, and every failure surfaces as one typed
:class:`ImageDecodeError` with a stable ``reason`` code that callers can count and
report.

This module imports PIL, numpy, :mod:`skray.core.errors` and :mod:`skray.core.preprocessing`
only: no torch, so the labeling job's read tasks, which only decode and crop, do not pay its
import (seconds of CPU and hundreds of MB per worker).
"""

from __future__ import annotations

import contextlib
import functools
import io
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps

from skray.core.errors import IMAGE_REASONS, one_line
from skray.core.preprocessing import DEFAULT_MAX_PIXELS, PreprocessingConfig

__all__ = [
    "FORMATS",
    "ImageDecodeError",
    "decode_for_eval",
    "decode_for_train",
    "decode_image",
    "eval_crop",
    "open_image",
    "resized_size",
]

# Formats we open; anything else (EPS, which shells out to Ghostscript, PSD, ...)
# is "not_an_image". Pillow opens multi-picture JPEGs (MPO) through the JPEG entry.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

# Transparent pixels are composited over white: photos with cut-out backgrounds
# (product shots, logos) are conventionally shown on white, and the colour stored
# under alpha=0 is arbitrary garbage that must not reach the model.
BACKGROUND = (255, 255, 255)


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image; ``reason`` is one of :data:`IMAGE_REASONS`.

    Callers branch and count on the stable code, humans read ``str(e)``, e.g.
    ``"truncated: image file is truncated (12 bytes not processed)"``.
    """

    def __init__(self, reason: str, detail: str):
        if reason not in IMAGE_REASONS:
            raise ValueError(
                f"unknown decode-error reason {reason!r}; expected one of {IMAGE_REASONS}"
            )
        # Both go to ``args`` so the error pickles intact across Ray workers.
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason}: {one_line(self.detail)}"


# --------------------------------------------------------------------------- decoding


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = None,
    resize_to: int | None = None,
) -> Image.Image:
    """Decode encoded bytes to an upright RGB image (first frame/page only).

    ``draft_size`` lets the JPEG decoder downscale by 1/2, 1/4 or 1/8 while
    decoding, keeping both sides >= ``draft_size``: a 12-megapixel photo that is
    about to be resized to 256 px then costs a fraction of the time and memory.
    Non-JPEG formats ignore it. Per-mode colour rules are in :func:`_to_rgb`.

    ``max_pixels`` is enforced here, from the header. Pillow's global limit
    (2 x ``Image.MAX_IMAGE_PIXELS``) still applies on top of it; this module
    never changes that global. ``resize_to`` is the shorter side the caller
    will scale to: that resize must fit ``max_pixels`` too, which refuses
    extreme aspect ratios (a 6 KB 1x65000 JPEG would become 256 x 16.6M).

    Raises :class:`ImageDecodeError` and nothing else for bad input.
    """
    with _typed_errors():
        img = open_image(data, max_pixels=max_pixels, resize_to=resize_to)
        if draft_size is not None:
            img.draft("RGB", (draft_size, draft_size))
        img.load()
        return _to_rgb(ImageOps.exif_transpose(img))


def open_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, resize_to: int | None = None
) -> Image.Image:
    """Parse the header only (no pixel decoded) and apply :func:`decode_image`'s checks:
    a known format, at most ``max_pixels``, and a resize to ``resize_to`` within it too.

    Every decoder (Pillow here, nvJPEG in :mod:`skray.core.device_decode`) starts from this, so
    they refuse the same inputs for the same reasons. Raises :class:`ImageDecodeError`.
    """
    if not data:
        raise ImageDecodeError("empty", "no bytes to decode")
    with _typed_errors():
        img = Image.open(io.BytesIO(data), formats=FORMATS)  # lazy: parses the header only
        _check_pixel_count(img, max_pixels)
        if resize_to is not None:
            _check_resize_target(img.size, resize_to, max_pixels)
        return img


@contextlib.contextmanager
def _typed_errors() -> Iterator[None]:
    """Whatever preparing an image raises leaves as :class:`ImageDecodeError`, so callers
    that count bad rows or answer 4xx never see a stray exception kill a worker."""
    try:
        yield
    except ImageDecodeError:
        raise
    except Exception as e:  # Pillow plugins also raise SyntaxError, ValueError, struct.error, ...
        raise _as_decode_error(e) from e


def _as_decode_error(e: Exception) -> ImageDecodeError:
    """The typed error for an exception raised while decoding, converting or cropping."""
    if isinstance(e, Image.UnidentifiedImageError):
        return ImageDecodeError("not_an_image", "not a JPEG, PNG, WebP, BMP, GIF or TIFF")
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        # Pillow's own global limit fired first (its warning only raises under
        # warnings-as-errors); same meaning as ours.
        return ImageDecodeError("too_many_pixels", str(e))
    if isinstance(e, MemoryError):
        return ImageDecodeError("too_many_pixels", "out of memory while preparing the image")
    if isinstance(e, EOFError):
        return ImageDecodeError("truncated", f"unexpected end of data ({e})")
    if isinstance(e, OSError):
        # Pillow says "truncated" for data that ends early; corrupt data reads
        # "broken data stream" or "decoder error", which no retry can fix.
        reason = "truncated" if "truncated" in str(e).lower() else "undecodable"
        return ImageDecodeError(reason, str(e))
    return ImageDecodeError("undecodable", f"{type(e).__name__}: {e}")


def _check_pixel_count(img: Image.Image, max_pixels: int) -> None:
    """Refuse decompression bombs from the header's size, before decoding a pixel."""
    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            "too_many_pixels", f"{width}x{height} = {width * height} pixels exceeds {max_pixels}"
        )


def _check_resize_target(size: tuple[int, int], shorter: int, max_pixels: int) -> None:
    """Refuse an image whose resize (shorter side -> ``shorter``) would exceed ``max_pixels``."""
    width, height = resized_size(size, shorter)
    if width * height > max_pixels:
        raise ImageDecodeError(
            "too_many_pixels",
            f"{size[0]}x{size[1]} resizes to {width}x{height} = {width * height} pixels "
            f"(shorter side {shorter}), which exceeds {max_pixels}",
        )


def resized_size(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """(width, height) with the shorter side scaled to ``shorter``, as torchvision rounds it."""
    width, height = size
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB.

    * 1, L, P, CMYK, YCbCr, RGB, ...: Pillow's own conversion (CMYK 0,0,0,0 is white).
    * Anything with alpha or a transparency key (LA, RGBA, PA, P/L/RGB with
      ``transparency``): composited over white, see :data:`BACKGROUND`.
    * I;16, I;16B, I;16L (16-bit): ``value >> 8``, so 65535 -> 255; opaque.
    * I (32-bit int): negatives clip to 0, then the image is taken to span the
      smallest of 8, 16 or 32 bits that holds its maximum and is shifted down to
      8 bits; Pillow does not record the source bit depth, and 16-bit sources
      are the common case.
    * F (float): read as 0..1 when its maximum is <= 1, else as 0..255; scaled
      to 0..255, rounded, clipped.
    """
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        img = _high_depth_to_l(img)
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, BACKGROUND), rgba).convert("RGB")
    return img.convert("RGB")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit and float greyscale down to 8-bit L (rules in :func:`_to_rgb`).

    Pillow's own conversion to L clips instead of scaling, which turns 16-bit
    images almost entirely white. A 16-bit transparency key is dropped: after
    scaling it would match the wrong pixels.
    """
    if img.mode == "F":
        scale = 255.0 if img.getextrema()[1] <= 1.0 else 1.0
        scaled = img.point(lambda v: v * scale + 0.5)  # + 0.5: F -> L truncates
    else:
        bits = next(b for b in (8, 16, 32) if img.getextrema()[1] < 2**b) if img.mode == "I" else 16
        # Pillow's integer point transform truncates, so dividing by 2**k is ``>> k``.
        scaled = img.convert("I").point(lambda v: v / 2 ** (bits - 8))
    grey = scaled.convert("L")  # clips to 0..255
    grey.info.pop("transparency", None)
    return grey


# --------------------------------------------------------------------------- transforms


RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


@functools.lru_cache(maxsize=16)
def eval_crop(
    cfg: PreprocessingConfig = PreprocessingConfig(),
) -> Callable[[Image.Image], np.ndarray]:
    """Resize the shorter side, centre-crop: RGB PIL -> (3, S, S) uint8 array.

    The geometric half of the eval transform. Batch pipelines ship these uint8 crops (a
    quarter of the bytes of float32) and normalize them next to the model
    (:func:`skray.core.transforms.normalize`). Resizing happens on the PIL image, as in timm's
    eval pipeline the published accuracy was measured with; the result is torchvision's
    ``Resize`` + ``CenterCrop`` + ``PILToTensor`` to the bit (a test holds them side by side).
    Cached per config; stateless, so safe to share.
    """
    return functools.partial(
        _resize_and_crop,
        shorter=cfg.resize_size,
        side=cfg.image_size,
        resample=RESAMPLING[cfg.interpolation],
    )


def _resize_and_crop(
    image: Image.Image, *, shorter: int, side: int, resample: Image.Resampling
) -> np.ndarray:
    """:func:`eval_crop`'s steps: Pillow's antialiased resize, then a centre crop whose corner
    rounds half to even as torchvision's does. ``shorter >= side`` (``crop_pct <= 1``), so the
    crop never leaves the image."""
    size = resized_size(image.size, shorter)
    if size != image.size:
        image = image.resize(size, resample=resample)
    width, height = image.size
    top, left = int(round((height - side) / 2.0)), int(round((width - side) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + side, top + side)))
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def decode_for_eval(data: bytes, cfg: PreprocessingConfig = PreprocessingConfig()) -> np.ndarray:
    """Encoded bytes -> uint8 eval crop (3, S, S); the CPU-side half of
    :func:`skray.core.transforms.preprocess`.

    Refuses images over ``cfg.max_pixels``. With ``cfg.jpeg_draft``, JPEGs are draft-decoded at
    no less than the resize target, so the result is never upscaled afterwards. Raises
    :class:`ImageDecodeError` and nothing else for bad input, whichever step fails.
    """
    size = cfg.resize_size
    draft = size if cfg.jpeg_draft else None
    image = decode_image(data, max_pixels=cfg.max_pixels, draft_size=draft, resize_to=size)
    with _typed_errors():
        return eval_crop(cfg)(image)


def decode_for_train(
    data: bytes,
    augment: Callable[[Image.Image], np.ndarray],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Encoded bytes -> uint8 training crop through ``augment``
    (:func:`skray.core.augment.train_augment`); raises
    :class:`ImageDecodeError` and nothing else for bad input, like :func:`decode_for_eval`."""
    image = decode_image(data, max_pixels=max_pixels)
    with _typed_errors():
        return augment(image)
