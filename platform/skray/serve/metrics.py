"""Live metrics of the Serve replicas, through Ray Serve's metrics API.

Each replica exports requests by route and status, their latency and the batch sizes of its
forward passes; Serve adds the deployment, replica and application tags. Scraped as
Prometheus text from each node's metrics export port, as the labeling job's series are
(:mod:`skray.label.metrics`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

LATENCY_BOUNDARIES_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
BATCH_SIZE_BOUNDARIES = [2**i for i in range(11)]  # 1 .. 1024, ServeConfig.max_batch_size's range


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
