"""The embedded Ray head cleans up what it started, and only that."""

from __future__ import annotations

from pathlib import Path

import pytest

from skray.dev.embedded import LocalRayHead

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_stopped_head_ends_every_process_it_started_and_no_other_rays(
    ray_cluster: LocalRayHead,
):
    import ray
    from ray._common.utils import get_ray_address_file

    other = LocalRayHead(num_cpus=1)
    other.start()
    try:
        started = other.processes()
        assert len(started) >= 4, "GCS, raylet, dashboard and their helpers"
        assert not set(started) & set(ray_cluster.processes())
    finally:
        other.stop()

    assert not [pid for pid in started if running(pid)]
    assert not other.processes()
    record = Path(get_ray_address_file(None))  # what `ray.init()` without an address reads
    assert not (record.exists() and record.read_text().endswith(f":{other.gcs_port}"))
    assert ray.get(ray.remote(lambda: "still here").remote()) == "still here", "the session's Ray"
