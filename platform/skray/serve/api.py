"""The HTTP contract of the classifier service: answers, errors, and the FastAPI app they hang on.

Bad input is the client's problem and gets a 4xx JSON error naming it, never a 5xx:
``{"error": {"code": ..., "message": ...}}``; a route raises :class:`ApiError`. The models
here are also the OpenAPI schema at ``/docs``; the replica (:mod:`skray.serve.replica`) adds its
routes to :data:`api`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from skray.inference.classifier import Prediction

RAW_IMAGE_TYPES = ("image/", "application/octet-stream")
BATCH_SIZE_HEADER = "X-Skray-Batch-Size"  # how many images shared this one's forward pass
SERVER_TIMING_HEADER = (
    "Server-Timing"  # read, decode_wait, decode, queue, forward, total (ms), in the replica
)


class ClassScore(BaseModel):
    label: str
    label_id: int
    score: float


class Classification(BaseModel):
    label: str
    label_id: int
    score: float
    top_k: list[ClassScore]
    model: str
    weights_sha256: str | None
    latency_ms: float


class ErrorDetail(BaseModel):
    code: str
    message: str


class BatchItem(BaseModel):
    """One image of a batch request: its answer, or the error that image alone got."""

    filename: str | None
    label: str | None = None
    label_id: int | None = None
    score: float | None = None
    top_k: list[ClassScore] | None = None
    error: ErrorDetail | None = None


class BatchClassification(BaseModel):
    results: list[BatchItem]
    model: str
    weights_sha256: str | None
    latency_ms: float


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    """A request the service refuses; becomes ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(code=code, message=message))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


ERRORS = {
    status: {"model": ErrorResponse, "description": why}
    for status, why in {
        400: "the image (or multipart body) cannot be decoded",
        401: "missing or wrong bearer token (when auth is on)",
        408: "the body did not arrive within body_timeout_s",
        413: "body or image count over the configured limit",
        415: "content type is not an image, octet-stream or multipart",
        422: "bad query parameter (top_k)",
        503: "overloaded: the replica holds max_inflight_bytes of uploads; retry after Retry-After",
    }.items()
}

TOP_K = Query(
    None, ge=1, description="how many classes to return, best first (default: the config's top_k)"
)

api = FastAPI(
    title="skray classifier",
    description="SK-ResNeXt image classification with dynamic batching on Ray Serve.",
    version="1",
)


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return error_response(err.status, err.code, err.message, err.headers)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in err.errors()
    )
    return error_response(422, "invalid_parameter", problems)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
    return error_response(err.status_code, code, str(err.detail), getattr(err, "headers", None))


def prediction_fields(p: Prediction) -> dict[str, Any]:
    top = [
        ClassScore(label=label, label_id=i, score=score)
        for i, score, label in zip(p.topk_ids, p.topk_scores, p.topk_labels)
    ]
    return {"label": p.label, "label_id": p.label_id, "score": p.score, "top_k": top}
