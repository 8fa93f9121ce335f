"""Ray Tune sweeps over the training recipe, compared in MLflow.

Each trial is a whole Ray Train run of :func:`skray.train.loop.train_loop` (one or
many workers) whose config is the base training config with the sampled keys
set. ASHA stops weak trials at epoch boundaries. MLflow gets one parent run per
sweep and one nested child run per trial; the best trial's model is registered
under an alias. Everything that can be wrong with the sweep config fails before
the first trial starts, naming the key.
"""

from __future__ import annotations

import importlib.util
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from skray.io.config import (
    ConfigError,
    RegistryMlflowConfig,
    StrictModel,
    deep_merge,
    dump_config,
    parse_overrides,
    read_yaml,
    validate,
)
from skray.io.storage import join
from skray.train.config import TrainConfig
from skray.train.driver import RUN_FILE, build_trainer, check_inputs
from skray.train.loop import EPOCH_SCORES

SWEEP_FILE = "skray_sweep.json"


class Dimension(StrictModel):
    """One searched key: ``loguniform``/``uniform`` (low, high), ``choice``/``grid`` (values)."""

    type: Literal["loguniform", "uniform", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _well_formed(self) -> "Dimension":
        if self.type in ("loguniform", "uniform"):
            if self.low is None or self.high is None or not self.low < self.high:
                raise ValueError(
                    f"{self.type} needs low < high (got low={self.low}, high={self.high})"
                )
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError(f"loguniform needs low > 0 (got {self.low})")
        elif not self.values:
            raise ValueError(f"{self.type} needs a non-empty values list")
        return self

    def example(self) -> Any:
        return self.values[0] if self.values else self.low

    def to_tune(self):
        from ray import tune

        if self.type == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.type == "uniform":
            return tune.uniform(self.low, self.high)
        return tune.choice(self.values) if self.type == "choice" else tune.grid_search(self.values)


class AshaConfig(StrictModel):
    enabled: bool = Field(True, description="false: no early stopping, every trial runs all epochs")
    grace_period: int = Field(
        1, ge=1, description="epochs every trial runs before it can be stopped"
    )
    reduction_factor: float = Field(
        2, gt=1, description="at each rung (grace_period x factor^k epochs) the best 1/factor go on"
    )


class SweepMlflowConfig(RegistryMlflowConfig):
    experiment: str = Field(
        "skray-sweeps", description="the sweep's parent run and a nested run per trial go in it"
    )
    alias: str | None = Field(
        "sweep-best", description="set on the best trial's registered version"
    )


class SweepConfig(StrictModel):
    name: str | None = Field(
        None, description="default sweep-<UTC timestamp>; the sweep lives in storage_path/name"
    )
    base: str = Field(description="the training config file every trial starts from")
    set: list[str] = Field([], description="overrides applied to the base config, as with --set")
    space: dict[str, Dimension] = Field(
        description="dotted training keys -> how to search each: type, low/high or values"
    )
    search: Literal["random", "grid", "optuna"] = Field(
        "random",
        description="random: sampled; grid: every combination (grid dimensions only); optuna: TPE",
    )
    optuna_startup_trials: int = Field(
        10, ge=1, description="optuna: random trials before TPE models the results"
    )
    seed: int | None = Field(
        None, description="optuna: the sampler's seed, for a sweep that suggests the same again"
    )
    metric: str = Field(
        "val_top1",
        description="trials are stopped and ranked by it; one that training reports each epoch",
    )
    mode: Literal["max", "min"] = Field(
        "max", description="max: a higher metric is better; min: a lower one"
    )
    asha: AshaConfig = AshaConfig()
    num_samples: int = Field(
        8, ge=1, description="trials drawn from the space; with grid dimensions, per grid point"
    )
    max_concurrent_trials: int = Field(
        2, ge=1, description="trials at once, each a whole Ray Train run"
    )
    storage_path: str = Field(
        ".skray/sweeps",
        description="local or s3://; the trials' runs go in storage_path/<name>-trials",
    )
    mlflow: SweepMlflowConfig = SweepMlflowConfig()

    @model_validator(mode="after")
    def _searchable(self) -> "SweepConfig":
        if not self.space:
            raise ValueError("space is empty: name at least one training key to search")
        if self.metric not in EPOCH_SCORES:
            raise ValueError(
                f"metric {self.metric!r} is never reported by training; one of {EPOCH_SCORES}"
            )
        grid = [k for k, d in self.space.items() if d.type == "grid"]
        sampled = [k for k, d in self.space.items() if d.type != "grid"]
        if self.search == "grid" and sampled:
            raise ValueError(
                f"search: grid needs every dimension of type grid; {', '.join(sampled)} is not"
            )
        if self.search == "optuna" and grid:
            raise ValueError(
                f"search: optuna samples; grid dimensions ({', '.join(grid)}) need random or grid"
            )
        return self


def trial_config(base: dict[str, Any], sampled: dict[str, Any]) -> TrainConfig:
    """The base training config with the sampled keys set; the error names the key."""
    tree: dict[str, Any] = {}
    for key, value in sampled.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return validate(TrainConfig, deep_merge(base, tree), source="trial config")


def resolve(cfg: SweepConfig) -> dict[str, Any]:
    """The base training config as a dict, checked with every searched key set to an example."""
    if cfg.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise ConfigError("search: optuna needs the optuna package (pip install optuna)")
    base = deep_merge(read_yaml(cfg.base), parse_overrides(cfg.set))
    validate(TrainConfig, base, source=cfg.base)
    try:
        trial_config(base, {k: d.example() for k, d in cfg.space.items()})
    except ConfigError as err:
        raise ConfigError(f"space names a key the training config does not take:\n{err}") from None
    return base


def _trial(config: dict[str, Any], *, base: dict[str, Any], sweep: dict[str, Any]) -> None:
    """One Tune trial: a Ray Train run reporting each epoch to Tune and to its MLflow child run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from skray.weights import store

    cfg = trial_config(base, config)
    name = tune.get_context().get_trial_name()
    train, val, weights = check_inputs(cfg)
    store.configure(sweep["tracking_uri"])
    run_id = store.resume_or_start_run(  # a trial restarted by a resumed sweep keeps its run
        join(join(sweep["trials_path"], name), RUN_FILE),
        sweep["experiment"],
        name,
        params=cfg.model_dump(mode="json"),
        tags={**store.run_tags(cfg.data.train), store.TRIAL_TAG: name},
        parent_run_id=sweep["parent_run_id"],
    )
    trainer = build_trainer(
        cfg,
        train,
        val,
        weights,
        name=name,
        storage_path=sweep["trials_path"],
        run_id=run_id,
        tracking_uri=sweep["tracking_uri"],
        callbacks=[TuneReportCallback()],
    )
    result = trainer.fit()
    if result.metrics:
        # A trial restarted by a resumed sweep after its last epoch trains nothing and so reports
        # nothing through the callback: tell Tune where it ended (a repeat is harmless otherwise).
        tune.report(result.metrics)


def sweep_name(cfg: SweepConfig) -> str:
    return cfg.name or "sweep-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def run(cfg: SweepConfig, resume: str | None = None) -> dict[str, Any]:
    """Run (or, with ``resume``, finish) a sweep; returns its summary."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from skray.weights import store

    base = resolve(cfg)
    train_cfg = validate(TrainConfig, base)
    check_inputs(train_cfg)
    name = Path(resume.rstrip("/")).name if resume else sweep_name(cfg)
    sweep_dir = resume.rstrip("/") if resume else join(cfg.storage_path, name)
    storage = (
        str(Path(sweep_dir).parent.resolve())
        if "://" not in sweep_dir
        else sweep_dir.rsplit("/", 1)[0]
    )
    tracking_uri = store.configure(cfg.mlflow.tracking_uri)
    parent = store.resume_or_start_run(  # a resumed sweep keeps its parent run
        join(sweep_dir, SWEEP_FILE),
        cfg.mlflow.experiment,
        name,
        params={"sweep": cfg.model_dump(mode="json")},
        tags=store.run_tags(train_cfg.data.train),
    )
    store.log_text(parent, dump_config(cfg), "sweep.yaml")
    print("[sweep] resolved config:\n" + dump_config(cfg), flush=True)

    ray.init(ignore_reinit_error=True)
    sweep = {
        "parent_run_id": parent,
        "tracking_uri": tracking_uri,
        "experiment": cfg.mlflow.experiment,
        "trials_path": join(storage, f"{name}-trials"),
    }
    trainable = tune.with_parameters(_trial, base=base, sweep=sweep)
    trainable = tune.with_resources(
        trainable, {"CPU": 0.1}
    )  # the trial's driver; its workers ask for their own
    if resume and tune.Tuner.can_restore(sweep_dir):
        tuner = tune.Tuner.restore(sweep_dir, trainable=trainable, resume_errored=False)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={key: dim.to_tune() for key, dim in cfg.space.items()},
            tune_config=tune.TuneConfig(
                metric=cfg.metric,
                mode=cfg.mode,
                num_samples=cfg.num_samples,
                max_concurrent_trials=cfg.max_concurrent_trials,
                search_alg=search_algorithm(cfg),
                scheduler=ASHAScheduler(
                    time_attr="epoch",
                    max_t=train_cfg.epochs,
                    grace_period=cfg.asha.grace_period,
                    reduction_factor=cfg.asha.reduction_factor,
                )
                if cfg.asha.enabled
                else None,
            ),
            run_config=tune.RunConfig(name=name, storage_path=storage),
        )
    grid = tuner.fit()
    return finish(cfg, grid, parent, train_cfg)


def search_algorithm(cfg: SweepConfig):
    """Tune's search algorithm for ``cfg.search``: for ``optuna``, Optuna's TPE sampler (its
    first ``optuna_startup_trials`` suggestions random, then drawn towards the best trials),
    seeded with ``seed``; None for random and grid, which Tune does itself."""
    if cfg.search == "optuna":
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(
            sampler=TPESampler(n_startup_trials=cfg.optuna_startup_trials, seed=cfg.seed)
        )
    return None


def finish(cfg: SweepConfig, grid, parent: str, train_cfg: TrainConfig) -> dict[str, Any]:
    """Close every child run with its final state, register the best trial's model."""
    from skray.weights import store

    children = store.child_runs(parent)
    trials = []
    for result in grid:
        history = result.metrics_dataframe
        epochs = 0 if history is None or history.empty else int(history["epoch"].max()) + 1
        state = (
            "failed"
            if result.error
            else ("completed" if epochs >= train_cfg.epochs else "stopped_early")
        )
        best = None
        if history is not None and not history.empty:
            column = history[cfg.metric]
            best = history.loc[column.idxmax() if cfg.mode == "max" else column.idxmin()]
        folder = Path(result.path).name  # Tune's trial folder: <trial name>_<index>_<params>
        run_id = next(
            (rid for trial, rid in children.items() if folder.startswith(trial + "_")), None
        )
        # MLflow is what runs are compared by, and it can hold one epoch more than Tune saw: a
        # trial that ASHA stops may finish its next epoch before the stop reaches its workers.
        logged = store.metric_history(run_id, cfg.metric) if run_id else []
        if run_id:
            store.set_state(run_id, state)
        reported = None if best is None else float(best[cfg.metric])
        trials.append(
            {
                "trial": folder,
                "run_id": run_id,
                "state": state,
                "epochs": max(epochs, len(logged)),
                "config": result.config,
                "best": (max(logged) if cfg.mode == "max" else min(logged)) if logged else reported,
                "checkpoint": None if best is None else best.get("checkpoint_path"),
            }
        )
    ranked = sorted(
        (t for t in trials if t["best"] is not None),
        key=lambda t: t["best"],
        reverse=cfg.mode == "max",
    )
    summary: dict[str, Any] = {
        "parent_run_id": parent,
        "trials": trials,
        "best": ranked[0] if ranked else None,
    }
    if ranked:
        store.log_metrics(parent, {f"best_{cfg.metric}": ranked[0]["best"]}, step=0)
        summary["model"] = _register_best(cfg, ranked, train_cfg)
    store.end_run(parent, "FINISHED" if ranked else "FAILED")
    return summary


def _register_best(
    cfg: SweepConfig, ranked: list[dict[str, Any]], train_cfg: TrainConfig
) -> dict | None:
    from skray.weights import store
    from skray.weights.resolver import load_model

    best = next((t for t in ranked if t["checkpoint"] and t["run_id"]), None)
    if best is None or not cfg.mlflow.registered_model:
        return None
    model, loaded = load_model(train_cfg.model.name, join(best["checkpoint"], "model.safetensors"))
    return store.log_model_to_run(
        best["run_id"],
        model,
        architecture=train_cfg.model.name,
        class_names=loaded.class_names,
        image_size=train_cfg.preprocessing.image_size,
        registered_model_name=cfg.mlflow.registered_model,
        alias=cfg.mlflow.alias,
    )
