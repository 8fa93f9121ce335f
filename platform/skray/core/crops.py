"""Rows read from units -> uint8 crops: the decode step that the labeling job's read tasks
(:mod:`skray.label.read`) and the training and evaluation datasets
(:mod:`skray.train.datasets`) share, so a bad image fails the same way, with the same typed
error, in every job.

``crop`` is :func:`skray.core.images.decode_for_eval` (the eval crop) or
:func:`skray.core.images.decode_for_train` (a random training crop) with their settings bound.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from skray.core.images import ImageDecodeError

# encoded bytes -> uint8 (3, S, S) array (the eval crop or a training crop); raises ImageDecodeError
Crop = Callable[[bytes], np.ndarray]


def crop_rows(
    rows: list[dict[str, Any]], crop: Crop, size: int
) -> tuple[np.ndarray, list[str], list[str]]:
    """Crops ``(N, 3, size, size)`` uint8 and a reason and an error per row ("" when it
    decoded): a row read with an error keeps them, one whose image does not decode gets its
    :class:`ImageDecodeError`'s reason and text; both keep a blank crop. Each image is decoded
    once."""
    crops = np.zeros((len(rows), 3, size, size), dtype=np.uint8)
    reasons, errors = [row["reason"] for row in rows], [row["error"] for row in rows]
    for i, row in enumerate(rows):
        if errors[i]:
            continue
        try:
            crops[i] = np.asarray(crop(row["data"]))
        except ImageDecodeError as err:
            reasons[i], errors[i] = err.reason, str(err)
    return crops, reasons, errors
