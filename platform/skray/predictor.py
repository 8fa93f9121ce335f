"""The labeling job's two per-batch stages, as Ray Data UDFs.

``decode_batch`` (stateless CPU tasks, scaled on their own): bytes -> uint8
center crops, or an error. ``Predictor`` (an actor pool): loads the model once
per actor in its fast form and turns crops into top-k labels. Crops travel as
uint8 and are normalized next to the model: a quarter of the bytes through the
object store, and the same arithmetic as :func:`skray.images.preprocess`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from skray.classifier import Classifier
from skray.images import DEFAULT_MAX_PIXELS, EvalTransformConfig, ImageDecodeError, decode_for_eval

PASSTHROUGH = ("key", "error", "meta", "unit", "unit_rows")


def decode_batch(
    batch: dict[str, np.ndarray],
    preprocessing: EvalTransformConfig,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> dict[str, np.ndarray]:
    """Decode and crop each image once; a bad one keeps a blank crop and gets ``error``."""
    size = preprocessing.image_size
    crops = np.zeros((len(batch["key"]), 3, size, size), dtype=np.uint8)
    errors = list(batch["error"])
    for i, data in enumerate(batch["data"]):
        if errors[i] is not None:
            continue
        try:
            crops[i] = decode_for_eval(bytes(data), preprocessing, max_pixels=max_pixels).numpy()
        except ImageDecodeError as err:
            errors[i] = str(err)
    out = {name: batch[name] for name in PASSTHROUGH}
    out["error"] = np.array(errors, dtype=object)
    out["image"] = crops
    return out


class Predictor:
    """Ray Data class UDF: the model is loaded once, in ``__init__``; ``__call__`` labels a batch."""

    def __init__(
        self,
        model: str | None,
        weights: str | None,
        top_k: int,
        preprocessing: EvalTransformConfig,
        threads: int | None = None,
        compile: bool = False,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        amp = torch.bfloat16 if torch.cuda.is_available() else None
        self.classifier = Classifier(
            model, weights, compile=compile, amp_dtype=amp, preprocessing=preprocessing
        )
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["key"])
        ok = np.array([e is None for e in batch["error"]], dtype=bool)
        k = min(self.top_k, len(self.classifier.class_names))
        label_id = np.full(n, -1, dtype=np.int32)
        score = np.zeros(n, dtype=np.float32)
        topk_ids = np.full((n, k), -1, dtype=np.int32)
        topk_scores = np.zeros((n, k), dtype=np.float32)
        if ok.any():
            predictions = self.classifier.predict_tensors(torch.from_numpy(batch["image"][ok]), k)
            rows = np.flatnonzero(ok)
            for row, p in zip(rows, predictions):
                label_id[row], score[row] = p.label_id, p.score
                topk_ids[row], topk_scores[row] = p.topk_ids, p.topk_scores
        names = self.classifier.class_names
        out = {name: batch[name] for name in PASSTHROUGH}
        out.update(
            label_id=label_id,
            label=np.array([names[i] if i >= 0 else None for i in label_id], dtype=object),
            score=score,
            topk_ids=topk_ids,
            topk_scores=topk_scores,
            model=np.full(n, self.classifier.architecture, dtype=object),
            weights_sha256=np.full(n, self.classifier.weights_sha256, dtype=object),
        )
        return out
