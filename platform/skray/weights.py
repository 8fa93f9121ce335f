"""Fetch, verify, read, load and save model weights.

Weights come from a local file, ``s3://``, ``https://`` or an MLflow model
(``models:/``, ``runs:/``); remote files are downloaded once into a cache keyed
by their full URI and checked against their sha256 (explicit, or the prefix
timm-style file names carry). A job pins its weights once (:func:`pin_weights`):
every worker then loads the same bytes or fails, and the sha256 recorded is
always that of the bytes deserialized. Loading never half-modifies a model: the checkpoint is compared with
the model first, and a mismatch raises one error that lists every difference.
The only tolerated difference is the classifier head's size, the fine-tuning
case: the backbone loads and the head stays fresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

import safetensors
import safetensors.torch
import torch

from skray import storage
from skray.classes import default_class_names
from skray.model import DEFAULT_MODEL, SKResNeXt, create_model, model_spec
from skray.storage import redact_uri

__all__ = [
    "WeightsError",
    "LoadedWeights",
    "PinnedWeights",
    "pin_weights",
    "default_cache_dir",
    "fetch",
    "read_state_dict",
    "load_weights",
    "save_weights",
    "load_model",
    "file_sha256",
]

log = logging.getLogger(__name__)

FORMAT = "skray/1"
HEAD_KEYS = frozenset({"fc.weight", "fc.bias"})
_NAME_HASH = re.compile(r"-([0-9a-f]{8,64})\.(pth|pt|safetensors)$")
_HEX = re.compile(r"[0-9a-f]{8,64}")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error:\s*(.+)")
_NESTED_KEYS = ("state_dict", "model", "state_dict_ema")
_CHUNK = 1 << 20
_MLFLOW_SCHEMES = ("models:/", "runs:/")
_LISTED = 10


class WeightsError(ValueError):
    """Weights that cannot be fetched, read, or loaded into the model."""


@dataclass(frozen=True)
class LoadedWeights:
    """What was loaded, for logs, model registries and the serving endpoint."""

    source: str
    sha256: str
    class_names: list[str]
    head_reset: bool
    architecture: str | None


@dataclass(frozen=True)
class PinnedWeights:
    """Weights resolved once, before any work, to a location that cannot move and its bytes' sha256.

    Labeling actors and Serve replicas load these, never the URI the user gave: an
    alias moved or a file replaced mid-job fails the load instead of mixing models.
    ``source`` and ``requested`` may carry credentials (presigned URLs): show them redacted.
    """

    requested: str  # as given: a path, a URL, "pretrained", models:/NAME@ALIAS...
    source: str  # the exact location loaded from
    sha256: str  # of the bytes at source when pinned
    version: str | None = None  # the MLflow registry version
    model_uri: str | None = None  # the fixed MLflow reference, e.g. models:/NAME/VERSION

    def to_dict(self) -> dict[str, str | None]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PinnedWeights:
        return cls(**data)

    def redacted(self) -> dict[str, str | None]:
        """:meth:`to_dict` fit for logs, manifests and the serving endpoint."""
        return {**self.to_dict(), "requested": redact_uri(self.requested), "source": redact_uri(self.source)}

    def __repr__(self) -> str:
        return "PinnedWeights(" + ", ".join(f"{k}={v!r}" for k, v in self.redacted().items()) + ")"


def pin_weights(
    uri: str | os.PathLike | None, model: str | None = None, *, cache_dir: Path | None = None
) -> PinnedWeights | None:
    """Resolve ``uri`` to :class:`PinnedWeights`, reading the bytes once to hash them.

    ``pretrained`` becomes the published URL of ``model`` (default architecture if
    None); an MLflow model its registered version's artifact; a path or S3 object
    stays as given, its content fixed by the hash. ``None`` (random weights) stays None.
    """
    if uri is None:
        return None
    requested = os.fspath(uri)
    source, model_uri, version = requested, None, None
    if requested == "pretrained":
        source = _pretrained_url(model)
    elif requested.startswith(_MLFLOW_SCHEMES):
        from skray.tracking import resolve_weights  # MLflow is imported only when needed

        source, model_uri, version = resolve_weights(requested)
    digest = file_sha256(fetch(source, cache_dir=cache_dir))
    return PinnedWeights(requested, source, digest, version, model_uri)


def default_cache_dir() -> Path:
    return Path(os.environ.get("SKRAY_CACHE_DIR") or Path.home() / ".cache/skray/weights")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _expected_hash(name: str, sha256: str | None) -> str | None:
    """The explicit hash, else the prefix in a timm-style name like ``x-f40e40bf.pth``."""
    if sha256 is not None:
        expected = sha256.lower()
        if not _HEX.fullmatch(expected):
            raise WeightsError(f"sha256 must be 8 to 64 hex digits, got {sha256!r}")
        return expected
    match = _NAME_HASH.search(name)
    return match.group(1) if match else None


def _check_hash(source: str, expected: str | None, actual: str) -> None:
    if expected is not None and not actual.startswith(expected):
        raise WeightsError(f"sha256 mismatch for {source}: expected {expected}, got {actual}")


def _open_remote(uri: str) -> tuple[BinaryIO, int | None]:
    """A readable stream over the remote file and its announced size, if any."""
    if urlparse(uri).scheme in ("http", "https"):
        response = urllib.request.urlopen(uri, timeout=60)  # noqa: S310 (scheme checked)
        length = response.headers.get("Content-Length")
        return response, int(length) if length is not None else None
    fs, path = storage.filesystem_for(uri)
    return fs.open_input_stream(path), fs.get_file_info(path).size


def _download(uri: str, target: Path, expected: str | None) -> None:
    """Stream ``uri`` into a temporary file beside ``target``, verify it, then rename it.

    The rename is atomic, so an interrupted or refused download never leaves a
    file under the final name.
    """
    source = redact_uri(uri)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            stream, size = _open_remote(uri)
            with stream:
                digest, received = hashlib.sha256(), 0
                while chunk := stream.read(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    received += len(chunk)
        if size is not None and received < size:
            raise WeightsError(f"truncated download of {source}: got {received} of {size} bytes")
        _check_hash(source, expected, digest.hexdigest())
        os.replace(tmp, target)
    except WeightsError:
        raise
    except FileNotFoundError:
        raise WeightsError(f"weights file not found: {source}") from None
    except (OSError, ValueError) as exc:  # URLError, HTTPError, pyarrow errors
        raise WeightsError(f"cannot download {source}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def fetch(
    uri: str | os.PathLike, *, sha256: str | None = None, cache_dir: Path | None = None
) -> Path:
    """A local path holding the weights at ``uri``, downloading remote files once.

    The cache is keyed by the whole URI: two objects with the same file name never
    share an entry. A cached copy is reused without network access only when its
    expected hash is known and matches; without a hash the remote file may have
    changed, so it is downloaded again. MLflow models are resolved by :mod:`skray.tracking`.
    """
    uri = os.fspath(uri)
    if uri.startswith(_MLFLOW_SCHEMES):
        from skray.tracking import download_weights  # MLflow is imported only when needed

        path = download_weights(uri)
        if sha256 is not None:
            _check_hash(redact_uri(uri), _expected_hash(path.name, sha256), file_sha256(path))
        return path
    if not storage.is_remote(uri):
        path = Path(storage.filesystem_for(uri)[1])
        if not path.is_file():
            raise WeightsError(f"weights file not found: {redact_uri(uri)}")
        if sha256 is not None:
            _check_hash(redact_uri(uri), _expected_hash(path.name, sha256), file_sha256(path))
        return path
    name = Path(urlparse(uri).path).name
    if not name:
        raise WeightsError(f"weights URI has no file name: {redact_uri(uri)}")
    expected = _expected_hash(name, sha256)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{hashlib.sha256(uri.encode()).hexdigest()[:16]}-{name}"
    if expected is not None and target.is_file() and file_sha256(target).startswith(expected):
        return target
    _download(uri, target, expected)
    return target


def _is_torch(data: bytes) -> bool:
    """Torch files are zip archives (or legacy pickles); anything else is tried as safetensors."""
    return data.startswith(b"PK\x03\x04") or data[:1] == b"\x80"


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors header: 8 bytes little-endian length, then JSON."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__") or {}


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
    return _parse(path.read_bytes(), str(path))


def _parse(data: bytes, path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """:func:`read_state_dict` over bytes already read (and hashed) from ``path``.

    Torch files are read with ``weights_only=True``: a checkpoint must never be
    able to run code.
    """
    suffix = Path(path).suffix.lower()
    if suffix not in (".pth", ".pt", ".safetensors"):
        suffix = ".pth" if _is_torch(data) else ".safetensors"
    try:
        if suffix == ".safetensors":
            return safetensors.torch.load(data), _safetensors_metadata(data)
        return _unwrap(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True), path), {}
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


def _apply(
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


def _fetch_and_read(
    weights: str | os.PathLike | PinnedWeights, sha256: str | None, cache_dir: Path | None
) -> tuple[dict[str, torch.Tensor], dict[str, str], str, str]:
    """(tensors, metadata, sha256, redacted source) of one read of the weights.

    The bytes are hashed and checked as read, then parsed: the file may have been
    replaced since :func:`fetch` looked at it, and the recorded hash must be of what loaded.
    """
    if isinstance(weights, PinnedWeights):
        uri, sha256 = weights.source, weights.sha256
    else:
        uri = os.fspath(weights)
    path = fetch(uri, sha256=sha256, cache_dir=cache_dir)
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    source = redact_uri(uri)
    if sha256 is not None:
        _check_hash(source, _expected_hash(path.name, sha256), digest)
    return *_parse(data, str(path)), digest, source


def load_weights(
    model: SKResNeXt,
    weights: str | os.PathLike | PinnedWeights,
    *,
    sha256: str | None = None,
    cache_dir: Path | None = None,
) -> LoadedWeights:
    """Load ``weights`` into ``model``; on any error the model is untouched.

    :class:`PinnedWeights` carry their own sha256: bytes that differ are refused.
    """
    state, metadata, digest, source = _fetch_and_read(weights, sha256, cache_dir)
    return _apply(model, state, metadata, source, digest)


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


def _pretrained_url(name: str | None) -> str:
    name = name or DEFAULT_MODEL
    url = model_spec(name).pretrained_url
    if url is None:
        raise WeightsError(f"model {name!r} has no published weights")
    return url


def load_model(
    name: str | None = None,
    weights: str | os.PathLike | PinnedWeights | None = None,
    *,
    num_classes: int | None = None,
    sha256: str | None = None,
) -> tuple[SKResNeXt, LoadedWeights | None]:
    """Build a model and load ``weights`` into it, reading what is not given from the file.

    ``weights="pretrained"`` means the variant's published checkpoint; ``None``
    means random weights; :class:`PinnedWeights` load only with their sha256. A ``num_classes`` different from the checkpoint's
    loads the backbone under a fresh head (fine-tuning).
    """
    if weights is None:
        return create_model(name or DEFAULT_MODEL, num_classes or 1000), None
    if weights == "pretrained":
        name = name or DEFAULT_MODEL
        weights = _pretrained_url(name)
    state, metadata, digest, source = _fetch_and_read(weights, sha256, None)
    name = name or metadata.get("architecture") or DEFAULT_MODEL
    classes = num_classes or (state["fc.weight"].shape[0] if "fc.weight" in state else 1000)
    model = create_model(name, classes)
    return model, _apply(model, state, metadata, source, digest)
