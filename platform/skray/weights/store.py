"""MLflow tracking: runs, their metrics and artifacts, and logging and registering models.

Every training run and sweep trial logs its config, tags and metrics here; the
best model is registered, and from then on ``models:/NAME/VERSION``,
``models:/NAME@ALIAS`` and ``runs:/RUN_ID/model`` work wherever skray takes
weights (read back by :mod:`skray.weights.registry`). With that module, the only
skray code that imports MLflow.

A logged model carries, besides MLflow's own ``pt2`` export, the skray
``.safetensors`` file as an extra file. That file is what skray loads back:
skray never unpickles or executes an MLflow model.
"""

from __future__ import annotations

import copy
import importlib.metadata
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import numpy as np
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

import skray
from skray.core.errors import SkrayError
from skray.core.model import SKResNeXt
from skray.io.config import redact_values
from skray.io.storage import read_json, redact_uri, write_json
from skray.weights.files import save_weights

__all__ = [
    "WEIGHTS_FILE",
    "default_tracking_uri",
    "default_artifact_root",
    "configure",
    "experiment_id",
    "flatten",
    "run_tags",
    "start_run",
    "resume_or_start_run",
    "log_metrics",
    "end_run",
    "log_model",
    "log_model_to_run",
]

log = logging.getLogger(__name__)

WEIGHTS_FILE = "skray_weights.safetensors"
_EXAMPLE_BATCH = 2  # torch.export fixes a batch dimension of size 1: 2 keeps it dynamic


def _home() -> Path:
    return Path(os.environ.get("SKRAY_HOME") or Path.cwd() / ".skray").expanduser().absolute()


def _embedded_uri() -> str:
    return f"sqlite:///{_home()}/mlflow/mlflow.db"


def default_tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else a SQLite store under ``$SKRAY_HOME`` (default ``./.skray``).

    The embedded store needs no server, so a laptop run is tracked like a cluster run.
    """
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    (_home() / "mlflow").mkdir(parents=True, exist_ok=True)
    return _embedded_uri()


def default_artifact_root() -> str:
    """Artifacts of the embedded store: beside its database, not in MLflow's ``./mlruns``."""
    return (_home() / "mlflow" / "artifacts").as_uri()


def configure(tracking_uri: str | None = None) -> str:
    """Point MLflow's tracking and registry at ``tracking_uri``, else :func:`default_tracking_uri`.

    MLflow exports the URIs to the environment, so subprocesses inherit them.
    """
    uri = tracking_uri or default_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    log.info("MLflow tracking at %s", redact_uri(uri))
    return uri


def experiment_id(name: str) -> str:
    """The id of experiment ``name``, created if missing (parallel trials may race to create it)."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    on_embedded = mlflow.get_tracking_uri() == _embedded_uri()
    try:
        return client.create_experiment(
            name, artifact_location=default_artifact_root() if on_embedded else None
        )
    except MlflowException:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: ``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``.

    Values are strings, URIs redacted (params are visible to every reader of the store),
    cut to MLflow's length limit, which would otherwise reject the run.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = str(redact_values(value))[:MAX_PARAM_VAL_LENGTH]
    return flat


def _git_commit() -> str:
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return result.stdout.strip()


def run_tags(data_uri: str | None = None) -> dict[str, str]:
    """Tags that make a run reproducible: code commit, library versions, the data it read.

    ``git_commit`` is ``HEAD`` of the working directory's repository, or ``"unknown"``;
    ``data_uri`` (redacted) is present only when given.
    """
    tags = {
        "git_commit": _git_commit(),
        "ray_version": importlib.metadata.version("ray"),
        "torch_version": torch.__version__,
        "skray_version": skray.__version__,
    }
    if data_uri is not None:
        tags["data_uri"] = redact_uri(data_uri)
    return tags


def start_run(
    experiment: str,
    run_name: str,
    *,
    params: dict[str, Any],
    tags: dict[str, str],
    parent_run_id: str | None = None,
) -> str:
    """Create a run with flattened params and tags and return its id.

    The run is not made active in this process: Ray workers and the driver log
    to it by id, which is what lets a resumed job continue the same run.
    """
    client = MlflowClient()
    all_tags = redact_values(
        {**tags, **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})}
    )
    run_id = client.create_run(
        experiment_id(experiment), run_name=run_name, tags=all_tags
    ).info.run_id
    flat = [Param(k, v) for k, v in flatten(params).items()]
    for start in range(0, len(flat), 100):  # MLflow takes at most 100 params a batch
        client.log_batch(run_id, params=flat[start : start + 100])
    return run_id


def log_metrics(
    run_id: str, metrics: dict[str, float], step: int, tracking_uri: str | None = None
) -> None:
    """Per-epoch metrics, from wherever the numbers are (a Ray Train worker, a Tune trial)."""
    now = int(time.time() * 1000)
    MlflowClient(tracking_uri).log_batch(
        run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()]
    )


def metric_history(run_id: str, metric: str) -> list[float]:
    """A run's values of ``metric``, one per step in step order; a step logged again (a retried
    attempt resumed from a checkpoint) keeps its latest value."""
    latest = {
        m.step: m.value
        for m in sorted(
            MlflowClient().get_metric_history(run_id, metric), key=lambda m: (m.step, m.timestamp)
        )
    }
    return [latest[step] for step in sorted(latest)]


def end_run(run_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(run_id, status)


def set_tag(run_id: str, key: str, value: str) -> None:
    MlflowClient().set_tag(run_id, key, value)


def log_text(run_id: str, text: str, artifact_file: str) -> None:
    MlflowClient().log_text(run_id, text, artifact_file)


def child_runs(parent_run_id: str) -> dict[str, str]:
    """Trial name -> run id of the runs nested under ``parent_run_id``."""
    parent = MlflowClient().get_run(parent_run_id)
    runs = MlflowClient().search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
    )
    return {r.data.tags.get(TRIAL_TAG, r.info.run_name): r.info.run_id for r in runs}


TRIAL_TAG = "skray.trial"
STATE_TAG = "skray.trial_state"
TRIAL_STATES = {"completed": "FINISHED", "stopped_early": "KILLED", "failed": "FAILED"}


def set_state(run_id: str, state: str) -> None:
    """Close a trial's run: its skray state as a tag, and MLflow's own status."""
    client = MlflowClient()
    client.set_tag(run_id, STATE_TAG, state)
    client.set_terminated(run_id, TRIAL_STATES[state])


def log_model_to_run(run_id: str, model: SKResNeXt, **kwargs: Any) -> dict[str, str | None]:
    """:func:`log_model` into the run ``run_id`` (reopened for the purpose).

    A run that had ended keeps its status and end time (a sweep trial stopped by ASHA stays
    ``KILLED`` when its model is the one registered): reopening it would end it ``FINISHED``.
    """
    before = MlflowClient().get_run(run_id).info
    try:
        with mlflow.start_run(run_id=run_id):
            return log_model(model, **kwargs)
    finally:
        if before.status != "RUNNING":
            MlflowClient().set_terminated(run_id, before.status, end_time=before.end_time)


def log_model(
    model: SKResNeXt,
    *,
    architecture: str,
    class_names: list[str],
    image_size: int = 224,
    registered_model_name: str | None = None,
    alias: str | None = None,
) -> dict[str, str | None]:
    """Log ``model`` to the active run as ``model``, optionally register it and alias the version.

    The logged model holds MLflow's ``pt2`` export (for MLflow serving) and
    :data:`WEIGHTS_FILE`, the file skray loads back. The caller's model is not
    touched: a CPU copy in eval mode is logged.

    Returns ``model_uri`` (``models:/<model id>``), ``run_id`` and ``registered_version``.
    """
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_model needs an active MLflow run (mlflow.start_run())")
    if alias is not None and registered_model_name is None:
        raise ValueError("an alias needs a registered_model_name")
    cpu_model = copy.deepcopy(model).cpu().eval()
    example = np.zeros((_EXAMPLE_BATCH, 3, image_size, image_size), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / WEIGHTS_FILE
        save_weights(cpu_model, weights, architecture=architecture, class_names=class_names)
        info = mlflow.pytorch.log_model(
            cpu_model,
            name="model",
            input_example=example,  # the signature is inferred from it
            metadata={
                "architecture": architecture,
                "class_names": list(class_names),
                "num_classes": cpu_model.num_classes,
            },
            extra_files=[str(weights)],
            registered_model_name=registered_model_name,
            # Pinned torch + cloudpickle: inferring requirements reloads the model in a subprocess.
            pip_requirements=mlflow.pytorch.get_default_pip_requirements(),
        )
    version = info.registered_model_version
    if alias is not None:
        MlflowClient().set_registered_model_alias(registered_model_name, alias, str(version))
    return {
        "model_uri": info.model_uri,
        "run_id": run.info.run_id,
        "registered_version": None if version is None else str(version),
    }


# ---- reading runs back (skray compare) -----------------------------------------------------------


def run_params(run_id: str) -> dict[str, str]:
    """The parameters logged to a run (flattened keys, as :func:`flatten` wrote them)."""
    return MlflowClient().get_run(run_id).data.params


def search_runs(
    experiment: str, parent_run_id: str | None = None, max_results: int = 5000
) -> list[Any]:
    """MLflow ``Run`` objects: those nested under ``parent_run_id`` when given, else every run
    of the experiment named ``experiment``; a missing experiment is a ``ValueError``."""
    client = MlflowClient()
    if parent_run_id:
        ids = [client.get_run(parent_run_id).info.experiment_id]
        query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    else:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise SkrayError(f"no MLflow experiment named {experiment!r}")
        ids, query = [found.experiment_id], ""
    return client.search_runs(ids, filter_string=query, max_results=max_results)


def log_artifact(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    MlflowClient().log_artifact(run_id, str(path), artifact_path)


# ---- labeling runs (skray.label.tracking) --------------------------------------------------------

TrackingError = MlflowException  # what the store raises: unreachable, refused, inconsistent


def log_artifacts(run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
    """Every file under ``local_dir``, kept in its folder structure under ``artifact_path``."""
    MlflowClient().log_artifacts(run_id, str(local_dir), artifact_path)


def tag_model_version(name: str, version: str, key: str, value: str) -> None:
    """A tag on registered model version ``name``/``version``: shown on the version's page."""
    MlflowClient().set_model_version_tag(name, version, key, redact_uri(value))


def model_version_tags(name: str, version: str) -> dict[str, str]:
    return dict(MlflowClient().get_model_version(name, version).tags)


def resume_or_start_run(
    record: str,
    experiment: str,
    run_name: str,
    *,
    params: dict[str, Any],
    tags: dict[str, str],
    parent_run_id: str | None = None,
) -> str:
    """The id of the run that ``record`` (a JSON file, local or ``s3://``) names, or of a new
    run (:func:`start_run`) written there: a job restarted or resumed logs to the run it began.
    """
    previous = read_json(record)
    if previous:
        return previous["mlflow_run_id"]
    run_id = start_run(experiment, run_name, params=params, tags=tags, parent_run_id=parent_run_id)
    write_json(record, {"mlflow_run_id": run_id, "name": run_name})
    return run_id
