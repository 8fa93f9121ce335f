"""MLflow tracking: runs are logged, the best model registered, and registered models
load as weights everywhere (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``, ``runs:/``)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

import skray
from helpers import PROJECT, SMALL, mlflow_store_in
from skray.core.model import create_model
from skray.weights.files import WeightsError, file_sha256
from skray.weights.registry import download_weights
from skray.weights.resolver import PinnedWeights, load_model, pin_weights
from skray.weights.store import (
    WEIGHTS_FILE,
    configure,
    default_artifact_root,
    default_tracking_uri,
    experiment_id,
    flatten,
    log_model,
    log_text,
    run_tags,
    start_run,
)

CLASSES = ["cat", "dog", "fox"]


def _reset_mlflow() -> None:
    """Forget the URIs configure() set: MLflow keeps them in globals and exports them to
    the environment (monkeypatch then restores the variables it saw)."""
    mlflow.set_tracking_uri(None)  # also unsets $MLFLOW_TRACKING_URI
    mlflow.set_registry_uri(None)  # leaves $MLFLOW_REGISTRY_URI set
    os.environ.pop("MLFLOW_REGISTRY_URI", None)


@contextmanager
def _tracking_at(directory: Path) -> Iterator[str]:
    """MLflow on a SQLite store in ``directory``, also the cwd (MLflow's fallback for
    artifacts); MLflow's global URIs and the environment are restored afterwards."""
    with pytest.MonkeyPatch.context() as mp:
        uri = mlflow_store_in(directory)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        mlflow.set_tracking_uri(uri)  # over any URI an earlier test left in MLflow's globals
        mlflow.set_registry_uri(uri)
        mp.chdir(directory)
        try:
            yield uri
        finally:
            _reset_mlflow()


@dataclass(frozen=True)
class Logged:
    directory: Path
    model: torch.nn.Module  # the original, in eval mode
    sha256: str  # of the weights file in the artifact store
    result: dict
    plain_model_uri: str  # a model of the same run without skray weights


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Logged:
    """One run that logged a trained-looking model as ``skray-test`` v1 (alias ``best``),
    plus a plain MLflow model without skray weights."""
    directory = tmp_path_factory.mktemp("mlflow")
    torch.manual_seed(0)
    model = create_model(SMALL, num_classes=len(CLASSES))
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))  # in train mode: BatchNorm statistics leave their defaults
    with _tracking_at(directory):
        configure()
        with mlflow.start_run(experiment_id=experiment_id("skray-tests")):
            result = log_model(
                model,
                architecture=SMALL,
                class_names=CLASSES,
                image_size=64,
                registered_model_name="skray-test",
                alias="best",
            )
            assert model.training, "log_model must leave the caller's model as it was"
            mlflow.pytorch.log_model(
                torch.nn.Linear(2, 2),
                name="plain",
                input_example=np.zeros((2, 2), np.float32),
                pip_requirements=["torch"],
            )
    [stored] = directory.rglob(WEIGHTS_FILE)  # in the artifact store, beside the database
    sha = file_sha256(stored)
    return Logged(directory, model.eval(), sha, result, f"runs:/{result['run_id']}/plain")


@pytest.fixture
def clean_mlflow(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No tracking URI configured, as in a fresh process; whatever the test sets is undone."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    yield
    _reset_mlflow()


@pytest.fixture
def store(logged: Logged) -> Iterator[Logged]:
    """The store of ``logged``, as the tracking store of this test."""
    with _tracking_at(logged.directory):
        yield logged


# --- where runs are tracked ----------------------------------------------------


def test_default_store_is_sqlite_under_skray_home(
    clean_mlflow: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SKRAY_HOME", str(tmp_path / "home"))
    assert default_tracking_uri() == f"sqlite:///{tmp_path}/home/mlflow/mlflow.db"
    assert (tmp_path / "home/mlflow").is_dir()
    assert default_artifact_root() == (tmp_path / "home/mlflow/artifacts").as_uri()


def test_default_skray_home_is_dot_skray_in_the_working_directory(
    clean_mlflow: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SKRAY_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert default_tracking_uri() == f"sqlite:///{tmp_path}/.skray/mlflow/mlflow.db"


def test_tracking_uri_from_the_environment_wins(
    clean_mlflow: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SKRAY_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert default_tracking_uri() == "http://mlflow.internal:5000"
    assert not (tmp_path / "mlflow").exists()


def test_embedded_store_keeps_artifacts_beside_its_database(
    clean_mlflow: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SKRAY_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    uri = configure()
    assert uri == default_tracking_uri()
    assert mlflow.get_tracking_uri() == mlflow.get_registry_uri() == uri
    first = experiment_id("train")
    assert experiment_id("train") == first
    artifact_location = MlflowClient().get_experiment(first).artifact_location
    assert artifact_location == default_artifact_root()


def test_configure_never_logs_credentials(
    clean_mlflow: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="skray.weights.store")
    uri = "postgresql://mlflow:s3cret@db.internal:5432/mlflow"
    assert configure(uri) == uri
    assert "s3cret" not in caplog.text
    assert "postgresql://***@db.internal:5432/mlflow" in caplog.text


# --- what a run records --------------------------------------------------------


def test_flatten_turns_a_nested_config_into_dotted_string_params() -> None:
    config = {
        "model": {"name": SMALL, "num_classes": 3},
        "train": {"lr": 0.1, "epochs": 2, "aug": {"flip": True}, "milestones": [1, 2]},
        "data": None,
        "notes": "x" * 7000,
    }
    flat = flatten(config)
    assert flat == {
        "model.name": SMALL,
        "model.num_classes": "3",
        "train.lr": "0.1",
        "train.epochs": "2",
        "train.aug.flip": "True",
        "train.milestones": "[1, 2]",
        "data": "None",
        "notes": "x" * 6000,  # MLflow rejects longer param values
    }
    assert flatten({"lr": 1}, prefix="trial.") == {"trial.lr": "1"}


def test_run_tags_record_commit_and_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(PROJECT)
    tags = run_tags("s3://data/train")
    assert re.fullmatch(r"[0-9a-f]{40}", tags["git_commit"])
    assert tags == {
        "git_commit": tags["git_commit"],
        "ray_version": importlib.metadata.version("ray"),
        "torch_version": torch.__version__,
        "skray_version": skray.__version__,
        "data_uri": "s3://data/train",
    }


def test_run_tags_outside_a_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    tags = run_tags("https://user:pw@h/d?sig=1")
    assert tags["git_commit"] == "unknown"
    assert tags["data_uri"] == "https://***@h/d?***"
    assert "data_uri" not in run_tags()


# --- logged and registered models ----------------------------------------------


def test_log_model_registers_the_version_and_sets_the_alias(store: Logged) -> None:
    client = MlflowClient()
    run_id = store.result["run_id"]
    assert store.result["registered_version"] == "1"
    version = client.get_model_version("skray-test", "1")
    assert version.run_id == run_id
    assert str(client.get_model_version_by_alias("skray-test", "best").version) == "1"
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    assert info.run_id == run_id
    assert f"models:/{info.model_id}" == store.result["model_uri"]
    assert info.metadata == {"architecture": SMALL, "class_names": CLASSES, "num_classes": 3}
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3, 64, 64)


def test_logged_model_serves_any_batch_size_with_mlflow(store: Logged) -> None:
    served = mlflow.pyfunc.load_model("models:/skray-test@best")  # MLflow's pt2 export
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        expected = store.model(x).numpy()
    np.testing.assert_allclose(served.predict(x.numpy()), expected, rtol=1e-4, atol=1e-5)


def test_log_model_needs_an_active_run_and_a_name_for_an_alias(store: Logged) -> None:
    model = create_model(SMALL, num_classes=3)
    with pytest.raises(RuntimeError, match="active MLflow run"):
        log_model(model, architecture=SMALL, class_names=CLASSES)
    with mlflow.start_run(experiment_id=experiment_id("skray-tests")):
        with pytest.raises(ValueError, match="registered_model_name"):
            log_model(model, architecture=SMALL, class_names=CLASSES, alias="best")


@pytest.mark.parametrize(
    "uri",
    ["models:/skray-test/1", "models:/skray-test@best", "runs:/{run_id}/model", "{model_uri}"],
)
def test_registered_model_loads_as_weights(store: Logged, uri: str) -> None:
    uri = uri.format(**store.result)
    model, loaded = load_model(weights=uri)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), store.model(x))
    assert loaded.source == uri
    assert loaded.class_names == CLASSES
    assert loaded.architecture == SMALL
    assert loaded.sha256 == store.sha256


def test_registered_model_weights_are_pinned_by_sha256(store: Logged) -> None:
    load_model(weights="models:/skray-test/1", sha256=store.sha256)
    with pytest.raises(WeightsError, match="sha256 mismatch for models:/skray-test/1"):
        load_model(weights="models:/skray-test/1", sha256="0" * 64)


def test_download_fetches_only_the_weights_file(store: Logged, tmp_path: Path) -> None:
    path = download_weights("models:/skray-test@best", tmp_path / "dst")
    assert path.name == WEIGHTS_FILE
    assert path.is_relative_to(tmp_path / "dst")
    assert [p for p in (tmp_path / "dst").rglob("*") if p.is_file()] == [path]


@pytest.mark.parametrize(
    "uri",
    [
        "models:/no-such-model/1",
        "models:/skray-test/9",
        "models:/skray-test@no-such-alias",
        "runs:/0123456789abcdef0123456789abcdef/model",
        "runs:/{run_id}/no-such-model",
    ],
)
def test_unknown_model_version_alias_or_run_is_a_weights_error(store: Logged, uri: str) -> None:
    uri = uri.format(**store.result)
    with pytest.raises(WeightsError, match=re.escape(uri)):
        load_model(weights=uri)


def test_mlflow_uris_use_the_default_store_when_none_is_configured(
    clean_mlflow: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SKRAY_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="models:/skray-test/1"):
        load_model(weights="models:/skray-test/1")
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/mlflow/mlflow.db"


def test_mlflow_model_without_skray_weights_is_a_weights_error(store: Logged) -> None:
    with pytest.raises(WeightsError, match=f"{re.escape(store.plain_model_uri)} holds no skray"):
        load_model(weights=store.plain_model_uri)


def test_the_resolver_imports_mlflow_only_for_mlflow_uris() -> None:
    code = "import sys, skray.weights.resolver; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_metric_history_is_one_value_per_step_and_a_relogged_step_keeps_its_latest(mlflow_store):
    from skray.weights import store

    run_id = store.start_run("skray-tests", "relogged", params={}, tags={})
    for step, value in [(0, 10.0), (1, 20.0), (2, 30.0)]:
        store.log_metrics(run_id, {"val_top1": value}, step=step)
    time.sleep(0.01)  # a retried attempt resumes from epoch 1's checkpoint and logs epoch 2 again
    store.log_metrics(run_id, {"val_top1": 35.0}, step=2)

    assert store.metric_history(run_id, "val_top1") == [10.0, 20.0, 35.0]


# --- pinned registry weights ---------------------------------------------------


def test_pinning_an_alias_records_the_version_and_a_later_alias_move_changes_nothing(
    store: Logged,
) -> None:
    client = MlflowClient()
    client.set_registered_model_alias("skray-test", "pin-test", "1")
    pinned = pin_weights("models:/skray-test@pin-test")

    assert (pinned.version, pinned.sha256) == ("1", store.sha256)
    assert pinned.model_uri == "models:/skray-test/1"
    assert Path(pinned.source).is_file() and pinned.source.endswith(
        WEIGHTS_FILE
    )  # the artifact itself
    moved = client.create_model_version(
        "skray-test", store.plain_model_uri
    )  # no skray weights in it
    client.set_registered_model_alias("skray-test", "pin-test", moved.version)
    with pytest.raises(WeightsError, match="holds no skray weights"):
        pin_weights("models:/skray-test@pin-test")  # the alias did move

    model, loaded = load_model(weights=PinnedWeights.from_dict(pinned.to_dict()))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), store.model(x))
    assert loaded.sha256 == store.sha256


def test_workers_get_the_weights_artifact_not_the_tracking_uri(store: Logged) -> None:
    from skray.label.config import LabelConfig
    from skray.serve.app import application
    from skray.serve.config import ServeConfig

    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    app = application(
        ServeConfig(model=SMALL, weights="models:/skray-test@best", gpus_per_replica=0)
    )
    deployment = app._bound_deployment
    pinned = PinnedWeights.from_dict(deployment.init_args[1])
    assert (pinned.version, pinned.sha256) == ("1", store.sha256)
    assert tracking_uri not in repr(deployment.ray_actor_options)
    assert "runtime_env" not in deployment.ray_actor_options
    label = LabelConfig(input="s3://in", output="s3://out", weights="models:/skray-test@best")
    assert label.s3.env() == {}  # the labeling workers' whole environment


def test_secrets_in_uris_reach_neither_mlflow_nor_the_output(
    mlflow_store: str, capsys: pytest.CaptureFixture
) -> None:
    from skray.io.config import dump_config
    from skray.train.config import TrainConfig

    secret = "s3cretpassw0rd"
    cfg = TrainConfig(
        data={
            "train": f"s3://bucket/train?X-Amz-Signature={secret}",
            "val": f"http://user:{secret}@minio.internal:9000/bucket/val",
        },
        model={"weights": f"https://h/w.pth?token={secret}"},
        mlflow={"tracking_uri": f"postgresql://user:{secret}@db.internal/mlflow"},
        scaling={"workers": 1},
    )
    run_id = start_run(
        "skray-tests",
        "secrets",
        params=cfg.model_dump(mode="json"),
        tags=run_tags(f"s3://user:{secret}@minio.internal/bucket/train"),
    )
    log_text(run_id, dump_config(cfg), "config.yaml")
    print(dump_config(cfg))

    run = MlflowClient().get_run(run_id)
    assert run.data.params["mlflow.tracking_uri"] == "postgresql://***@db.internal/mlflow"
    assert run.data.params["data.val"] == "http://***@minio.internal:9000/bucket/val"
    logged = mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
    for text in (repr(run.data.params), repr(run.data.tags), logged, capsys.readouterr().out):
        assert secret not in text


def test_registering_the_model_of_a_trial_asha_stopped_leaves_its_run_killed(
    mlflow_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from skray.weights import store

    monkeypatch.chdir(tmp_path)  # the store's artifacts land here
    run_id = start_run("skray-tests", "_trial_d_00000", params={}, tags={})
    store.set_state(
        run_id, "stopped_early"
    )  # what a sweep's finish does before registering the best
    ended = MlflowClient().get_run(run_id).info

    store.log_model_to_run(
        run_id,
        create_model(SMALL, num_classes=2),
        architecture=SMALL,
        class_names=["a", "b"],
        image_size=32,
        registered_model_name="skray-stopped",
    )

    run = MlflowClient().get_run(run_id)
    assert (run.info.status, run.info.end_time) == ("KILLED", ended.end_time)
    assert run.data.tags[store.STATE_TAG] == "stopped_early"
    assert MlflowClient().get_model_version("skray-stopped", "1").run_id == run_id
