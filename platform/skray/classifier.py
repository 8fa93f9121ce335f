"""One loaded model ready to classify: weights, class names, fast path, top-k.

The labeling actors, the Serve replicas and ``skray predict`` all hold one of
these, so they load weights, preprocess and rank the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, Field

from skray.classes import default_class_names
from skray.config import StrictModel
from skray.images import DEFAULT_MAX_PIXELS, EvalTransformConfig, ImageDecodeError, decode_for_eval, normalize
from skray.model import DEFAULT_MODEL, list_models, prepare_for_inference
from skray.weights import PinnedWeights, load_model

RANDOM_WEIGHTS_SEED = 0  # without weights, every actor and replica still holds one and the same model


def registered_model(name: str) -> str:
    if name not in list_models():
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return name


ModelName = Annotated[str, AfterValidator(registered_model)]
"""A config field holding an architecture name: unknown names fail validation, listing the known ones."""


class PreprocessingConfig(StrictModel):
    """The eval transform as a config section (labeling, serving): the model card's by default."""

    image_size: int = Field(224, ge=32)
    crop_pct: float = Field(0.875, gt=0, le=1)
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)

    def transform(self) -> EvalTransformConfig:
        return EvalTransformConfig(self.image_size, self.crop_pct, self.interpolation)


@dataclass(frozen=True)
class Prediction:
    label_id: int
    label: str
    score: float
    topk_ids: list[int]
    topk_scores: list[float]
    topk_labels: list[str]

    def top(self, k: int) -> Prediction:
        """The same prediction keeping only the ``k`` best classes."""
        return replace(self, topk_ids=self.topk_ids[:k], topk_scores=self.topk_scores[:k],
                       topk_labels=self.topk_labels[:k])


class Classifier:
    """Loads the model once; classifies batches of preprocessed tensors or raw bytes."""

    def __init__(
        self,
        model: str | None = None,
        weights: str | PinnedWeights | None = None,
        *,
        device: str | None = None,
        compile: bool = False,
        amp_dtype: torch.dtype | None = None,
        preprocessing: EvalTransformConfig = EvalTransformConfig(),
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            net, loaded = load_model(model, weights)  # PinnedWeights: only the bytes they were pinned to
        self.pinned = weights if isinstance(weights, PinnedWeights) else None
        self.architecture = model or (loaded.architecture if loaded else None) or DEFAULT_MODEL
        self.weights_source = loaded.source if loaded else None
        self.weights_sha256 = loaded.sha256 if loaded else None
        self.class_names = loaded.class_names if loaded else default_class_names(net.num_classes)
        self.random_weights = loaded is None
        self.preprocessing, self.max_pixels = preprocessing, max_pixels
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._forward = prepare_for_inference(net, self.device, compile=compile, amp_dtype=amp_dtype)

    def decode(self, data: bytes) -> torch.Tensor:
        """Bytes -> uint8 eval crop (3, S, S); raises :class:`ImageDecodeError`."""
        return decode_for_eval(data, self.preprocessing, max_pixels=self.max_pixels)

    def predict_tensors(self, crops: torch.Tensor, top_k: int = 5) -> list[Prediction]:
        """Top-k for a batch of uint8 eval crops (N, 3, S, S), normalized on the model's device."""
        batch = normalize(crops.to(self.device, non_blocking=True), self.preprocessing.mean, self.preprocessing.std)
        probs = torch.softmax(self._forward(batch), dim=1).cpu()
        scores, ids = probs.topk(min(top_k, probs.shape[1]), dim=1)
        return [self._prediction(i.tolist(), s.tolist()) for i, s in zip(ids, scores)]

    def predict_bytes(
        self, images: list[bytes], top_k: int = 5
    ) -> list[Prediction | ImageDecodeError]:
        """Classify what decodes; a broken image yields its error in its place."""
        results: list[Prediction | ImageDecodeError] = []
        tensors: list[torch.Tensor] = []
        for data in images:
            try:
                tensors.append(self.decode(data))
                results.append(None)  # type: ignore[arg-type]
            except ImageDecodeError as err:
                results.append(err)
        predictions = iter(self.predict_tensors(torch.stack(tensors), top_k) if tensors else [])
        return [next(predictions) if r is None else r for r in results]

    def _prediction(self, ids: list[int], scores: list[float]) -> Prediction:
        labels = [self.class_names[i] for i in ids]
        return Prediction(ids[0], labels[0], scores[0], ids, scores, labels)
