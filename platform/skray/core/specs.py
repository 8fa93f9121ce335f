"""The registered variants: each one's architecture and the eval preprocessing its weights were
measured with, side by side (timm's model args and pretrained cfg).

Torch-free, so that configs, drivers, CLIs and Tune's trial actors can name and check a model
without paying for torch's import (seconds of CPU per process); :mod:`skray.core.model` builds
the ``nn.Module`` from a spec.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DEFAULT_MODEL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ModelSpec",
    "list_models",
    "model_spec",
]

DEFAULT_MODEL = "skresnext50_32x4d"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """One registered variant: its architecture, its published weights, and the eval
    preprocessing they were measured with (timm's pretrained cfg); every job's
    ``preprocessing`` section defaults to the latter
    (:class:`skray.core.preprocessing.PreprocessingConfig`)."""

    layers: tuple[int, ...]
    cardinality: int
    base_width: int
    stem_width: int = 64
    planes: tuple[int, ...] = (64, 128, 256, 512)
    rd_divisor: int = 32
    description: str = ""
    pretrained_url: str | None = None
    pretrained_sha256_prefix: str | None = None
    image_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


_MODELS: dict[str, ModelSpec] = {
    "skresnext50_32x4d": ModelSpec(
        layers=(3, 4, 6, 3),
        cardinality=32,
        base_width=4,
        description="SK-ResNeXt-50 32x4d: 27.48M params, 4.5 GMACs at 224 px, "
        "ImageNet top-1 80.15 / top-5 94.64 with skresnext50_ra-f40e40bf.pth",
        pretrained_url="https://github.com/rwightman/pytorch-image-models/releases/"
        "download/v0.1-weights/skresnext50_ra-f40e40bf.pth",
        pretrained_sha256_prefix="f40e40bf",
        image_size=224,
        crop_pct=0.875,
        interpolation="bicubic",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    ),
    "skresnext14_8x4d_half": ModelSpec(
        layers=(1, 1, 1, 1),
        cardinality=8,
        base_width=4,
        stem_width=32,
        planes=(32, 64, 128, 256),
        rd_divisor=8,
        description="14 layers, cardinality 8, half-width stages: the same blocks, "
        "small enough for CPU tests and demos (no published weights)",
        image_size=224,
        crop_pct=0.875,
        interpolation="bicubic",
    ),
}


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_spec(name: str) -> ModelSpec:
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; registered: {', '.join(list_models())}"
        ) from None
