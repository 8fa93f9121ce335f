"""The published recipe's arithmetic: SGD parameter groups, the warm-up and cosine LR
schedule laid out in steps, and the label-smoothed loss that skips undecodable rows.

Kept apart from the loop: pure functions of the config, each tested on its own.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from skray.train.config import TrainConfig
from skray.train.datasets import BAD_LABEL, DatasetError, LabeledData


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
