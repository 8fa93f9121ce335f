"""The serving application's typed ``args`` (:class:`ServeConfig`) and the helpers that read
them, apart from the replica so a config can be checked (``skray config serve``, ``skray
serve``) without importing Ray Serve or the model."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from skray.core.preprocessing import PreprocessingConfig
from skray.io.config import Decode, ModelName, ModelPreprocessing, PrecisionOptions

# Lower than the batch default (89M): a replica decodes ``decode_concurrency`` uploads at once and
# each can hold its source and an RGB copy (about 8 bytes a pixel), so 40M keeps two under 700 MB
# while still taking any camera up to 40 MP; JPEGs are draft-decoded far smaller anyway.
SERVE_MAX_PIXELS = 40_000_000


class ServeConfig(PrecisionOptions):
    """The application's ``args`` in a Serve config file (``configs/serve.yaml``)."""

    gpus_key = "gpus_per_replica"

    model: ModelName | None = Field(
        None, description="None: the architecture recorded in the weights, else the default"
    )
    weights: str | None = Field(
        None,
        description="path, s3://, https://, pretrained, models:/, runs:/; None: random weights",
    )
    top_k: int = Field(5, ge=1, description="when the request does not say")
    max_batch_size: int = Field(
        16,
        ge=1,
        le=1024,
        description="images per forward pass at most; a batch is what queued while the last ran",
    )
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, le=10, description="seconds a short batch waits for more once the model is free"
    )
    max_body_bytes: int = Field(16 << 20, ge=1024, description="per request, multipart included")
    max_inflight_bytes: int = Field(
        64 << 20,
        ge=1024,
        description="request bodies a replica holds at once (by Content-Length, then as "
        "streamed); past it 503 with Retry-After, before the body is read",
    )
    max_images_per_request: int = Field(64, ge=1, description="/v1/classify/batch")
    preprocessing: ModelPreprocessing = PreprocessingConfig(max_pixels=SERVE_MAX_PIXELS)
    body_timeout_s: float = Field(
        10, gt=0, le=3600, description="the whole body must arrive within it, else 408"
    )
    decode_concurrency: int = Field(
        2, ge=1, le=64, description="uploads decoded at once per replica: bounds memory"
    )
    warmup_batches: int = Field(
        2, ge=0, description="full batches through the model before /healthz says ready"
    )
    auth_token_env: str | None = Field(
        None, description="if set: the environment variable holding the bearer token"
    )
    cpus_per_replica: float = Field(1, gt=0, description="CPUs each replica reserves from Ray")
    gpus_per_replica: Literal["auto"] | float = Field(
        "auto", description="auto: 1 when the cluster has GPUs"
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op threads per CPU replica")
    decode: Decode = Field(
        "auto",
        description=(
            "gpu: each batch's bytes are decoded next to the model; auto: gpu on a GPU replica"
        ),
    )

    @model_validator(mode="after")
    def _one_body_fits(self) -> ServeConfig:
        if self.max_inflight_bytes < self.max_body_bytes:
            raise ValueError(
                f"max_inflight_bytes ({self.max_inflight_bytes}) must be at least "
                f"max_body_bytes ({self.max_body_bytes}), or the largest allowed body never fits"
            )
        return self

    @field_validator("preprocessing", mode="before")
    @classmethod
    def _serving_pixel_limit(cls, value: Any) -> Any:
        """A ``preprocessing`` section without ``max_pixels`` gets the serving limit, not the
        batch one."""
        if isinstance(value, dict) and "max_pixels" not in value:
            return {**value, "max_pixels": SERVE_MAX_PIXELS}
        return value


def bearer_token(variable: str | None) -> str | None:
    """The token from the named environment variable; configured but unset is an error, not an
    open door."""
    if not variable:
        return None
    token = os.environ.get(variable, "").strip()
    if not token:
        raise ValueError(
            f"auth_token_env is {variable!r} but that variable is empty or not set "
            "in the replica's environment"
        )
    return token
