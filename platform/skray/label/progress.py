"""The run's telemetry on the driver: images done, img/s, ETA, and where the workers' time went.

The same figures go into the manifest's timings, the summary and the report's chart.
"""

from __future__ import annotations

import time
from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc

STAGE_COLUMNS = ("decode_s", "model_s", "wait_s")
STAGE_FIGURES = {  # manifest key -> how the progress line and the summary show it
    "decode_img_per_s": "decode {:.1f} img/s/task",
    "model_img_per_s": "model {:.1f} img/s/actor",
    "actor_busy_fraction": "actors busy {:.0%}",
    "actor_wait_s": "actors waited {:.1f}s",
}


class StageTimes:
    """Where the workers' time went, from per-row columns the stages add (a batch's seconds
    over its rows): ``decode_s`` in a read+decode task, ``model_s`` in a model actor's
    ``__call__``, ``wait_s`` an actor idle before it (waiting for input). Summed on the
    driver as batches arrive; a column no stage sent leaves its figures out. ``read_bytes``
    sums what the read stage took from storage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.rows: dict[str, int] = defaultdict(int)
        self.read_bytes: int | None = None

    def add(self, batch: pa.Table) -> None:
        for name in STAGE_COLUMNS:
            if name in batch.column_names:
                self.seconds[name] += pc.sum(batch.column(name)).as_py() or 0.0
                self.rows[name] += batch.num_rows
        if "read_bytes" in batch.column_names:
            self.read_bytes = (self.read_bytes or 0) + (pc.sum(batch["read_bytes"]).as_py() or 0)

    def figures(self) -> dict[str, float]:
        """decode img/s per decode task, model img/s per actor, the actors' busy fraction
        (model over model + wait: on GPUs, how busy the GPUs were), the actors' wait and the
        bytes read."""
        seconds, figures = self.seconds, {}
        if self.read_bytes is not None:
            figures["read_bytes"] = self.read_bytes
        for name, stage in (("decode_s", "decode"), ("model_s", "model")):
            if seconds.get(name, 0) > 0:
                figures[f"{stage}_img_per_s"] = round(self.rows[name] / seconds[name], 3)
        if "model_s" in seconds and "wait_s" in seconds:
            model, wait = seconds["model_s"], seconds["wait_s"]
            if model + wait > 0:
                figures["actor_busy_fraction"] = round(model / (model + wait), 4)
            figures["actor_wait_s"] = round(wait, 3)
        return figures

    def describe(self) -> str:
        """The figures as the progress line shows them ('' until a stage reported)."""
        figures = self.figures()
        return "; ".join(
            shown.format(figures[key]) for key, shown in STAGE_FIGURES.items() if key in figures
        )


PROGRESS_POINTS = 256  # throughput samples a manifest keeps: every other one is dropped when full


class Progress:
    """A driver line every few seconds: images done / total, img/s, ETA, and the stages' figures.
    Each line is also a ``[seconds, images done]`` sample (``samples``, for the report's
    throughput chart), thinned to at most :data:`PROGRESS_POINTS` however long the run."""

    def __init__(
        self, total: int | None, interval_s: float, stages: StageTimes | None = None
    ) -> None:
        self.total, self.interval_s = total, interval_s
        self.stages = stages or StageTimes()
        self.done = 0
        self.start = self.last = time.monotonic()
        self.first: tuple[float, int] | None = None  # when the first batch arrived, and its size
        self.samples: list[list[float]] = [[0.0, 0]]

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.first is None:
            self.first = (now, n)
        if now - self.last >= self.interval_s:
            self.last = now
            self.sample(now)
            print(self.line(), flush=True)

    def sample(self, now: float | None = None) -> None:
        """Record ``[seconds since start, images done]`` (now, unless given)."""
        now = time.monotonic() if now is None else now
        self.samples.append([round(now - self.start, 3), self.done])
        if len(self.samples) > PROGRESS_POINTS:
            self.samples = self.samples[::2]

    @property
    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.start, 1e-9)

    @property
    def steady_rate(self) -> float:
        """img/s after the first batch: start-up (cluster, model load, first batch) excluded."""
        if self.first is None:
            return 0.0
        at, n = self.first
        return (self.done - n) / max(time.monotonic() - at, 1e-9)

    def line(self) -> str:
        total = "?" if self.total is None else str(self.total)
        eta = ""
        if self.total is not None and self.rate > 0:
            eta = f", ETA {max(self.total - self.done, 0) / self.rate:.0f}s"
        stages = self.stages.describe()
        stages = f" ({stages})" if stages else ""
        return f"[label] {self.done}/{total} images, {self.rate:.1f} img/s{eta}{stages}"
