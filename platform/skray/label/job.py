"""The bulk labeling job: object storage -> decode -> model actors -> Parquet, exactly once.

Everything that can be checked is checked before Ray does any work: the config,
the input listing, the output location, and that the weights fit the model.
Then units that earlier runs committed are skipped and the rest stream through
Ray Data; the driver commits each unit's rows as one Parquet part the moment the
unit is complete, writes the manifest, then the report (:mod:`skray.report.page`). Each
run is also an MLflow run (:mod:`skray.label.tracking`) unless ``mlflow.enabled`` is off.
The config is :mod:`skray.label.config`, the Ray Data graph :mod:`skray.label.pipeline`,
the manifest :mod:`skray.label.manifest`.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from skray.core.specs import DEFAULT_MODEL
from skray.io.config import dump_config
from skray.io.retry import StorageUnavailable, call_with_retry
from skray.io.sources import listing_tables
from skray.io.sources.rows import incomplete_reason
from skray.io.storage import join, read_json, redact_text, redact_uri, write_json
from skray.label.commit import UnitCommitter
from skray.label.config import LabelConfig
from skray.label.lease import Lease
from skray.label.manifest import build_manifest
from skray.label.pipeline import build_dataset
from skray.label.plan import Plan, make_plan
from skray.label.progress import Progress
from skray.label.sinks import (
    JOB_FILE,
    MANIFEST,
    REPORT_DIR,
    OutputError,
    check_writable,
    clear_output,
    summarize_output,
    withdraw_manifest,
    withdraw_rows,
)
from skray.report.page import write_report
from skray.weights.resolver import PinnedWeights, load_model, pin_weights

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """What a run settled before any work: the plan, the pinned weights, the output's lease."""

    plan: Plan
    pinned: PinnedWeights | None
    weights: dict[str, Any]
    lease: Lease
    tracking_uri: str | None = None  # the MLflow store, reached; None: mlflow.enabled is off


def _check_previous(cfg: LabelConfig, previous: dict[str, Any] | None, sha256: str | None) -> None:
    """A rerun must match the config and the exact weights that made the output so far."""
    if not previous:
        return
    if previous.get("fingerprint") != cfg.fingerprint():
        raise OutputError(
            f"{redact_uri(cfg.output)} holds results of a different labeling config "
            f"(fingerprint {previous.get('fingerprint')} != {cfg.fingerprint()}): "
            "use another output or --overwrite"
        )
    if previous.get("weights_sha256", sha256) != sha256:
        raise OutputError(
            f"{redact_uri(cfg.output)} was labeled with weights "
            f"sha256 {previous['weights_sha256']}, "
            f"but {redact_uri(cfg.weights or 'random weights')} now has sha256 {sha256}: "
            "the weights changed behind the same name. "
            "Use another output, or --overwrite to relabel everything"
        )


def prepare(cfg: LabelConfig) -> Prepared:
    """Everything checked before any work: the input, the weights (pinned), the output and its
    lease. Only then does ``--overwrite`` delete, and the earlier manifest is withdrawn so a
    reader never takes a partial output for a complete one."""
    # The listing's first table is read now (a missing or empty input fails first) and the
    # rest streams into the plan at the end; closed on any failure in between.
    with closing(
        listing_tables(cfg.input, cfg.exclude, cfg.io_retry, cfg.input_inventory)
    ) as files:
        return _prepare_listed(cfg, files)


def _prepare_listed(cfg: LabelConfig, files: Iterator[pa.Table]) -> Prepared:
    pinned = pin_weights(cfg.weights, cfg.model)
    model, loaded = load_model(cfg.model, pinned)  # weights that do not fit fail here
    weights = {
        "model": cfg.model or (loaded.architecture if loaded else None) or DEFAULT_MODEL,
        "weights": redact_uri(pinned.source) if pinned else None,
        "weights_version": pinned.version if pinned else None,
        "weights_sha256": pinned.sha256 if pinned else None,
        "random_weights": pinned is None,
        "num_classes": model.num_classes,
    }
    del model
    check_writable(cfg.output)
    tracking_uri = None
    if cfg.mlflow.enabled:
        from skray.label import tracking  # MLflow is heavy: imported when the run is recorded only

        tracking_uri = tracking.connect(cfg.mlflow.tracking_uri, cfg.mlflow.experiment)
    lease = Lease(cfg.output, cfg.lease_ttl_s)
    lease.acquire()
    try:
        job_uri = join(cfg.output, JOB_FILE)
        if cfg.overwrite:
            clear_output(cfg.output)
        else:
            _check_previous(cfg, read_json(job_uri), weights["weights_sha256"])
        withdraw_manifest(cfg.output)
        write_json(
            job_uri,
            {
                "fingerprint": cfg.fingerprint(),
                "weights_sha256": weights["weights_sha256"],
                "weights_version": weights["weights_version"],
            },
        )
        columns = (cfg.image_column,) + ((cfg.id_column,) if cfg.id_column else ())
        plan = make_plan(files, cfg.output, cfg.format, cfg.files_per_unit, columns)
    except BaseException:
        lease.release()
        raise
    return Prepared(plan, pinned, weights, lease, tracking_uri)


def run(cfg: LabelConfig) -> dict[str, Any]:
    """Label every key under ``cfg.input`` not yet in ``cfg.output``; returns the manifest."""
    import ray

    from skray.label.metrics import RunMetrics

    started = time.time()
    os.environ.update(cfg.s3.env())
    print("[label] resolved config:\n" + dump_config(cfg), flush=True)
    prepared = prepare(cfg)
    plan, weights = prepared.plan, prepared.weights
    with prepared.lease as lease, _mlflow_run(cfg, prepared) as mlflow_run:
        if weights["random_weights"]:
            print(
                "[label] WARNING: no weights given: the model has RANDOM weights, "
                "labels are meaningless",
                flush=True,
            )
        precision, why = cfg.resolved_precision()
        print(
            f"[label] {plan.listed} inputs listed, "
            f"{plan.committed_rows} keys already committed "
            f"({plan.committed_parts} parts), {plan.removed_rows} no longer in the input; "
            f"{plan.todo.num_rows} units to do; precision {precision} ({why})",
            flush=True,
        )
        progress = Progress(plan.pending_rows, cfg.progress_interval_s)
        ray_started = time.time()
        committer = UnitCommitter(
            cfg.output, lease.check, cfg.commit_concurrency, io_retry=cfg.io_retry
        )
        _heal(cfg, plan, lease.check)
        with committer:
            if plan.todo.num_rows:
                ray.init(ignore_reinit_error=True)
                live = RunMetrics(redact_uri(cfg.output), plan.pending_rows)
                dataset = build_dataset(cfg, plan.todo, prepared.pinned)
                for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                    lease.check()
                    progress.stages.add(batch)
                    progress.add(committer.add(batch))
                    live.received(progress.done)
                    _stop_if_denied(cfg, committer.incomplete)
        # every part is written here: only now may the manifest say the output is complete
        progress.sample()
        print(progress.line(), flush=True)
        summary = summarize_output(cfg.output)
        finished = time.time()
        manifest = build_manifest(
            cfg,
            plan,
            summary,
            weights,
            committed=committer.committed,
            progress=progress,
            total_s=finished - started,
            pipeline_s=finished - ray_started,
            mlflow_run=mlflow_run,
            incomplete=not_read(plan, committer.incomplete),
        )
        lease.check()
        manifest_uri = join(cfg.output, MANIFEST)
        call_with_retry(
            lambda: write_json(manifest_uri, manifest), "writing the manifest", cfg.io_retry
        )
        lease.check()
        report, report_error = _write_report(cfg.output) if summary["parts"] else (None, None)
        mlflow_error = None
        if mlflow_run:
            from skray.label import tracking

            report_dir = report and join(cfg.output, REPORT_DIR)
            mlflow_error = tracking.finish(mlflow_run["run_id"], manifest, report_dir)
        _record_warnings(cfg, manifest, report_error=report_error, mlflow_error=mlflow_error)
    return manifest


def _record_warnings(cfg: LabelConfig, manifest: dict[str, Any], **warnings: str | None) -> None:
    """What failed after the output was complete (the report, the MLflow record), added to the
    manifest: the output stays complete, and the run still exits 0."""
    found = {key: value for key, value in warnings.items() if value}
    if not found:
        return
    manifest.update(found)
    uri = join(cfg.output, MANIFEST)
    try:
        call_with_retry(lambda: write_json(uri, manifest), "writing the manifest", cfg.io_retry)
    except StorageUnavailable as err:
        log.warning("the manifest does not record %s: %s", ", ".join(found), err)


def _heal(cfg: LabelConfig, plan: Plan, check_lease) -> None:
    """Take out the rows earlier versions committed for storage failures (their keys are in
    this run's units), before any part is written: a key is never in two parts."""
    if not plan.heal:
        return
    print(
        f"[label] {sum(h.rows for h in plan.heal)} rows of earlier runs' storage errors "
        f"in {len(plan.heal)} parts: reading their keys again",
        flush=True,
    )
    for heal in plan.heal:
        check_lease()
        withdraw_rows(cfg.output, heal.part, heal.keys, cfg.io_retry)


def not_read(plan: Plan, incomplete: dict[str, str]) -> dict[str, Any] | None:
    """What storage faults left unread (None: nothing): ``units``, ``keys`` (the rows of image
    and Parquet units, one per tar shard, whose samples are not known until read), and the
    units per reason. The next run reads exactly these."""
    if not incomplete:
        return None
    units = plan.units_of(incomplete)
    reasons: dict[str, int] = {}
    for why in incomplete.values():
        reason = incomplete_reason(why)
        reasons[reason] = reasons.get(reason, 0) + 1
    return {
        "units": len(units),
        "keys": sum(u.rows if u.rows is not None else len(u.uris) for u in units),
        "reasons": reasons,
        "first_error": redact_uri(next(iter(incomplete.values()))),
    }


def _stop_if_denied(cfg: LabelConfig, incomplete: dict[str, str]) -> None:
    """Access refused past the retry budget will not heal by itself: stop now, with one
    message, rather than fail every unit left (none becomes an error row)."""
    denied = next((why for why in incomplete.values() if incomplete_reason(why) == "denied"), None)
    if denied is None:
        return
    source = "AWS_PROFILE" if os.environ.get("AWS_PROFILE") else "AWS_ACCESS_KEY_ID"
    if not os.environ.get(source):
        source = "the default credential chain (instance role, ~/.aws)"
    raise StorageUnavailable(
        f"access to {redact_uri(cfg.input)} was refused with the credentials from {source} "
        f"(expired or not allowed?): {redact_uri(denied.split(':', 2)[2].strip())}. "
        "Nothing was committed as an error; rerun with working credentials to finish",
        "denied",
    )


def mlflow_params(cfg: LabelConfig, weights: dict[str, Any]) -> dict[str, Any]:
    """What decided the labels, as the labeling run's MLflow params (URIs redacted)."""
    return {
        "input": redact_uri(cfg.input),
        "output": redact_uri(cfg.output),
        "format": cfg.format,
        "model": weights["model"],
        "weights": weights["weights"],
        "weights_version": weights["weights_version"],
        "weights_sha256": weights["weights_sha256"],
        "top_k": cfg.top_k,
        "min_score": cfg.min_score,
        "batch_size": cfg.batch_size,
        "actors": {
            "min": cfg.actors.min,
            "max": cfg.actors.max,
            "gpus": cfg.actors.gpus,
            "batch_size": cfg.actors.batch_size,
        },
        **dict(zip(("precision", "precision_reason"), cfg.resolved_precision())),
        "decode": cfg.decode,
    }


@contextmanager
def _mlflow_run(cfg: LabelConfig, prepared: Prepared) -> Iterator[dict[str, str] | None]:
    """The MLflow run of this labeling run (None when off): started here, ended FAILED when the
    labeling fails; :func:`skray.label.tracking.finish` records a run that completed."""
    if prepared.tracking_uri is None:
        yield None
        return
    from skray.label import tracking

    run_id = tracking.start(
        cfg.mlflow.experiment,
        mlflow_params(cfg, prepared.weights),
        cfg.output,
        cfg.input,
        prepared.pinned,
    )
    print(
        f"[label] MLflow run {run_id} in experiment {cfg.mlflow.experiment} "
        f"at {redact_uri(prepared.tracking_uri)}",
        flush=True,
    )
    try:
        yield {
            "run_id": run_id,
            "experiment": cfg.mlflow.experiment,
            "tracking_uri": redact_uri(prepared.tracking_uri),
        }
    except BaseException:
        tracking.fail(run_id)
        raise


def _write_report(output: str) -> tuple[str | None, str | None]:
    """The report beside the manifest, and the error that left the complete output without
    one (a storage fault, a chart that would not draw: a warning, never the run's failure)."""
    try:
        page = write_report(output)
    except Exception as err:  # noqa: BLE001 - the labels are complete whatever the report does
        error = redact_text(f"{type(err).__name__}: {err}")
        log.warning(
            "no report written (the labels are complete; run `skray report %s`): %s",
            redact_uri(output),
            error,
        )
        return None, error
    print(f"[label] report: {redact_uri(page)}", flush=True)
    return page, None
