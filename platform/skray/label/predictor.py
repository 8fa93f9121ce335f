"""The labeling job's two stages, as Ray Data UDFs.

``read_and_decode`` (stateless CPU tasks, scaled on their own): reads a unit and, with
``decode="cpu"``, turns its bytes into uint8 center crops, batch by batch, or an error per
row; with ``decode="gpu"`` it ships the encoded bytes (a fraction of the crops' size) and
the actors decode them next to the model (:mod:`skray.core.device_decode`). ``Predictor`` (an
actor pool): loads the model once per actor in its fast form and turns crops into top-k
labels. Crops are normalized next to the model, the same arithmetic as
:func:`skray.core.images.preprocess`.

Stage figures ride along as columns, per row (the batch's seconds / its rows), for the driver
to sum: ``decode_s`` (read + decode), ``model_s`` (forward) and ``wait_s`` (the actor idle
before this batch arrived), and ``read_bytes``, what the read stage took from storage for the
row (its object, member or cell; none for a row never read).
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator, Literal

import numpy as np
import pyarrow as pa
import torch

from skray.core.crops import crop_rows
from skray.core.images import ImageDecodeError, decode_for_eval
from skray.core.preprocessing import PreprocessingConfig
from skray.inference.classifier import Classifier
from skray.io.config import Decode, Precision
from skray.io.retry import IoRetry
from skray.io.sources import SampleLimits, table_batches
from skray.label.metrics import LabelMetrics
from skray.label.sinks import LABEL_SCHEMA
from skray.weights.resolver import PinnedWeights

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


class Predictor:
    """Ray Data class UDF: the model is loaded once, in ``__init__``; ``__call__`` labels a batch.

    With ``decode="gpu"`` (or ``auto`` on a GPU actor) batches carry bytes: the batch is cut
    into chunks of the model's batch shape and the next chunk is decoded by a prefetch thread
    (on its own CUDA stream) while the current one runs through the model.
    """

    def __init__(
        self,
        model: str | None,
        pinned: PinnedWeights | None,
        top_k: int,
        preprocessing: PreprocessingConfig,
        threads: int | None = None,
        compile: bool = False,
        decode: Decode = "cpu",
        batch_size: int | Literal["auto"] | None = None,
        precision: Precision = "fp32",
        calibration: torch.Tensor | None = None,
        min_score: float | None = None,
        output: str
        | None = None,  # the labeling output, as the live metrics' tag (skray.label.metrics)
    ) -> None:
        self.classifier = Classifier.for_worker(
            model,
            pinned,
            threads=threads,
            compile=compile,
            preprocessing=preprocessing,
            decode=decode,
            batch_size=batch_size,
            precision=precision,
            calibration=calibration,
        )
        on_gpu = torch.cuda.is_available()
        self.top_k, self.min_score = top_k, min_score or 0.0
        self._prefetch = ThreadPoolExecutor(1, thread_name_prefix="skray-prefetch")
        self._stream = (
            torch.cuda.Stream() if on_gpu else None
        )  # GPU only: decode beside the forward
        self._returned: float | None = None  # when the previous batch was handed back
        self.metrics = LabelMetrics(output)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        start = time.perf_counter()
        n = len(batch["key"])
        reasons = [r or None for r in batch["reason"]]
        errors = [e or None for e in batch["error"]]
        ok = [i for i, e in enumerate(errors) if not e]
        if "data" in batch:
            logits, decode_s, model_s = self._decode_and_forward(
                [batch["data"][i] for i in ok], ok, reasons, errors
            )
        else:
            logits, model_s = (
                self._forward(torch.from_numpy(batch["image"][ok])) if ok else (None, 0.0)
            )
            decode_s = 0.0
        results: list = [None] * n
        for i, prediction in zip(ok, self.classifier.rank(logits, self.top_k) if ok else []):
            results[i] = None if errors[i] else prediction  # errors[i]: the actor's decode failed
        wait_s = start - self._returned if self._returned is not None else 0.0
        table = self._table(
            batch,
            results,
            reasons,
            errors,
            {
                "decode_s": np.asarray(batch["decode_s"], dtype=np.float64) + decode_s / n,
                "model_s": np.full(n, model_s / n),
                "wait_s": np.full(n, wait_s / n),
                "read_bytes": np.asarray(batch["read_bytes"], dtype=np.int64),
            },
        )
        self.metrics.batch(
            reasons,
            {
                "decode": float(np.sum(batch["decode_s"])) + decode_s,
                "model": model_s,
                "wait": wait_s,
            },
        )
        self._returned = time.perf_counter()
        return table

    def _decode_and_forward(
        self,
        blobs: list[bytes],
        rows: list[int],
        reasons: list[str | None],
        errors: list[str | None],
    ) -> tuple[torch.Tensor | None, float, float]:
        """Logits for ``blobs`` (rows ``rows`` of the batch), decoding chunk k+1 while chunk k runs;
        decode errors are written into ``reasons`` and ``errors``. Returns the logits and the
        decode and model seconds."""
        if not blobs:
            return None, 0.0, 0.0
        step = self.classifier.batch_size or len(blobs)
        chunks = [slice(s, s + step) for s in range(0, len(blobs), step)]
        pending: Future = self._prefetch.submit(self._decode, blobs[chunks[0]])
        logits, decode_s, model_s = [], 0.0, 0.0
        for k, chunk in enumerate(chunks):
            crops, chunk_errors, seconds = pending.result()
            decode_s += seconds
            if k + 1 < len(chunks):
                pending = self._prefetch.submit(self._decode, blobs[chunks[k + 1]])
            for row, err in zip(rows[chunk], chunk_errors):
                if err is not None:
                    reasons[row], errors[row] = err.reason, str(err)
            chunk_logits, seconds = self._forward(crops)
            logits.append(chunk_logits)
            model_s += seconds
        return torch.cat(logits), decode_s, model_s

    def _forward(self, crops: torch.Tensor) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        logits = self.classifier.logits(crops)
        if self._stream is not None:  # GPU only: time the forward, not just its launch
            torch.cuda.current_stream().synchronize()
        return logits, time.perf_counter() - start

    def _decode(
        self, blobs: list[bytes]
    ) -> tuple[torch.Tensor, list[ImageDecodeError | None], float]:
        start = time.perf_counter()
        if self._stream is None:
            crops, errors = self.classifier.decode_batch(blobs)
        else:  # GPU only
            with torch.cuda.stream(self._stream):
                crops, errors = self.classifier.decode_batch(blobs)
            self._stream.synchronize()
            crops.record_stream(torch.cuda.current_stream())
        return crops, errors, time.perf_counter() - start

    def _table(
        self,
        batch: dict[str, np.ndarray],
        results: list,
        reasons: list[str | None],
        errors: list[str | None],
        stages: dict[str, np.ndarray],
    ) -> pa.Table:
        n = len(results)
        names = self.classifier.class_names

        def column(field: str) -> list:
            return [getattr(p, field) if p else None for p in results]

        # under min_score: top-k kept, no label (None on failed rows, which have no score)
        unsure = [None if p is None else p.score < self.min_score for p in results]
        sure = [p if p and not low else None for p, low in zip(results, unsure)]

        labels = {  # the label schema's columns, typed by it (skray.label.sinks.LABEL_SCHEMA)
            "key": batch["key"],
            "label_id": [p.label_id if p else None for p in sure],
            "label": [names[p.label_id] if p else None for p in sure],
            "score": column("score"),
            "topk_ids": column("topk_ids"),
            "topk_scores": column("topk_scores"),
            "model": [self.classifier.architecture] * n,
            "weights_sha256": [self.classifier.weights_sha256] * n,
            "reason": reasons,
            "error": errors,
            "meta": [m or None for m in batch["meta"]],
            "low_confidence": unsure,
        }
        return pa.table(
            {
                **{f.name: pa.array(labels[f.name], f.type) for f in LABEL_SCHEMA},
                "unit": pa.array(batch["unit"], pa.string()),
                "unit_rows": pa.array(batch["unit_rows"], pa.int64()),
                **{name: pa.array(values) for name, values in stages.items()},
            }
        )
