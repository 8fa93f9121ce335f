"""Ray Tune sweeps: ASHA, nested MLflow runs, the best model registered, compare, resume,
bad spaces."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from helpers import PROJECT, labeled_dataset, wait_for
from skray.dev.embedded import LocalRayHead
from skray.io.config import ConfigError, load_config, validate
from skray.train.compare import compare, learning_curves
from skray.train.sweep import SweepConfig, resolve, run

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, str]:
    return labeled_dataset(tmp_path_factory.mktemp("sweepdata"), per_class=32)


def sweep_config(dataset, tmp_path, **changes) -> SweepConfig:
    values = {
        "name": "lrwd",
        "base": str(PROJECT / "configs" / "train_cpu_small.yaml"),
        "set": [
            f"data.train={dataset['train']}",
            f"data.val={dataset['val']}",
            "preprocessing.image_size=48",
            "epochs=4",
            "scaling.workers=1",
            "batch_size=16",
            "mlflow.registered_model=null",
        ],
        # Two useful learning rates first, a hopeless one after: ASHA must stop it at its first
        # rung, where both good trials are already recorded.
        "space": {
            "optim.lr": {"type": "grid", "values": [0.8, 0.6, 1e-7]},
            "optim.weight_decay": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
        },
        "num_samples": 1,
        "max_concurrent_trials": 2,
        "asha": {"grace_period": 1, "reduction_factor": 2},
        "storage_path": str(tmp_path / "sweeps"),
        "mlflow": {"registered_model": "skray-sweep"},
        **changes,
    }
    return validate(SweepConfig, values, source="sweep config")


@pytest.mark.slow
def test_an_asha_sweep_stops_weak_trials_and_leaves_nested_runs_and_the_best_model(
    ray_cluster: LocalRayHead, dataset, tmp_path, mlflow_store
):
    summary = run(sweep_config(dataset, tmp_path))

    states = [t["state"] for t in summary["trials"]]
    by_lr = {t["config"]["optim.lr"]: t["state"] for t in summary["trials"]}
    assert by_lr[1e-7] == "stopped_early", "the hopeless trial stops at its first rung"
    # Either good trial may be cut at a rung by the other, which reached it first and better.
    assert "completed" in (by_lr[0.8], by_lr[0.6])
    client = MlflowClient()
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'"
    )
    assert len(children) == 3
    assert all(client.get_metric_history(c.info.run_id, "val_top1") for c in children)
    assert {c.data.tags["skray.trial_state"] for c in children} == set(states)
    # MLflow's own status says the same: ASHA's stopped trials are KILLED, finished ones FINISHED.
    assert {(c.data.tags["skray.trial_state"], c.info.status) for c in children} <= {
        ("completed", "FINISHED"),
        ("stopped_early", "KILLED"),
    }
    assert parent.data.metrics["best_val_top1"] == summary["best"]["best"]
    version = client.get_model_version_by_alias("skray-sweep", "sweep-best")
    assert version.run_id == summary["best"]["run_id"]

    rows, plots = compare(parent=summary["parent_run_id"], out_dir=str(tmp_path / "plots"))

    bests = [r["best"] for r in rows]
    assert len(rows) == 3 and bests == sorted(bests, reverse=True)
    # Two trials may tie on the metric; either may then head the table.
    assert rows[0]["best"] == summary["best"]["best"] and rows[0]["lr"] in (0.8, 0.6)
    assert [p.name for p in plots] == ["lr_wd.png", "learning_curves.png"]
    assert all(p.stat().st_size > 1000 for p in plots)
    legend = learning_curves(rows, "val_top1").axes[0].get_legend()
    assert len(legend.get_texts()) == 3, "one labeled curve per trial (Tune names them _trial_...)"
    assert {a.path for a in client.list_artifacts(summary["parent_run_id"], "compare")} == {
        "compare/lr_wd.png",
        "compare/learning_curves.png",
    }


# --- bad sweeps fail before any trial ------------------------------------------


@pytest.mark.parametrize(
    "space, message",
    [
        ({"optim.lr": {"type": "loguniform", "low": 0.3, "high": 0.03}}, "low < high"),
        ({"optim.lr": {"type": "loguniform", "low": 0, "high": 0.3}}, "low > 0"),
        ({"optim.lr": {"type": "choice", "values": []}}, "non-empty values"),
        ({"optim.lr": {"type": "normal", "low": 0, "high": 1}}, "space.optim.lr.type"),
    ],
)
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
    cfg = sweep_config(
        dataset, tmp_path, space={"optim.learning_rate": {"type": "uniform", "low": 0.1, "high": 1}}
    )
    with pytest.raises(ConfigError, match="optim.learning_rate: unknown key"):
        resolve(cfg)


def test_a_metric_training_never_reports_fails(dataset, tmp_path):
    with pytest.raises(ConfigError, match="metric 'val_acc' is never reported"):
        sweep_config(dataset, tmp_path, metric="val_acc")


def test_the_project_sweep_config_is_valid():
    cfg = load_config(SweepConfig, PROJECT / "configs" / "sweep_lr_wd.yaml")
    assert set(cfg.space) == {"optim.lr", "optim.weight_decay"}
    resolve(cfg.model_copy(update={"base": str(PROJECT / "configs" / "train_baseline.yaml")}))


@pytest.mark.slow
def test_an_interrupted_optuna_tpe_sweep_resumes_without_repeating_finished_trials(
    ray_cluster: LocalRayHead, dataset, tmp_path, mlflow_store
):
    import json
    import os
    import subprocess
    import sys

    import yaml

    pytest.importorskip("optuna")
    # Two TPE trials of two epochs, one at a time: once the first has finished, the driver
    # dies. The resumed sweep restores the searcher with the trials and runs the second.
    cfg = sweep_config(
        dataset,
        tmp_path,
        name="interrupted",
        search="optuna",
        num_samples=2,
        max_concurrent_trials=1,
        asha={"enabled": False},
        space={"optim.lr": {"type": "loguniform", "low": 0.05, "high": 1.0}},
        mlflow={"registered_model": None, "tracking_uri": mlflow_store},
    )
    cfg.set.append("epochs=2")
    config_file = tmp_path / "sweep.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    sweep_dir = tmp_path / "sweeps" / "interrupted"
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_cluster.gcs_address,
        "RAY_AUTH_MODE": "token",
        # Tune saves its experiment state each second instead of each 10: the driver can be
        # killed as soon as the first trial is saved as finished.
        "TUNE_GLOBAL_CHECKPOINT_S": "1",
    }
    driver = subprocess.Popen(
        [sys.executable, "-m", "skray.cli", "sweep", "--config", str(config_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def finished_trials() -> dict[str, int]:
        record = sweep_dir / "skray_sweep.json"
        if not record.exists():
            return {}
        client = MlflowClient()
        parent = client.get_run(json.loads(record.read_text())["mlflow_run_id"])
        children = client.search_runs(
            [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        )
        epochs = {
            c.info.run_id: len(client.get_metric_history(c.info.run_id, "epoch")) for c in children
        }
        return {run_id: n for run_id, n in epochs.items() if n >= 2}

    def trials_tune_saved_as_finished() -> int:
        """Trials the experiment state a resume reads records as TERMINATED."""
        saved = sorted(sweep_dir.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
        try:
            trials = json.loads(saved[-1].read_text())["trial_data"] if saved else []
        except ValueError:  # caught mid-write
            return 0
        return sum(json.loads(state)["status"] == "TERMINATED" for state, _ in trials)

    done_before = wait_for(finished_trials, 400, "a trial to finish", interval_s=1)
    wait_for(
        lambda: trials_tune_saved_as_finished() >= len(done_before),
        120,
        "Tune to save the finished trial in its experiment state",
        interval_s=0.5,
    )
    driver.kill()
    driver.wait(timeout=60)

    summary = run(cfg, resume=str(sweep_dir))

    assert [t["state"] for t in summary["trials"]] == ["completed"] * 2
    assert all(0.05 <= t["config"]["optim.lr"] <= 1.0 for t in summary["trials"]), (
        "TPE samples inside the space"
    )
    client = MlflowClient()
    assert client.get_run(summary["parent_run_id"]).data.params["sweep.search"] == "optuna"
    for run_id, epochs in done_before.items():
        assert len(client.get_metric_history(run_id, "epoch")) == epochs, (
            "finished trials did not run again"
        )
    assert (
        len(
            client.search_runs(
                [client.get_run(summary["parent_run_id"]).info.experiment_id],
                f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'",
            )
        )
        == 2
    )


def test_optuna_search_without_optuna_installed_fails_before_any_trial(dataset, tmp_path):
    import importlib.util

    if importlib.util.find_spec("optuna") is not None:
        pytest.skip("optuna is installed here")
    with pytest.raises(ConfigError, match="search: optuna needs the optuna package"):
        resolve(
            sweep_config(
                dataset,
                tmp_path,
                search="optuna",
                space={"optim.lr": {"type": "loguniform", "low": 0.01, "high": 1}},
            )
        )


# --- compare ranks by the sweep's mode and plots what it says --------------------------


def logged_sweep(metric: str, curves: dict[str, list[float]], mode: str = "max", **sweep) -> str:
    """A sweep's parent run (its config recorded as ``run`` records it) and one child run per
    trial, named as Tune names them, with ``metric`` logged per epoch; returns the parent id."""
    from skray.weights import store

    cfg = validate(
        SweepConfig,
        {
            "base": "unused.yaml",
            "metric": metric,
            "mode": mode,
            "space": {"optim.lr": {"type": "uniform", "low": 0.1, "high": 1}},
            **sweep,
        },
        source="sweep config",
    )
    parent = store.start_run(
        "skray-sweeps", "sweep", params={"sweep": cfg.model_dump(mode="json")}, tags={}
    )
    for name, curve in curves.items():
        child = store.start_run(
            "skray-sweeps",
            name,
            params={"optim": {"lr": 0.1, "weight_decay": 1e-4}},
            tags={store.TRIAL_TAG: name},
            parent_run_id=parent,
        )
        for epoch, value in enumerate(curve):
            store.log_metrics(child, {metric: value}, step=epoch)
    return parent


def test_compare_ranks_a_min_mode_sweep_lowest_first(mlflow_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the store's artifacts land here
    parent = logged_sweep(
        "train_loss",
        {
            "_trial_a_00000": [2.0, 1.5, 1.2],
            "_trial_a_00001": [2.0, 0.4, 0.3],
            "_trial_a_00002": [3.0, 2.5, 2.6],
        },
        mode="min",
    )

    rows, _ = compare(parent=parent, metric="train_loss", out_dir=str(tmp_path / "plots"))

    assert [(r["run"], r["best"]) for r in rows] == [
        ("_trial_a_00001", 0.3),
        ("_trial_a_00000", 1.2),
        ("_trial_a_00002", 2.5),
    ]


def test_compare_takes_the_mode_from_the_sweep_then_the_flag_then_the_metric_name(mlflow_store):
    from skray.train.compare import resolve_mode

    min_sweep = logged_sweep("val_top1", {}, mode="min")  # a sweep may rank any metric either way
    assert resolve_mode(min_sweep, "val_top1") == "min"
    assert resolve_mode(min_sweep, "val_top1", mode="max") == "max"
    assert (
        resolve_mode(min_sweep, "train_loss") == "min"
    )  # not the metric the sweep ranked: by its name
    assert resolve_mode(None, "train_loss") == "min" and resolve_mode(None, "val_top5") == "max"
    with pytest.raises(ValueError, match="mode must be max or min"):
        resolve_mode(None, "val_top1", mode="lowest")


def test_the_learning_curves_plot_has_a_labeled_line_per_run_best_first(
    mlflow_store, tmp_path, monkeypatch, recwarn
):
    from skray.train.compare import collect, learning_curves

    monkeypatch.chdir(tmp_path)
    curves = {f"_trial_b_{i:05d}": [10.0 * i, 10.0 * i + 5] for i in range(7)}
    parent = logged_sweep("val_top1", curves)

    rows, plots = compare(parent=parent, out_dir=str(tmp_path / "plots"))

    assert not [w for w in recwarn if "legend" in str(w.message)], [str(w.message) for w in recwarn]
    assert all(p.stat().st_size > 1000 for p in plots)
    figure = learning_curves(collect(None, parent, "val_top1"), "val_top1", top=5)
    axes = figure.axes[0]
    legend = [t.get_text() for t in axes.get_legend().get_texts()]
    assert legend == [f"trial_b_{i:05d} ({10 * i + 5:g})" for i in (6, 5, 4, 3, 2)]
    assert len(axes.get_lines()) == 5 and axes.get_title() == "learning curves of the best 5 runs"
    best_first = [curves[f"_trial_b_{i:05d}"] for i in (6, 5, 4, 3, 2)]
    assert [list(line.get_ydata()) for line in axes.get_lines()] == best_first


# --- optuna is TPE ------------------------------------------------------------------------


def test_optuna_search_is_tpe_its_suggestions_after_the_random_start_close_in_on_the_best_region():
    import math

    from skray.train.sweep import search_algorithm

    pytest.importorskip("optuna")
    cfg = validate(
        SweepConfig,
        {
            "base": "unused.yaml",
            "search": "optuna",
            "seed": 0,
            "optuna_startup_trials": 10,
            "space": {
                "optim.lr": {"type": "loguniform", "low": 1e-4, "high": 1.0},
                "optim.weight_decay": {"type": "loguniform", "low": 1e-6, "high": 1e-2},
            },
        },
        source="sweep config",
    )
    searcher = search_algorithm(cfg)
    # What tune.Tuner does with the search algorithm and the space it is given.
    assert searcher.set_search_properties(
        cfg.metric, cfg.mode, {k: d.to_tune() for k, d in cfg.space.items()}
    )

    def decades_from_best(c: dict) -> float:  # val_top1 is best at lr 1e-2, weight decay 1e-4
        return math.hypot(math.log10(c["optim.lr"]) + 2, math.log10(c["optim.weight_decay"]) + 4)

    distances = []
    for i in range(50):
        config = searcher.suggest(f"trial{i}")
        distances.append(decades_from_best(config))
        searcher.on_trial_complete(
            f"trial{i}", {"val_top1": 100 - 10 * distances[-1] ** 2, "config": config}
        )

    # Within a decade of the best: about 1 in 10 random suggestions (often 3 to 9 of the last 25).
    assert all(0 <= d <= math.hypot(2, 2) * 1.5 for d in distances)
    assert sum(d < 1 for d in distances[25:]) >= 12, [round(d, 2) for d in distances]


# --- failed and stopped trials in MLflow ---------------------------------------------------


def test_a_raising_trial_is_failed_and_a_stopped_one_killed_in_mlflow_and_the_rest_are_ranked(
    mlflow_store,
):
    import pandas as pd
    from ray.tune import Result

    from skray.train.config import TrainConfig
    from skray.train.sweep import finish
    from skray.weights import store

    names = ["_trial_c_00000", "_trial_c_00001", "_trial_c_00002", "_trial_c_00003"]
    curves = {
        names[0]: [40.0, 60.0, 70.0, 75.0],
        names[1]: [50.0, 80.0, 85.0, 82.0],
        names[2]: [10.0, 12.0],
        names[3]: [],
    }
    parent = logged_sweep("val_top1", curves, mlflow={"registered_model": None})

    def result(name: str, error: Exception | None = None) -> Result:
        frame = pd.DataFrame({"epoch": range(len(curves[name])), "val_top1": curves[name]})
        return Result(
            metrics={"config": {"optim.lr": 0.1}},
            checkpoint=None,
            error=error,
            path=f"/sweeps/lrwd/{name}_{name[-1]}_optim.lr=0.1",
            metrics_dataframe=frame,
        )

    cfg = validate(
        SweepConfig,
        {
            "base": "unused.yaml",
            "mlflow": {"registered_model": None},
            "space": {"optim.lr": {"type": "uniform", "low": 0.1, "high": 1}},
        },
        source="sweep config",
    )
    grid = [
        result(names[0]),
        result(names[1]),
        result(names[2]),
        result(names[3], error=RuntimeError("the trial raised before its first epoch")),
    ]

    summary = finish(cfg, grid, parent, TrainConfig(data={"train": "x", "val": "y"}, epochs=4))

    client = MlflowClient()
    runs = {name: client.get_run(store.child_runs(parent)[name]) for name in names}
    assert {n: (r.info.status, r.data.tags[store.STATE_TAG]) for n, r in runs.items()} == {
        names[0]: ("FINISHED", "completed"),
        names[1]: ("FINISHED", "completed"),
        names[2]: ("KILLED", "stopped_early"),
        names[3]: ("FAILED", "failed"),
    }
    assert [t["state"] for t in summary["trials"]] == [
        "completed",
        "completed",
        "stopped_early",
        "failed",
    ]
    assert (
        summary["best"]["run_id"] == runs[names[1]].info.run_id and summary["best"]["best"] == 85.0
    )
    finished_parent = client.get_run(parent)
    assert (
        finished_parent.info.status == "FINISHED"
        and finished_parent.data.metrics["best_val_top1"] == 85.0
    )


def test_skray_compare_mode_flag_overrides_the_sweeps_mode(
    mlflow_store, tmp_path, monkeypatch, capsys
):
    from skray.cli import main

    monkeypatch.chdir(tmp_path)
    parent = logged_sweep(
        "train_loss", {"_trial_b_00000": [1.0, 0.2], "_trial_b_00001": [1.0, 0.9]}, mode="min"
    )

    assert (
        main(
            [
                "compare",
                "--parent",
                parent,
                "--metric",
                "train_loss",
                "--mode",
                "max",
                "--out",
                str(tmp_path / "plots"),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert table.index("_trial_b_00001") < table.index("_trial_b_00000")


def test_compare_shows_labeling_runs_by_model_and_weights_with_a_bar_per_run(
    mlflow_store, tmp_path, monkeypatch, capsys
):
    from skray.cli import main
    from skray.weights import store

    monkeypatch.chdir(tmp_path)
    for name, model, rate in (
        ("label-a", "skresnext14_8x4d_half", 5.0),
        ("label-b", "skresnext50_32x4d", 9.0),
    ):
        params = {"model": model, "weights_version": "3", "precision": "fp32"}
        run = store.start_run("skray-label", name, params=params, tags={})
        store.log_metrics(run, {"img_per_s": rate}, step=0)

    rows, plots = compare(experiment="skray-label", metric="img_per_s", out_dir=str(tmp_path))
    assert [r["run"] for r in rows] == ["label-b", "label-a"]
    assert [p.name for p in plots] == ["runs.png"] and plots[0].stat().st_size > 0

    assert main(["compare", "--experiment", "skray-label", "--metric", "img_per_s"]) == 0
    header, _, first, second = capsys.readouterr().out.splitlines()[:4]
    assert header.split()[:4] == ["run", "model", "weights_version", "precision"]
    assert first.split()[:2] == ["label-b", "skresnext50_32x4d"] and "9.00" in first
    assert second.split()[:2] == ["label-a", "skresnext14_8x4d_half"]
