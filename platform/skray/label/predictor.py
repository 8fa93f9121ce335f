"""The labeling job's second stage, as a Ray Data class UDF: the model actors.

``Predictor`` (an actor pool) loads the model once per actor in its fast form and turns the
read stage's crops (:mod:`skray.label.read`), or with ``decode="gpu"`` its bytes, decoded here
next to the model (:mod:`skray.core.device_decode`), into top-k labels. Crops are normalized
next to the model, the same arithmetic as :func:`skray.core.transforms.preprocess`.

Stage figures ride along as columns, per row (the batch's seconds / its rows), for the driver
to sum: the read stage's ``decode_s`` and ``read_bytes``, then ``model_s`` (forward) and
``wait_s`` (the actor idle before this batch arrived).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import numpy as np
import pyarrow as pa
import torch

from skray.core.images import ImageDecodeError
from skray.core.preprocessing import PreprocessingConfig
from skray.inference.classifier import Classifier
from skray.io.config import Decode, Precision
from skray.label.metrics import LabelMetrics
from skray.label.sinks import LABEL_SCHEMA
from skray.weights.resolver import PinnedWeights


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
