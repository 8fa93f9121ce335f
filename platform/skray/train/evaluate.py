"""``skray evaluate``: top-1 / top-5 of a model on a labeled image set, with the card's eval
transform.

How a user confirms 80.15 / 94.64 for the published weights on ImageNet val
(``ROOT/<synset>/<image>``: sorted synsets are the logits' order). The data
streams through Ray Data like the labeling job: read + eval crop in CPU tasks,
an actor pool holding the model in its fast form, counts summed on the driver.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from skray.core.preprocessing import PreprocessingConfig
from skray.inference.classifier import Classifier
from skray.inference.precision import resolve_precision
from skray.io.config import (
    ModelName,
    ModelPreprocessing,
    Precision,
    StrictModel,
    resolve_gpus,
)
from skray.train.accuracy import count_hits
from skray.train.datasets import BAD_LABEL, DatasetError, LabeledData, discover, ray_dataset
from skray.weights.resolver import PinnedWeights, pin_weights


class EvaluateConfig(StrictModel):
    data: str  # ROOT/<synset>/<image> (folder), WebDataset shards or Parquet; local or s3://
    format: Literal["folder", "webdataset", "parquet"] = "folder"
    model: ModelName | None = Field(
        None, description="None: the architecture recorded in the weights, else the default"
    )
    weights: str | None = None
    preprocessing: ModelPreprocessing = Field(
        PreprocessingConfig(), description="unset fields: the model's"
    )
    batch_size: int = Field(64, ge=1)
    actors: int = Field(1, ge=1)
    threads: int | None = Field(None, ge=1, description="torch intra-op threads per actor")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32", description="auto: bf16 on AMX/AVX512-BF16 CPUs and bf16 GPUs, else fp32"
    )


class Scorer:
    """Ray Data class UDF: the model loaded once; each batch -> its hit counts
    (:func:`skray.train.accuracy.count_hits`)."""

    def __init__(
        self,
        model: str | None,
        weights: PinnedWeights | None,
        preprocessing: PreprocessingConfig,
        label_map: list[int] | None,
        threads: int | None = None,
        precision: Precision = "fp32",
    ) -> None:
        self.classifier = Classifier.for_worker(
            model, weights, threads=threads, preprocessing=preprocessing, precision=precision
        )
        self.label_map = None if label_map is None else np.array(label_map)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        labels = batch["label"]
        good = labels != BAD_LABEL
        hits1 = hits5 = 0
        if good.any():  # the model sees decodable rows only
            targets = labels[good] if self.label_map is None else self.label_map[labels[good]]
            logits = self.classifier.logits(torch.from_numpy(batch["image"][good]))
            hits1, hits5, _, _ = count_hits(logits.cpu(), torch.from_numpy(targets)).tolist()
        return {
            "top1": np.array([int(hits1)]),
            "top5": np.array([int(hits5)]),
            "n": np.array([int(good.sum())]),
            "skipped": np.array([int((~good).sum())]),
        }


def label_map(data: LabeledData, model_classes: list[str]) -> list[int] | None:
    """Dataset class index -> model logit index: by name when the names match, else by position."""
    if set(data.class_names) <= set(model_classes):
        index = {name: i for i, name in enumerate(model_classes)}
        return [index[name] for name in data.class_names]
    if len(data.class_names) > len(model_classes):
        raise DatasetError(
            f"the dataset has {len(data.class_names)} classes, the model only {len(model_classes)}"
        )
    return None


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    import ray
    import ray.data

    pinned = pin_weights(cfg.weights, cfg.model)  # every actor scores the same bytes
    probe = Classifier(cfg.model, pinned)  # fails fast on weights; gives the class names
    preprocessing = cfg.preprocessing.for_model(
        probe.architecture
    )  # unset: the loaded architecture's
    data = discover(cfg.data, cfg.format)
    mapping = label_map(data, probe.class_names)
    ray.init(ignore_reinit_error=True)
    gpus = resolve_gpus("auto")
    precision, reason = resolve_precision(cfg.precision, "cuda" if gpus else "cpu")
    ds = ray_dataset(
        data,
        image_size=preprocessing.image_size,
        train=False,
        eval_cfg=preprocessing,
        batch_size=cfg.batch_size,
    )
    ds = ds.map_batches(
        Scorer,
        fn_constructor_kwargs={
            "model": cfg.model,
            "weights": pinned,
            "preprocessing": preprocessing,
            "label_map": mapping,
            "threads": cfg.threads,
            "precision": precision,
        },
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.actors),
        num_gpus=gpus,
    )
    totals = {"top1": 0, "top5": 0, "n": 0, "skipped": 0}
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key in totals:
            totals[key] += int(batch[key].sum())
    n = max(totals["n"], 1)
    return {
        "data": cfg.data,
        "model": probe.architecture,
        "weights": probe.weights_source,
        "weights_sha256": probe.weights_sha256,
        "images": totals["n"],
        "skipped": totals["skipped"],
        "top1": 100.0 * totals["top1"] / n,
        "top5": 100.0 * totals["top5"] / n,
        "precision": precision,
        "precision_reason": reason,
    }
