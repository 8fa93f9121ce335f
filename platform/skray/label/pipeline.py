"""The Ray Data graph of a labeling run: units -> read+decode tasks -> the model actor pool.

Ray is imported when the graph is built, so the driver's checks run without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from skray.io.config import resolve_decode, resolve_gpus
from skray.io.sources import SampleLimits
from skray.io.storage import redact_uri
from skray.label.config import LabelConfig
from skray.label.resources import (
    actor_pool_sizes,
    decode_memory_bytes,
    decode_task_cpus,
    schedulable_memory,
)
from skray.weights.resolver import PinnedWeights

if TYPE_CHECKING:
    import ray.data


def build_dataset(
    cfg: LabelConfig, units: pa.Table, pinned: PinnedWeights | None
) -> ray.data.Dataset:
    """The labeled rows of ``units`` (a plan's rows of ``Unit.to_row``), streamed: one
    read+decode task per unit, then the model actors in batches of ``cfg.batch_size``."""
    import ray
    import ray.data

    from skray.inference.quantize import calibration_crops
    from skray.label.predictor import Predictor
    from skray.label.read import read_and_decode

    preprocessing = cfg.preprocessing
    gpus = resolve_gpus(cfg.actors.gpus)
    decode = resolve_decode(cfg.decode, gpus > 0)  # both stages: crops or bytes travel between them
    pool = actor_pool_sizes(cfg.actors, gpus, ray.cluster_resources().get("GPU", 0))
    print(
        f"[label] model actors: {pool[0]} at start, up to {pool[1]}, {gpus:g} GPU each", flush=True
    )
    # the workers see the configured S3 location only: credentials stay in the nodes'
    # environment, and pinned weights name a concrete file, so no MLflow store is needed
    env = cfg.s3.env()
    runtime_env = {"env_vars": env} if env else None
    # A block per unit, each its own row's copy: a slice would ship the whole plan's buffers.
    # from_blocks reads their metadata here; from_arrow would run a remote task per unit for it
    # before the first read, each in a worker outside the read tasks' runtime env.
    ds = ray.data.from_blocks([units.take([i]) for i in range(units.num_rows)])
    ds = ds.map_batches(
        read_and_decode,
        fn_kwargs={
            "preprocessing": preprocessing,
            "batch_size": cfg.batch_size,
            "image_column": cfg.image_column,
            "id_column": cfg.id_column,
            "max_object_bytes": cfg.max_object_bytes,
            "sample_limits": SampleLimits(cfg.max_members_per_sample, cfg.max_sample_bytes),
            "io_retry": cfg.io_retry,
            "read_buffer_bytes": cfg.read_buffer_bytes,
            "decode": decode,
        },
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=decode_task_cpus(
            cfg.decode_cpus, cfg.actors.cpus, pool[0], ray.cluster_resources().get("CPU", 0)
        ),
        memory=schedulable_memory(decode_memory_bytes(cfg), ray.nodes()),
        concurrency=cfg.decode_concurrency,
        runtime_env=runtime_env,
    )
    return ds.map_batches(
        Predictor,
        fn_constructor_kwargs={
            "model": cfg.model,
            "pinned": pinned,
            "top_k": cfg.top_k,
            "preprocessing": preprocessing,
            "threads": cfg.actors.threads,
            "compile": cfg.actors.compile,
            "decode": decode,
            "batch_size": cfg.actors.batch_size or cfg.batch_size,
            "precision": cfg.resolved_precision()[0],
            "min_score": cfg.min_score,
            "output": redact_uri(cfg.output),
            "calibration": calibration_crops(
                cfg.actors.calibration, cfg.actors.calibration_images, preprocessing
            )
            if cfg.actors.precision == "int8"
            else None,
        },
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1]),
        num_gpus=gpus,
        num_cpus=cfg.actors.cpus,
        runtime_env=runtime_env,
    )
