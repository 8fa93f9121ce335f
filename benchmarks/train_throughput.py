"""Training throughput: skray's Ray Train loop vs a plain PyTorch loop, same in-memory data.

One worker, the same model, batch, optimizer and uint8 crops (already decoded, held
in memory: this measures the loop, not decoding). The Ray Train side is the real
``skray.train.loop.train_loop`` (DDP wrapper, Ray Data shard iteration, per-epoch
validation, checkpoint, report); its img/s covers the training steps of an epoch,
like the plain loop's. Median over epochs after the first.

The plain loop runs with no Ray in the machine: before ``ray.init`` and again after
``ray.shutdown`` (Ray's own processes would otherwise slow the baseline down, and a
2-core machine has nothing to spare). An epoch is 3072 images (96 steps) by default:
each epoch starts a new Ray Data iterator, a fixed cost that a 24-step epoch of 768
images cannot hide (``--images 768`` shows it; the README has both).

With ``--amp off,bf16`` every loop runs at each precision in the same run (CPU bf16 is
autocast with no grad scaler, what ``amp: bf16`` does on a CPU worker), so the ratio to the
plain fp32 loop shows what bf16 buys on this CPU.

    python benchmarks/train_throughput.py [--model skresnext14_8x4d_half] [--size 96] [--batch 32]
        [--amp off,bf16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import ray
import torch

from skray.core.hardware import cpu_summary
from skray.core.model import create_model
from skray.io.config import validate
from skray.train.config import TrainConfig
from skray.train.datasets import LabeledData
from skray.train.loop import autocast_settings, train_epoch, train_loop
from skray.train.recipe import build_optimizer


def plain_loop(
    cfg: TrainConfig, images: torch.Tensor, labels: torch.Tensor, classes: int
) -> list[float]:
    """The same step as train_loop (:func:`skray.train.loop.train_epoch`), without Ray: img/s per
    epoch."""
    model = create_model(cfg.model.name, num_classes=classes).train()
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    steps = len(images) // cfg.batch_size
    rates = []
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        order = torch.randperm(len(images))[: steps * cfg.batch_size].split(cfg.batch_size)
        batches = ({"image": images[index], "label": labels[index]} for index in order)
        train_epoch(
            model,
            model,
            optimizer,
            scaler,
            batches,
            cfg,
            device=torch.device("cpu"),
            epoch=epoch,
            steps_per_epoch=steps,
            **autocast_settings(cfg.amp, torch.device("cpu")),
        )
        rates.append(steps * cfg.batch_size / (time.perf_counter() - started))
    return rates


def ray_train_loop(
    cfg: TrainConfig, images: np.ndarray, labels: np.ndarray, classes: int
) -> list[float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    rates: list[float] = []
    data = LabeledData("memory://", "folder", (), tuple(f"c{i}" for i in range(classes)))
    rows = [{"image": image, "label": label} for image, label in zip(images, labels)]
    train = ray.data.from_items(rows).materialize()
    val = ray.data.from_items(rows[: cfg.batch_size])
    storage = tempfile.mkdtemp(prefix="skray-train-bench-")
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "train_data": data,
            "mlflow_run_id": None,
            "tracking_uri": None,
            "weights": None,
        },
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": 2}),
        run_config=RunConfig(name="bench", storage_path=storage),
        datasets={"train": train, "val": val},
    )
    result = trainer.fit()
    history = result.metrics_dataframe
    rates = history.sort_values("epoch")["img_per_s"].tolist()
    return rates


def rounded(rates: dict[str, list[float]]) -> str:
    return "; ".join(f"{amp}: {', '.join(f'{r:.1f}' for r in rs)}" for amp, rs in rates.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="skresnext14_8x4d_half")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--images", type=int, default=3072)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--amp", default="off", help="off, bf16 or both (off,bf16)")
    args = parser.parse_args()
    print(cpu_summary(), flush=True)

    classes = 10
    configs = {
        amp: validate(
            TrainConfig,
            {
                "data": {"train": "memory://"},
                "model": {"name": args.model},
                "epochs": args.epochs,
                "batch_size": args.batch,
                "preprocessing": {"image_size": args.size},
                "amp": amp,
                "mlflow": {"registered_model": None},
                "scaling": {"workers": 1, "use_gpu": False, "cpus_per_worker": 2},
                "optim": {"warmup_epochs": 0, "label_smoothing": 0.0},
            },
        )
        for amp in args.amp.split(",")
    }
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, 3, args.size, args.size), dtype=np.uint8)
    labels = rng.integers(0, classes, args.images).astype(np.int64)
    tensors = torch.from_numpy(images), torch.from_numpy(labels)

    torch.set_num_threads(2)
    plain = {amp: plain_loop(cfg, *tensors, classes) for amp, cfg in configs.items()}
    print(f"plain PyTorch, before Ray: {rounded(plain)} img/s", flush=True)
    ray.init(num_cpus=4, logging_level="ERROR", include_dashboard=False)
    in_ray = {amp: ray_train_loop(cfg, images, labels, classes) for amp, cfg in configs.items()}
    print(f"skray train_loop on Ray Train: {rounded(in_ray)} img/s", flush=True)
    ray.shutdown()
    for amp, cfg in configs.items():
        plain[amp] += plain_loop(cfg, *tensors, classes)

    # epochs 2+ of each loop (the first pays allocation and, in Ray, the ingest's start)
    plain_rate = {
        amp: statistics.median(r[1 : args.epochs] + r[args.epochs + 1 :])
        for amp, r in plain.items()
    }
    ray_rate = {amp: statistics.median(r[1:]) for amp, r in in_ray.items()}
    baseline = next(iter(plain_rate.values()))
    print(
        f"\n{args.model}, {args.size} px, batch {args.batch}, {args.images} images in memory, "
        f"{args.epochs} epochs, 1 worker x 2 threads, CPU ({os.cpu_count()} cores)"
    )
    print(
        f"| loop | amp | img/s per epoch | median (epochs 2+) | x plain {args.amp.split(',')[0]} |"
        "\n|---|---|---|---:|---:|"
    )
    for amp in configs:
        print(
            f"| plain PyTorch, no Ray running (before, after) | {amp} "
            f"| {', '.join(f'{r:.1f}' for r in plain[amp])} | {plain_rate[amp]:.1f} "
            f"| {plain_rate[amp] / baseline:.2f} |"
        )
        print(
            f"| skray train_loop on Ray Train | {amp} "
            f"| {', '.join(f'{r:.1f}' for r in in_ray[amp])} "
            f"| {ray_rate[amp]:.1f} | {ray_rate[amp] / baseline:.2f} |"
        )
    for amp in configs:
        print(
            f"Ray Train loop vs plain, {amp}: {ray_rate[amp] / plain_rate[amp]:.2f} (target >= 0.9)"
        )


if __name__ == "__main__":
    main()
