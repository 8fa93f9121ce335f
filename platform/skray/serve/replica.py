"""The replica behind the HTTP endpoint: one :class:`Classifier` per Serve replica under a
FastAPI ingress.

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
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from skray.core.images import ImageDecodeError
from skray.inference.batching import Batcher, BatchTiming
from skray.inference.classifier import Classifier, Prediction
from skray.inference.quantize import calibration_crops
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
from skray.serve.budget import BodyBudget, Claim
from skray.serve.config import ServeConfig, bearer_token
from skray.serve.metrics import RequestMetrics, serve_metrics
from skray.weights.resolver import PinnedWeights

log = logging.getLogger(__name__)

DEPLOYMENT = "Classifier"

api.add_middleware(RequestMetrics)  # requests by route and status, latency (skray.serve.metrics)


# ---- the replica: ``serve.ingress`` snapshots the FastAPI app (and so the globals its methods
# use) when the class is defined, so everything they call is defined above this line. ----------


# A stopping replica checks for requests in flight every half second, not Serve's default 2 s:
# an idle one leaves a rollout or a scale-down that much sooner.
@serve.deployment(
    name=DEPLOYMENT,
    health_check_period_s=10,
    graceful_shutdown_timeout_s=30,
    graceful_shutdown_wait_loop_s=0.5,
)
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
        self._bodies = BodyBudget(cfg.max_inflight_bytes)
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
                "max_inflight_bytes": cfg.max_inflight_bytes,
                "max_images_per_request": cfg.max_images_per_request,
                "max_pixels": cfg.preprocessing.max_pixels,
                "body_timeout_s": cfg.body_timeout_s,
                "decode_concurrency": cfg.decode_concurrency,
            },
            "device": str(c.device),
            "decode": c.decode_on,
            "precision": c.precision,
            "precision_reason": c.precision_reason,
            "auth": "bearer" if self.token else None,
        }

    @api.post("/v1/classify", response_model=Classification, responses=ERRORS)
    async def classify(self, request: Request, top_k: int | None = TOP_K) -> JSONResponse:
        """Classify one image: the raw body (``image/*``, ``application/octet-stream``) or one
        multipart file."""
        started, k = time.perf_counter(), self._accept(request, top_k)
        with self._bodies.claim() as claim:
            return await self._classify_one(request, k, started, claim)

    async def _classify_one(
        self, request: Request, k: int, started: float, claim: Claim
    ) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        timing: dict[str, float] = {}
        if content_type.startswith("multipart/form-data"):
            files = await self._read_files(request, claim)
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
            data = await self._read_body(request, claim)
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
        with self._bodies.claim() as claim:
            files = await self._read_files(request, claim)
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

    async def _read_body(self, request: Request, claim: Claim) -> bytes:
        """The whole body, refused with 413 as soon as it is known to exceed the limit, with
        503 when the replica holds too many bytes of bodies (``claim``: its declared length
        before any is read), and with 408 if it takes longer than ``body_timeout_s``: a
        stalled upload must not hold a slot forever."""
        limit, timeout = self.config.max_body_bytes, self.config.body_timeout_s
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(
                413, "payload_too_large", f"body is {int(declared)} bytes; the limit is {limit}"
            )
        if declared.isdigit():
            claim.grow_to(int(declared))
        chunks, size = [], 0
        try:
            async with asyncio.timeout(timeout):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise ApiError(
                            413, "payload_too_large", f"body exceeds the limit of {limit} bytes"
                        )
                    claim.grow_to(size)
                    chunks.append(chunk)
        except TimeoutError:
            raise ApiError(
                408,
                "request_timeout",
                f"the body did not arrive within {timeout} s ({size} bytes received)",
            ) from None
        return b"".join(chunks)

    async def _read_files(self, request: Request, claim: Claim) -> list[tuple[str | None, bytes]]:
        """The file parts of a size-limited multipart body, in order."""
        body = await self._read_body(request, claim)

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
