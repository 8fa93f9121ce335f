"""The labeling job's config schema: what a run reads, how it labels, and where it writes.

Apart from the driver so the CLI, tests and benchmarks build and check a config without
the machinery that runs it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import Field

from skray.core.hardware import cuda_available
from skray.core.preprocessing import PreprocessingConfig
from skray.inference.precision import Resolved, resolve_precision
from skray.io.config import (
    Decode,
    MlflowConfig,
    ModelName,
    ModelPreprocessing,
    PrecisionOptions,
    StrictModel,
)
from skray.io.objects import DEFAULT_BUFFER_BYTES
from skray.io.retry import IoRetry
from skray.io.sources import (
    DEFAULT_MAX_MEMBERS_PER_SAMPLE,
    DEFAULT_MAX_OBJECT_BYTES,
    DEFAULT_MAX_SAMPLE_BYTES,
)
from skray.label.commit import DEFAULT_CONCURRENCY
from skray.label.lease import DEFAULT_TTL_S


class ActorsConfig(PrecisionOptions):
    gpus_key = "gpus"

    min: int = Field(
        1, ge=1, description="CPU actors: the pool starts here, autoscales up to max (not on GPUs)"
    )
    max: int = Field(
        1, ge=1, description="the pool's largest size; GPU actors all start at once, as GPUs allow"
    )
    gpus: Literal["auto"] | float = Field(
        "auto", description="per actor; auto = 1 when the cluster has GPUs"
    )
    cpus: float = Field(1, gt=0, description="CPUs each actor reserves from Ray")
    threads: int | None = Field(None, ge=1, description="torch intra-op threads per CPU actor")
    compile: bool = Field(False, description="torch.compile the model in each actor")
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

    enabled: bool = Field(
        True, description="record each run in MLflow (the store is reached before any work)"
    )
    experiment: str = Field("skray-label", description="each labeling run is a run in it")


class LabelConfig(StrictModel):
    input: str = Field(description="a prefix (recursive), a file or a glob; local or s3://")
    output: str = Field(description="the Parquet parts, manifest and report; local or s3://")
    format: Literal["auto", "images", "webdataset", "parquet"] = Field(
        "auto", description="auto: .tar is webdataset, .parquet parquet, anything else images"
    )
    exclude: list[str] = Field(
        [], description="globs, relative to the input, of files to skip (hidden ones always are)"
    )
    input_inventory: str | None = Field(
        None,
        description="an S3 Inventory manifest.json (or a Parquet/CSV listing) of the input's "
        "bucket, read instead of LISTing it; the input, exclude and hidden names still apply",
    )
    model: ModelName | None = Field(
        None, description="None: the architecture recorded in the weights, else the default"
    )
    weights: str | None = Field(
        None,
        description="path, s3://, https://, pretrained, models:/, runs:/; None: random weights",
    )
    top_k: int = Field(5, ge=1, le=1000, description="labels kept per image, best first")
    min_score: float | None = Field(
        None, ge=0, le=1, description="a top score under it: no label, low_confidence"
    )
    batch_size: int = Field(
        32, ge=1, description="images per batch from read+decode to the model actors"
    )
    files_per_unit: int = Field(
        256,
        ge=1,
        description="image files per unit (one task, one part); each tar or Parquet file is one",
    )
    image_column: str = Field("image", description="Parquet inputs: the column of image bytes")
    id_column: str | None = Field(
        None, description="Parquet inputs: the column naming each row's key (None: the row index)"
    )
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
    max_members_per_sample: int = Field(
        DEFAULT_MAX_MEMBERS_PER_SAMPLE,
        ge=1,
        description="per WebDataset sample; past it: too_large",
    )
    max_sample_bytes: int = Field(
        DEFAULT_MAX_SAMPLE_BYTES,
        ge=1,
        description="per WebDataset sample, its members together; past it: too_large",
    )
    read_buffer_bytes: int = Field(
        DEFAULT_BUFFER_BYTES,
        ge=64 * 2**10,
        description="a tar shard or Parquet file is read this much per request (one GET)",
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
    overwrite: bool = Field(
        False, description="discard the earlier output and start over (else a rerun resumes)"
    )
    lease_ttl_s: float = Field(
        DEFAULT_TTL_S, ge=5, description="a killed run's lease is taken over after this"
    )
    progress_interval_s: float = Field(
        5, gt=0, description="seconds between the driver's progress lines"
    )
    commit_concurrency: int = Field(
        DEFAULT_CONCURRENCY, ge=1, description="parts written at once (S3 PUTs overlap)"
    )
    io_retry: IoRetry = Field(
        IoRetry(),
        description="each storage call's retries; past them a unit stays unwritten, to rerun",
    )
    mlflow: LabelMlflowConfig = LabelMlflowConfig()

    def resolved_precision(self) -> tuple[Resolved, str]:
        """The actors' precision, ``auto`` resolved on this driver before any work (so the
        fingerprint holds what the actors run): GPU actors when ``actors.gpus`` > 0, or
        ``auto`` and this machine has a GPU; else CPU actors, on a CPU like this one's."""
        gpus = self.actors.gpus
        on_gpu = cuda_available() if gpus == "auto" else gpus > 0
        return resolve_precision(self.actors.precision, "cuda" if on_gpu else "cpu")

    def fingerprint(self) -> str:
        """What decides the output's content, besides the weights (pinned by sha256 in the job
        record): a rerun must match it to resume. ``files_per_unit`` is not part of it:
        units are cut from the keys still to do, so it changes nothing committed. ``min_score``
        counts only when set, and the sample limits when changed, so outputs made before they
        existed keep their fingerprint. Precision counts as resolved: ``auto`` is what it
        chose, so an output never mixes fp32 and bf16 labels."""
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
            "precision": self.resolved_precision()[0],
        }
        if self.min_score is not None:
            content["min_score"] = self.min_score
        for key, default in (
            ("max_members_per_sample", DEFAULT_MAX_MEMBERS_PER_SAMPLE),
            ("max_sample_bytes", DEFAULT_MAX_SAMPLE_BYTES),
        ):
            if getattr(self, key) != default:
                content[key] = getattr(self, key)
        blob = json.dumps(content, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
