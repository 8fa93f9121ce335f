"""Live metrics, read the way Prometheus reads them: from the metrics export port of every Ray
node, while the cluster runs. The labeling job's counts add up to its manifest; a Serve
replica counts each answer by route and status, its latency, and the batches it ran."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from helpers import SMALL, wait_for, wait_ready, write_weights
from skray.dev.embedded import LocalRayHead, free_port
from skray.dev.testing import synthetic_image, write_sample_dataset
from skray.io.storage import LOOPBACK
from skray.label.config import LabelConfig
from skray.label.job import run
from skray.serve.app import application
from skray.serve.config import ServeConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

EXPORTED_WITHIN_S = 90  # Ray reports each 10 s by default (2 s in the test Ray): a few intervals
APP = "skray-metrics"
JPEG = {"content-type": "image/jpeg"}
# write_sample_dataset's broken files, one per reason
REASONS = ["empty", "not_an_image", "too_many_pixels", "truncated"]
# as scraped: Ray's ray_ prefix, _total on counters (skray.label.metrics defines them)
IMAGES, FAILED = "ray_skray_label_images_total", "ray_skray_label_failed_total"
STAGE_SECONDS, REMAINING = "ray_skray_label_stage_seconds_total", "ray_skray_label_images_remaining"
REQUESTS, LATENCY = "ray_skray_serve_requests_total", "ray_skray_serve_request_latency_s"
BATCH_SIZE = "ray_skray_serve_batch_size"


def scrape() -> list[Sample]:
    """Every sample on every live node's metrics export port."""
    import ray

    ports = {node["MetricsExportPort"] for node in ray.nodes() if node["Alive"]}
    return [
        sample
        for port in sorted(ports)
        for family in text_string_to_metric_families(
            httpx.get(f"http://{LOOPBACK}:{port}/metrics", timeout=10).text
        )
        for sample in family.samples
    ]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum over every series of ``name`` (each worker exports its own) with these labels."""
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def by(samples: list[Sample], name: str, label: str, **labels: str) -> dict[str, float]:
    """``name`` summed per value of ``label``, over the series with ``labels``."""
    values = {
        s.labels[label] for s in samples if s.name == name and labels.items() <= s.labels.items()
    }
    return {value: total(samples, name, **labels, **{label: value}) for value in sorted(values)}


def shown(sample: Sample) -> str:
    """A sample without the labels Ray adds to every series (Component, WorkerId, ...)."""
    labels = {k: v for k, v in sample.labels.items() if k.islower() and not k.startswith("otel_")}
    return f"{sample.name}{labels} {sample.value}"


def scrape_until(done: Callable[[list[Sample]], bool], what: str) -> list[Sample]:
    """Scrape until ``done`` holds; on timeout the error shows the skray series last seen."""
    last: list[Sample] = []

    def exported() -> list[Sample] | None:
        nonlocal last
        last = scrape()
        return last if done(last) else None

    try:
        return wait_for(exported, EXPORTED_WITHIN_S, what, interval_s=1)
    except AssertionError as err:
        seen = [shown(s) for s in last if "skray" in s.name and not s.name.endswith("_bucket")]
        raise AssertionError(f"{err}; skray series seen:\n" + "\n".join(seen)) from None


def test_a_labeling_run_exports_images_failures_by_reason_and_stage_seconds_that_match_its_manifest(
    ray_cluster: LocalRayHead, mlflow_store: str, tmp_path: Path
):
    data, labels = str(tmp_path / "data"), str(tmp_path / "labels")
    keys = write_sample_dataset(data, files=12, shards=0)  # and one broken file per failure reason
    run_ = {"output": labels}

    cfg = LabelConfig(input=data, output=labels, model=SMALL, batch_size=4, files_per_unit=6)
    manifest = run(cfg)
    samples = scrape_until(
        lambda s: (
            total(s, IMAGES, **run_) >= len(keys) and by(s, REMAINING, "output").get(labels) == 0
        ),
        f"the {len(keys)} images of the run counted, none remaining",
    )

    assert total(samples, IMAGES, **run_) == manifest["inputs"] == len(keys)
    assert by(samples, FAILED, "reason", **run_) == manifest["failed_by_reason"]
    assert sorted(manifest["failed_by_reason"]) == REASONS
    seconds = by(samples, STAGE_SECONDS, "stage", **run_)
    assert set(seconds) == {"decode", "model", "wait"} and min(seconds.values()) > 0
    # images / worker seconds: the manifest's img/s per read+decode task and per model actor
    for stage in ("decode", "model"):
        figure = manifest["timings"][f"{stage}_img_per_s"]
        assert len(keys) / seconds[stage] == pytest.approx(figure, rel=1e-2)


@pytest.fixture(scope="module")
def url(ray_cluster: LocalRayHead, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A classifier app of its own (small model) on a Serve proxy of this module."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": LOOPBACK, "port": port})
    weights = write_weights(tmp_path_factory.mktemp("metrics") / "small.safetensors", seed=0)
    cfg = ServeConfig(
        model=SMALL, weights=weights, max_batch_size=8, batch_wait_timeout_s=0.2, warmup_batches=1
    )
    serve.run(application(cfg), name=APP, route_prefix="/")
    base = f"http://{LOOPBACK}:{port}"
    wait_ready(base)
    yield base
    serve.shutdown()


def test_a_serve_replica_exports_requests_by_route_and_status_their_latency_and_its_batch_sizes(
    url: str,
):
    async def classify_concurrently(n: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            posts = [
                client.post(f"{url}/v1/classify", content=synthetic_image(i), headers=JPEG)
                for i in range(n)
            ]
            return await asyncio.gather(*posts)

    good = asyncio.run(classify_concurrently(3))
    classify = f"{url}/v1/classify"
    text = {"content-type": "text/plain"}
    refused = {
        400: httpx.post(classify, content=b"not a picture", headers=JPEG, timeout=30),
        415: httpx.post(classify, content=b"cat", headers=text, timeout=30),
        422: httpx.post(
            f"{classify}?top_k=0", content=synthetic_image(0), headers=JPEG, timeout=30
        ),
        404: httpx.get(f"{url}/no/such/route/42", timeout=30),
    }
    assert [r.status_code for r in good] == [200] * 3
    assert {status: r.status_code for status, r in refused.items()} == {s: s for s in refused}
    app, route = {"application": APP}, {"application": APP, "path": "/v1/classify"}
    samples = scrape_until(
        lambda s: total(s, REQUESTS, **route) >= 6 and total(s, REQUESTS, **app, path="other") >= 1,
        "the 7 requests counted",
    )

    assert by(samples, REQUESTS, "status", **route) == {"200": 3, "400": 1, "415": 1, "422": 1}
    assert by(samples, REQUESTS, "status", **app, path="other") == {"404": 1}
    assert total(samples, LATENCY + "_count", **route) == 6
    # the images that reached the model, and how many shared each one's forward pass
    sizes = [int(r.headers["x-skray-batch-size"]) for r in good]
    assert total(samples, BATCH_SIZE + "_count", **app) == round(sum(1 / size for size in sizes))
    assert total(samples, BATCH_SIZE + "_bucket", **app, le="1.0") == sizes.count(1)
