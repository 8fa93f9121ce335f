"""``skray evaluate``: top-1 / top-5 of a model on a labeled image set, with the card's eval transform.

How a user confirms 80.15 / 94.64 for the published weights on ImageNet val
(``ROOT/<synset>/<image>``: sorted synsets are the logits' order). The data
streams through Ray Data like the labeling job: read + eval crop in CPU tasks,
an actor pool holding the model in its fast form, counts summed on the driver.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from skray.classifier import Classifier
from skray.config import resolve_gpus
from skray.datasets import BAD_LABEL, LabeledData, discover, ray_dataset
from skray.images import EvalTransformConfig
from skray.resolver import PinnedWeights, pin_weights


class Scorer:
    """Ray Data class UDF: the model loaded once; each batch -> its hit counts."""

    def __init__(self, model: str | None, weights: PinnedWeights | None, preprocessing: EvalTransformConfig,
                 label_map: list[int] | None, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        amp = torch.bfloat16 if torch.cuda.is_available() else None
        self.classifier = Classifier(model, weights, amp_dtype=amp, preprocessing=preprocessing)
        self.label_map = label_map

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        labels = batch["label"]
        good = labels != BAD_LABEL
        hits1 = hits5 = 0
        if good.any():
            targets = labels[good] if self.label_map is None else np.array(self.label_map)[labels[good]]
            predictions = self.classifier.predict_tensors(torch.from_numpy(batch["image"][good]), top_k=5)
            hits1 = sum(int(p.label_id == t) for p, t in zip(predictions, targets))
            hits5 = sum(int(t in p.topk_ids) for p, t in zip(predictions, targets))
        return {"top1": np.array([hits1]), "top5": np.array([hits5]), "n": np.array([int(good.sum())]),
                "skipped": np.array([int((~good).sum())])}


def label_map(data: LabeledData, model_classes: list[str]) -> list[int] | None:
    """Dataset class index -> model logit index: by name when the names match, else by position."""
    if set(data.class_names) <= set(model_classes):
        index = {name: i for i, name in enumerate(model_classes)}
        return [index[name] for name in data.class_names]
    if len(data.class_names) > len(model_classes):
        raise ValueError(f"the dataset has {len(data.class_names)} classes, the model only {len(model_classes)}")
    return None


def evaluate(data_uri: str, weights: str | None, *, model: str | None = None, fmt: str = "folder",
             batch_size: int = 64, image_size: int = 224, crop_pct: float = 0.875,
             actors: int = 1, threads: int | None = None) -> dict[str, Any]:
    import ray
    import ray.data

    preprocessing = EvalTransformConfig(image_size, crop_pct)
    pinned = pin_weights(weights, model)  # every actor scores the same bytes
    probe = Classifier(model, pinned)  # fails fast on weights; gives the class names
    data = discover(data_uri, fmt)  # type: ignore[arg-type]
    mapping = label_map(data, probe.class_names)
    ray.init(ignore_reinit_error=True)
    ds = ray_dataset(data, image_size=image_size, train=False, eval_cfg=preprocessing, batch_size=batch_size)
    ds = ds.map_batches(
        Scorer, fn_constructor_kwargs={"model": model, "weights": pinned, "preprocessing": preprocessing,
                                       "label_map": mapping, "threads": threads},
        batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=resolve_gpus("auto"),
    )
    totals = {"top1": 0, "top5": 0, "n": 0, "skipped": 0}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key in totals:
            totals[key] += int(batch[key].sum())
    n = max(totals["n"], 1)
    return {"data": data_uri, "model": probe.architecture, "weights": probe.weights_source,
            "weights_sha256": probe.weights_sha256, "images": totals["n"], "skipped": totals["skipped"],
            "top1": 100.0 * totals["top1"] / n, "top5": 100.0 * totals["top5"] / n}
