"""A new model version rolls out with ``serve deploy`` (the real CLI, against the head's
dashboard) while clients keep sending requests: none of them fails."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from helpers import PROJECT, SMALL, wait_for, wait_ready, write_weights
from skray.dev.embedded import LocalRayHead, free_port, ray_cli
from skray.dev.testing import synthetic_image
from skray.io.storage import LOOPBACK
from skray.weights.files import file_sha256

pytestmark = pytest.mark.slow


def serve_deploy(head: LocalRayHead, config: dict, path: Path) -> None:
    path.write_text(yaml.safe_dump(config))
    subprocess.run(
        [str(Path(ray_cli()).parent / "serve"), "deploy", str(path), "-a", head.address],
        env=head.env,
        check=True,
        capture_output=True,
        timeout=120,
    )


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


def test_serve_deploy_rolls_out_new_weights_without_dropping_a_request(
    ray_cluster, serve_config, tmp_path
):
    old, new = (
        write_weights(tmp_path / "v1.safetensors", seed=1),
        write_weights(tmp_path / "v2.safetensors", seed=2),
    )
    old_sha, new_sha = file_sha256(Path(old)), file_sha256(Path(new))
    app = serve_config["applications"][0]
    base = f"http://{LOOPBACK}:{serve_config['http_options']['port']}"
    app["args"]["weights"] = old
    serve_deploy(ray_cluster, serve_config, tmp_path / "v1.yaml")
    wait_ready(base)

    # Every request is recorded as (client, HTTP status or None when no reply came, weights
    # sha256 or what went wrong): a refused connection or a reply that is not the JSON of a
    # classification is a failed request, never a client thread that silently stops.
    answers: list[tuple[int, int | None, str]] = []
    stop = threading.Event()

    def client(number: int) -> None:
        image = synthetic_image(3)
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                try:
                    reply = http.post(
                        f"{base}/v1/classify", content=image, headers={"content-type": "image/jpeg"}
                    )
                except Exception as err:  # noqa: BLE001 - no reply at all: connection refused, reset, timeout
                    answers.append((number, None, f"{type(err).__name__}: {err}"))
                    stop.wait(0.1)
                    continue
                try:
                    answers.append((number, reply.status_code, reply.json()["weights_sha256"]))
                except Exception:  # noqa: BLE001 - a 5xx page, a truncated body, JSON without the field
                    answers.append(
                        (number, reply.status_code, f"not a classification: {reply.text[:200]!r}")
                    )

    clients = [threading.Thread(target=client, args=(number,)) for number in range(3)]
    for thread in clients:
        thread.start()
    try:
        wait_for(lambda: {n for n, _, _ in answers} == {0, 1, 2}, 60, "an answer to every client")
        app["args"]["weights"] = new
        serve_deploy(ray_cluster, serve_config, tmp_path / "v2.yaml")
        wait_for(
            lambda: {n for n, _, sha in answers if sha == new_sha} == {0, 1, 2},
            120,
            "every client answered by the new weights",
        )
        rolled_out = len(answers)
        wait_for(lambda: len(answers) >= rolled_out + 6, 60, "answers after the rollout")
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=60)

    assert not any(thread.is_alive() for thread in clients)
    failed = [a for a in answers if a[1] != 200 or a[2] not in (old_sha, new_sha)]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed: {failed[:5]}"
    for number in range(3):  # every client kept sending across the rollout
        shas = [sha for n, _, sha in answers if n == number]
        assert shas and shas[0] == old_sha and new_sha in shas, (number, len(shas))
    shas = [sha for _, _, sha in answers]
    assert shas[0] == old_sha and shas[-1] == new_sha and set(shas) == {old_sha, new_sha}
    assert httpx.get(f"{base}/healthz", timeout=10).json()["weights_sha256"] == new_sha
