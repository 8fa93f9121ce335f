"""The Serve endpoint, over real HTTP on 127.0.0.1: answers like ``skray predict``, batches
concurrent requests, refuses bad input with a 4xx JSON error, and says when it is ready."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import random
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from PIL import Image

from helpers import CLASSES, PROJECT, SMALL, wait_for, wait_ready, write_weights
from skray.cli import main
from skray.dev.embedded import LocalRayHead, free_port
from skray.dev.testing import synthetic_image
from skray.io.config import ConfigError
from skray.io.storage import LOOPBACK
from skray.serve.app import application
from skray.serve.config import ServeConfig
from skray.serve.launch import resolve_launch

BODY_LIMIT = 256 * 1024
BODY_TIMEOUT_S = 2.0
INFLIGHT_LIMIT = 12 * BODY_LIMIT  # twelve largest bodies at once per replica
JPEG = {"content-type": "image/jpeg"}
FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


def deploy(cfg: ServeConfig, name: str, route_prefix: str, **options) -> None:
    from ray import serve

    serve.run(application(cfg, **options), name=name, route_prefix=route_prefix)


def predict_cli(weights: str, paths: list[Path], top_k: int) -> dict[str, list[tuple[int, float]]]:
    """``skray predict``'s answer per file: [(label_id, score)] best first."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["predict", "--weights", weights, "--top-k", str(top_k), *map(str, paths)]) == 0
    answers: dict[str, list[tuple[int, float]]] = {}
    for line in out.getvalue().splitlines():
        if not line.startswith(" "):
            current = answers.setdefault(line, [])
        else:
            score, rest = line.split(maxsplit=1)
            current.append((int(rest.rsplit("(", 1)[1].rstrip(")")), float(score)))
    return answers


def assert_same_answer(reply: dict, expected: list[tuple[int, float]]) -> None:
    assert [c["label_id"] for c in reply["top_k"]] == [i for i, _ in expected]
    assert [c["score"] for c in reply["top_k"]] == pytest.approx([s for _, s in expected], abs=2e-4)
    assert reply["label_id"] == expected[0][0] and reply["label"] == CLASSES[expected[0][0]]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_weights(tmp_path_factory.mktemp("serve") / "small.safetensors", seed=0)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(16):
        fmt = list(FORMATS)[i % len(FORMATS)]
        path = folder / f"img{i:02d}.{fmt.lower()}"
        path.write_bytes(synthetic_image(i, (200 + 8 * i, 160), fmt))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def serve_port(ray_cluster: LocalRayHead) -> Iterator[int]:
    """Serve's HTTP proxy on 127.0.0.1 for this module; shut down after it."""
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": LOOPBACK, "port": port})
    yield port
    serve.shutdown()


@pytest.fixture(scope="module")
def url(serve_port: int, weights: str) -> str:
    """The classifier app at the root of the proxy (small model, 10 classes, tight limits)."""
    cfg = ServeConfig(
        model=SMALL,
        weights=weights,
        max_batch_size=8,
        batch_wait_timeout_s=0.2,
        max_body_bytes=BODY_LIMIT,
        max_inflight_bytes=INFLIGHT_LIMIT,
        max_images_per_request=6,
        warmup_batches=1,
        top_k=3,
        body_timeout_s=BODY_TIMEOUT_S,
    )
    deploy(cfg, "skray", "/")
    base = f"http://{LOOPBACK}:{serve_port}"
    wait_ready(base)
    return base


@pytest.fixture(scope="module")
def expected(weights: str, images: list[Path]) -> dict[str, list[tuple[int, float]]]:
    return predict_cli(weights, images, top_k=5)


@pytest.mark.slow
def test_raw_bodies_and_multipart_files_get_the_answers_skray_predict_gives(
    url, images, expected, weights
):
    from skray.weights.files import file_sha256

    for path in images[:3]:  # one of each format
        reply = httpx.post(
            f"{url}/v1/classify?top_k=5",
            content=path.read_bytes(),
            headers={"content-type": FORMATS[path.suffix[1:].upper()]},
            timeout=30,
        )
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert_same_answer(body, expected[str(path)])
        assert body["model"] == SMALL and body["weights_sha256"] == file_sha256(Path(weights))
        assert body["latency_ms"] > 0

    octet = httpx.post(
        f"{url}/v1/classify?top_k=5",
        content=images[3].read_bytes(),
        headers={"content-type": "application/octet-stream"},
        timeout=30,
    )
    multipart = httpx.post(
        f"{url}/v1/classify?top_k=5", files={"file": ("x.png", images[4].read_bytes())}, timeout=30
    )
    default_k = httpx.post(
        f"{url}/v1/classify",
        content=images[5].read_bytes(),
        headers={"content-type": "image/webp"},
        timeout=30,
    )
    assert_same_answer(octet.json(), expected[str(images[3])])
    assert_same_answer(multipart.json(), expected[str(images[4])])
    assert len(default_k.json()["top_k"]) == 3  # the config's top_k


@pytest.mark.slow
def test_concurrent_requests_share_batches_and_each_gets_its_own_answer(url, images, expected):
    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{url}/v1/classify?top_k=5",
                        content=path.read_bytes(),
                        headers={"content-type": FORMATS[path.suffix[1:].upper()]},
                    )
                    for path in images
                )
            )

    replies = asyncio.run(send_all())

    assert [r.status_code for r in replies] == [200] * len(images)
    for path, reply in zip(images, replies):
        assert_same_answer(reply.json(), expected[str(path)])
    batch_sizes = [int(r.headers["x-skray-batch-size"]) for r in replies]
    assert max(batch_sizes) > 1 and max(batch_sizes) <= 8  # batched, never over max_batch_size
    for reply in replies:  # where its time went in the replica, stage by stage (ms)
        stages = dict(
            entry.strip().split(";dur=") for entry in reply.headers["server-timing"].split(",")
        )
        assert list(stages) == ["read", "decode_wait", "decode", "queue", "forward", "total"]
        assert float(stages["forward"]) > 0
        assert float(stages["total"]) >= sum(float(v) for k, v in stages.items() if k != "total")


@pytest.mark.slow
def test_the_batch_endpoint_answers_each_image_and_reports_the_broken_one_alone(
    url, images, expected
):
    files = [("files", (p.name, p.read_bytes())) for p in images[:3]]
    files.insert(1, ("files", ("broken.jpg", images[0].read_bytes()[:300])))

    reply = httpx.post(f"{url}/v1/classify/batch?top_k=5", files=files, timeout=60)

    assert reply.status_code == 200, reply.text
    results = reply.json()["results"]
    assert [r["filename"] for r in results] == [
        "img00.jpeg",
        "broken.jpg",
        "img01.png",
        "img02.webp",
    ]
    assert results[1]["error"]["code"] == "image_truncated" and results[1]["label"] is None
    for result, path in zip([results[0], *results[2:]], images[:3]):
        assert result["error"] is None
        assert_same_answer(result, expected[str(path)])


def multipart(files: int) -> dict:
    return {"files": [("files", (f"{i}.jpg", synthetic_image(i, (64, 64)))) for i in range(files)]}


BAD_REQUESTS = {
    "not an image": (
        "/v1/classify",
        {"content": b"hello, world", "headers": {"content-type": "image/jpeg"}},
        400,
        "image_not_an_image",
        "not a JPEG",
    ),
    "truncated image": (
        "/v1/classify",
        {"content": synthetic_image(1)[:400], "headers": {"content-type": "image/jpeg"}},
        400,
        "image_truncated",
        "truncated",
    ),
    "empty body": (
        "/v1/classify",
        {"content": b"", "headers": {"content-type": "image/png"}},
        400,
        "image_empty",
        "no bytes",
    ),
    "body over the limit": (
        "/v1/classify",
        {"content": b"\xff" * (BODY_LIMIT + 1), "headers": {"content-type": "image/jpeg"}},
        413,
        "payload_too_large",
        str(BODY_LIMIT),
    ),
    "chunked body over the limit": (
        "/v1/classify",
        {"content": iter([b"\xff" * 65536] * 5), "headers": {"content-type": "image/jpeg"}},
        413,
        "payload_too_large",
        str(BODY_LIMIT),
    ),
    "json": (
        "/v1/classify",
        {"json": {"image": "aGVsbG8="}},
        415,
        "unsupported_media_type",
        "application/json",
    ),
    "text": (
        "/v1/classify",
        {"content": b"cat", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
        "text/plain",
    ),
    "no content type": (
        "/v1/classify",
        {"content": b"\xff\xd8"},
        415,
        "unsupported_media_type",
        "(none)",
    ),
    "top_k zero": (
        "/v1/classify?top_k=0",
        {"content": synthetic_image(1), "headers": {"content-type": "image/jpeg"}},
        422,
        "invalid_parameter",
        "top_k",
    ),
    "top_k not a number": (
        "/v1/classify?top_k=many",
        {"content": synthetic_image(1), "headers": {"content-type": "image/jpeg"}},
        422,
        "invalid_parameter",
        "top_k",
    ),
    "top_k over the classes": (
        "/v1/classify?top_k=11",
        {"content": synthetic_image(1), "headers": {"content-type": "image/jpeg"}},
        422,
        "invalid_parameter",
        "at most 10",
    ),
    "two files to the single endpoint": (
        "/v1/classify",
        multipart(2),
        422,
        "one_file_expected",
        "batch",
    ),
    "too many files": ("/v1/classify/batch", multipart(7), 413, "too_many_images", "6"),
    "raw body to the batch endpoint": (
        "/v1/classify/batch",
        {"content": synthetic_image(1), "headers": {"content-type": "image/jpeg"}},
        415,
        "unsupported_media_type",
        "multipart",
    ),
    "multipart without a boundary": (
        "/v1/classify",
        {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}},
        400,
        "bad_multipart",
        "boundary",
    ),
    "unknown path": ("/v1/clasify", {"content": b"x"}, 404, "not_found", "Not Found"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_input_gets_a_4xx_json_error_naming_it_and_the_replica_carries_on(url, images, case):
    path, request, status, code, named = BAD_REQUESTS[case]

    reply = httpx.post(url + path, timeout=30, **request)

    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == code and named in error["message"]
    after = httpx.post(
        f"{url}/v1/classify",
        content=images[0].read_bytes(),
        headers={"content-type": "image/jpeg"},
        timeout=30,
    )
    assert after.status_code == 200


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def resize_bombs() -> dict[str, bytes]:
    """A few KB each; the eval resize (shorter side -> 256) of each would need GBs."""
    return {
        "jpeg 1x65000": encoded(Image.new("L", (1, 65_000)), "JPEG"),  # 65k pixels, resize 4.3G
        "1-bit png 16x2000000": encoded(
            Image.new("1", (16, 2_000_000)), "PNG"
        ),  # 32M pixels, resize 8G
        "1-bit png 16x5500000": encoded(
            Image.new("1", (16, 5_500_000)), "PNG"
        ),  # 88M: over the limit itself
    }


@pytest.mark.slow
def test_resize_bombs_get_a_quick_400_and_the_replica_keeps_serving(
    url, images, expected, resize_bombs
):
    timings = {}
    for name, data in resize_bombs.items():
        assert len(data) < 20_000, name
        started = time.monotonic()
        reply = httpx.post(
            f"{url}/v1/classify", content=data, headers={"content-type": "image/png"}, timeout=30
        )
        timings[name] = time.monotonic() - started
        assert (
            reply.status_code == 400 and reply.json()["error"]["code"] == "image_too_many_pixels"
        ), reply.text
    assert max(timings.values()) < 1.0, timings

    async def ordinary() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{url}/v1/classify?top_k=5",
                        content=path.read_bytes(),
                        headers={"content-type": FORMATS[path.suffix[1:].upper()]},
                    )
                    for path in images
                )
            )

    replies = asyncio.run(ordinary())
    assert [r.status_code for r in replies] == [200] * len(images)
    for path, reply in zip(images, replies):
        assert_same_answer(reply.json(), expected[str(path)])
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200


def upload_head(port: int, path: str, declared: int) -> bytes:
    """The request line and headers of a JPEG upload declaring ``declared`` body bytes."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()


def read_reply(sock: socket.socket) -> httpx.Response:
    """The HTTP response that arrives on ``sock`` (TimeoutError past the socket's timeout)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
        header, sep, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?i)content-length: *(\d+)", header)
        if sep and length and len(body) >= int(length[1]):
            break
    header, _, body = data.partition(b"\r\n\r\n")
    status, *fields = header.decode("latin-1").split("\r\n")
    headers = [tuple(f.split(": ", 1)) for f in fields]
    return httpx.Response(int(status.split(" ", 2)[1]), headers=headers, content=body)


def stalled_upload(
    port: int, declared: int, sent: bytes, wait_s: float
) -> tuple[httpx.Response, float]:
    """POST headers declaring ``declared`` body bytes, send only ``sent`` and stall: the server's
    answer and the seconds it took."""
    with socket.create_connection((LOOPBACK, port), timeout=wait_s) as sock:
        started = time.monotonic()
        sock.sendall(upload_head(port, "/v1/classify", declared) + sent)
        reply = read_reply(sock)
        return reply, time.monotonic() - started


@pytest.mark.slow
def test_a_stalled_upload_gets_408_and_frees_its_slot(url, serve_port, images):
    reply, elapsed = stalled_upload(serve_port, 100_000, b"\xff" * 10, wait_s=BODY_TIMEOUT_S + 10)

    assert reply.status_code == 408 and reply.json()["error"]["code"] == "request_timeout"
    assert BODY_TIMEOUT_S <= elapsed < BODY_TIMEOUT_S + 3
    after = httpx.post(
        f"{url}/v1/classify", content=images[0].read_bytes(), headers=JPEG, timeout=30
    )
    assert after.status_code == 200


@pytest.fixture(scope="module")
def uploads(serve_port: int, weights: str) -> Iterator[tuple[str, ServeConfig]]:
    """An app with the default limits (16 MiB bodies, 64 MiB in flight) and time enough for every
    admitted body to arrive: its base URL and config."""
    from ray import serve

    cfg = ServeConfig(
        model=SMALL, weights=weights, max_batch_size=8, warmup_batches=1, body_timeout_s=120
    )
    deploy(cfg, "uploads", "/uploads")
    base = f"http://{LOOPBACK}:{serve_port}/uploads"
    wait_ready(base)
    yield base, cfg
    serve.delete("uploads")


@pytest.mark.slow
def test_uploads_past_max_inflight_bytes_get_503_before_their_body_is_read_and_the_replica_goes_on(
    uploads, serve_port, images
):
    base, cfg = uploads
    held = cfg.max_inflight_bytes // cfg.max_body_bytes
    stalled = [
        socket.create_connection((LOOPBACK, serve_port), timeout=30) for _ in range(held + 1)
    ]
    try:
        for upload in stalled:  # each claims its declared length and stalls after one byte
            upload.sendall(
                upload_head(serve_port, "/uploads/v1/classify", cfg.max_body_bytes) + b"\xff"
            )
        answered, _, _ = select.select(stalled, [], [], 60)
        assert answered, "one upload too many, whichever came last, is answered"
        reply = read_reply(answered[0])
        others = [upload for upload in stalled if upload is not answered[0]]
        held_on, _, _ = select.select(others, [], [], 1)
        assert not held_on, "one upload too many, whichever came last, is answered; the rest wait"
    finally:
        for upload in stalled:
            upload.close()

    assert reply.status_code == 503 and reply.json()["error"]["code"] == "overloaded"
    assert reply.headers["retry-after"] == "1"

    def classified() -> bool:
        image = images[0].read_bytes()
        return httpx.post(f"{base}/v1/classify", content=image, headers=JPEG, timeout=30).is_success

    wait_for(classified, 30, "the claims of the uploads that hung up to be given back")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def replica_pid(app: str) -> int:
    """The pid of the one replica of ``app`` (Ray titles it ``ray::ServeReplica:<app>:…``)."""
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(
                f"ray::ServeReplica:{app}:".encode()
            ):
                return int(proc.name)
    raise AssertionError(f"no replica process of {app}")


@pytest.mark.slow
def test_64_concurrent_16_mib_uploads_keep_the_replicas_memory_near_its_inflight_budget(
    uploads, images
):
    base, cfg = uploads
    pid = replica_pid("uploads")
    body = bytes(random.Random(0).getrandbits(8) for _ in range(1024)) * (16 << 10)  # 16 MiB
    before, peak, done = rss_bytes(pid), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes(pid))
            time.sleep(0.02)

    async def upload(client: httpx.AsyncClient) -> int | str:
        try:
            reply = await client.post(f"{base}/v1/classify", content=body, headers=JPEG)
            return reply.status_code
        except httpx.TransportError:  # refused (503) before the whole body was sent
            return "refused mid-upload"

    async def flood() -> list[int | str]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*(upload(c) for _ in range(64)))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        answers = asyncio.run(flood())
    finally:
        done.set()
        sampler.join()
    after = httpx.post(
        f"{base}/v1/classify", content=images[0].read_bytes(), headers=JPEG, timeout=30
    )
    grew = peak[0] - before
    print(
        f"replica RSS {before >> 20} MiB, peak {peak[0] >> 20} MiB (+{grew >> 20} MiB); "
        f"answers {collections.Counter(answers)}"
    )

    assert set(answers) <= {400, 503, "refused mid-upload"} and 400 in answers
    # Each admitted body is held about three times at the peak (its chunks, the joined body, the
    # decoder's view): +196 MiB measured on 64 MiB in flight. Unbounded, every admitted upload
    # was held: +1.2 GiB here with the check removed, +2.2 GiB in the run.
    assert grew < 6 * cfg.max_inflight_bytes
    assert after.status_code == 200, "and it goes on serving"


def test_max_inflight_bytes_below_max_body_bytes_fails_naming_both():
    with pytest.raises(ValueError, match="max_inflight_bytes .* must be at least max_body_bytes"):
        ServeConfig(max_body_bytes=2048, max_inflight_bytes=1024)


@pytest.mark.slow
def test_model_endpoint_describes_the_model_and_the_api_is_documented(url, weights):
    from skray.weights.files import file_sha256

    info = httpx.get(f"{url}/v1/model", timeout=10).json()
    assert info["model"] == SMALL and info["classes"] == CLASSES and info["num_classes"] == 10
    assert info["weights"] == {
        "requested": weights,
        "source": weights,
        "sha256": file_sha256(Path(weights)),
        "version": None,
        "model_uri": None,
        "random": False,
    }
    assert (
        info["preprocessing"]["image_size"] == 224 and info["preprocessing"]["resize_size"] == 256
    )
    assert info["preprocessing"]["interpolation"] == "bicubic"
    assert info["batching"] == {"max_batch_size": 8, "batch_wait_timeout_s": 0.2}
    assert (
        info["limits"]["max_pixels"] == info["preprocessing"]["max_pixels"] == 40_000_000
    )  # serving's own
    assert (
        info["limits"]["body_timeout_s"] == BODY_TIMEOUT_S
        and info["limits"]["decode_concurrency"] == 2
        and info["limits"]["max_inflight_bytes"] == INFLIGHT_LIMIT
    )
    assert info["auth"] is None
    assert (info["precision"], info["precision_reason"]) == ("fp32", "as configured")
    schema = httpx.get(f"{url}/openapi.json", timeout=10).json()
    assert {"/v1/classify", "/v1/classify/batch", "/v1/model", "/healthz"} <= set(schema["paths"])
    assert "413" in schema["paths"]["/v1/classify"]["post"]["responses"]
    assert httpx.get(f"{url}/docs", timeout=10).status_code == 200


@pytest.mark.slow
def test_bearer_token_auth_when_configured(serve_port, weights, images):
    token = "s3cret-test-token"
    cfg = ServeConfig(
        model=SMALL, weights=weights, auth_token_env="SKRAY_TEST_SERVE_TOKEN", warmup_batches=0
    )
    deploy(
        cfg,
        "secure",
        "/secure",
        ray_actor_options={"runtime_env": {"env_vars": {"SKRAY_TEST_SERVE_TOKEN": token}}},
    )
    base = f"http://{LOOPBACK}:{serve_port}/secure"
    try:
        assert wait_ready(base)["status"] == "ok"  # probes need no token
        image = {"content": images[0].read_bytes(), "headers": {"content-type": "image/jpeg"}}
        missing = httpx.post(f"{base}/v1/classify", timeout=30, **image)
        wrong = httpx.post(
            f"{base}/v1/classify",
            timeout=30,
            content=image["content"],
            headers={**image["headers"], "authorization": "Bearer nope"},
        )
        right = httpx.post(
            f"{base}/v1/classify",
            timeout=30,
            content=image["content"],
            headers={**image["headers"], "authorization": f"Bearer {token}"},
        )
        info = httpx.get(
            f"{base}/v1/model", headers={"authorization": f"Bearer {token}"}, timeout=10
        )
    finally:
        from ray import serve

        serve.delete("secure")
    for reply in (missing, wrong):
        assert reply.status_code == 401 and reply.headers["www-authenticate"] == "Bearer"
        assert reply.json()["error"]["code"] == "unauthorized" and token not in reply.text
    assert right.status_code == 200 and info.json()["auth"] == "bearer" and token not in info.text
    assert httpx.get(f"{base}/v1/model", timeout=10).status_code == 404  # the app is gone


@pytest.mark.slow
def test_healthz_says_503_until_warmed_up_and_early_requests_wait_instead_of_failing(
    serve_port, weights, images
):
    cfg = ServeConfig(model=SMALL, weights=weights, max_batch_size=16, warmup_batches=20)
    base = f"http://{LOOPBACK}:{serve_port}/warm"
    deploy(cfg, "warm", "/warm")  # returns once the replica is constructed; warm-up runs after
    try:
        before = httpx.get(f"{base}/healthz", timeout=10)
        early = httpx.post(
            f"{base}/v1/classify",
            content=images[0].read_bytes(),
            headers={"content-type": "image/jpeg"},
            timeout=120,
        )
        after = httpx.get(f"{base}/healthz", timeout=10)
    finally:
        from ray import serve

        serve.delete("warm")
    assert before.status_code == 503 and before.json() == {"status": "warming_up"}
    assert early.status_code == 200 and early.json()["label"] in CLASSES
    assert (
        after.status_code == 200 and after.json()["status"] == "ok" and after.json()["warmup_s"] > 0
    )


@pytest.mark.slow
def test_skray_serve_deploys_a_config_file_and_stops_on_sigterm(
    ray_cluster, serve_port, weights, images, tmp_path
):
    config = yaml.safe_load((PROJECT / "configs/serve.yaml").read_text())
    config["http_options"]["port"] = serve_port
    app = config["applications"][0]
    app.update(name="cli", route_prefix="/cli")
    app["deployments"][0]["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    command = [
        sys.executable,
        "-m",
        "skray.cli",
        "serve",
        "--config",
        str(tmp_path / "serve.yaml"),
        "--weights",
        weights,
        "--set",
        "warmup_batches=0",
        "--address",
        ray_cluster.gcs_address,
    ]
    process = subprocess.Popen(
        command, env=ray_cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    base = f"http://{LOOPBACK}:{serve_port}/cli"
    try:
        wait_for(
            lambda: any("Ctrl-C stops it" in line for line in lines),
            120,
            "skray serve to say it is up",
        )
        assert any(f"at {base}/v1/classify" in line for line in lines), "".join(lines)
        reply = httpx.post(
            f"{base}/v1/classify",
            content=images[1].read_bytes(),
            headers={"content-type": "image/png"},
            timeout=30,
        )
        assert reply.status_code == 200 and reply.json()["model"] == SMALL
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    assert process.returncode == 0, "".join(lines)
    assert any("stopping cli" in line for line in lines)
    assert httpx.get(f"{base}/healthz", timeout=10).status_code == 404


def test_shipped_serve_configs_validate_with_serve_and_skray(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    launch = resolve_launch(str(PROJECT / "configs/serve.yaml"))
    assert launch.http_options == {"host": "127.0.0.1", "port": 8000}
    assert (
        launch.config.model is None
        and launch.deployment_options["autoscaling_config"]["max_replicas"] == 4
    )
    service = yaml.safe_load((PROJECT / "configs/cluster/rayservice.yaml").read_text())
    (tmp_path / "v2.yaml").write_text(service["spec"]["serveConfigV2"])
    ServeDeploySchema.parse_obj(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert resolve_launch(str(tmp_path / "v2.yaml")).config.auth_token_env == "SKRAY_SERVE_TOKEN"


@pytest.mark.parametrize(
    "args, named",
    [
        (["--set", "max_batch_size=0"], "max_batch_size"),
        (["--set", "max_batchsize=8"], "max_batchsize: unknown key"),
        (["--app", "nope"], "--app"),
        (["--set", "precision=int8", "--set", "gpus_per_replica=0"], "needs calibration"),
        (["--set", "precision=int8", "--set", "calibration=/data"], "gpus_per_replica: 0"),
    ],
)
def test_a_bad_serve_config_fails_before_anything_starts_naming_the_key(args, named, capsys):
    assert main(["serve", "--config", str(PROJECT / "configs/serve.yaml"), *args]) == 2
    assert named in capsys.readouterr().err


def test_a_configured_auth_variable_that_is_unset_is_an_error_not_an_open_door(monkeypatch):
    from skray.serve.config import bearer_token

    monkeypatch.delenv("SKRAY_NOPE", raising=False)
    with pytest.raises(ValueError, match="SKRAY_NOPE"):
        bearer_token("SKRAY_NOPE")
    assert bearer_token(None) is None
    with pytest.raises(ConfigError, match="weights"):
        resolve_launch(None, overrides=["weights=[1, 2]"])
