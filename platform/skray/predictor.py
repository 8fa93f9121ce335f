"""The labeling job's two stages, as Ray Data UDFs.

``read_and_decode`` (stateless CPU tasks, scaled on their own): reads a unit and
turns its bytes into uint8 center crops, batch by batch, or an error per row;
bytes never enter the object store and are decoded once. ``Predictor`` (an actor
pool): loads the model once per actor in its fast form and turns crops into
top-k labels. Crops travel as uint8 and are normalized next to the model: a
quarter of the bytes of float32, and the same arithmetic as
:func:`skray.images.preprocess`.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch

from skray.classifier import Classifier
from skray.images import DEFAULT_MAX_PIXELS, EvalTransformConfig, ImageDecodeError, decode_for_eval
from skray.sources import Unit, unit_batches
from skray.weights import PinnedWeights

PASSTHROUGH = ("key", "error", "meta", "unit", "unit_rows")


def decode_rows(
    rows: list[dict[str, Any]], preprocessing: EvalTransformConfig, max_pixels: int = DEFAULT_MAX_PIXELS
) -> dict[str, np.ndarray]:
    """Decode and crop each image once; a bad one keeps a blank crop and gets ``error``."""
    size = preprocessing.image_size
    crops = np.zeros((len(rows), 3, size, size), dtype=np.uint8)
    errors = [row["error"] for row in rows]
    for i, row in enumerate(rows):
        if errors[i]:
            continue
        try:
            crops[i] = decode_for_eval(row["data"], preprocessing, max_pixels=max_pixels).numpy()
        except ImageDecodeError as err:
            errors[i] = str(err)
    out = {name: np.array([row[name] for row in rows], dtype=object) for name in PASSTHROUGH}
    out["unit_rows"] = out["unit_rows"].astype(np.int64)
    out["error"] = np.array(errors, dtype=object)
    out["image"] = crops
    return out


def read_and_decode(
    units: pa.Table,
    preprocessing: EvalTransformConfig,
    max_pixels: int,
    batch_size: int,
    image_column: str,
    id_column: str | None,
    max_object_bytes: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Stream each unit's decoded crops ``batch_size`` at a time, as they are read, so a task
    holds one batch of bytes, not a shard; the rows of a unit's last batch carry its row count."""
    for unit in units.to_pylist():
        for rows in unit_batches(Unit.from_row(unit), batch_size, image_column, id_column,
                                 max_object_bytes=max_object_bytes):
            yield decode_rows(rows, preprocessing, max_pixels)


class Predictor:
    """Ray Data class UDF: the model is loaded once, in ``__init__``; ``__call__`` labels a batch."""

    def __init__(
        self,
        model: str | None,
        pinned: PinnedWeights | None,
        top_k: int,
        preprocessing: EvalTransformConfig,
        threads: int | None = None,
        compile: bool = False,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        amp = torch.bfloat16 if torch.cuda.is_available() else None
        self.classifier = Classifier(
            model, pinned, compile=compile, amp_dtype=amp, preprocessing=preprocessing
        )
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["key"])
        ok = np.array([not e for e in batch["error"]], dtype=bool)
        predictions = iter(
            self.classifier.predict_tensors(torch.from_numpy(batch["image"][ok]), self.top_k)
            if ok.any()
            else []
        )
        results = [next(predictions) if good else None for good in ok]
        names = self.classifier.class_names

        def column(field: str) -> list:
            return [getattr(p, field) if p else None for p in results]

        return pa.table(
            {
                "key": pa.array(batch["key"], pa.string()),
                "label_id": pa.array(column("label_id"), pa.int32()),
                "label": pa.array([names[p.label_id] if p else None for p in results], pa.string()),
                "score": pa.array(column("score"), pa.float32()),
                "topk_ids": pa.array(column("topk_ids"), pa.list_(pa.int32())),
                "topk_scores": pa.array(column("topk_scores"), pa.list_(pa.float32())),
                "model": pa.array([self.classifier.architecture] * n, pa.string()),
                "weights_sha256": pa.array([self.classifier.weights_sha256] * n, pa.string()),
                "error": pa.array([e or None for e in batch["error"]], pa.string()),
                "meta": pa.array([m or None for m in batch["meta"]], pa.string()),
                "unit": pa.array(batch["unit"], pa.string()),
                "unit_rows": pa.array(batch["unit_rows"], pa.int64()),
            }
        )
