"""Live metrics of the labeling job and the Serve replicas, through Ray's metrics API.

Every process records into ``ray.util.metrics``; each node's metrics agent serves them as
Prometheus text on the node's metrics export port (``ray start --metrics-export-port``;
``ray.nodes()[i]["MetricsExportPort"]`` when Ray chose it) within one report interval
(``RAY_metrics_report_interval_ms``, 10 s by default). Ray prefixes every name with ``ray_``
and exports a counter with a ``_total`` suffix: ``skray_label_images`` is scraped as
``ray_skray_label_images_total``. All names, descriptions and tag keys are defined here.

The counts are live progress, not the record: a batch Ray Data retries is counted again;
the manifest's counts are exact.
"""

from __future__ import annotations

import functools
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from ray.util.metrics import Counter, Gauge

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
BATCH_SIZE_BOUNDARIES = [2**i for i in range(11)]  # 1 .. 1024, ServeConfig.max_batch_size's range


def failure_reason(error: str) -> str:
    """A row error's reason code (``"truncated: ..."`` -> ``truncated``), as the manifest counts."""
    return error.split(":", 1)[0]


class LabelMetrics:
    """What a model actor exports for each batch it answers, tagged with the labeling output."""

    def __init__(self, output: str | None) -> None:
        tags = {"output": output or ""}
        self.images = Counter(
            "skray_label_images",
            "images answered by the model actors, labeled or failed",
            tag_keys=("output",),
        ).set_default_tags(tags)
        self.failed = Counter(
            "skray_label_failed",
            "images that failed to read or decode, by reason code",
            tag_keys=("output", "reason"),
        ).set_default_tags(tags)
        self.stage_seconds = Counter(
            "skray_label_stage_seconds",
            "worker seconds per stage: decode (read + decode), model (forward), "
            "wait (a model actor idle before a batch); images / seconds = img/s",
            tag_keys=("output", "stage"),
        ).set_default_tags(tags)

    def batch(self, errors: Sequence[str | None], seconds: dict[str, float]) -> None:
        """One answered batch: its rows' errors (None: labeled) and its seconds per stage."""
        self.images.inc(len(errors))
        for reason, n in Tally(failure_reason(e) for e in errors if e).items():
            self.failed.inc(n, tags={"reason": reason})
        for stage, value in seconds.items():
            if value > 0:
                self.stage_seconds.inc(value, tags={"stage": stage})


class RunMetrics:
    """What the labeling driver exports: how many images this run is still waiting for."""

    def __init__(self, output: str, pending: int | None) -> None:
        self.pending = pending  # None: not known before reading (tar shards); no gauge then
        self.remaining = Gauge(
            "skray_label_images_remaining",
            "images the labeling run is still waiting for from the model actors",
            tag_keys=("output",),
        ).set_default_tags({"output": output})
        self.received(0)

    def received(self, done: int) -> None:
        """``done`` images of this run have reached the driver."""
        if self.pending is not None:
            self.remaining.set(max(self.pending - done, 0))


class ServeMetrics:
    """What a Serve replica exports; Serve adds the deployment, replica and application tags."""

    def __init__(self) -> None:
        from ray.serve import metrics as serve_metrics_api  # in replicas only: a heavy import

        self.requests = serve_metrics_api.Counter(
            "skray_serve_requests",
            "HTTP requests answered by the replica, by route path and status code",
            tag_keys=("path", "status"),
        )
        self.latency = serve_metrics_api.Histogram(
            "skray_serve_request_latency_s",
            "seconds from a request reaching the replica to its answer",
            boundaries=LATENCY_BOUNDARIES_S,
            tag_keys=("path",),
        )
        self.batch_size = serve_metrics_api.Histogram(
            "skray_serve_batch_size",
            "images per forward pass of the model",
            boundaries=BATCH_SIZE_BOUNDARIES,
        )

    def request(self, path: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"path": path, "status": str(status)})
        self.latency.observe(seconds, tags={"path": path})


@functools.cache
def serve_metrics() -> ServeMetrics:
    """The replica's metrics, made once, in the replica (where Serve's tags are known)."""
    return ServeMetrics()


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class RequestMetrics:
    """ASGI middleware: every HTTP answer counted by route and status, and its latency observed.

    ``path`` is the matched route's template (``/v1/classify``), ``other`` for paths no route
    matched, so a scanner's random URLs cannot grow the series. An exception counts as the 500
    that Starlette answers; a request cancelled (client gone) is not counted.
    """

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: int | None = None  # no answer started (yet)

        async def send_noting_status(message: MutableMapping[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        except Exception:
            status = 500
            raise
        finally:
            if status is not None:
                path = getattr(scope.get("route"), "path", "other")
                serve_metrics().request(path, status, time.perf_counter() - started)
