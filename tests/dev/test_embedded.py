"""The embedded Ray head cleans up what it started, and only that."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from skray.dev import embedded
from skray.dev.embedded import LocalRayHead, ensure_auth_token, free_ports


def running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_ports_chosen_together_are_all_different():
    # One at a time, 100 ports repeat one about every fourth try here (a head's dashboard
    # once lost its port to its own client server that way).
    assert all(len(set(free_ports(100))) == 100 for _ in range(20))


@pytest.mark.timeout(60)
def test_a_missing_auth_token_is_generated_and_an_existing_one_used_as_it_is(tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path)
    token_file = tmp_path / ".ray" / "auth_token"

    ensure_auth_token(env)
    token = token_file.read_text()
    commands = []
    monkeypatch.setattr(embedded.subprocess, "run", lambda args, **_: commands.append(args))
    ensure_auth_token(env)
    ensure_auth_token({**env, "HOME": str(tmp_path / "elsewhere"), "RAY_AUTH_TOKEN": token})

    assert len(token) >= 32 and token_file.read_text() == token
    assert commands == [], "no Ray CLI start for a token that is there"


@pytest.mark.slow
@pytest.mark.timeout(180)
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
