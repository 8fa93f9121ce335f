"""Shared fixtures: one embedded S3 server and one local Ray cluster per test session."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from skray.embedded import EmbeddedS3, LocalRayHead
from skray.storage import join, write_bytes_atomic

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
    from skray.testing import write_labeled_folder

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


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A place to write, on the local disk or in a fresh bucket on the embedded S3."""
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("bucket")


# --- inputs and outputs written by hand --------------------------------------


def write_files(root: str, names: list[str], data: bytes = b"x") -> None:
    for name in names:
        write_bytes_atomic(join(root, name), data)


def parquet_bytes(columns: dict[str, list]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def label_row(key: str, label: str | None = "cat", error: str | None = None) -> dict:
    """One output row as the sink stores it (error None = labeled)."""
    ok = error is None
    return {
        "key": key, "label_id": 1 if ok else None, "label": label if ok else None,
        "score": 0.9 if ok else None, "topk_ids": [1, 2] if ok else None,
        "topk_scores": [0.9, 0.1] if ok else None, "model": SMALL, "weights_sha256": None,
        "error": error, "meta": None,
    }
