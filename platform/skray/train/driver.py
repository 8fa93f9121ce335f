"""Distributed training on Ray Train: the published recipe, checkpoints, resume, MLflow.

``train_loop`` is the whole per-worker loop, top to bottom: build the model,
restore the latest checkpoint if there is one, then per epoch :func:`train_epoch`,
:func:`validate`, :func:`save_checkpoint` through ``ray.train.report`` and log to MLflow
(rank 0). ``run`` is the driver: it checks everything it can before a worker starts, opens
the MLflow run, fits, and registers the best checkpoint's model.
"""

from __future__ import annotations

import json
import math
import posixpath
import queue
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
import yaml
from pydantic import Field, model_validator
from torch import nn

from skray.core.images import PreprocessingConfig, normalize
from skray.core.model import DEFAULT_MODEL, SKResNeXt, create_model
from skray.io.config import (
    ConfigError,
    ModelName,
    ModelPreprocessing,
    RegistryMlflowConfig,
    StrictModel,
    dump_config,
)
from skray.io.config import validate as validate_config
from skray.io.storage import (
    exists,
    filesystem_for,
    join,
    read_bytes,
    read_json,
    write_bytes_atomic,
    write_json,
)
from skray.train.datasets import (
    BAD_LABEL,
    DatasetError,
    LabeledData,
    discover,
    ray_dataset,
    with_row_counts,
)
from skray.weights.files import save_weights
from skray.weights.resolver import PinnedWeights, load_weights, pin_weights

RUN_FILE = "skray_run.json"
CONFIG_FILE = "skray_train.yaml"
METRICS = (
    "train_loss",
    "lr",
    "val_top1",
    "val_top5",
    "img_per_s",
    "skipped_images",
    "epoch",
    "resumed_at_epoch",
)


class DataConfig(StrictModel):
    train: str
    val: str | None = None
    format: Literal["folder", "webdataset", "parquet"] = "folder"
    class_names: list[str] | None = None
    num_classes: int | None = Field(None, ge=2)
    image_column: str = "image"
    label_column: str = "label"
    files_per_unit: int = Field(64, ge=1)
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1, description="undecodable images are skipped; above this the run fails"
    )
    decode_cpus: float = Field(
        0.5, gt=0, description="per read+decode task; lowered when the workers leave no room"
    )
    stall_timeout_s: float = Field(
        600, gt=0, description="no batch for this long: the run fails saying the input stalled"
    )
    shuffle_buffer: int = Field(
        0, ge=0, description="rows shuffled on each worker; folder units are already class-mixed"
    )


class ModelConfig(StrictModel):
    name: ModelName = DEFAULT_MODEL
    weights: str | None = Field(
        None, description="fine-tuning: start from these weights, head sized by the dataset"
    )
    freeze_backbone_epochs: int = Field(0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "pretrained" in data:
            raise ValueError(
                "model.pretrained is now model.weights (a path, s3://, https://, 'pretrained', "
                "models:/ or runs:/)"
            )
        return data


class OptimConfig(StrictModel):
    lr: float = Field(
        0.1, gt=0, description="at base_batch_size; the rule: lr * batch_size / base_batch_size"
    )
    base_batch_size: int = Field(256, ge=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    no_weight_decay_on_norm_and_bias: bool = True
    warmup_epochs: float = Field(5, ge=0)
    min_lr: float = Field(0, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)


class ScalingConfig(StrictModel):
    workers: int = Field(8, ge=1)
    use_gpu: bool = True
    cpus_per_worker: float = Field(1, gt=0)


class TrainMlflowConfig(RegistryMlflowConfig):
    experiment: str = "skray-train"


_MOVED_KEYS = {
    "image_size": "preprocessing.image_size",
    "eval_crop_pct": "preprocessing.crop_pct",
    "interpolation": "preprocessing.interpolation",
}


class TrainConfig(StrictModel):
    name: str | None = Field(None, description="run name; default train-<UTC timestamp>")
    storage_path: str = Field(
        ".skray/train", description="local or s3://; the run lives in storage_path/name"
    )
    data: DataConfig
    model: ModelConfig = ModelConfig()
    # Eval crops for validation; training crops are random-resized to the same image_size, with
    # the same interpolation, mean and std. Unset fields: the model's (skray.core.model.ModelSpec).
    preprocessing: ModelPreprocessing = PreprocessingConfig()
    optim: OptimConfig = OptimConfig()
    scaling: ScalingConfig = ScalingConfig()
    mlflow: TrainMlflowConfig = TrainMlflowConfig()
    epochs: int = Field(100, ge=1)
    batch_size: int = Field(256, ge=1, description="global, across workers")
    randaugment: bool = False
    randaugment_magnitude: int = Field(9, ge=0, le=30)
    amp: Literal["off", "bf16", "fp16"] = Field("bf16", description="on GPU only")
    channels_last: bool = Field(
        True, description="on GPU only: NHWC model and inputs, what tensor cores want"
    )
    keep_checkpoints: int = Field(2, ge=1, description="best k by val_top1")
    max_failures: int = Field(
        3, ge=-1, description="worker-group restarts from the latest checkpoint"
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        moved = {k: v for k, v in _MOVED_KEYS.items() if isinstance(data, dict) and k in data}
        if moved:
            raise ValueError("; ".join(f"{old} is now {new}" for old, new in moved.items()))
        return data

    @model_validator(mode="after")
    def _batch_fits_workers(self) -> "TrainConfig":
        if self.batch_size % self.scaling.workers:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by scaling.workers "
                f"{self.scaling.workers}"
            )
        return self

    @property
    def lr(self) -> float:
        """The linear scaling rule: the recipe's LR is for base_batch_size."""
        return self.optim.lr * self.batch_size / self.optim.base_batch_size


# --- the per-worker loop ------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float, skip_norm_and_bias: bool) -> list[dict]:
    """Weight decay on conv and linear weights only (1-D tensors are norms and biases)."""
    if not skip_norm_and_bias:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_at(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine down to min_lr, per step."""
    warmup = cfg.optim.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.optim.min_lr + 0.5 * (cfg.lr - cfg.optim.min_lr) * (
        1 + math.cos(math.pi * min(1.0, progress))
    )


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.SGD:
    """SGD with momentum over ``model``'s parameters, at the scaled LR, no decay on norms and
    biases."""
    return torch.optim.SGD(
        param_groups(model, cfg.optim.weight_decay, cfg.optim.no_weight_decay_on_norm_and_bias),
        lr=cfg.lr,
        momentum=cfg.optim.momentum,
    )


def batch_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mean label-smoothed cross-entropy over the decodable rows of a batch.

    Undecodable rows (label ``BAD_LABEL``) stay in the batch, since DDP needs equal work
    per rank, with zero weight. A mean per worker: DDP's gradient average is then the
    gradient of the global batch's mean.
    """
    good = labels != BAD_LABEL
    loss = (
        nn.functional.cross_entropy(
            logits, labels.clamp(min=0), reduction="none", label_smoothing=label_smoothing
        )
        * good
    ).sum()
    return loss / good.sum().clamp(min=1)


def share_buffers(model: nn.Module, world: int) -> None:
    """Give every worker rank 0's BatchNorm statistics before validating: each worker's last
    step updated them with its own batch, and rank 0's model is the one checkpointed."""
    if world > 1:
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)


def uses_channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.channels_last and device.type == "cuda"


def device_images(
    images: torch.Tensor,
    preprocessing: PreprocessingConfig,
    device: torch.device,
    channels_last: bool,
) -> torch.Tensor:
    """uint8 crops -> normalized float on ``device``, NHWC when the model is."""
    x = normalize(images.to(device, non_blocking=True), preprocessing.mean, preprocessing.std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def build_training_state(
    cfg: TrainConfig,
    num_classes: int,
    device: torch.device,
    *,
    weights: PinnedWeights | None = None,
    state: dict[str, Any] | None = None,
    prepare: Callable[[nn.Module], nn.Module] = lambda model: model,
) -> tuple[nn.Module, SKResNeXt, torch.optim.SGD, torch.amp.GradScaler]:
    """The model, its optimizer and grad scaler, restored from a checkpoint's ``state`` if given.

    The order puts every tensor on the training device: the model is prepared (moved to
    ``device``, wrapped in DDP) first, the optimizer is built over the prepared parameters,
    and only then is its state loaded (``Optimizer.load_state_dict`` casts each state
    tensor to its parameter's device and dtype). Returns (the prepared model, the bare
    model inside it, optimizer, scaler).
    """
    model = create_model(cfg.model.name, num_classes=num_classes)
    if weights:
        load_weights(model, weights)
    if state:
        model.load_state_dict(state["model"])
    if uses_channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    prepared = prepare(model)
    raw_model: SKResNeXt = prepared.module if hasattr(prepared, "module") else prepared
    optimizer = build_optimizer(raw_model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16" and device.type == "cuda")
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
    return prepared, raw_model, optimizer, scaler


def checkpoint_state(
    raw_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    *,
    epoch: int,
    best_top1: float,
    config: dict[str, Any],
    class_names: list[str],
) -> dict[str, Any]:
    """What a checkpoint's ``state.pt`` holds: everything a restart needs to continue exactly."""
    return {
        "model": raw_model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "best_top1": best_top1,
        "config": config,
        "class_names": list(class_names),
    }


def all_reduce(*values: float, device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def steps_per_epoch(data: LabeledData, cfg: TrainConfig) -> int:
    """Optimizer steps in one epoch, which the warm-up and cosine schedule is laid out in:
    the rows (undecodable ones included: they stay in their batches) over the global batch,
    rounded down, as every worker drops its last partial batch. WebDataset shards carry no
    count of their own: :func:`skray.train.datasets.with_row_counts` counts them before training."""
    if data.num_images is None:
        raise DatasetError(
            f"{data.uri}: the number of images is unknown, so the LR schedule cannot be laid "
            f"out in steps (count them first: skray.train.datasets.with_row_counts)"
        )
    return max(1, data.num_images // cfg.batch_size)


class IngestStalledError(RuntimeError):
    """No batch came from the input pipeline for ``data.stall_timeout_s``."""


def stall_guarded(batches: Iterable, timeout_s: float, what: str) -> Iterator:
    """``batches``, read one thread ahead (at most two waiting), raising
    :class:`IngestStalledError` when the next one does not come within ``timeout_s``:
    a pipeline that stalls says so and fails the run instead of hanging silently."""
    items: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()

    def offer(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not offer(("batch", batch)):
                    return
            offer(("end", None))
        except BaseException as err:  # noqa: BLE001 - raised again where the batches are used
            offer(("error", err))

    threading.Thread(target=produce, name=f"skray-{what}-batches", daemon=True).start()
    try:
        while True:
            try:
                kind, value = items.get(timeout=timeout_s)
            except queue.Empty:
                raise IngestStalledError(
                    f"no {what} batch for {timeout_s:g} s (data.stall_timeout_s): the input "
                    "pipeline is stalled. Most often its read+decode tasks (data.decode_cpus CPUs "
                    "each) find no CPU left beside the training workers (scaling.workers x "
                    "scaling.cpus_per_worker): `ray status` shows them under Pending Demands. "
                    "Lower those or add CPUs; raise data.stall_timeout_s if the batches are only "
                    "slow."
                ) from None
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


def train_epoch(
    model: nn.Module,
    raw_model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batches: Iterable[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    *,
    device: torch.device,
    epoch: int,
    steps_per_epoch: int,
    frozen: bool = False,
    use_amp: bool = False,
    amp_dtype: torch.dtype = torch.bfloat16,
) -> dict[str, float]:
    """One epoch of steps over ``batches`` (``model`` the prepared one, ``raw_model`` inside it).

    Returns this worker's sums: ``seen`` (decodable rows trained on), ``skipped``
    (undecodable ones), ``loss_sum`` (each batch's mean loss x its decodable rows), and the
    last step's ``lr``. The sums stay on the device until the epoch ends: no step waits for
    the device to catch up (as ``float(loss)`` would), one sync per epoch.
    """
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # seen, skipped, loss x seen
    lr = lr_at(epoch * steps_per_epoch, steps_per_epoch, cfg)
    for step, batch in enumerate(batches):
        labels = batch["label"].to(device)
        good = labels != BAD_LABEL
        images = device_images(
            batch["image"], cfg.preprocessing, device, uses_channels_last(cfg, device)
        )
        lr = lr_at(epoch * steps_per_epoch + step, steps_per_epoch, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            loss = batch_loss(model(images), labels, cfg.optim.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if frozen:
            for name, param in raw_model.named_parameters():
                if not name.startswith("fc."):
                    param.grad = None
        scaler.step(optimizer)
        scaler.update()
        seen = good.sum().double()
        sums += torch.stack([seen, (~good).sum().double(), loss.detach().double() * seen])
    seen_sum, skipped, loss_sum = sums.tolist()
    return {"seen": seen_sum, "skipped": skipped, "loss_sum": loss_sum, "lr": lr}


def set_backbone_frozen(model: SKResNeXt, frozen: bool) -> None:
    """Frozen: BatchNorm statistics stay put and only the head learns (grads dropped after
    backward)."""
    for name, module in model.named_modules():
        if not name.startswith("fc") and isinstance(module, nn.BatchNorm2d):
            module.train(not frozen)


def count_hits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(top-1 hits, top-5 hits, decodable rows, undecodable rows) of one batch, float64 on its
    device: a row labeled ``BAD_LABEL`` is counted as undecodable, never as a hit."""
    good = labels != BAD_LABEL
    hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
    return torch.stack(
        [(hits[:, 0] & good).sum(), (hits.any(dim=1) & good).sum(), good.sum(), (~good).sum()]
    ).double()


def validate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    cfg: TrainConfig,
    *,
    device: torch.device,
    use_amp: bool = False,
    amp_dtype: torch.dtype = torch.bfloat16,
) -> dict[str, float]:
    """This worker's :func:`count_hits` over ``batches``, summed: ``correct1``, ``correct5``,
    ``total`` (decodable rows) and ``skipped``; one sync, at the end."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
        for batch in batches:
            images = device_images(
                batch["image"], cfg.preprocessing, device, uses_channels_last(cfg, device)
            )
            sums += count_hits(model(images), batch["label"].to(device))
    correct1, correct5, total, skipped = sums.tolist()
    return {"correct1": correct1, "correct5": correct5, "total": total, "skipped": skipped}


def epoch_metrics(
    trained: dict[str, float],
    validated: dict[str, float],
    elapsed: float,
    cfg: TrainConfig,
    *,
    epoch: int,
    start_epoch: int,
    world: int,
    device: torch.device,
) -> dict[str, float]:
    """The epoch's metrics over all workers, from each worker's :func:`train_epoch` and
    :func:`validate` sums; fails the run when more than ``data.max_bad_fraction`` of the images
    did not decode."""
    seen, skipped, loss_sum, c1, c5, n, elapsed_sum = all_reduce(
        trained["seen"],
        trained["skipped"] + validated["skipped"],
        trained["loss_sum"],
        validated["correct1"],
        validated["correct5"],
        validated["total"],
        elapsed,
        device=device,
    )
    if skipped > cfg.data.max_bad_fraction * max(seen + n + skipped, 1):
        raise DatasetError(
            f"{int(skipped)} images could not be decoded, more than "
            f"data.max_bad_fraction={cfg.data.max_bad_fraction} of the data"
        )
    return {
        "epoch": epoch,
        "train_loss": loss_sum / max(seen, 1),
        "lr": trained["lr"],
        "val_top1": 100.0 * c1 / max(n, 1),
        "val_top5": 100.0 * c5 / max(n, 1),
        "img_per_s": seen / max(elapsed_sum / world, 1e-9),
        "skipped_images": skipped,
        "resumed_at_epoch": start_epoch,  # > 0 when this attempt restored a checkpoint
    }


def save_checkpoint(
    directory: Path,
    raw_model: SKResNeXt,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    *,
    epoch: int,
    best_top1: float,
    class_names: list[str],
) -> None:
    """A checkpoint in ``directory``: ``state.pt`` to resume exactly, ``model.safetensors`` to use
    the model."""
    torch.save(
        checkpoint_state(
            raw_model,
            optimizer,
            scaler,
            epoch=epoch,
            best_top1=best_top1,
            config=cfg.model_dump(mode="json"),
            class_names=class_names,
        ),
        directory / "state.pt",
    )
    save_weights(
        raw_model,
        directory / "model.safetensors",
        architecture=cfg.model.name,
        class_names=class_names,
    )


def latest_state() -> dict[str, Any] | None:
    """What the latest checkpoint of this run saved (:func:`checkpoint_state`), if there is one."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=True)


def train_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from skray.weights import store

    cfg = TrainConfig.model_validate(loop_config["config"])
    data: LabeledData = loop_config["train_data"]
    class_names = list(data.class_names)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    amp = {
        "use_amp": cfg.amp != "off" and device.type == "cuda",
        "amp_dtype": torch.bfloat16 if cfg.amp == "bf16" else torch.float16,
    }

    state = latest_state()
    start_epoch, best_top1 = (state["epoch"] + 1, state["best_top1"]) if state else (0, 0.0)
    # pinned by the driver, so every worker and every retry loads the same bytes
    weights = PinnedWeights.from_dict(loop_config["weights"]) if loop_config["weights"] else None
    ddp_model, raw_model, optimizer, scaler = build_training_state(
        cfg,
        len(class_names),
        device,
        weights=weights,
        state=state,
        prepare=ray.train.torch.prepare_model,
    )
    if state:
        print(f"[train] rank {rank}: resumed from the checkpoint of epoch {state['epoch']}")
    per_worker_batch = cfg.batch_size // world
    epoch_steps = steps_per_epoch(data, cfg)
    for epoch in range(start_epoch, cfg.epochs):
        frozen = epoch < cfg.model.freeze_backbone_epochs
        ddp_model.train()
        set_backbone_frozen(raw_model, frozen)
        started = time.perf_counter()
        batches = ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=per_worker_batch,
            drop_last=True,
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
        )
        trained = train_epoch(
            ddp_model,
            raw_model,
            optimizer,
            scaler,
            stall_guarded(batches, cfg.data.stall_timeout_s, "training"),
            cfg,
            device=device,
            epoch=epoch,
            steps_per_epoch=epoch_steps,
            frozen=frozen,
            **amp,
        )
        elapsed = time.perf_counter() - started

        ddp_model.eval()
        share_buffers(raw_model, world)
        val_batches = ray.train.get_dataset_shard("val").iter_torch_batches(
            batch_size=per_worker_batch
        )
        validated = validate(
            raw_model,
            stall_guarded(val_batches, cfg.data.stall_timeout_s, "validation"),
            cfg,
            device=device,
            **amp,
        )
        metrics = epoch_metrics(
            trained,
            validated,
            elapsed,
            cfg,
            epoch=epoch,
            start_epoch=start_epoch,
            world=world,
            device=device,
        )
        best_top1 = max(best_top1, metrics["val_top1"])
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = None
            if rank == 0:
                save_checkpoint(
                    Path(directory),
                    raw_model,
                    optimizer,
                    scaler,
                    cfg,
                    epoch=epoch,
                    best_top1=best_top1,
                    class_names=class_names,
                )
                checkpoint = ray.train.Checkpoint.from_directory(directory)
                if loop_config["mlflow_run_id"]:
                    store.log_metrics(
                        loop_config["mlflow_run_id"],
                        metrics,
                        step=epoch,
                        tracking_uri=loop_config["tracking_uri"],
                    )
                print(
                    f"[train] epoch {epoch}: "
                    + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                )
            ray.train.report(metrics, checkpoint=checkpoint)


# --- the driver ---------------------------------------------------------------


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
            size = int.from_bytes(f.read(8), "little")
            metadata = json.loads(f.read(size)).get("__metadata__") or {}
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


@dataclass(frozen=True)
class CpuPlan:
    """The CPUs each training worker and each read+decode task of the ingest ask Ray for."""

    cpus_per_worker: float
    decode_cpus: float
    note: str | None = None  # what was changed and why, or what will wait


def plan_cpus(cfg: TrainConfig, cluster_cpus: float) -> CpuPlan:
    """Fit the workers *and* the ingest into a cluster of ``cluster_cpus`` logical CPUs.

    The workers hold their CPUs for the whole run; a decode task that finds none left waits
    forever, and training with it. So when the workers would leave less than one decode
    task's CPUs (2 workers x 1 CPU on a 2-CPU machine; a GPU node whose CPUs all go to
    ``cpus_per_worker``), each worker gives up ``data.decode_cpus`` (at most half its own)
    for the ingest beside it, and the note says so. Workers that do not fit at all are left
    as asked: an autoscaler may add nodes; the note says what to lower on a fixed cluster.
    """
    workers, per_worker, decode = (
        cfg.scaling.workers,
        cfg.scaling.cpus_per_worker,
        cfg.data.decode_cpus,
    )
    need = workers * per_worker
    if cluster_cpus - need >= decode:
        return CpuPlan(per_worker, decode)
    asked = f"scaling.workers {workers} x scaling.cpus_per_worker {per_worker:g}"
    if need > cluster_cpus:
        return CpuPlan(
            per_worker,
            decode,
            note=(
                f"the cluster has {cluster_cpus:g} CPUs now and the training workers ask for "
                f"{need:g} ({asked}): training waits until nodes join; on a fixed cluster, "
                "lower those"
            ),
        )
    given = min(decode, per_worker / 2)
    return CpuPlan(
        per_worker - given,
        given,
        note=(
            f"{asked} would leave {max(cluster_cpus - need, 0):g} of the cluster's "
            f"{cluster_cpus:g} CPUs to the ingest, less than one read+decode task "
            f"(data.decode_cpus {decode:g}), which would wait forever: each worker gets "
            f"{per_worker - given:g} CPUs and each decode task {given:g}. To choose yourself, "
            f"set them so that workers x cpus_per_worker + decode_cpus <= {cluster_cpus:g}"
        ),
    )


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
        plan_cpus(cfg, ray.cluster_resources().get("CPU", 0.0))
        if ray.is_initialized()
        else CpuPlan(cfg.scaling.cpus_per_worker, cfg.data.decode_cpus)
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
    previous = read_json(join(run_dir, RUN_FILE)) if resume else None
    if previous:
        run_id = previous["mlflow_run_id"]
    else:
        run_id = store.start_run(
            cfg.mlflow.experiment,
            name,
            params=cfg.model_dump(mode="json"),
            tags=store.run_tags(cfg.data.train),
        )
        write_bytes_atomic(
            join(run_dir, CONFIG_FILE), dump_config(cfg, redact=False).encode()
        )  # for --resume
        write_json(join(run_dir, RUN_FILE), {"mlflow_run_id": run_id, "name": name})

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
    return validate_config(TrainConfig, yaml.safe_load(read_bytes(uri)), source=uri)
