"""What the two stages declare to Ray: model actors in the pool, and each read+decode task's
CPUs and memory. Sized from the config and the cluster so that no declaration can leave
tasks pending forever and no node runs more decode tasks than its memory holds.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from skray.io.config import ConfigError
from skray.io.sources import PARQUET_BATCH_ROWS
from skray.label.config import ActorsConfig, LabelConfig

log = logging.getLogger(__name__)

DECODE_BASE_BYTES = 512 * 2**20  # a decode worker's own footprint: Python, pyarrow, torch


def decode_memory_bytes(cfg: LabelConfig) -> int:
    """What one read+decode task may hold at worst, declared to Ray so a node never runs
    more of them than its memory takes: a batch of objects at the cap plus a Parquet read
    batch, the read buffer of a shard, one image decoded at ``max_pixels`` (RGBA, and a
    copy), and the batch's crops."""
    if cfg.decode_memory_mb is not None:
        return cfg.decode_memory_mb * 2**20
    objects = (cfg.batch_size + PARQUET_BATCH_ROWS) * cfg.max_object_bytes
    decoded = 2 * 4 * cfg.preprocessing.max_pixels
    crops = cfg.batch_size * 3 * cfg.preprocessing.image_size**2
    return DECODE_BASE_BYTES + objects + cfg.read_buffer_bytes + decoded + crops


def schedulable_memory(memory: int, nodes: list[dict[str, Any]]) -> int:
    """``memory``, or the most any live node offers: a declaration no node can meet would
    leave the tasks pending forever, and the worst case it stands for is rare."""
    largest = max((int(n["Resources"].get("memory", 0)) for n in nodes if n["Alive"]), default=0)
    if largest and memory > largest:
        log.warning(
            "read+decode tasks declare %d MiB, more than any node has: %d MiB declared instead "
            "(lower batch_size or max_object_bytes, or set decode_memory_mb)",
            memory >> 20,
            largest >> 20,
        )
        return largest
    return memory


def actor_pool_sizes(
    actors: ActorsConfig, gpus_per_actor: float, cluster_gpus: float
) -> tuple[int, int]:
    """(min_size, max_size) of the model actor pool; Ray Data starts ``min_size`` actors and
    adds the rest one at a time as the first ones fill up.

    On CPUs the pool autoscales between ``actors.min`` and ``actors.max``. On GPUs it
    starts at full size, ``actors.max`` or as many actors as the cluster's GPUs hold now
    if fewer, since the ramp-up costs minutes on a big pool while GPUs sit idle; it may
    still grow to ``actors.max`` as GPU nodes join. ``actors.min`` does not apply there."""
    if gpus_per_actor <= 0:
        return actors.min, max(actors.min, actors.max)
    fits = math.floor(cluster_gpus / gpus_per_actor + 1e-9)
    return max(1, min(actors.max, fits)), actors.max


def decode_task_cpus(
    decode_cpus: float, actor_cpus: float, actors_at_start: int, cluster_cpus: float
) -> float:
    """The CPUs each read+decode task declares: ``decode_cpus``, or what the model actors
    leave when that is less. Ray Data would otherwise hold every task back, forever."""
    room = cluster_cpus - actor_cpus * actors_at_start
    if room <= 0:
        raise ConfigError(
            f"actors.cpus {actor_cpus:g} x {actors_at_start} actor(s) at start take all "
            f"{cluster_cpus:g} CPUs of the cluster: no read+decode task could ever run. "
            "Lower actors.cpus or actors.min, or add CPUs"
        )
    if room < decode_cpus:
        log.warning(
            "decode_cpus %g does not fit beside the model actors (%g of %g CPUs left): "
            "each read+decode task declares %g",
            decode_cpus,
            room,
            cluster_cpus,
            room,
        )
        return room
    return decode_cpus
