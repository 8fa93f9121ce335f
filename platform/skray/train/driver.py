"""``skray train``: the driver of a Ray Train run.

``run`` checks everything it can before a worker starts (data, classes, weights, the run
directory), opens or resumes the MLflow run, fits :func:`skray.train.loop.train_loop` on
the workers, and registers the best checkpoint's model.
"""

from __future__ import annotations

import json
import posixpath
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import yaml

from skray.core.model import create_model
from skray.io.config import ConfigError, dump_config, validate
from skray.io.storage import (
    exists,
    filesystem_for,
    join,
    read_bytes,
    write_bytes_atomic,
    write_json,
)
from skray.train.config import TrainConfig
from skray.train.datasets import LabeledData, discover, ray_dataset, with_row_counts
from skray.train.loop import train_loop
from skray.train.resources import CpuSplit, split_cpus
from skray.weights.files import read_safetensors_metadata
from skray.weights.resolver import PinnedWeights, load_weights, pin_weights

RUN_FILE = "skray_run.json"
CONFIG_FILE = "skray_train.yaml"


def run_name(cfg: TrainConfig) -> str:
    return cfg.name or "train-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def _run_dir_entries(run_dir: str) -> list[str]:
    """The names directly in ``run_dir`` (none when it does not exist), local or on S3."""
    fs, path = filesystem_for(run_dir)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return (
            [posixpath.basename(path)] if fs.get_file_info(path).type == pafs.FileType.File else []
        )
    return sorted(
        posixpath.basename(info.path) for info in fs.get_file_info(pafs.FileSelector(path))
    )


def checkpoint_class_names(run_dir: str) -> list[str] | None:
    """The class names the run's latest checkpoint was trained on (None before its first one)."""
    checkpoints = [name for name in _run_dir_entries(run_dir) if name.startswith("checkpoint_")]
    for name in reversed(checkpoints):
        fs, path = filesystem_for(join(join(run_dir, name), "model.safetensors"))
        if fs.get_file_info(path).type != pafs.FileType.File:
            continue  # a checkpoint still being written
        with fs.open_input_file(path) as f:
            metadata = read_safetensors_metadata(f)
        return json.loads(metadata["class_names"]) if "class_names" in metadata else None
    return None


def check_run_dir(run_dir: str, *, resume: bool, class_names: list[str]) -> None:
    """Before anything is written: Ray Train restores whatever checkpoints ``run_dir`` holds,
    so a new run refuses a directory in use, and a resumed one refuses data whose classes
    differ from the ones its checkpoints were trained on."""
    if not resume:
        if _run_dir_entries(run_dir):
            raise ConfigError(
                f"run directory {run_dir} already holds a run: a new run there would continue "
                f"its checkpoints. Choose another name (or storage_path), or continue that run "
                f"with --resume {run_dir}"
            )
        return
    trained = checkpoint_class_names(run_dir)
    if trained is None or list(trained) == list(class_names):
        return
    missing = [c for c in trained if c not in class_names]
    added = [c for c in class_names if c not in trained]
    if missing or added:
        detail = "; ".join(
            part
            for part in (
                f"not in the data: {', '.join(missing)}" if missing else "",
                f"new in the data: {', '.join(added)}" if added else "",
            )
            if part
        )
    else:
        detail = f"the same names in another order: checkpoint {trained}, data {list(class_names)}"
    raise ConfigError(
        f"--resume {run_dir}: the data's classes differ from the ones its checkpoints were "
        f"trained on ({len(trained)} in the checkpoint, {len(class_names)} in the data): {detail}"
    )


def check_inputs(cfg: TrainConfig) -> tuple[LabeledData, LabeledData, PinnedWeights | None]:
    """Everything that can fail before a worker starts: data, classes, and the weights,
    pinned for the workers (which then need no MLflow tracking URI)."""
    common = {
        "class_names": cfg.data.class_names,
        "num_classes": cfg.data.num_classes,
        "image_column": cfg.data.image_column,
        "label_column": cfg.data.label_column,
        "files_per_unit": cfg.data.files_per_unit,
    }
    train = with_row_counts(
        discover(cfg.data.train, cfg.data.format, **common)
    )  # the schedule's steps
    val = (
        discover(
            cfg.data.val, cfg.data.format, **{**common, "class_names": list(train.class_names)}
        )
        if cfg.data.val
        else train
    )
    weights = pin_weights(cfg.model.weights, cfg.model.name)
    if weights:
        load_weights(create_model(cfg.model.name, num_classes=len(train.class_names)), weights)
    return train, val, weights


def build_trainer(
    cfg: TrainConfig,
    train: LabeledData,
    val: LabeledData,
    weights: PinnedWeights | None,
    *,
    name: str,
    storage_path: str,
    run_id: str | None,
    tracking_uri: str | None,
    callbacks: list | None = None,
):
    """The TorchTrainer of one run: shared by ``skray train`` and each sweep trial."""
    import ray.train
    from ray.train.torch import TorchTrainer

    eval_cfg = cfg.preprocessing
    augment = {
        "interpolation": eval_cfg.interpolation,
        "randaugment": cfg.randaugment,
        "randaugment_magnitude": cfg.randaugment_magnitude,
    }
    per_task = max(1, cfg.batch_size // cfg.scaling.workers)
    cpus = (
        split_cpus(cfg, ray.cluster_resources().get("CPU", 0.0))
        if ray.is_initialized()
        else CpuSplit(cfg.scaling.cpus_per_worker, cfg.data.decode_cpus)
    )
    if cpus.note:
        print(f"[train] {cpus.note}", flush=True)
    return TorchTrainer(
        train_loop,
        # The tracking URI travels here, not in runtime_env: the Ray dashboard shows env_vars.
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "train_data": train,
            "weights": weights.to_dict() if weights else None,
            "mlflow_run_id": run_id,
            "tracking_uri": tracking_uri,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cpus.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=_absolute(storage_path),
            callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute="val_top1",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={
            "train": ray_dataset(
                train,
                image_size=eval_cfg.image_size,
                train=True,
                eval_cfg=eval_cfg,
                augment=augment,
                batch_size=per_task,
                num_cpus=cpus.decode_cpus,
            ),
            "val": ray_dataset(
                val,
                image_size=eval_cfg.image_size,
                train=False,
                eval_cfg=eval_cfg,
                batch_size=per_task,
                num_cpus=cpus.decode_cpus,
            ),
        },
    )


def run(cfg: TrainConfig | None, resume: str | None = None) -> dict[str, Any]:
    """Train (or, with ``resume``, continue the run stored there); returns the final summary."""
    import ray

    from skray.weights import store

    if resume:
        cfg, run_dir = load_run_config(resume), resume.rstrip("/")
        name, storage_path = run_dir.rsplit("/", 1)[1], run_dir.rsplit("/", 1)[0]
    else:
        name, storage_path = run_name(cfg), cfg.storage_path
        run_dir = join(storage_path, name)
    train, val, weights = check_inputs(cfg)
    check_run_dir(run_dir, resume=bool(resume), class_names=list(train.class_names))
    print("[train] resolved config:\n" + dump_config(cfg), flush=True)
    print(
        f"[train] {len(train.class_names)} classes, lr {cfg.lr:g} (= {cfg.optim.lr:g} x "
        f"{cfg.batch_size} / {cfg.optim.base_batch_size}), run at {run_dir}",
        flush=True,
    )

    tracking_uri = store.configure(cfg.mlflow.tracking_uri)
    run_id = store.resume_or_start_run(
        join(run_dir, RUN_FILE),
        cfg.mlflow.experiment,
        name,
        params=cfg.model_dump(mode="json"),
        tags=store.run_tags(cfg.data.train),
    )
    if not resume:  # a resumed run was read from its saved config
        write_bytes_atomic(join(run_dir, CONFIG_FILE), dump_config(cfg, redact=False).encode())

    ray.init(ignore_reinit_error=True)
    trainer = build_trainer(
        cfg,
        train,
        val,
        weights,
        name=name,
        storage_path=storage_path,
        run_id=run_id,
        tracking_uri=tracking_uri,
    )
    try:
        result = trainer.fit()
    except Exception:
        store.end_run(run_id, status="FAILED")
        raise
    best = max(result.best_checkpoints, key=lambda pair: pair[1]["val_top1"])
    summary = {
        "run_dir": run_dir,
        "mlflow_run_id": run_id,
        "final": result.metrics,
        "best": best[1],
        "best_checkpoint": best[0].path,
    }
    with best[0].as_directory() as directory:
        model = create_model(cfg.model.name, num_classes=len(train.class_names))
        load_weights(model, str(Path(directory) / "model.safetensors"))
    summary["model"] = store.log_model_to_run(
        run_id,
        model,
        architecture=cfg.model.name,
        class_names=list(train.class_names),
        image_size=cfg.preprocessing.image_size,
        registered_model_name=cfg.mlflow.registered_model,
        alias=cfg.mlflow.alias,
    )
    store.end_run(run_id, status="FINISHED")
    write_json(join(run_dir, "skray_result.json"), summary)
    return summary


def _absolute(storage_path: str) -> str:
    return storage_path if "://" in storage_path else str(Path(storage_path).resolve())


def load_run_config(run_dir: str) -> TrainConfig:
    """The resolved config a run saved at its start: ``--resume`` needs nothing else."""
    uri = join(run_dir, CONFIG_FILE)
    if not exists(uri):
        raise ConfigError(f"--resume {run_dir}: no {CONFIG_FILE} there (not a skray training run)")
    return validate(TrainConfig, yaml.safe_load(read_bytes(uri)), source=uri)
