"""How many CPUs the training workers and the ingest's decode tasks ask Ray for, so that
neither starves the other on a small or GPU-heavy cluster.
"""

from __future__ import annotations

from dataclasses import dataclass

from skray.train.config import TrainConfig


@dataclass(frozen=True)
class CpuSplit:
    """The CPUs each training worker and each read+decode task of the ingest ask Ray for."""

    cpus_per_worker: float
    decode_cpus: float
    note: str | None = None  # what was changed and why, or what will wait


def split_cpus(cfg: TrainConfig, cluster_cpus: float) -> CpuSplit:
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
        return CpuSplit(per_worker, decode)
    asked = f"scaling.workers {workers} x scaling.cpus_per_worker {per_worker:g}"
    if need > cluster_cpus:
        return CpuSplit(
            per_worker,
            decode,
            note=(
                f"the cluster has {cluster_cpus:g} CPUs now and the training workers ask for "
                f"{need:g} ({asked}): training waits until nodes join; on a fixed cluster, "
                "lower those"
            ),
        )
    given = min(decode, per_worker / 2)
    return CpuSplit(
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
