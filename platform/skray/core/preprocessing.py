"""The eval preprocessing of every job as a config section, filled from the model's spec.

Torch-free (pydantic and :mod:`skray.core.specs` only): configs and drivers validate it without
importing torch; :mod:`skray.core.images` applies it.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from skray.core.specs import DEFAULT_MODEL, model_spec

__all__ = ["DEFAULT_MAX_PIXELS", "PreprocessingConfig"]

# Pillow's own default bomb limit, fixed here so that nobody changing the global
# ``Image.MAX_IMAGE_PIXELS`` silently changes what skray accepts.
DEFAULT_MAX_PIXELS = 89_478_485

_DEFAULT_SPEC = model_spec(DEFAULT_MODEL)
_FROM_MODEL = ("image_size", "crop_pct", "interpolation", "mean", "std")


class PreprocessingConfig(BaseModel):
    """The eval preprocessing of every job (label, train, evaluate, serve), as a config section.

    A field left unset is the model's: :meth:`for_model` fills it from the variant's
    :class:`~skray.core.specs.ModelSpec`; until then it holds the default model's value. Frozen, so
    it can key a cache.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    image_size: int = Field(
        _DEFAULT_SPEC.image_size, ge=32, description="side of the square crop the model sees"
    )
    crop_pct: float = Field(
        _DEFAULT_SPEC.crop_pct, gt=0, le=1, description="crop side / resized short side"
    )
    interpolation: Literal["bicubic", "bilinear", "nearest"] = Field(
        _DEFAULT_SPEC.interpolation,  # type: ignore[assignment]
        description="the resize filter",
    )
    mean: tuple[float, float, float] = Field(_DEFAULT_SPEC.mean, description="RGB, 0..1")
    std: tuple[float, float, float] = Field(_DEFAULT_SPEC.std, description="RGB, 0..1")
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, description="larger images are refused before decoding"
    )
    jpeg_draft: bool = Field(
        False,
        description=(
            "let libjpeg downscale large JPEGs by 1/2, 1/4 or 1/8 while decoding (never below "
            "the resize target); faster, but not timm's eval pipeline"
        ),
    )

    def for_model(self, name: str | None) -> PreprocessingConfig:
        """This config with every field not set explicitly taken from model ``name``'s spec."""
        spec = model_spec(name or DEFAULT_MODEL)
        unset = {key: getattr(spec, key) for key in _FROM_MODEL if key not in self.model_fields_set}
        return self.model_copy(update=unset)

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop; half-up rounding so 224/0.875 is 256."""
        return math.floor(self.image_size / self.crop_pct + 0.5)
