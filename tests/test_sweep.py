"""Ray Tune sweeps: ASHA, nested MLflow runs, the best model registered, compare, resume, bad spaces."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from skray.compare import compare
from skray.config import ConfigError, load_config, validate
from skray.embedded import LocalRayHead
from skray.sweep import SweepConfig, resolve, run

from conftest import PROJECT, labeled_dataset

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, str]:
    return labeled_dataset(tmp_path_factory.mktemp("sweepdata"), per_class=32)


def sweep_config(dataset, tmp_path, **changes) -> SweepConfig:
    values = {
        "name": "lrwd", "base": str(PROJECT / "configs" / "train_cpu_small.yaml"),
        "set": [f"data.train={dataset['train']}", f"data.val={dataset['val']}", "image_size=48", "epochs=4",
                "scaling.workers=1", "batch_size=16", "mlflow.registered_model=null"],
        # Two useful learning rates first, two hopeless ones after: ASHA must stop those.
        "space": {"optim.lr": {"type": "grid", "values": [0.8, 0.6, 1e-7, 1e-8]},
                  "optim.weight_decay": {"type": "loguniform", "low": 1e-5, "high": 1e-3}},
        "num_samples": 1, "max_concurrent_trials": 2, "asha": {"grace_period": 1, "reduction_factor": 2},
        "storage_path": str(tmp_path / "sweeps"), "mlflow": {"registered_model": "skray-sweep"},
        **changes,
    }
    return validate(SweepConfig, values, source="sweep config")



def test_an_asha_sweep_stops_weak_trials_and_leaves_nested_runs_and_the_best_model(
    ray_cluster: LocalRayHead, dataset, tmp_path, mlflow_store
):
    summary = run(sweep_config(dataset, tmp_path))

    states = [t["state"] for t in summary["trials"]]
    assert len(states) == 4 and "stopped_early" in states and "completed" in states
    client = MlflowClient()
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")
    assert len(children) == 4
    assert all(client.get_metric_history(c.info.run_id, "val_top1") for c in children)
    assert {c.data.tags["skray.trial_state"] for c in children} == set(states)
    assert parent.data.metrics["best_val_top1"] == summary["best"]["best"]
    version = client.get_model_version_by_alias("skray-sweep", "sweep-best")
    assert version.run_id == summary["best"]["run_id"]

    rows, plots = compare(parent=summary["parent_run_id"], out_dir=str(tmp_path / "plots"))

    bests = [r["best"] for r in rows]
    assert len(rows) == 4 and bests == sorted(bests, reverse=True)
    # Two trials may tie on the metric; either may then head the table.
    assert rows[0]["best"] == summary["best"]["best"] and rows[0]["lr"] in (0.8, 0.6)
    assert [p.name for p in plots] == ["lr_wd.png", "learning_curves.png"]
    assert all(p.stat().st_size > 1000 for p in plots)
    assert {a.path for a in client.list_artifacts(summary["parent_run_id"], "compare")} == \
        {"compare/lr_wd.png", "compare/learning_curves.png"}


# --- bad sweeps fail before any trial ------------------------------------------


@pytest.mark.parametrize("space, message", [
    ({"optim.lr": {"type": "loguniform", "low": 0.3, "high": 0.03}}, "low < high"),
    ({"optim.lr": {"type": "loguniform", "low": 0, "high": 0.3}}, "low > 0"),
    ({"optim.lr": {"type": "choice", "values": []}}, "non-empty values"),
    ({"optim.lr": {"type": "normal", "low": 0, "high": 1}}, "space.optim.lr.type"),
])
def test_an_invalid_search_space_fails_naming_the_key(dataset, tmp_path, space, message):
    with pytest.raises(ConfigError, match=message):
        sweep_config(dataset, tmp_path, space=space)


def test_grid_search_takes_only_grid_dimensions_and_optuna_none(dataset, tmp_path):
    with pytest.raises(ConfigError, match="optim.weight_decay is not"):
        sweep_config(dataset, tmp_path, search="grid")
    with pytest.raises(ConfigError, match=r"grid dimensions \(optim.lr\)"):
        sweep_config(dataset, tmp_path, search="optuna")
    grid = {"optim.lr": {"type": "grid", "values": [0.1, 0.2]}}
    assert sweep_config(dataset, tmp_path, search="grid", space=grid).search == "grid"


def test_a_space_key_the_trainer_does_not_take_fails_before_any_trial(dataset, tmp_path):
    cfg = sweep_config(dataset, tmp_path, space={"optim.learning_rate": {"type": "uniform", "low": 0.1, "high": 1}})
    with pytest.raises(ConfigError, match="optim.learning_rate: unknown key"):
        resolve(cfg)


def test_a_metric_training_never_reports_fails(dataset, tmp_path):
    with pytest.raises(ConfigError, match="metric 'val_acc' is never reported"):
        sweep_config(dataset, tmp_path, metric="val_acc")


def test_the_project_sweep_config_is_valid():
    cfg = load_config(SweepConfig, PROJECT / "configs" / "sweep_lr_wd.yaml")
    assert set(cfg.space) == {"optim.lr", "optim.weight_decay"}
    resolve(cfg.model_copy(update={"base": str(PROJECT / "configs" / "train_baseline.yaml")}))


def test_an_interrupted_sweep_resumes_without_repeating_finished_trials(
    ray_cluster: LocalRayHead, dataset, tmp_path, mlflow_store
):
    import json
    import os
    import subprocess
    import sys
    import time

    import yaml

    # Three trials of two epochs, two at a time: once one has finished, the driver dies.
    cfg = sweep_config(dataset, tmp_path, name="interrupted", asha={"enabled": False},
                       space={"optim.lr": {"type": "grid", "values": [0.8, 0.6, 0.4]}},
                       mlflow={"registered_model": None, "tracking_uri": mlflow_store})
    cfg.set.append("epochs=2")
    config_file = tmp_path / "sweep.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    sweep_dir = tmp_path / "sweeps" / "interrupted"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.gcs_address, "RAY_AUTH_MODE": "token"}
    driver = subprocess.Popen([sys.executable, "-m", "skray.cli", "sweep", "--config", str(config_file)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def finished_trials() -> dict[str, int]:
        record = sweep_dir / "skray_sweep.json"
        if not record.exists():
            return {}
        client = MlflowClient()
        parent = client.get_run(json.loads(record.read_text())["parent_run_id"])
        children = client.search_runs([parent.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        epochs = {c.info.run_id: len(client.get_metric_history(c.info.run_id, "epoch")) for c in children}
        return {run_id: n for run_id, n in epochs.items() if n >= 2}

    deadline = time.monotonic() + 400
    while not finished_trials() and time.monotonic() < deadline:
        time.sleep(1)
    done_before = finished_trials()
    assert done_before, "a trial finished before the interruption"
    time.sleep(5)  # Tune saves its experiment state after a trial ends
    driver.kill()
    driver.wait(timeout=60)

    summary = run(cfg, resume=str(sweep_dir))

    assert len(summary["trials"]) == 3
    client = MlflowClient()
    for run_id, epochs in done_before.items():
        assert len(client.get_metric_history(run_id, "epoch")) == epochs, "finished trials did not run again"
    assert len(client.search_runs([client.get_run(summary["parent_run_id"]).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'")) == 3


def test_optuna_search_without_optuna_installed_fails_before_any_trial(dataset, tmp_path):
    import importlib.util

    if importlib.util.find_spec("optuna") is not None:
        pytest.skip("optuna is installed here")
    with pytest.raises(ConfigError, match="search: optuna needs the optuna package"):
        resolve(sweep_config(dataset, tmp_path, search="optuna",
                             space={"optim.lr": {"type": "loguniform", "low": 0.01, "high": 1}}))


def test_an_optuna_tpe_sweep_samples_inside_the_space(ray_cluster: LocalRayHead, dataset, tmp_path, mlflow_store):
    pytest.importorskip("optuna")
    cfg = sweep_config(dataset, tmp_path, name="tpe", search="optuna", num_samples=2, asha={"enabled": False},
                       space={"optim.lr": {"type": "loguniform", "low": 0.05, "high": 1.0}},
                       mlflow={"registered_model": None})
    cfg.set.append("epochs=1")

    summary = run(cfg)

    assert [t["state"] for t in summary["trials"]] == ["completed", "completed"]
    assert all(0.05 <= t["config"]["optim.lr"] <= 1.0 for t in summary["trials"])
    assert MlflowClient().get_run(summary["parent_run_id"]).data.params["sweep.search"] == "optuna"
