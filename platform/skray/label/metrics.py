"""Live metrics of the labeling job, through Ray's metrics API.

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

from collections import Counter as Tally
from collections.abc import Sequence

from ray.util.metrics import Counter, Gauge


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

    def batch(self, reasons: Sequence[str | None], seconds: dict[str, float]) -> None:
        """One answered batch: its rows' reason codes (None: labeled) and its seconds per
        stage."""
        self.images.inc(len(reasons))
        for reason, n in Tally(r for r in reasons if r).items():
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
