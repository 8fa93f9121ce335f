"""Fixtures only (what tests import lives in helpers.py): one embedded S3 server and one
local Ray cluster per test session, an MLflow store, buckets."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import RAY_DEFAULT_AGENT_PORT, ReadmeCpuRun, mlflow_store_in, occupied
from skray.dev.embedded import EmbeddedS3, LocalRayHead
from skray.dev.s3proxy import FaultyS3Proxy

# Ray reads its auth mode once, when first used: set it before anything connects.
os.environ["RAY_AUTH_MODE"] = "token"
# Ray Train's controller polls its workers every 2 s and starts a preemption-watcher actor
# per run: over the suite's ~20 short runs that is minutes of waiting and process starts
# that no test looks at. Set before the head starts, so its raylet, jobs and drivers get them.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray keeps as many idle workers as the node has CPUs (4 here) and ends the rest after a
# second: each run's read tasks (0.5 CPU each) then start cold processes that import torch.
os.environ.setdefault("RAY_num_workers_soft_limit", "10")
# The GCS declares a node dead after 5 failed health checks, 3 s apart by default: the node-loss
# test would wait 15 s for it. 1 s apart here.
os.environ.setdefault("RAY_health_check_period_ms", "1000")
# Every Ray process reports its metrics to the node's export port each 10 s by default: the
# metrics tests would wait up to that long for a count. Each 2 s here.
os.environ.setdefault("RAY_metrics_report_interval_ms", "2000")
# Ray's log monitor lists the log folder on every pass (ten a second) until it tracks 1000
# files; the suite's head writes several hundred, so that listing alone cost about a CPU-minute.
# Past the threshold it lists them every 0.5 s, which is how it runs here from the start.
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "1")
# Jobs that track by default (labeling runs, training) write their MLflow store under
# SKRAY_HOME: a session folder, never the checkout's .skray/ (tests wanting a store of their
# own set it per test).
os.environ["SKRAY_HOME"] = tempfile.mkdtemp(prefix="skray-test-home-")
os.environ.pop("MLFLOW_TRACKING_URI", None)


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
    environment on every worker); this test process is connected to it as a driver. Ray's
    default agent port is taken while it runs, as any other Ray on the machine (the README run's)
    takes it: every ``ray job submit`` test then shows the head runs jobs regardless."""
    import ray

    head = LocalRayHead(num_cpus=4, env=embedded_s3.env())
    with occupied(RAY_DEFAULT_AGENT_PORT), head:  # as another Ray on the machine would hold it
        ray.init(address=head.gcs_address, logging_level="WARNING")
        try:
            yield head
        finally:
            ray.shutdown()


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite MLflow store (and skray home) for one test; this process points at it
    too, since an earlier test's ``mlflow.set_tracking_uri`` would otherwise win over the env."""
    import mlflow

    uri = mlflow_store_in(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("SKRAY_HOME", str(tmp_path))
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


@pytest.fixture
def faulty_s3(embedded_s3: EmbeddedS3, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultyS3Proxy]:
    """A :class:`~skray.dev.s3proxy.FaultyS3Proxy` in front of the embedded S3, healthy at
    first; this process's S3 clients go through it."""
    with FaultyS3Proxy(embedded_s3.endpoint_url) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        yield proxy


@pytest.fixture
def bucket(embedded_s3: EmbeddedS3, request: pytest.FixtureRequest) -> str:
    """A fresh bucket named after the test."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip(
        "-"
    )
    embedded_s3.create_bucket(name)
    return f"s3://{name}"


@pytest.fixture(params=["local", "s3"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A place to write, on the local disk or in a fresh bucket on the embedded S3."""
    if request.param == "local":
        return str(tmp_path)
    return request.getfixturevalue("bucket")


README_CPU_RUN = pytest.StashKey[ReadmeCpuRun]()
README_CPU_RUN_NEEDED = pytest.StashKey[bool]()
# Where the README's run starts when the selection goes that far: the Serve tests wait on
# Serve's and Ray's control loops about half the time, and its training fills those idle CPUs
# instead of slowing the CPU-bound tests at the start of the session.
README_CPU_RUN_STARTS_AT = "tests/serve/"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Whether the selection needs the README's CPU command, which trains on a Ray of its own."""
    needed = any("readme_cpu_run" in getattr(item, "fixturenames", ()) for item in session.items)
    session.config.stash[README_CPU_RUN_NEEDED] = needed and not session.config.option.collectonly


def start_readme_cpu_run(config: pytest.Config) -> ReadmeCpuRun:
    """The README's CPU command, started in the background the first time it is asked for."""
    if README_CPU_RUN not in config.stash:
        run = ReadmeCpuRun(Path(tempfile.mkdtemp(prefix="skray-readme-cpu-")))
        config.stash[README_CPU_RUN] = run
        config.add_cleanup(run.stop)
    return config.stash[README_CPU_RUN]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.config.stash.get(README_CPU_RUN_NEEDED, False) and item.nodeid.startswith(
        README_CPU_RUN_STARTS_AT
    ):
        start_readme_cpu_run(item.config)


@pytest.fixture(scope="session")
def readme_cpu_run(request: pytest.FixtureRequest) -> ReadmeCpuRun:
    """The README's CPU command, running since the Serve tests began (or starting now, when the
    selection has none)."""
    return start_readme_cpu_run(request.config)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test on the session's Ray is slow: say so, so that `-m "not slow"` never starts Ray."""
    unmarked = [
        item.nodeid
        for item in items
        if "ray_cluster" in getattr(item, "fixturenames", ())
        and item.get_closest_marker("slow") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "tests on the session's Ray need @pytest.mark.slow: " + ", ".join(unmarked)
        )
