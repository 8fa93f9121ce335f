"""Shared fixtures: one embedded S3 server and one local Ray cluster per test session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from skray.embedded import EmbeddedS3, LocalRayHead

# Ray reads its auth mode once, when first used: set it before anything connects.
os.environ["RAY_AUTH_MODE"] = "token"

PROJECT = Path(__file__).resolve().parents[1]
SMALL = "skresnext14_8x4d_half"


@pytest.fixture(scope="session")
def embedded_s3() -> Iterator[EmbeddedS3]:
    """moto's S3 server on 127.0.0.1, started by the project's own code; this process's
    AWS environment points at it for the whole session (tests use their own buckets)."""
    saved = dict(os.environ)
    with EmbeddedS3() as s3:
        os.environ.update(s3.env())
        yield s3
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def s3_server(embedded_s3: EmbeddedS3) -> str:
    """The embedded S3 endpoint URL."""
    return embedded_s3.endpoint_url


@pytest.fixture(scope="session")
def ray_cluster(embedded_s3: EmbeddedS3) -> Iterator[LocalRayHead]:
    """A Ray head started with ``ray start`` (token auth on, 4 logical CPUs, the S3
    environment on every worker); this test process is connected to it as a driver."""
    import ray

    with LocalRayHead(num_cpus=4, env=embedded_s3.env()) as head:
        ray.init(address=head.gcs_address, logging_level="WARNING")
        try:
            yield head
        finally:
            ray.shutdown()


def labeled_dataset(root: Path, per_class: int) -> dict[str, str]:
    """A 4-class folder dataset with a learnable signal: train/ and a 12-per-class val/."""
    from skray.demo import write_labeled_folder

    write_labeled_folder(str(root / "train"), classes=4, per_class=per_class, seed=0)
    write_labeled_folder(str(root / "val"), classes=4, per_class=12, seed=1)
    return {"train": str(root / "train"), "val": str(root / "val")}


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite MLflow store (and skray home) for one test; this process points at it
    too, since an earlier test's ``mlflow.set_tracking_uri`` would otherwise win over the env."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SKRAY_HOME", str(tmp_path))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


@pytest.fixture
def bucket(embedded_s3: EmbeddedS3, request: pytest.FixtureRequest) -> str:
    """A fresh bucket named after the test."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    embedded_s3.create_bucket(name)
    return f"s3://{name}"
