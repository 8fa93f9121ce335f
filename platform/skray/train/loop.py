"""The per-worker Ray Train loop, top to bottom.

``train_loop`` builds the model, restores the latest checkpoint if there is one, then per
epoch runs :func:`train_epoch`, :func:`evaluate_epoch`, :func:`save_checkpoint` through
``ray.train.report`` and logs to MLflow (rank 0). Ray is imported inside the functions that
need a Ray Train worker, so the steps run (and are tested) without one.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from skray.core.model import SKResNeXt, create_model
from skray.core.preprocessing import PreprocessingConfig
from skray.core.transforms import normalize
from skray.inference.precision import resolve_precision
from skray.train.accuracy import count_hits
from skray.train.checkpoints import latest_state, save_checkpoint
from skray.train.config import TrainConfig
from skray.train.datasets import BAD_LABEL, DatasetError, LabeledData
from skray.train.ingest import stall_guarded
from skray.train.recipe import batch_loss, build_optimizer, lr_at, steps_per_epoch
from skray.weights.resolver import PinnedWeights, load_weights


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


def all_reduce(*values: float, device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def autocast_settings(amp: str, device: torch.device) -> dict[str, Any]:
    """``train_epoch``'s autocast: bf16 where the worker's device computes in it natively
    (bf16 GPUs; AMX or AVX512-BF16 CPUs, 1.4x fp32 steps here; no grad scaler, bf16 has
    fp32's range), since a CPU without it would only convert around fp32 kernels, slower;
    fp16 on GPUs only. Elsewhere the step runs in fp32, as ``amp: off``."""
    native_bf16 = resolve_precision("auto", device.type)[0] == "bf16"
    return {
        "use_amp": (amp == "bf16" and native_bf16) or (amp == "fp16" and device.type == "cuda"),
        "amp_dtype": torch.bfloat16 if amp == "bf16" else torch.float16,
    }


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


def evaluate_epoch(
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


# What the loop reports each epoch (:func:`epoch_scores`): what a sweep can optimize.
EPOCH_SCORES = (
    "train_loss",
    "lr",
    "val_top1",
    "val_top5",
    "img_per_s",
    "skipped_images",
    "epoch",
    "resumed_at_epoch",
)


def epoch_scores(
    trained: dict[str, float],
    evaluated: dict[str, float],
    elapsed: float,
    cfg: TrainConfig,
    *,
    epoch: int,
    start_epoch: int,
    world: int,
    device: torch.device,
) -> dict[str, float]:
    """The epoch's scores over all workers, from each worker's :func:`train_epoch` and
    :func:`evaluate_epoch` sums; fails the run when more than ``data.max_bad_fraction`` of the
    images did not decode."""
    seen, skipped, loss_sum, c1, c5, n, elapsed_sum = all_reduce(
        trained["seen"],
        trained["skipped"] + evaluated["skipped"],
        trained["loss_sum"],
        evaluated["correct1"],
        evaluated["correct5"],
        evaluated["total"],
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


def train_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    # setup: config, device, and the model restored from the latest checkpoint if any
    cfg = TrainConfig.model_validate(loop_config["config"])
    data: LabeledData = loop_config["train_data"]
    class_names = list(data.class_names)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    amp = autocast_settings(cfg.amp, device)

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
        # train
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

        # evaluate, every worker with rank 0's BatchNorm statistics
        ddp_model.eval()
        share_buffers(raw_model, world)
        val_batches = ray.train.get_dataset_shard("val").iter_torch_batches(
            batch_size=per_worker_batch
        )
        evaluated = evaluate_epoch(
            raw_model,
            stall_guarded(val_batches, cfg.data.stall_timeout_s, "validation"),
            cfg,
            device=device,
            **amp,
        )
        scores = epoch_scores(
            trained,
            evaluated,
            elapsed,
            cfg,
            epoch=epoch,
            start_epoch=start_epoch,
            world=world,
            device=device,
        )
        # checkpoint and log (rank 0), report (every worker)
        best_top1 = max(best_top1, scores["val_top1"])
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
                    from skray.weights import store  # rank 0 only: MLflow's import is 1.6 s

                    store.log_metrics(
                        loop_config["mlflow_run_id"],
                        scores,
                        step=epoch,
                        tracking_uri=loop_config["tracking_uri"],
                    )
                print(
                    f"[train] epoch {epoch}: "
                    + ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
                )
            ray.train.report(scores, checkpoint=checkpoint)
