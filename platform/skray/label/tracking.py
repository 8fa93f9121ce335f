"""A labeling run in MLflow: one MLflow run per labeling run (the first and every rerun).

Params say what decided the labels (input, output, model, the pinned weights, batch size,
actors, precision, decode, min_score), metrics what came out (images, labeled, failed per
reason, low confidence, img/s), and the report folder and manifest are artifacts. Weights
from the registry are linked both ways: the run is tagged with the model's name and
version, and that model version with the run, so its page leads to the labels it made.

The store is reached when the job is prepared, before any work (:func:`connect`): a store
that cannot be reached fails the run then, not after hours of labeling. A store that goes
away later costs the record only (a warning), never the output. MLflow is reached through
:mod:`skray.weights.store` only.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from skray.io.config import ConfigError
from skray.io.storage import filesystem_for, redact_text, redact_uri
from skray.weights import store
from skray.weights.resolver import PinnedWeights

log = logging.getLogger(__name__)

MODEL_NAME_TAG = "skray.model_name"
MODEL_VERSION_TAG = "skray.model_version"
OUTPUT_TAG = "skray.output"
WARNING_TAG = "skray.warning"  # what failed to be recorded after the output was complete
RUN_TAG_PREFIX = (
    "skray.labeling_run."  # on a model version: one tag per labeling run, valued its output
)


def connect(tracking_uri: str | None, experiment: str) -> str:
    """Reach the store and its experiment now (created if missing); returns the store's URI.
    Unreachable is a :class:`ConfigError` naming the switch that labels without it."""
    uri = store.configure(tracking_uri)
    try:
        store.experiment_id(experiment)
    except (store.TrackingError, OSError) as err:
        reason = str(err).partition("\n")[0]
        raise ConfigError(
            f"mlflow: cannot reach the tracking store {redact_uri(uri)}: {reason} "
            "(set mlflow.enabled=false to label without recording the run)"
        ) from None
    return uri


def registered_version(pinned: PinnedWeights | None) -> tuple[str, str] | None:
    """(name, version) when the weights are a registered model version, else None."""
    if (
        pinned is None
        or pinned.version is None
        or not (pinned.model_uri or "").startswith("models:/")
    ):
        return None
    return pinned.model_uri.removeprefix("models:/").rsplit("/", 1)[0], pinned.version


def start(
    experiment: str,
    params: dict[str, Any],
    output: str,
    data_uri: str,
    pinned: PinnedWeights | None,
) -> str:
    """Open the run (params and tags) and link it with the registered model version, if any."""
    tags = {**store.run_tags(data_uri), OUTPUT_TAG: redact_uri(output)}
    registered = registered_version(pinned)
    if registered:
        tags.update({MODEL_NAME_TAG: registered[0], MODEL_VERSION_TAG: registered[1]})
    name = "label-" + time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    run_id = store.start_run(experiment, name, params=params, tags=tags)
    if registered:
        store.tag_model_version(*registered, RUN_TAG_PREFIX + run_id, output)
    return run_id


def metrics(manifest: dict[str, Any]) -> dict[str, float]:
    """The manifest's counts and throughput as metrics."""
    timings = manifest["timings"]
    values = {
        "images": manifest["rows"],
        "labeled": manifest["labeled"],
        "failed": manifest["failed"],
        "low_confidence": manifest["low_confidence"],
        "images_this_run": timings["images_this_run"],
        "img_per_s": timings["img_per_s"],
        "steady_img_per_s": timings["steady_img_per_s"],
        **{f"failed_{reason}": count for reason, count in manifest["failed_by_reason"].items()},
    }
    return {name: float(value) for name, value in values.items()}


def _download(uri: str, dest: Path) -> None:
    """The files of folder ``uri`` (local or s3://) into ``dest``, flat."""
    fs, path = filesystem_for(uri)
    dest.mkdir(parents=True, exist_ok=True)
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as stream:
                (dest / info.base_name).write_bytes(stream.read())


def finish(run_id: str, manifest: dict[str, Any], report_dir: str | None) -> str | None:
    """Metrics, the manifest and the report folder; the run ends FINISHED. Whatever fails now
    is a warning, returned (None: recorded in full): the output is complete and stays so, and
    the run is still ended — FINISHED with a ``skray.warning`` tag, or FAILED — never left
    RUNNING."""
    try:
        store.log_metrics(run_id, metrics(manifest), step=0)
        store.log_text(run_id, json.dumps(manifest, indent=2), "_manifest.json")
        if report_dir is not None:
            with tempfile.TemporaryDirectory() as tmp:
                _download(report_dir, Path(tmp) / "report")
                store.log_artifacts(run_id, Path(tmp) / "report", "report")
        store.end_run(run_id, "FINISHED")
        return None
    except Exception as err:  # noqa: BLE001 - after a complete output, any failure is a warning
        error = redact_text(f"{type(err).__name__}: {err}")
    log.warning(
        "the labeling output is complete, but MLflow run %s is not recorded in full: %s",
        run_id,
        error,
    )
    try:
        store.set_tag(run_id, WARNING_TAG, error[:500])
        store.end_run(run_id, "FINISHED")
    except Exception:  # noqa: BLE001 - the store itself is failing: end it FAILED if it can
        fail(run_id)
    return error


def fail(run_id: str) -> None:
    """End the run FAILED (the labeling run raised); a store that fails too is only logged."""
    try:
        store.end_run(run_id, "FAILED")
    except (store.TrackingError, OSError) as err:
        log.warning("MLflow run %s could not be marked failed: %s", run_id, err)
