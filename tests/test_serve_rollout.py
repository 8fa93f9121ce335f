"""A new model version rolls out with ``serve deploy`` (the real CLI, against the head's
dashboard) while clients keep sending requests: none of them fails."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import PROJECT, SMALL
from skray.demo import synthetic_image
from skray.embedded import LOOPBACK, LocalRayHead, free_port, ray_cli
from skray.weights import file_sha256
from test_serve import wait_ready, write_weights


def serve_deploy(head: LocalRayHead, config: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(config))
    subprocess.run([str(Path(ray_cli()).parent / "serve"), "deploy", str(path), "-a", head.address],
                   env=head.env, check=True, capture_output=True, timeout=120)


@pytest.fixture
def serve_config(ray_cluster: LocalRayHead) -> Iterator[dict]:
    """configs/serve.yaml on a free port, one replica, small model; Serve shut down afterwards."""
    from ray import serve

    config = yaml.safe_load((PROJECT / "configs/serve.yaml").read_text())
    config["http_options"]["port"] = free_port()
    app = config["applications"][0]
    app["args"].update(model=SMALL, max_batch_size=4, warmup_batches=1)
    app["deployments"][0]["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    yield config
    serve.shutdown()


def test_serve_deploy_rolls_out_new_weights_without_dropping_a_request(ray_cluster, serve_config, tmp_path):
    old, new = write_weights(tmp_path / "v1.safetensors", seed=1), write_weights(tmp_path / "v2.safetensors", seed=2)
    old_sha, new_sha = file_sha256(Path(old)), file_sha256(Path(new))
    app = serve_config["applications"][0]
    base = f"http://{LOOPBACK}:{serve_config['http_options']['port']}"
    app["args"]["weights"] = old
    serve_deploy(ray_cluster, serve_config, tmp_path / "v1.yaml")
    wait_ready(base)

    answers: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        image = synthetic_image(3)
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                reply = http.post(f"{base}/v1/classify", content=image, headers={"content-type": "image/jpeg"})
                answers.append((reply.status_code, reply.json().get("weights_sha256")))

    clients = [threading.Thread(target=client) for _ in range(3)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(1)
        app["args"]["weights"] = new
        serve_deploy(ray_cluster, serve_config, tmp_path / "v2.yaml")
        deadline = time.monotonic() + 120
        while not any(sha == new_sha for _, sha in answers[-5:]) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1)
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=60)

    assert {status for status, _ in answers} == {200}, [a for a in answers if a[0] != 200][:5]
    shas = [sha for _, sha in answers]
    assert shas[0] == old_sha and shas[-1] == new_sha and set(shas) == {old_sha, new_sha}
    assert httpx.get(f"{base}/healthz", timeout=10).json()["weights_sha256"] == new_sha
