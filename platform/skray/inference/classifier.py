"""One loaded model ready to classify: weights, class names, fast path, top-k.

The labeling actors, the Serve replicas and ``skray predict`` all hold one of
these, so they load weights, preprocess and rank the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from skray.core.classes import default_class_names
from skray.core.images import ImageDecodeError, decode_for_eval
from skray.core.model import prepare_for_inference
from skray.core.preprocessing import PreprocessingConfig
from skray.core.specs import DEFAULT_MODEL
from skray.core.transforms import normalize
from skray.inference.precision import resolve_precision
from skray.inference.quantize import DEFAULT_BATCH_SIZE, check_int8, quantize_int8
from skray.io.config import Decode, Precision, resolve_decode
from skray.weights.resolver import PinnedWeights, load_model

RANDOM_WEIGHTS_SEED = (
    0  # without weights, every actor and replica still holds one and the same model
)


def probe_batch_size(
    forward,
    image_size: int,
    device: torch.device,
    *,
    memory_fraction: float = 0.8,
    limit: int = 1024,
) -> int:
    """GPU only: the largest power-of-two batch (<= ``limit``) whose forward peaks within
    ``memory_fraction`` of the GPU's memory; probed once, at start, with the uncompiled model."""
    total = torch.cuda.get_device_properties(device).total_memory
    best, size = 1, 1
    while size <= limit:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            forward(torch.zeros(size, 3, image_size, image_size, device=device))
            torch.cuda.synchronize(device)
        except torch.cuda.OutOfMemoryError:
            break
        if torch.cuda.max_memory_allocated(device) > memory_fraction * total:
            break
        best, size = size, size * 2
    torch.cuda.empty_cache()
    return best


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
        return replace(
            self,
            topk_ids=self.topk_ids[:k],
            topk_scores=self.topk_scores[:k],
            topk_labels=self.topk_labels[:k],
        )


class Classifier:
    """Loads the model once; classifies batches of preprocessed tensors or raw bytes."""

    def __init__(
        self,
        model: str | None = None,
        weights: str | PinnedWeights | None = None,
        *,
        device: str | None = None,
        compile: bool = False,
        preprocessing: PreprocessingConfig = PreprocessingConfig(),
        decode: Decode = "cpu",
        batch_size: int | Literal["auto"] | None = None,
        precision: Precision = "fp32",
        calibration: torch.Tensor | None = None,
    ) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            net, loaded = load_model(
                model, weights
            )  # PinnedWeights: only the bytes they were pinned to
        self.pinned = weights if isinstance(weights, PinnedWeights) else None
        self.architecture = model or (loaded.architecture if loaded else None) or DEFAULT_MODEL
        self.weights_source = loaded.source if loaded else None
        self.weights_sha256 = loaded.sha256 if loaded else None
        self.class_names = loaded.class_names if loaded else default_class_names(net.num_classes)
        self.random_weights = loaded is None
        self.preprocessing = preprocessing = preprocessing.for_model(
            self.architecture
        )  # unset: the model's
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        precision, self.precision_reason = resolve_precision(precision, self.device.type)
        if precision == "int8":  # uint8 eval crops to calibrate on, e.g. quantize.calibration_crops
            check_int8(self.device, calibration)
        amp_dtype = torch.bfloat16 if precision == "bf16" else None
        self._forward = prepare_for_inference(
            net, self.device, compile=compile, amp_dtype=amp_dtype
        )
        self.compiled = compile
        if batch_size == "auto":  # a GPU is probed; elsewhere, batches run as they come
            uncompiled = prepare_for_inference(net, self.device, amp_dtype=amp_dtype)
            on_gpu = self.device.type == "cuda"
            batch_size = (
                probe_batch_size(uncompiled, preprocessing.image_size, self.device)
                if on_gpu
                else None
            )
        self.batch_size = batch_size  # the forward's batch shape: inputs run in chunks of it
        self.precision = precision
        if precision == "int8":  # compiled for one batch shape: logits() pads short chunks to it
            self.batch_size = batch_size or DEFAULT_BATCH_SIZE
            self._forward = quantize_int8(net, calibration, self.batch_size, preprocessing)
            self.compiled = True
        self.decode_on = resolve_decode(decode, self.device.type == "cuda")
        self._decoder = None
        if self.decode_on == "gpu":
            # torchvision's decoders: imported only by the processes that decode on the device.
            from skray.core.device_decode import DeviceDecoder

            self._decoder = DeviceDecoder(preprocessing, device=self.device)

    def decode(self, data: bytes) -> torch.Tensor:
        """Bytes -> uint8 eval crop (3, S, S); raises :class:`ImageDecodeError`."""
        return torch.from_numpy(decode_for_eval(data, self.preprocessing))

    def decode_batch(
        self, images: list[bytes]
    ) -> tuple[torch.Tensor, list[ImageDecodeError | None]]:
        """Bytes -> uint8 crops (N, 3, S, S) on the model's device and one error or ``None`` each
        (a failed image keeps a zero crop); only with ``decode="gpu"`` (or ``auto`` on a GPU)."""
        if self._decoder is None:
            raise RuntimeError("decode_batch needs a device decoder: Classifier(decode='gpu')")
        return self._decoder(images)

    def logits(self, crops: torch.Tensor) -> torch.Tensor:
        """fp32 logits for uint8 crops (N, 3, S, S), run in chunks of ``batch_size``; with
        ``compile``, a short last chunk is zero-padded to it, so the compiled graph is reused."""
        step = self.batch_size or len(crops)
        out = []
        for start in range(0, len(crops), step):
            chunk = crops[start : start + step].to(self.device, non_blocking=True)
            n = len(chunk)
            if self.compiled and n < step:
                chunk = torch.cat([chunk, chunk.new_zeros((step - n, *chunk.shape[1:]))])
            batch = normalize(chunk, self.preprocessing.mean, self.preprocessing.std)
            out.append(self._forward(batch)[:n])
        return torch.cat(out)

    def predict_tensors(self, crops: torch.Tensor, top_k: int = 5) -> list[Prediction]:
        """Top-k for a batch of uint8 eval crops (N, 3, S, S), normalized on the model's device."""
        return self.rank(self.logits(crops), top_k)

    def rank(self, logits: torch.Tensor, top_k: int = 5) -> list[Prediction]:
        """Logits (N, classes) -> one top-k :class:`Prediction` per row."""
        probs = torch.softmax(logits, dim=1).cpu()
        scores, ids = probs.topk(min(top_k, probs.shape[1]), dim=1)
        return [self._prediction(i.tolist(), s.tolist()) for i, s in zip(ids, scores)]

    def predict_bytes(
        self, images: list[bytes], top_k: int = 5
    ) -> list[Prediction | ImageDecodeError]:
        """Classify what decodes; a broken image yields its error in its place."""
        if self._decoder is not None:
            crops, errors = self._decoder(images)
            ok = [i for i, e in enumerate(errors) if e is None]
            predictions = iter(self.predict_tensors(crops[ok], top_k) if ok else [])
            return [next(predictions) if e is None else e for e in errors]
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

    @classmethod
    def for_worker(
        cls,
        model: str | None,
        weights: str | PinnedWeights | None,
        *,
        threads: int | None = None,
        **options: object,
    ) -> Classifier:
        """The model as a Ray worker holds it (labeling actor, Serve replica, evaluation scorer):
        ``threads`` torch intra-op threads when given; ``options`` as for the constructor."""
        if threads:
            torch.set_num_threads(threads)
        return cls(model, weights, **options)  # type: ignore[arg-type]
