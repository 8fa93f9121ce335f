"""What a training checkpoint holds and how the loop writes and restores it.

``state.pt`` is everything a restarted worker group needs to continue exactly;
``model.safetensors`` beside it is the model alone, loadable anywhere skray takes weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from skray.core.model import SKResNeXt
from skray.train.config import TrainConfig
from skray.weights.files import save_weights


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
