"""Online classification on Ray Serve: a FastAPI ingress over one :class:`Classifier` per replica.

Each request is read (size-limited), authorized, and decoded with the same
``skray.core.images`` eval transform as the labeling job, off the event loop; its
uint8 crop then queues for the model, and the next batch is taken when the model is
free (:class:`skray.inference.batching.Batcher`), so batches fill while one runs. Every answer
says where its time went in the replica: a ``Server-Timing`` header (read, decode
wait and decode, queue, forward, total; milliseconds) and ``X-Skray-Batch-Size``; requests
by route and status, their latency and the batch sizes are live metrics
(:mod:`skray.serve.metrics`).

Bad input gets a 4xx JSON error naming it (the contract: :mod:`skray.serve.api`). A
replica only says it is ready on ``/healthz`` once its model is loaded and warmed up;
requests that arrive earlier wait for the warm-up instead of failing.

As in Ray's ``serve/doc_code/app_builder.py``: typed args (:class:`ServeConfig`) -> builder
(:func:`application`) -> ``.bind()``. ``build_app`` is the builder for ``serve run`` / ``serve
deploy`` (``import_path: skray.serve.app:build_app``); ``skray serve`` (:mod:`skray.serve.launch`)
reads the same config file.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import threading
import time
from typing import Any, Literal

import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import Field, field_validator
from ray import serve
from ray.serve.deployment import Application
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from skray.core.images import ImageDecodeError, PreprocessingConfig
from skray.inference.batching import Batcher, BatchTiming
from skray.inference.classifier import Classifier, Prediction
from skray.inference.quantize import calibration_crops
from skray.io.config import (
    Decode,
    ModelName,
    ModelPreprocessing,
    PrecisionOptions,
    deep_merge,
    resolve_gpus,
    validate,
)
from skray.serve.api import (
    BATCH_SIZE_HEADER,
    ERRORS,
    RAW_IMAGE_TYPES,
    SERVER_TIMING_HEADER,
    TOP_K,
    ApiError,
    BatchClassification,
    BatchItem,
    Classification,
    ErrorDetail,
    api,
    prediction_fields,
)
from skray.serve.metrics import RequestMetrics, serve_metrics
from skray.weights.resolver import PinnedWeights, pin_weights

log = logging.getLogger(__name__)

DEPLOYMENT = "Classifier"
IMPORT_PATH = "skray.serve.app:build_app"
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
    weights: str | None = None
    top_k: int = Field(5, ge=1, description="when the request does not say")
    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10)
    max_body_bytes: int = Field(16 << 20, ge=1024, description="per request, multipart included")
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
    cpus_per_replica: float = Field(1, gt=0)
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


api.add_middleware(RequestMetrics)  # requests by route and status, latency (skray.label.metrics)


# ---- the replica: ``serve.ingress`` snapshots the FastAPI app (and so the globals its methods
# use) when the class is defined, so everything they call is defined above this line. ----------


@serve.deployment(name=DEPLOYMENT, health_check_period_s=10, graceful_shutdown_timeout_s=30)
@serve.ingress(api)
class ClassifierDeployment:
    """One model per replica, loaded in ``__init__``; warmed up in the background."""

    def __init__(self, config: dict[str, Any], pinned: dict[str, Any] | None) -> None:
        """``pinned``: :meth:`PinnedWeights.to_dict` of ``config.weights``, resolved once by the
        builder."""
        self.config = cfg = ServeConfig.model_validate(config)
        self.token = bearer_token(cfg.auth_token_env)
        weights = (
            PinnedWeights.from_dict(pinned) if pinned else None
        )  # every replica: the same bytes
        transform = cfg.preprocessing
        calibration = (
            calibration_crops(cfg.calibration, cfg.calibration_images, transform)
            if cfg.precision == "int8"
            else None
        )
        self.classifier = Classifier.for_worker(
            cfg.model,
            weights,
            threads=cfg.threads,
            preprocessing=transform,
            decode=cfg.decode,
            precision=cfg.precision,
            calibration=calibration,
            batch_size=cfg.max_batch_size if cfg.precision == "int8" else None,
        )
        # decode on the model's device: requests queue their bytes and each batch decodes together
        self._device_decode = self.classifier.decode_on == "gpu"
        self.num_classes = len(self.classifier.class_names)
        self.metrics = serve_metrics()
        self._batcher: Batcher[tuple[torch.Tensor | bytes, int], Prediction | ImageDecodeError] = (
            Batcher(self._forward, cfg.max_batch_size, cfg.batch_wait_timeout_s)
        )
        self._decode_slots = asyncio.Semaphore(cfg.decode_concurrency)
        self._warm = threading.Event()
        self._warmup_error: str | None = None
        self._warmup_s: float | None = None
        threading.Thread(target=self._warm_up, name="skray-warmup", daemon=True).start()

    def _warm_up(self) -> None:
        """Run a single image and ``warmup_batches`` full batches through the model (allocator,
        kernels)."""
        try:
            started = time.perf_counter()
            size = self.classifier.preprocessing.image_size
            crop = torch.zeros((3, size, size), dtype=torch.uint8)
            self.classifier.predict_tensors(crop[None], top_k=1)
            for _ in range(self.config.warmup_batches):
                self.classifier.predict_tensors(
                    crop.expand(self.config.max_batch_size, -1, -1, -1), top_k=1
                )
            self._warmup_s = time.perf_counter() - started
        except Exception as err:  # noqa: BLE001 - reported by /healthz and check_health
            self._warmup_error = f"{type(err).__name__}: {err}"
            log.exception("warm-up failed")
        finally:
            self._warm.set()

    def check_health(self) -> None:
        """Serve replaces a replica whose warm-up failed."""
        if self._warmup_error:
            raise RuntimeError(f"model warm-up failed: {self._warmup_error}")

    async def _ready(self) -> None:
        while not self._warm.is_set():
            await asyncio.sleep(0.05)
        if self._warmup_error:
            raise RuntimeError(f"model warm-up failed: {self._warmup_error}")

    @api.get("/healthz", responses={503: {"description": "loading, warming up, or failed"}})
    def healthz(self) -> JSONResponse:
        """200 once the model is loaded and warmed up; 503 before, or if warm-up failed."""
        if not self._warm.is_set():
            return JSONResponse({"status": "warming_up"}, status_code=503)
        if self._warmup_error:
            return JSONResponse({"status": "failed", "error": self._warmup_error}, status_code=503)
        return JSONResponse(
            {
                "status": "ok",
                "model": self.classifier.architecture,
                "weights_sha256": self.classifier.weights_sha256,
                "warmup_s": round(self._warmup_s or 0.0, 3),
            }
        )

    @api.get("/v1/model", responses={401: ERRORS[401]})
    def model_info(self, request: Request) -> dict[str, Any]:
        """Architecture, classes, weights, preprocessing and limits of the model served."""
        self._authorize(request)
        c, cfg = self.classifier, self.config
        return {
            "model": c.architecture,
            "num_classes": self.num_classes,
            "classes": c.class_names,
            "weights": {
                "source": None,
                "sha256": None,
                **(c.pinned.redacted() if c.pinned else {}),
                "random": c.random_weights,
            },
            "preprocessing": {
                **cfg.preprocessing.model_dump(),
                "resize_size": c.preprocessing.resize_size,
                "mean": list(c.preprocessing.mean),
                "std": list(c.preprocessing.std),
            },
            "batching": {
                "max_batch_size": cfg.max_batch_size,
                "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
            },
            "limits": {
                "max_body_bytes": cfg.max_body_bytes,
                "max_images_per_request": cfg.max_images_per_request,
                "max_pixels": cfg.preprocessing.max_pixels,
                "body_timeout_s": cfg.body_timeout_s,
                "decode_concurrency": cfg.decode_concurrency,
            },
            "device": str(c.device),
            "decode": c.decode_on,
            "precision": c.precision,
            "auth": "bearer" if self.token else None,
        }

    @api.post("/v1/classify", response_model=Classification, responses=ERRORS)
    async def classify(self, request: Request, top_k: int | None = TOP_K) -> JSONResponse:
        """Classify one image: the raw body (``image/*``, ``application/octet-stream``) or one
        multipart file."""
        started, k = time.perf_counter(), self._accept(request, top_k)
        content_type = request.headers.get("content-type", "")
        timing: dict[str, float] = {}
        if content_type.startswith("multipart/form-data"):
            files = await self._read_files(request)
            if len(files) != 1:
                raise ApiError(
                    422,
                    "one_file_expected",
                    f"expected exactly one file part, got {len(files)} "
                    "(several images go to /v1/classify/batch)",
                )
            data = files[0][1]
            timing["read"] = time.perf_counter() - started
        elif content_type.startswith(RAW_IMAGE_TYPES):
            data = await self._read_body(request)
            timing["read"] = time.perf_counter() - started
        else:
            raise ApiError(
                415,
                "unsupported_media_type",
                f"content type {content_type or '(none)'!r} is not an image: send image/*, "
                "application/octet-stream or multipart/form-data",
            )
        try:
            prediction, batch = await self._classify(data, k, timing)
        except ImageDecodeError as err:
            raise ApiError(400, f"image_{err.reason}", str(err)) from None
        answer = Classification(**prediction_fields(prediction), **self._served_by(started))
        timing["total"] = time.perf_counter() - started
        return JSONResponse(
            answer.model_dump(),
            headers={
                BATCH_SIZE_HEADER: str(batch.size),
                SERVER_TIMING_HEADER: ", ".join(
                    f"{stage};dur={1000 * s:.1f}" for stage, s in timing.items()
                ),
            },
        )

    @api.post("/v1/classify/batch", response_model=BatchClassification, responses=ERRORS)
    async def classify_batch(
        self, request: Request, top_k: int | None = TOP_K
    ) -> BatchClassification:
        """Classify every file of a multipart body; a broken image gets its own error, the others
        answers."""
        started, k = time.perf_counter(), self._accept(request, top_k)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(
                415,
                "unsupported_media_type",
                "/v1/classify/batch takes multipart/form-data, one file part per image",
            )
        files = await self._read_files(request)
        if not files:
            raise ApiError(422, "no_files", "the multipart body has no file parts")
        outcomes = await asyncio.gather(
            *(self._classify(data, k) for _, data in files), return_exceptions=True
        )
        results = []
        for (name, _), outcome in zip(files, outcomes):
            if isinstance(outcome, ImageDecodeError):
                error = ErrorDetail(code=f"image_{outcome.reason}", message=str(outcome))
                results.append(BatchItem(filename=name, error=error))
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                results.append(BatchItem(filename=name, **prediction_fields(outcome[0])))
        return BatchClassification(results=results, **self._served_by(started))

    async def _classify(
        self, data: bytes, top_k: int, timing: dict[str, float] | None = None
    ) -> tuple[Prediction, BatchTiming]:
        """Decode off the event loop, ``decode_concurrency`` at a time so a burst of large images
        cannot multiply memory, then join the next batch; the answer and its batch. ``timing`` gets
        the seconds spent waiting for a decode slot, decoding, queued for the model and in its
        forward (which includes the decode when the model's device decodes)."""
        waited = decoding = decoded = time.perf_counter()
        image: torch.Tensor | bytes = data
        if not self._device_decode:
            async with self._decode_slots:
                decoding = time.perf_counter()
                image = await asyncio.to_thread(self.classifier.decode, data)
            decoded = time.perf_counter()
        await self._ready()
        answer, batch = await self._batcher.submit((image, top_k))
        if timing is not None:
            timing.update(
                decode_wait=decoding - waited,
                decode=decoded - decoding,
                queue=batch.queue_s,
                forward=batch.forward_s,
            )
        if isinstance(answer, ImageDecodeError):
            raise answer
        return answer, batch

    def _forward(
        self, items: list[tuple[torch.Tensor | bytes, int]]
    ) -> list[Prediction | ImageDecodeError]:
        """One forward pass for every image queued together (crops, or bytes the model's device
        decodes), each answer cut to its own top_k; an image that does not decode gets its error."""
        images, k = [image for image, _ in items], max(k for _, k in items)
        self.metrics.batch_size.observe(len(items))
        answers = (
            self.classifier.predict_bytes(images, k)
            if self._device_decode
            else self.classifier.predict_tensors(torch.stack(images), k)
        )
        return [
            a if isinstance(a, ImageDecodeError) else a.top(top_k)
            for a, (_, top_k) in zip(answers, items)
        ]

    def _authorize(self, request: Request) -> None:
        if not self.token:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        ):
            raise ApiError(
                401,
                "unauthorized",
                "a valid 'Authorization: Bearer <token>' header is required",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def _accept(self, request: Request, top_k: int | None) -> int:
        """Authorize the request; its top_k, checked against the classes."""
        self._authorize(request)
        k = top_k or self.config.top_k
        if k > self.num_classes:
            raise ApiError(
                422,
                "invalid_parameter",
                f"top_k: must be at most {self.num_classes}, the number of classes (got {k})",
            )
        return k

    async def _read_body(self, request: Request) -> bytes:
        """The whole body, refused with 413 as soon as it is known to exceed the limit, and with
        408 if it takes longer than ``body_timeout_s``: a stalled upload must not hold a slot
        forever."""
        limit, timeout = self.config.max_body_bytes, self.config.body_timeout_s
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(
                413, "payload_too_large", f"body is {int(declared)} bytes; the limit is {limit}"
            )
        chunks, size = [], 0
        try:
            async with asyncio.timeout(timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise ApiError(
                            413, "payload_too_large", f"body exceeds the limit of {limit} bytes"
                        )
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(
                408,
                "request_timeout",
                f"the body did not arrive within {timeout} s ({size} bytes received)",
            ) from None
        return b"".join(chunks)

    async def _read_files(self, request: Request) -> list[tuple[str | None, bytes]]:
        """The file parts of a size-limited multipart body, in order."""
        body = await self._read_body(request)

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        limit = self.config.max_images_per_request
        try:
            form = await Request(request.scope, replay).form(
                max_files=limit, max_part_size=self.config.max_body_bytes
            )
        except (MultiPartException, StarletteHTTPException) as err:
            message = getattr(err, "detail", None) or getattr(err, "message", str(err))
            if message.startswith("Too many files"):
                raise ApiError(
                    413, "too_many_images", f"more than {limit} images in one request"
                ) from None
            raise ApiError(400, "bad_multipart", f"malformed multipart body: {message}") from None
        return [
            (v.filename, await v.read()) for _, v in form.multi_items() if isinstance(v, UploadFile)
        ]

    def _served_by(self, started: float) -> dict[str, Any]:
        return {
            "model": self.classifier.architecture,
            "weights_sha256": self.classifier.weights_sha256,
            "latency_ms": round(1000 * (time.perf_counter() - started), 2),
        }


def application(cfg: ServeConfig, **deployment_options: Any) -> Application:
    """The Serve application for ``cfg``; ``deployment_options`` (autoscaling, ...) as in a
    config file.

    The weights are pinned here, once: an alias moved or a file replaced later cannot give
    replicas started by autoscaling or recovery another model.
    """
    pinned = pin_weights(cfg.weights, cfg.model)
    actor_options: dict[str, Any] = {
        "num_cpus": cfg.cpus_per_replica,
        "num_gpus": resolve_gpus(cfg.gpus_per_replica),
    }
    options = {
        "max_ongoing_requests": 4 * cfg.max_batch_size,
        **deployment_options,
        "ray_actor_options": deep_merge(
            actor_options, deployment_options.get("ray_actor_options") or {}
        ),
    }
    return ClassifierDeployment.options(**options).bind(
        cfg.model_dump(), pinned.to_dict() if pinned else None
    )


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder (``import_path: skray.serve.app:build_app``): ``args`` is a
    :class:`ServeConfig`."""
    return application(validate(ServeConfig, dict(args), source="serve args"))
