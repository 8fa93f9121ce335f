"""MLflow models as weights: which skray weights file a ``models:/NAME/VERSION``,
``models:/NAME@ALIAS``, ``models:/<model id>`` or ``runs:/RUN_ID/model`` URI names, resolved
to a fixed place (an alias can move) and downloaded. Kept apart from
:mod:`skray.weights.store`, which writes runs and logs models: loading weights only reads.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from skray.weights.files import WeightsError
from skray.weights.store import WEIGHTS_FILE, configure

__all__ = ["ResolvedModel", "download_weights", "resolve_weights"]


def _weights_path(repo: Any, uri: str) -> str:
    """The path of :data:`WEIGHTS_FILE` inside the MLflow model that ``repo`` reads."""
    with tempfile.TemporaryDirectory() as tmp:
        flavor = Model.load(repo.download_artifacts("MLmodel", tmp)).flavors.get("pytorch", {})
    paths = [
        f["path"] for f in flavor.get("extra_files", []) if Path(f["path"]).name == WEIGHTS_FILE
    ]
    if not paths:
        raise WeightsError(f"MLflow model {uri} holds no skray weights file ({WEIGHTS_FILE})")
    return paths[0]


def _model_error(uri: str, exc: Exception) -> WeightsError:
    reason = str(exc).partition("\n")[0]
    return WeightsError(f"cannot get MLflow model {uri}: {reason}")


def download_weights(uri: str, dst_dir: Path | None = None) -> Path:
    """The local path of the skray weights file in the MLflow model at ``uri``.

    ``uri`` is ``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``models:/<model id>``
    or ``runs:/RUN_ID/model``. Only the model's ``MLmodel`` and the weights file
    are downloaded. With ``dst_dir`` unset, MLflow picks the place: a temporary
    folder, or for a local store reached through ``models:/``, the stored file itself.
    """
    if not mlflow.is_tracking_uri_set():
        configure()
    try:
        repo = get_artifact_repository(uri)
        path = _weights_path(repo, uri)
        if dst_dir is not None:
            Path(dst_dir).mkdir(parents=True, exist_ok=True)
        return Path(repo.download_artifacts(path, None if dst_dir is None else str(dst_dir)))
    except (MlflowException, OSError) as exc:  # OSError: the stores' network and file errors
        raise _model_error(uri, exc) from exc


class ResolvedModel(NamedTuple):
    location: str  # where the weights file is: its artifact store, else ``model_uri``
    model_uri: str  # the fixed MLflow reference: ``models:/NAME/VERSION``, a model id or ``runs:/``
    version: str | None  # the registry version, None outside the registry


def resolve_weights(uri: str) -> ResolvedModel:
    """The fixed place of the skray weights file of the MLflow model ``uri``, resolved now.

    An alias (``models:/NAME@ALIAS``) can move; the answer cannot. ``location`` is the
    artifact's own ``file://`` or ``s3://`` URI when skray reads that store directly (so
    workers need no tracking server), else the fixed ``model_uri``.
    """
    if not mlflow.is_tracking_uri_set():
        configure()
    try:
        repo = get_artifact_repository(uri)
        path = _weights_path(repo, uri)
        location = (
            f"{repo.repo.artifact_uri.rstrip('/')}/{path}"  # the store behind models:/ and runs:/
        )
    except (MlflowException, OSError) as exc:
        raise _model_error(uri, exc) from exc
    version = getattr(repo, "model_version", None)  # None for runs:/ and models:/<model id>
    model_uri = uri if version is None else f"models:/{repo.model_name}/{version}"
    readable = urlsplit(location).scheme in ("", "file", "s3")
    return ResolvedModel(
        location if readable else model_uri, model_uri, None if version is None else str(version)
    )
