"""The bulk labeling job: object storage -> decode -> model actors -> Parquet, exactly once.

Everything that can be checked is checked before Ray does any work: the config,
the input listing, the output location, and that the weights fit the model.
Then units that earlier runs committed are skipped and the rest stream through
Ray Data; the driver commits each unit's rows as one Parquet part the moment the
unit is complete, writes the manifest, then the report (:mod:`skray.report.page`). Each
run is also an MLflow run (:mod:`skray.label.tracking`) unless ``mlflow.enabled`` is off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from skray.core.images import PreprocessingConfig
from skray.core.model import DEFAULT_MODEL
from skray.inference.classifier import resolve_decode
from skray.inference.quantize import calibration_crops
from skray.io.config import (
    ConfigError,
    Decode,
    MlflowConfig,
    ModelName,
    ModelPreprocessing,
    PrecisionOptions,
    StrictModel,
    dump_config,
    redact_values,
    resolve_gpus,
)
from skray.io.sources import DEFAULT_MAX_OBJECT_BYTES, PARQUET_BATCH_ROWS, Unit, list_inputs
from skray.io.storage import join, read_json, redact_uri, write_json
from skray.label.commit import DEFAULT_CONCURRENCY, UnitCommitter
from skray.label.lease import DEFAULT_TTL_S, Lease
from skray.label.plan import Plan, plan
from skray.label.sinks import (
    JOB_FILE,
    MANIFEST,
    REPORT_DIR,
    OutputError,
    check_writable,
    clear_output,
    summarize_output,
    withdraw_manifest,
)
from skray.report.page import write_report
from skray.weights.resolver import PinnedWeights, load_model, pin_weights

log = logging.getLogger(__name__)


class ActorsConfig(PrecisionOptions):
    gpus_key = "gpus"

    min: int = Field(1, ge=1)
    max: int = Field(1, ge=1)
    gpus: Literal["auto"] | float = Field(
        "auto", description="per actor; auto = 1 when the cluster has GPUs"
    )
    cpus: float = Field(1, gt=0)
    threads: int | None = Field(None, ge=1, description="torch intra-op threads per CPU actor")
    compile: bool = False
    batch_size: int | Literal["auto"] | None = Field(
        None, description="the model's batch shape (None: batch_size); auto: probed per GPU"
    )


class S3Config(StrictModel):
    """Where S3 is, when not in the environment; credentials only ever come from the environment."""

    endpoint_url: str | None = Field(
        None, description="else AWS_ENDPOINT_URL; e.g. http://127.0.0.1:9000 for MinIO"
    )
    region: str | None = Field(None, description="else AWS_REGION / AWS_DEFAULT_REGION")

    def env(self) -> dict[str, str]:
        values = {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_REGION": self.region}
        return {name: value for name, value in values.items() if value}


class LabelMlflowConfig(MlflowConfig):
    """Each labeling run as an MLflow run; the store is reached before any work."""

    enabled: bool = True
    experiment: str = "skray-label"


class LabelConfig(StrictModel):
    input: str
    output: str
    format: Literal["auto", "images", "webdataset", "parquet"] = "auto"
    exclude: list[str] = []
    model: ModelName | None = Field(
        None, description="None: the architecture recorded in the weights, else the default"
    )
    weights: str | None = None
    top_k: int = Field(5, ge=1, le=1000)
    min_score: float | None = Field(
        None, ge=0, le=1, description="a top score under it: no label, low_confidence"
    )
    batch_size: int = Field(32, ge=1)
    files_per_unit: int = Field(256, ge=1)
    image_column: str = "image"
    id_column: str | None = None
    decode_cpus: float = Field(
        0.5,
        gt=0,
        description="per read+decode task; unlike actors.cpus, so Ray keeps the stages apart",
    )
    decode_concurrency: int | None = Field(
        None, ge=1, description="max read+decode tasks at once (None: as CPUs allow)"
    )
    max_object_bytes: int = Field(
        DEFAULT_MAX_OBJECT_BYTES, ge=1, description="per image file, tar member, Parquet cell"
    )
    decode_memory_mb: int | None = Field(
        None, ge=1, description="per read+decode task (None: from the bounds above)"
    )
    decode: Decode = Field(
        "auto",
        description=(
            "gpu: actors decode the bytes next to the model; auto: gpu when actors get GPUs"
        ),
    )
    preprocessing: ModelPreprocessing = Field(
        PreprocessingConfig(), description="unset fields: the model's"
    )
    actors: ActorsConfig = ActorsConfig()
    s3: S3Config = S3Config()
    overwrite: bool = False
    lease_ttl_s: float = Field(
        DEFAULT_TTL_S, ge=5, description="a killed run's lease is taken over after this"
    )
    progress_interval_s: float = Field(5, gt=0)
    commit_concurrency: int = Field(
        DEFAULT_CONCURRENCY, ge=1, description="parts written at once (S3 PUTs overlap)"
    )
    mlflow: LabelMlflowConfig = LabelMlflowConfig()

    def fingerprint(self) -> str:
        """What decides the output's content, besides the weights (pinned by sha256 in the job
        record): a rerun must match it to resume. ``files_per_unit`` is not part of it:
        units are cut from the keys still to do, so it changes nothing committed. ``min_score``
        counts only when set, so outputs made before it existed keep their fingerprint."""
        keys = (
            "input",
            "format",
            "exclude",
            "model",
            "top_k",
            "image_column",
            "id_column",
            "preprocessing",
            "max_object_bytes",
        )
        content = {
            **self.model_dump(mode="json", include=set(keys)),
            "precision": self.actors.precision,
        }
        if self.min_score is not None:
            content["min_score"] = self.min_score
        blob = json.dumps(content, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


STAGE_COLUMNS = ("decode_s", "model_s", "wait_s")
STAGE_FIGURES = {  # manifest key -> how the progress line and the summary show it
    "decode_img_per_s": "decode {:.1f} img/s/task",
    "model_img_per_s": "model {:.1f} img/s/actor",
    "actor_busy_fraction": "actors busy {:.0%}",
    "actor_wait_s": "actors waited {:.1f}s",
}


class StageTimes:
    """Where the workers' time went, from per-row columns the stages add (a batch's seconds
    over its rows): ``decode_s`` in a read+decode task, ``model_s`` in a model actor's
    ``__call__``, ``wait_s`` an actor idle before it (waiting for input). Summed on the
    driver as batches arrive; a column no stage sent leaves its figures out."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.rows: dict[str, int] = defaultdict(int)

    def add(self, batch: pa.Table) -> None:
        for name in STAGE_COLUMNS:
            if name in batch.column_names:
                self.seconds[name] += pc.sum(batch.column(name)).as_py() or 0.0
                self.rows[name] += batch.num_rows

    def figures(self) -> dict[str, float]:
        """decode img/s per decode task, model img/s per actor, the actors' busy fraction
        (model over model + wait: on GPUs, how busy the GPUs were) and the actors' wait."""
        seconds, figures = self.seconds, {}
        for name, stage in (("decode_s", "decode"), ("model_s", "model")):
            if seconds.get(name, 0) > 0:
                figures[f"{stage}_img_per_s"] = round(self.rows[name] / seconds[name], 3)
        if "model_s" in seconds and "wait_s" in seconds:
            model, wait = seconds["model_s"], seconds["wait_s"]
            if model + wait > 0:
                figures["actor_busy_fraction"] = round(model / (model + wait), 4)
            figures["actor_wait_s"] = round(wait, 3)
        return figures

    def describe(self) -> str:
        """The figures as the progress line shows them ('' until a stage reported)."""
        figures = self.figures()
        return "; ".join(
            shown.format(figures[key]) for key, shown in STAGE_FIGURES.items() if key in figures
        )


PROGRESS_POINTS = 256  # throughput samples a manifest keeps: every other one is dropped when full


class Progress:
    """A driver line every few seconds: images done / total, img/s, ETA, and the stages' figures.
    Each line is also a ``[seconds, images done]`` sample (``samples``, for the report's
    throughput chart), thinned to at most :data:`PROGRESS_POINTS` however long the run."""

    def __init__(
        self, total: int | None, interval_s: float, stages: StageTimes | None = None
    ) -> None:
        self.total, self.interval_s = total, interval_s
        self.stages = stages or StageTimes()
        self.done = 0
        self.start = self.last = time.monotonic()
        self.first: tuple[float, int] | None = None  # when the first batch arrived, and its size
        self.samples: list[list[float]] = [[0.0, 0]]

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.first is None:
            self.first = (now, n)
        if now - self.last >= self.interval_s:
            self.last = now
            self.sample(now)
            print(self.line(), flush=True)

    def sample(self, now: float | None = None) -> None:
        """Record ``[seconds since start, images done]`` (now, unless given)."""
        now = time.monotonic() if now is None else now
        self.samples.append([round(now - self.start, 3), self.done])
        if len(self.samples) > PROGRESS_POINTS:
            self.samples = self.samples[::2]

    @property
    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.start, 1e-9)

    @property
    def steady_rate(self) -> float:
        """img/s after the first batch: start-up (cluster, model load, first batch) excluded."""
        if self.first is None:
            return 0.0
        at, n = self.first
        return (self.done - n) / max(time.monotonic() - at, 1e-9)

    def line(self) -> str:
        total = "?" if self.total is None else str(self.total)
        eta = ""
        if self.total is not None and self.rate > 0:
            eta = f", ETA {max(self.total - self.done, 0) / self.rate:.0f}s"
        stages = self.stages.describe()
        stages = f" ({stages})" if stages else ""
        return f"[label] {self.done}/{total} images, {self.rate:.1f} img/s{eta}{stages}"


DECODE_BASE_BYTES = 512 * 2**20  # a decode worker's own footprint: Python, pyarrow, torch


def decode_memory_bytes(cfg: LabelConfig) -> int:
    """What one read+decode task may hold at worst, declared to Ray so a node never runs
    more of them than its memory takes: a batch of objects at the cap plus a Parquet read
    batch, one image decoded at ``max_pixels`` (RGBA, and a copy), and the batch's crops."""
    if cfg.decode_memory_mb is not None:
        return cfg.decode_memory_mb * 2**20
    objects = (cfg.batch_size + PARQUET_BATCH_ROWS) * cfg.max_object_bytes
    decoded = 2 * 4 * cfg.preprocessing.max_pixels
    crops = cfg.batch_size * 3 * cfg.preprocessing.image_size**2
    return DECODE_BASE_BYTES + objects + decoded + crops


def schedulable_memory(memory: int, nodes: list[dict[str, Any]]) -> int:
    """``memory``, or the most any live node offers: a declaration no node can meet would
    leave the tasks pending forever, and the worst case it stands for is rare."""
    largest = max((int(n["Resources"].get("memory", 0)) for n in nodes if n["Alive"]), default=0)
    if largest and memory > largest:
        log.warning(
            "read+decode tasks declare %d MiB, more than any node has: %d MiB declared instead "
            "(lower batch_size or max_object_bytes, or set decode_memory_mb)",
            memory >> 20,
            largest >> 20,
        )
        return largest
    return memory


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
    files = list_inputs(cfg.input, cfg.exclude)
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
        planned = plan(files, cfg.output, cfg.format, cfg.files_per_unit, columns)
    except BaseException:
        lease.release()
        raise
    return Prepared(planned, pinned, weights, lease, tracking_uri)


def actor_pool_sizes(
    actors: ActorsConfig, gpus_per_actor: float, cluster_gpus: float
) -> tuple[int, int]:
    """(min_size, max_size) of the model actor pool; Ray Data starts ``min_size`` actors and
    adds the rest one at a time as the first ones fill up.

    On CPUs the pool autoscales between ``actors.min`` and ``actors.max``. On GPUs it
    starts at full size, ``actors.max`` or as many actors as the cluster's GPUs hold now
    if fewer, since the ramp-up costs minutes on a big pool while GPUs sit idle; it may
    still grow to ``actors.max`` as GPU nodes join. ``actors.min`` does not apply there."""
    if gpus_per_actor <= 0:
        return actors.min, max(actors.min, actors.max)
    fits = math.floor(cluster_gpus / gpus_per_actor + 1e-9)
    return max(1, min(actors.max, fits)), actors.max


def worker_env(cfg: LabelConfig) -> dict[str, str]:
    """What the workers must see: the configured S3 location (no secrets: credentials stay in the
    nodes' environment; pinned weights name a concrete file, so no MLflow store is needed)."""
    return cfg.s3.env()


def decode_task_cpus(
    decode_cpus: float, actor_cpus: float, actors_at_start: int, cluster_cpus: float
) -> float:
    """The CPUs each read+decode task declares: ``decode_cpus``, or what the model actors
    leave when that is less. Ray Data would otherwise hold every task back, forever."""
    room = cluster_cpus - actor_cpus * actors_at_start
    if room <= 0:
        raise ConfigError(
            f"actors.cpus {actor_cpus:g} x {actors_at_start} actor(s) at start take all "
            f"{cluster_cpus:g} CPUs of the cluster: no read+decode task could ever run. "
            "Lower actors.cpus or actors.min, or add CPUs"
        )
    if room < decode_cpus:
        log.warning(
            "decode_cpus %g does not fit beside the model actors (%g of %g CPUs left): "
            "each read+decode task declares %g",
            decode_cpus,
            room,
            cluster_cpus,
            room,
        )
        return room
    return decode_cpus


def build_dataset(cfg: LabelConfig, units: list[Unit], pinned: PinnedWeights | None):
    import ray
    import ray.data

    from skray.label.predictor import Predictor, read_and_decode

    preprocessing = cfg.preprocessing
    gpus = resolve_gpus(cfg.actors.gpus)
    decode = resolve_decode(cfg.decode, gpus > 0)  # both stages: crops or bytes travel between them
    pool = actor_pool_sizes(cfg.actors, gpus, ray.cluster_resources().get("GPU", 0))
    print(
        f"[label] model actors: {pool[0]} at start, up to {pool[1]}, {gpus:g} GPU each", flush=True
    )
    env = worker_env(cfg)
    runtime_env = {"env_vars": env} if env else None
    ds = ray.data.from_items([u.to_row() for u in units], override_num_blocks=len(units))
    ds = ds.map_batches(
        read_and_decode,
        fn_kwargs={
            "preprocessing": preprocessing,
            "batch_size": cfg.batch_size,
            "image_column": cfg.image_column,
            "id_column": cfg.id_column,
            "max_object_bytes": cfg.max_object_bytes,
            "decode": decode,
        },
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=decode_task_cpus(
            cfg.decode_cpus, cfg.actors.cpus, pool[0], ray.cluster_resources().get("CPU", 0)
        ),
        memory=schedulable_memory(decode_memory_bytes(cfg), ray.nodes()),
        concurrency=cfg.decode_concurrency,
        runtime_env=runtime_env,
    )
    return ds.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "model": cfg.model,
            "pinned": pinned,
            "top_k": cfg.top_k,
            "preprocessing": preprocessing,
            "threads": cfg.actors.threads,
            "compile": cfg.actors.compile,
            "decode": decode,
            "batch_size": cfg.actors.batch_size or cfg.batch_size,
            "precision": cfg.actors.precision,
            "min_score": cfg.min_score,
            "output": redact_uri(cfg.output),
            "calibration": calibration_crops(
                cfg.actors.calibration, cfg.actors.calibration_images, preprocessing
            )
            if cfg.actors.precision == "int8"
            else None,
        },
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1]),
        num_gpus=gpus,
        num_cpus=cfg.actors.cpus,
        runtime_env=runtime_env,
    )


def run(cfg: LabelConfig) -> dict[str, Any]:
    """Label every key under ``cfg.input`` not yet in ``cfg.output``; returns the manifest."""
    import ray

    from skray.label.metrics import RunMetrics

    started = time.time()
    os.environ.update(cfg.s3.env())
    print("[label] resolved config:\n" + dump_config(cfg), flush=True)
    prepared = prepare(cfg)
    planned, weights = prepared.plan, prepared.weights
    with prepared.lease as lease, _mlflow_run(cfg, prepared) as mlflow_run:
        if weights["random_weights"]:
            print(
                "[label] WARNING: no weights given: the model has RANDOM weights, "
                "labels are meaningless",
                flush=True,
            )
        print(
            f"[label] {planned.listed} inputs listed, "
            f"{planned.committed_rows} keys already committed "
            f"({planned.committed_parts} parts), {planned.removed_rows} no longer in the input; "
            f"{len(planned.units)} units to do",
            flush=True,
        )
        progress = Progress(planned.pending_rows, cfg.progress_interval_s)
        ray_started = time.time()
        with UnitCommitter(cfg.output, lease.check, cfg.commit_concurrency) as committer:
            if planned.units:
                ray.init(ignore_reinit_error=True)
                live = RunMetrics(redact_uri(cfg.output), planned.pending_rows)
                dataset = build_dataset(cfg, planned.units, prepared.pinned)
                for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
                    lease.check()
                    progress.stages.add(batch)
                    progress.add(committer.add(batch))
                    live.received(progress.done)
        # every part is written here: only now may the manifest say the output is complete
        progress.sample()
        print(progress.line(), flush=True)
        summary = summarize_output(cfg.output)
        finished = time.time()
        manifest = {
            "output": redact_uri(cfg.output),
            "inputs": summary["rows"] - planned.removed_rows,
            "rows": summary["rows"],
            "labeled": summary["labeled"],
            "failed": summary["failed"],
            "failed_by_reason": summary["failed_by_reason"],
            "skipped_already_done": planned.committed_rows - planned.removed_rows,
            "removed_from_input": planned.removed_rows,
            "units": {
                "total": summary["parts"],
                "skipped": planned.committed_parts,
                "committed": committer.committed,
            },
            "duplicates": summary["rows"] - summary["distinct_keys"],
            "low_confidence": summary["low_confidence"],
            "top_labels": summary["top_labels"],
            **weights,
            "timings": {
                "total_s": round(finished - started, 3),
                "pipeline_s": round(finished - ray_started, 3),
                "images_this_run": progress.done,
                "img_per_s": round(progress.rate, 3),
                "steady_img_per_s": round(progress.steady_rate, 3),
                **progress.stages.figures(),
                "progress": progress.samples,
            },
            "mlflow": mlflow_run,
            "config": redact_values(json.loads(cfg.model_dump_json())),
        }
        lease.check()
        write_json(join(cfg.output, MANIFEST), manifest)
        report = _write_report(cfg.output)
    if mlflow_run:
        from skray.label import tracking

        tracking.finish(mlflow_run["run_id"], manifest, report and join(cfg.output, REPORT_DIR))
    return manifest


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
        "precision": cfg.actors.precision,
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


def _write_report(output: str) -> str | None:
    """The report beside the manifest; a storage error leaves the complete output without one."""
    try:
        page = write_report(output)
    except OSError as err:
        log.warning(
            "no report written (the labels are complete; run `skray report %s`): %s",
            redact_uri(output),
            err,
        )
        return None
    print(f"[label] report: {redact_uri(page)}", flush=True)
    return page


def format_summary(manifest: dict[str, Any]) -> str:
    """The table a person reads at the end of a run."""
    timings = manifest["timings"]
    lines = [
        f"inputs              {manifest['inputs']}",
        f"labeled             {manifest['labeled']}",
        *(
            [
                f"low confidence      {manifest['low_confidence']} (top score under "
                f"{manifest['config'].get('min_score')}: no label)"
            ]
            if manifest.get("low_confidence")
            else []
        ),
        f"failed              {manifest['failed']}",
        *(f"  {reason:<18}{count}" for reason, count in manifest["failed_by_reason"].items()),
        f"skipped (done)      {manifest['skipped_already_done']}",
        f"duplicates          {manifest['duplicates']}",
        f"img/s (this run)    {timings['img_per_s']}",
        *(
            f"  {shown.format(timings[key])}"
            for key, shown in STAGE_FIGURES.items()
            if key in timings
        ),
        f"wall time           {timings['total_s']} s",
        f"model               {manifest['model']}"
        + (" (RANDOM weights: labels are meaningless)" if manifest["random_weights"] else ""),
        "most frequent labels:",
        *(f"  {count:>6}  {label}" for label, count in manifest["top_labels"]),
        f"Parquet             {manifest['output']}",
        f"report              {join(manifest['output'], REPORT_DIR)}/index.html",
        *(
            [f"MLflow run          {run['run_id']} (experiment {run['experiment']})"]
            if (run := manifest.get("mlflow"))
            else []
        ),
    ]
    return "\n".join(lines)
