"""Model weights as files: read, verify against the model, load all-or-nothing, save.

Torch files are read with ``weights_only=True`` and safetensors files as tensors: no
checkpoint can run code. Loading never half-modifies a model: the checkpoint is compared
with the model first, and a mismatch raises one error that lists every difference. The
only tolerated difference is the classifier head's size, the fine-tuning case: the
backbone loads and the head stays fresh.

Where weights come from (a path, ``s3://``, ``https://``, ``pretrained``, an MLflow
model) and pinning them is :mod:`skray.weights.resolver`, above this module and
:mod:`skray.weights.store`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import safetensors
import safetensors.torch
import torch

from skray.core.classes import default_class_names
from skray.core.errors import SkrayError
from skray.core.model import SKResNeXt
from skray.core.specs import model_spec
from skray.io import storage

__all__ = [
    "WeightsError",
    "LoadedWeights",
    "apply_state",
    "file_sha256",
    "parse_state_dict",
    "read_safetensors_metadata",
    "read_state_dict",
    "save_weights",
]

log = logging.getLogger(__name__)

FORMAT = "skray/1"
HEAD_KEYS = frozenset({"fc.weight", "fc.bias"})
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*(.+)")
_NESTED_KEYS = ("state_dict", "model", "state_dict_ema")
_CHUNK = 1 << 20
_LISTED = 10


class WeightsError(SkrayError):
    """Weights that cannot be fetched, read, or loaded into the model."""


@dataclass(frozen=True)
class LoadedWeights:
    """What was loaded, for logs, model registries and the serving endpoint."""

    source: str
    sha256: str
    class_names: list[str]
    head_reset: bool
    architecture: str | None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _is_torch(data: bytes) -> bool:
    """Torch files are zip archives (or legacy pickles); anything else is tried as safetensors."""
    return data.startswith(b"PK\x03\x04") or data[:1] == b"\x80"


def read_safetensors_metadata(f: BinaryIO) -> dict[str, str]:
    """The ``__metadata__`` of the safetensors file open as ``f``, from its header alone (8
    bytes little-endian length, then JSON): no tensor is read."""
    size = int.from_bytes(f.read(8), "little")
    return json.loads(f.read(size)).get("__metadata__") or {}


def _unwrap(obj: object, path: str) -> dict[str, torch.Tensor]:
    """The state_dict inside a training checkpoint, without DataParallel's ``module.``."""
    if isinstance(obj, dict):
        obj = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), dict)), obj)
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"cannot read weights file {path}: no state_dict of tensors in it")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata (empty for torch files) of a weights file."""
    path = Path(path)
    return parse_state_dict(path.read_bytes(), str(path))


def parse_state_dict(data: bytes, path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """:func:`read_state_dict` over bytes already read (and hashed) from ``path``.

    Torch files are read with ``weights_only=True``: a checkpoint must never be
    able to run code.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in (".pth", ".pt", ".safetensors"):
        suffix = ".pth" if _is_torch(data) else ".safetensors"
    try:
        if suffix == ".safetensors":
            return safetensors.torch.load(data), read_safetensors_metadata(io.BytesIO(data))
        return _unwrap(
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), path
        ), {}
    except WeightsError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure means an unusable file
        raise WeightsError(f"cannot read weights file {path}: {_reason(exc)}") from exc


def _reason(exc: Exception) -> str:
    """One line out of a reader's error; torch's weights_only refusal is a page of advice."""
    text = str(exc).strip()
    refused = _UNPICKLER_ERROR.search(text)
    if refused:
        detail = refused[1].split(". ")[0]
        what = "it holds objects other than tensors" if "global" in detail else "not a checkpoint"
        return f"{what}, refused by weights_only loading ({detail})"
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class _Diff:
    missing: list[str]
    unexpected: list[str]
    mismatched: dict[str, str]  # key -> "key: checkpoint (shape) vs model (shape)"

    @property
    def empty(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    @property
    def only_head_size(self) -> bool:
        differs = bool(self.mismatched) and self.mismatched.keys() <= HEAD_KEYS
        return differs and not (self.missing or self.unexpected)


def _compare(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> _Diff:
    # BatchNorm fills in a missing num_batches_tracked itself (checkpoints from before torch 0.4.1).
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = {
        k: f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    }
    return _Diff(missing, unexpected, mismatched)


def _listing(title: str, items: list[str]) -> str:
    more = f"\n    ... and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return f"\n  {title} ({len(items)}):" + "".join(f"\n    {i}" for i in items[:_LISTED]) + more


def _mismatch_error(source: str, diff: _Diff) -> WeightsError:
    parts = [
        _listing(title, items)
        for title, items in (
            ("missing keys", diff.missing),
            ("unexpected keys", diff.unexpected),
            ("mismatched shapes", list(diff.mismatched.values())),
        )
        if items
    ]
    return WeightsError(f"weights {source} do not fit the model:" + "".join(parts))


def _class_names(metadata: dict[str, str], num_classes: int, head_reset: bool) -> list[str]:
    """Names saved with the weights when they describe this head, else the defaults."""
    if head_reset or "class_names" not in metadata:
        return default_class_names(num_classes)
    try:
        names = json.loads(metadata["class_names"])
    except json.JSONDecodeError as exc:
        raise WeightsError(f"metadata class_names is not JSON: {exc}") from None
    if not isinstance(names, list) or len(names) != num_classes:
        raise WeightsError(f"metadata class_names is not a list of {num_classes} names")
    return [str(n) for n in names]


def apply_state(
    model: SKResNeXt,
    state: dict[str, torch.Tensor],
    metadata: dict[str, str],
    source: str,
    sha256: str,
) -> LoadedWeights:
    """Load ``state`` into ``model``, all or nothing; a head of another size stays as it is."""
    current = model.state_dict()
    diff = _compare(state, current)
    head_reset = diff.only_head_size
    if head_reset:
        log.warning(
            "checkpoint head has %d classes, model has %d: loaded the backbone, the head was reset",
            state["fc.weight"].shape[0],
            model.num_classes,
        )
        state = {**state, **{k: current[k] for k in HEAD_KEYS}}
    elif not diff.empty:
        raise _mismatch_error(source, diff)
    model.load_state_dict(state, strict=True)
    return LoadedWeights(
        source=source,
        sha256=sha256,
        class_names=_class_names(metadata, model.num_classes, head_reset),
        head_reset=head_reset,
        architecture=metadata.get("architecture"),
    )


def save_weights(
    model: SKResNeXt,
    path: str | Path,
    *,
    architecture: str,
    class_names: list[str] | None = None,
) -> str:
    """Write a ``.safetensors`` file that :func:`load_model` can rebuild the model from alone.

    Returns the file's sha256, to pin it when loading it back.
    """
    if model_spec(architecture) != model.spec:
        raise ValueError(f"the model is not a {architecture!r}")
    names = list(class_names) if class_names is not None else default_class_names(model.num_classes)
    if len(names) != model.num_classes:
        raise ValueError(f"{len(names)} class names for a {model.num_classes}-class head")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    metadata = {
        "architecture": architecture,
        "num_classes": str(model.num_classes),
        "class_names": json.dumps(names),
        "format": FORMAT,
    }
    data = safetensors.torch.save(tensors, metadata=metadata)
    storage.write_bytes_atomic(os.fspath(path), data)
    return hashlib.sha256(data).hexdigest()
