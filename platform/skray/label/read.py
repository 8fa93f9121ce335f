"""The labeling job's first stage, as a Ray Data task UDF: read a unit, decode its images.

``read_and_decode`` (stateless CPU tasks, scaled on their own) reads a unit and, with
``decode="cpu"``, turns its bytes into uint8 center crops, batch by batch, or an error per
row; with ``decode="gpu"`` it ships the encoded bytes (a fraction of the crops' size) and the
model actors decode them (:mod:`skray.label.predictor`).

Torch-free (Pillow, numpy, pyarrow): the read tasks are most of a run's processes, and torch's
import would cost each seconds of CPU and hundreds of MB. Stage figures ride along as columns,
per row: ``decode_s`` (read + decode, the batch's seconds / its rows) and ``read_bytes``, what
this stage took from storage for the row (its object, member or cell; none for a row never
read).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Iterator, Literal

import numpy as np
import pyarrow as pa

from skray.core.crops import crop_rows
from skray.core.images import decode_for_eval
from skray.core.preprocessing import PreprocessingConfig
from skray.io.retry import IoRetry
from skray.io.sources import SampleLimits, table_batches

__all__ = ["bytes_rows", "decode_rows", "read_and_decode"]

PASSTHROUGH = ("key", "reason", "error", "meta", "unit", "unit_rows")


def _passthrough(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    out = {name: np.array([row[name] for row in rows], dtype=object) for name in PASSTHROUGH}
    out["unit_rows"] = out["unit_rows"].astype(np.int64)
    out["read_bytes"] = np.array([len(row["data"]) for row in rows], dtype=np.int64)
    return out


def decode_rows(
    rows: list[dict[str, Any]], preprocessing: PreprocessingConfig
) -> dict[str, np.ndarray]:
    """The ``decode="cpu"`` batch: each image's eval crop (:func:`skray.core.crops.crop_rows`);
    a bad one keeps a blank crop and gets ``error``."""
    crop = functools.partial(decode_for_eval, cfg=preprocessing)
    crops, reasons, errors = crop_rows(rows, crop, preprocessing.image_size)
    out = _passthrough(rows)
    out["reason"], out["error"] = np.array(reasons, dtype=object), np.array(errors, dtype=object)
    out["image"] = crops
    return out


def bytes_rows(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The ``decode="gpu"`` batch: rows keep their encoded bytes (sizes already checked
    against ``max_object_bytes`` when read) for the actor to decode; a failed read ships none."""
    out = _passthrough(rows)
    out["data"] = np.array([b"" if row["error"] else row["data"] for row in rows], dtype=object)
    return out


def read_and_decode(
    units: pa.Table,
    preprocessing: PreprocessingConfig,
    batch_size: int,
    image_column: str,
    id_column: str | None,
    max_object_bytes: int,
    io_retry: IoRetry | None = None,
    decode: Literal["cpu", "gpu"] = "cpu",
    sample_limits: SampleLimits = SampleLimits(),
    read_buffer_bytes: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Stream each unit's decoded crops (or, with ``decode="gpu"``, its bytes) ``batch_size`` at
    a time, as they are read, so a task holds one batch of bytes, not a shard; the rows of a
    unit's last batch carry its row count."""
    start = time.perf_counter()  # decode_s: from resuming to the next yield, reading included
    batches = table_batches(
        units,
        batch_size,
        image_column=image_column,
        id_column=id_column,
        max_object_bytes=max_object_bytes,
        io_retry=io_retry,
        sample_limits=sample_limits,
        read_buffer_bytes=read_buffer_bytes,
    )
    for rows in batches:
        out = decode_rows(rows, preprocessing) if decode == "cpu" else bytes_rows(rows)
        out["decode_s"] = np.full(len(rows), (time.perf_counter() - start) / len(rows))
        yield out
        start = time.perf_counter()
