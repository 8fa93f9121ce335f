"""Batch decode next to the model: encoded bytes -> uint8 eval crops on the model's device.

The labeling actors (``decode: gpu``) and serving can hand a batch of encoded images to a
:class:`DeviceDecoder` instead of shipping decoded crops: baseline JPEGs are decoded together
by torchvision (nvJPEG on CUDA, libjpeg-turbo on CPU), resized and centre-cropped as tensors
on the device. It is the same eval geometry as :func:`skray.core.images.eval_crop` (shorter side to
``resize_size``, bicubic with antialias, centre crop), and every image first passes
:func:`skray.core.images.open_image`'s header checks, so the same inputs are refused for the same
reasons. Everything else (PNG, WebP, CMYK JPEGs, a JPEG the device decoder refuses, a file
without its end marker) is decoded by :func:`skray.core.images.decode_for_eval` in a small thread
pool, exactly as on the CPU path, errors included.

The device path never draft-decodes (nvJPEG has no DCT scaling), so it reproduces the
full-decode pipeline; with ``jpeg_draft`` on, only the Pillow fallback drafts.

This module runs on CPU too (torchvision's CPU JPEG decoder, torch's resize), which is how
its agreement with the Pillow path is tested without a GPU.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from skray.core.images import ImageDecodeError, decode_for_eval, open_image, resized_size
from skray.core.preprocessing import PreprocessingConfig

__all__ = ["DeviceDecoder"]

EXIF_ORIENTATION = 0x0112
JPEG_END = b"\xff\xd9"


class DeviceDecoder:
    """Decodes a batch of encoded images to ``(N, 3, S, S)`` uint8 crops on ``device``.

    ``__call__`` returns the crops and one :class:`ImageDecodeError` or ``None`` per image;
    a failed image keeps a zero crop. ``cpu_threads`` sizes the Pillow fallback pool.
    """

    def __init__(
        self,
        cfg: PreprocessingConfig = PreprocessingConfig(),
        *,
        device: str | torch.device = "cpu",
        cpu_threads: int = 2,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.interpolation = InterpolationMode(cfg.interpolation)
        self._pool = ThreadPoolExecutor(cpu_threads, thread_name_prefix="skray-decode")

    def __call__(self, blobs: list[bytes]) -> tuple[torch.Tensor, list[ImageDecodeError | None]]:
        size = self.cfg.image_size
        crops = torch.zeros((len(blobs), 3, size, size), dtype=torch.uint8, device=self.device)
        errors: list[ImageDecodeError | None] = [None] * len(blobs)
        on_device: dict[int, int] = {}  # index -> EXIF orientation
        on_cpu: list[int] = []
        for i, data in enumerate(blobs):
            try:
                img = open_image(
                    data, max_pixels=self.cfg.max_pixels, resize_to=self.cfg.resize_size
                )
            except ImageDecodeError as err:
                errors[i] = err
                continue
            if _device_decodable(img, data):
                on_device[i] = img.getexif().get(EXIF_ORIENTATION, 1)
            else:
                on_cpu.append(i)
        fallback = {i: self._pool.submit(self._cpu_crop, blobs[i]) for i in on_cpu}
        for i, image in self._decode_on_device(blobs, list(on_device)).items():
            if image is None:
                fallback[i] = self._pool.submit(self._cpu_crop, blobs[i])
            else:
                crops[i] = self._crop(_orient(image, on_device[i]))
        cpu_crops = {}
        for i, future in fallback.items():
            try:
                cpu_crops[i] = future.result()
            except ImageDecodeError as err:
                errors[i] = err
        if cpu_crops:
            index = torch.tensor(list(cpu_crops), device=self.device)
            crops[index] = _to_device(torch.stack(list(cpu_crops.values())), self.device)
        return crops, errors

    def _cpu_crop(self, data: bytes) -> torch.Tensor:
        return torch.from_numpy(decode_for_eval(data, self.cfg))

    def _decode_on_device(
        self, blobs: list[bytes], indices: list[int]
    ) -> dict[int, torch.Tensor | None]:
        """One batched decode; if the batch is refused, each image alone (``None``: refused)."""
        if not indices:
            return {}
        encoded = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in indices]
        try:
            return dict(
                zip(indices, decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))
            )
        except RuntimeError:
            out: dict[int, torch.Tensor | None] = {}
            for i, data in zip(indices, encoded):
                try:
                    out[i] = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
                except RuntimeError:
                    out[i] = None
            return out

    def _crop(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 -> (3, S, S): :func:`skray.core.images.eval_crop`'s geometry."""
        width, height = resized_size((image.shape[2], image.shape[1]), self.cfg.resize_size)
        image = F.resize(image, [height, width], interpolation=self.interpolation, antialias=True)
        return F.center_crop(image, [self.cfg.image_size])

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _device_decodable(img: Image.Image, data: bytes) -> bool:
    """A plain JPEG (not MPO) in RGB or greyscale that ends with its end-of-image marker:
    nvJPEG may fill in a truncated file that Pillow refuses, so those go to Pillow."""
    return (
        img.format == "JPEG" and img.mode in ("RGB", "L") and data.rstrip(b"\0").endswith(JPEG_END)
    )


def _orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """Apply an EXIF orientation (1-8) to (3, H, W), as :func:`PIL.ImageOps.exif_transpose` does."""
    if orientation in (2, 4, 5, 7):
        image = image.flip(-1)  # mirror first, then rotate: 5 = mirror + 90 ccw ...
    turns = {3: 2, 4: 2, 5: 1, 6: 3, 7: 3, 8: 1}.get(
        orientation, 0
    )  # counter-clockwise quarter turns
    return torch.rot90(image, turns, dims=(-2, -1)) if turns else image


def _to_device(crops: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device copy from pinned memory, so it is asynchronous (CUDA only)."""
    if device.type != "cuda":
        return crops.to(device)
    return crops.pin_memory().to(device, non_blocking=True)
