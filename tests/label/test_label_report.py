"""Every labeling run ends with its report, flags what it is unsure of under ``min_score``,
and is an MLflow run in ``skray-label`` linked with the registered model version it used."""

from __future__ import annotations

import statistics
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from mlflow import MlflowClient

from helpers import SMALL, mlflow_store_in
from labeled_output import write_labeled_output
from skray.core.model import create_model
from skray.dev.embedded import free_port
from skray.dev.testing import write_sample_dataset
from skray.inference.classifier import Classifier
from skray.io.config import ConfigError
from skray.io.storage import exists, filesystem_for, join, read_bytes, read_json, redact_uri
from skray.label.config import LabelConfig
from skray.label.job import run
from skray.label.manifest import format_summary
from skray.label.progress import PROGRESS_POINTS, Progress
from skray.label.sinks import JOB_FILE, MANIFEST, OutputError, clear_output
from skray.report.page import write_report
from skray.report.review import write_review
from skray.train.compare import collect
from skray.weights import store

CLASSES = ["cat", "dog", "fox"]
MODEL = "skray-label-test"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SQLite MLflow store for the module, holding a 3-class model as ``MODEL`` version 1
    (three classes: top scores spread around a threshold); yields the version's URI."""
    directory = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        uri = mlflow_store_in(directory)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("SKRAY_HOME", str(directory))
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        store.configure(uri)
        torch.manual_seed(0)
        model = create_model(SMALL, num_classes=len(CLASSES))
        with mlflow.start_run(experiment_id=store.experiment_id("skray-label-tests-models")):
            store.log_model(
                model,
                architecture=SMALL,
                class_names=CLASSES,
                image_size=64,
                registered_model_name=MODEL,
            )
        yield f"models:/{MODEL}/1"
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


def median_score(data: str, keys: list[str], weights: str) -> float:
    """The median top score of the decodable inputs, computed here without the job."""
    classifier = Classifier(SMALL, weights)
    blobs = [read_bytes(k) for k in keys if "#" not in k]
    scores = [p.score for p in classifier.predict_bytes(blobs, 1) if not isinstance(p, Exception)]
    return round(statistics.median(scores), 6)


def label_runs(experiment: str = "skray-label") -> list:
    return store.search_runs(experiment)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_labeling_flags_low_confidence_writes_its_report_and_is_an_mlflow_run_of_the_model_version(
    ray_cluster, registry: str, location: str
) -> None:
    data, labels = join(location, "data"), join(location, "labels")
    keys = write_sample_dataset(data, files=24, shards=1, per_shard=8)
    min_score = median_score(data, keys, registry)
    before = (
        {r.info.run_id for r in label_runs()}
        if MlflowClient().get_experiment_by_name("skray-label")
        else set()
    )
    cfg = LabelConfig(
        input=data,
        output=labels,
        weights=registry,
        top_k=2,
        batch_size=8,
        files_per_unit=8,
        min_score=min_score,
        progress_interval_s=0.1,
    )

    manifest = run(cfg)

    # min_score: top-k kept, no label, flagged and counted; failed rows are not flagged
    fs, path = filesystem_for(labels)
    table = pq.read_table(path, filesystem=fs)
    ok = table.filter(pc.is_null(table.column("error")))
    rows = ok.to_pylist()
    unsure = [r for r in rows if r["low_confidence"]]
    assert unsure and len(unsure) < len(rows), "the median splits the rows"
    assert all(
        r["label"] is None
        and r["label_id"] is None
        and len(r["topk_ids"]) == 2
        and r["score"] < min_score
        for r in unsure
    )
    assert all(
        r["label"] in CLASSES and r["score"] >= min_score for r in rows if not r["low_confidence"]
    )
    assert (
        table.filter(pc.is_valid(table.column("error"))).column("low_confidence").null_count
        == manifest["failed"]
    )
    assert manifest["low_confidence"] == len(unsure) and manifest["labeled"] == len(rows) - len(
        unsure
    )
    assert f"low confidence      {len(unsure)}" in format_summary(manifest)

    # throughput samples and the report, beside the manifest
    progress = manifest["timings"]["progress"]
    assert progress[0] == [0.0, 0] and progress[-1][1] == manifest["timings"][
        "images_this_run"
    ] == len(keys)
    assert [p[0] for p in progress] == sorted(p[0] for p in progress)
    page = read_bytes(join(labels, "_report/index.html")).decode()
    assert "throughput" in page and f"score &lt; {min_score:g}" in page
    assert exists(join(labels, "_report/throughput.png"))

    # the MLflow run: params, metrics, artifacts, and the registry link both ways
    [run_id] = {r.info.run_id for r in label_runs()} - before
    assert manifest["mlflow"]["run_id"] == run_id
    recorded = MlflowClient().get_run(run_id)
    params, metrics, tags = recorded.data.params, recorded.data.metrics, recorded.data.tags
    assert recorded.info.status == "FINISHED"
    assert params["output"] == redact_uri(labels) and params["input"] == redact_uri(data)
    assert (
        params["weights_sha256"] == manifest["weights_sha256"] and params["weights_version"] == "1"
    )
    assert (
        params["min_score"] == str(min_score)
        and params["model"] == SMALL
        and params["batch_size"] == "8"
    )
    assert {"actors.max", "precision", "decode", "weights"} <= params.keys()
    assert (params["precision"], params["precision_reason"]) == ("fp32", "as configured")
    assert (manifest["precision"], manifest["precision_reason"]) == ("fp32", "as configured")
    assert metrics["images"] == len(keys) and metrics["low_confidence"] == len(unsure)
    assert metrics["failed"] == manifest["failed"] > 0
    assert all(
        metrics[f"failed_{reason}"] == n for reason, n in manifest["failed_by_reason"].items()
    )
    assert metrics["img_per_s"] == manifest["timings"]["img_per_s"]
    artifacts = {a.path for a in MlflowClient().list_artifacts(run_id)}
    assert {"_manifest.json", "report"} <= artifacts
    assert "report/index.html" in {a.path for a in MlflowClient().list_artifacts(run_id, "report")}
    assert tags["skray.model_name"] == MODEL and tags["skray.model_version"] == "1"
    version_tags = store.model_version_tags(MODEL, "1")
    assert version_tags[f"skray.labeling_run.{run_id}"] == redact_uri(labels)

    # skray compare reads labeling runs
    [row] = [r for r in collect("skray-label", None, "img_per_s") if r["run_id"] == run_id]
    assert row["best"] == manifest["timings"]["img_per_s"]

    # a rerun with another min_score is refused before any work, and records no run
    with pytest.raises(OutputError, match="fingerprint"):
        run(cfg.model_copy(update={"min_score": min(1.0, min_score * 2)}))
    assert {r.info.run_id for r in label_runs()} - before == {run_id}


@pytest.mark.timeout(300)
def test_an_unreachable_mlflow_store_fails_the_run_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(
        "MLFLOW_TRACKING_URI", raising=False
    )  # restored after MLflow exported its own
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    data, labels = str(tmp_path / "data"), str(tmp_path / "labels")
    write_sample_dataset(data, files=2, shards=0, broken=False)
    cfg = LabelConfig(
        input=data,
        output=labels,
        model=SMALL,
        mlflow={"tracking_uri": f"http://127.0.0.1:{free_port()}"},
    )  # nothing listens there
    try:
        with pytest.raises(ConfigError, match="mlflow.enabled=false"):
            run(cfg)
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert not exists(join(labels, JOB_FILE)), "nothing written: the output is as it was"


def test_min_score_is_part_of_the_fingerprint_only_when_set() -> None:
    base = LabelConfig(input="in", output="out")
    assert base.fingerprint() == "edd43779beb14d08", (
        "outputs made before min_score existed still resume"
    )
    assert LabelConfig(input="in", output="out", min_score=0.3).fingerprint() != base.fingerprint()
    assert (
        LabelConfig(input="in", output="out", min_score=0.3).fingerprint()
        != LabelConfig(input="in", output="out", min_score=0.4).fingerprint()
    )
    with pytest.raises(ValueError, match="min_score"):
        LabelConfig(input="in", output="out", min_score=1.5)


def test_progress_samples_stay_bounded_and_keep_the_first_and_latest() -> None:
    progress = Progress(total=None, interval_s=0)
    for _ in range(5 * PROGRESS_POINTS):
        progress.add(3)
    progress.sample()
    samples = progress.samples
    assert len(samples) <= PROGRESS_POINTS
    assert samples[0] == [0.0, 0] and samples[-1][1] == 15 * PROGRESS_POINTS
    assert [s[1] for s in samples] == sorted(s[1] for s in samples)


def test_overwrite_clears_the_report_and_review_samples_with_the_parts(tmp_path: Path) -> None:
    out = write_labeled_output(str(tmp_path))
    write_report(out.uri)
    write_review(out.uri, 5)
    write_review(out.uri, 5, fmt="parquet")
    assert exists(join(out.uri, "_report/index.html")) and exists(join(out.uri, "_review.csv"))

    clear_output(out.uri)

    assert sorted(p.name for p in Path(out.uri).iterdir()) == []
    assert exists(out.tar_keys[0].split("#")[0]), "the sources stay"


def test_summary_names_the_report_and_the_mlflow_run(tmp_path: Path) -> None:
    out = write_labeled_output(str(tmp_path))
    manifest = read_json(join(out.uri, MANIFEST))
    manifest.update(
        inputs=1,
        labeled=1,
        low_confidence=2,
        failed=0,
        failed_by_reason={},
        top_labels=[],
        mlflow={"run_id": "abc123", "experiment": "skray-label"},
    )
    manifest["config"]["min_score"] = 0.25
    summary = format_summary(manifest)
    assert "low confidence      2 (top score under 0.25: no label)" in summary
    assert f"report              {out.uri}/_report/index.html" in summary
    assert "MLflow run          abc123 (experiment skray-label)" in summary


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_report_or_mlflow_failure_after_the_manifest_is_a_warning_recorded_never_a_failure(
    ray_cluster, tmp_path: Path, mlflow_store: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from skray.cli import main
    from skray.label import job, tracking

    data, labels = tmp_path / "data", str(tmp_path / "labels")
    write_sample_dataset(str(data), files=8, shards=0)

    def chart_fails(output: str) -> str:
        raise ValueError("mathtext: unknown symbol")

    def store_fails(*args, **kwargs) -> None:
        raise RuntimeError("the tracking store went away")

    monkeypatch.setattr(job, "write_report", chart_fails)
    monkeypatch.setattr(tracking.store, "log_metrics", store_fails)

    code = main(["label", "--input", str(data), "--output", labels, "--model", SMALL])

    manifest = read_json(join(labels, MANIFEST))
    assert code == 0 and manifest["complete"], capsys.readouterr().err
    assert manifest["report_error"] == "ValueError: mathtext: unknown symbol"
    assert manifest["mlflow_error"] == "RuntimeError: the tracking store went away"
    recorded = MlflowClient().get_run(manifest["mlflow"]["run_id"])
    assert recorded.info.status == "FINISHED", "ended, never left RUNNING"
    assert recorded.data.tags["skray.warning"] == manifest["mlflow_error"]
