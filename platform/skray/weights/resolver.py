"""Which weights: resolve a URI, pin it to exact bytes, fetch them, load them.

Weights come from a local file, ``s3://``, ``https://``, ``pretrained`` (the variant's
published checkpoint) or an MLflow model (``models:/``, ``runs:/``, through
:mod:`skray.weights.registry`); remote files are downloaded once into a cache keyed by their full
URI and checked against their sha256 (explicit, or the prefix timm-style file names
carry). A job pins its weights once (:func:`pin_weights`): every worker then loads the
same bytes or fails, and the sha256 recorded is always that of the bytes deserialized.
Reading and loading the file is :mod:`skray.weights.files`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

import torch

from skray.core.model import SKResNeXt, create_model
from skray.core.specs import DEFAULT_MODEL, model_spec
from skray.io import storage
from skray.io.storage import redact_uri
from skray.weights.files import (
    LoadedWeights,
    WeightsError,
    apply_state,
    file_sha256,
    parse_state_dict,
)

__all__ = [
    "PinnedWeights",
    "pin_weights",
    "default_cache_dir",
    "fetch",
    "load_weights",
    "load_model",
]

_NAME_HASH = re.compile(r"-([0-9a-f]{8,64})\.(pth|pt|safetensors)$")
_HEX = re.compile(r"[0-9a-f]{8,64}")
_CHUNK = 1 << 20
_MLFLOW_SCHEMES = ("models:/", "runs:/")


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
        return {
            **self.to_dict(),
            "requested": redact_uri(self.requested),
            "source": redact_uri(self.source),
        }

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
        from skray.weights.registry import (
            resolve_weights,
        )  # MLflow is heavy: imported for an MLflow URI only

        source, model_uri, version = resolve_weights(requested)
    digest = file_sha256(fetch(source, cache_dir=cache_dir))
    return PinnedWeights(requested, source, digest, version, model_uri)


def default_cache_dir() -> Path:
    return Path(os.environ.get("SKRAY_CACHE_DIR") or Path.home() / ".cache/skray/weights")


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
    changed, so it is downloaded again. MLflow models are resolved by :mod:`skray.weights.registry`.
    """
    uri = os.fspath(uri)
    if uri.startswith(_MLFLOW_SCHEMES):
        from skray.weights.registry import (
            download_weights,
        )  # MLflow is heavy: imported for an MLflow URI only

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
    return *parse_state_dict(data, str(path)), digest, source


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
    return apply_state(model, state, metadata, source, digest)


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
    means random weights; :class:`PinnedWeights` load only with their sha256. A
    ``num_classes`` different from the checkpoint's loads the backbone under a fresh head
    (fine-tuning).
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
    return model, apply_state(model, state, metadata, source, digest)
