"""Weights: resolving and fetching (local, https, s3), verifying, reading, loading
all-or-nothing, saving."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import logging
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import safetensors
import torch

from skray.core.classes import default_class_names
from skray.core.model import create_model
from skray.io import storage
from skray.io.storage import redact_uri
from skray.weights.files import WeightsError, file_sha256, read_state_dict, save_weights
from skray.weights.resolver import PinnedWeights, fetch, load_model, load_weights, pin_weights

pytestmark = pytest.mark.timeout(60)

ARCH = "skresnext14_8x4d_half"


def small_model(num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    """A random small model whose BatchNorm running stats are not the defaults."""
    torch.manual_seed(seed)
    model = create_model(ARCH, num_classes=num_classes)
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    return model.eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    torch.manual_seed(123)
    with torch.no_grad():
        return model.eval()(torch.randn(1, 3, 64, 64))


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def named_by_hash(directory: Path, stem: str, data: bytes, suffix: str = ".safetensors") -> Path:
    """A file named timm-style, with the first 8 hex digits of its sha256."""
    path = directory / f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}{suffix}"
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, str]:
    """A small 10-class model, saved once with class names."""
    model = small_model()
    path = tmp_path_factory.mktemp("saved") / "model.safetensors"
    digest = save_weights(model, path, architecture=ARCH, class_names=list("abcdefghij"))
    return model, path, digest


# --- save / load -------------------------------------------------------------


def test_round_trip_gives_identical_logits_and_returns_the_metadata(saved) -> None:
    model, path, digest = saved
    restored = create_model(ARCH, num_classes=10)

    loaded = load_weights(restored, str(path))

    assert torch.equal(logits(restored), logits(model))
    assert loaded.class_names == list("abcdefghij")
    assert loaded.architecture == ARCH
    assert loaded.sha256 == digest == file_sha256(path)
    assert loaded.source == str(path)
    assert not loaded.head_reset


def test_load_model_infers_architecture_and_classes_from_the_file(saved) -> None:
    model, path, _ = saved

    restored, loaded = load_model(weights=path)

    assert restored.spec == model.spec
    assert restored.num_classes == 10
    assert torch.equal(logits(restored), logits(model))
    assert loaded.architecture == ARCH


def test_load_model_without_weights_is_random_init() -> None:
    model, loaded = load_model(ARCH, num_classes=3)
    assert model.num_classes == 3 and loaded is None


def test_pretrained_needs_published_weights() -> None:
    with pytest.raises(WeightsError, match="has no published weights"):
        load_model(ARCH, "pretrained")


def test_save_refuses_class_names_that_do_not_fit_the_head(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="3 class names for a 10-class head"):
        save_weights(small_model(), path, architecture=ARCH, class_names=list("abc"))
    assert list(tmp_path.iterdir()) == []


def test_saved_file_is_written_atomically_without_leftovers(saved, tmp_path: Path) -> None:
    model, _, _ = saved
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old")

    digest = save_weights(model, path, architecture=ARCH)

    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
    assert digest == file_sha256(path)
    with safetensors.safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "skray/1" and metadata["num_classes"] == "10"
    assert json.loads(metadata["class_names"]) == default_class_names(10)


# --- .pth variants ------------------------------------------------------------


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: sd, id="raw"),
        pytest.param(lambda sd: {"state_dict": sd, "epoch": 3}, id="state_dict"),
        pytest.param(lambda sd: {"model": sd, "optimizer": {}}, id="model"),
        pytest.param(lambda sd: {"state_dict_ema": sd}, id="state_dict_ema"),
        pytest.param(lambda sd: {f"module.{k}": v for k, v in sd.items()}, id="module_prefix"),
    ],
)
def test_pth_checkpoint_layouts_all_load(saved, tmp_path: Path, wrap) -> None:
    model, _, _ = saved
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(model.state_dict()), path)
    restored = create_model(ARCH, num_classes=10)

    loaded = load_weights(restored, str(path))

    assert torch.equal(logits(restored), logits(model))
    assert loaded.class_names == default_class_names(10)
    assert loaded.architecture is None


def test_nested_state_dict_is_preferred_over_the_ema_copy(saved, tmp_path: Path) -> None:
    model, _, _ = saved
    ema = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict_ema": ema, "state_dict": model.state_dict()}, path)

    state, _ = read_state_dict(path)

    assert_same_params(state, model.state_dict())


def test_file_without_known_extension_is_sniffed(saved, tmp_path: Path) -> None:
    model, path, _ = saved
    as_torch, as_safetensors = tmp_path / "weights.bin", tmp_path / "weights.data"
    torch.save(model.state_dict(), as_torch)
    as_safetensors.write_bytes(path.read_bytes())

    for file in (as_torch, as_safetensors):
        assert_same_params(read_state_dict(file)[0], model.state_dict())


# --- refused files: the model is never modified --------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_random_bytes_are_refused(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(random.Random(0).randbytes(4096))
    model = small_model()
    before = params(model)

    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_weights(model, str(path))
    assert_same_params(params(model), before)


def test_truncated_pth_is_refused(saved, tmp_path: Path) -> None:
    model, _, _ = saved
    path = tmp_path / "ckpt.pth"
    torch.save(model.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with pytest.raises(WeightsError, match="cannot read weights file"):
        load_weights(create_model(ARCH, num_classes=10), str(path))


class NotATensor:
    """Stands for any object a malicious pickle could construct."""


def test_pickled_objects_are_refused_because_loading_is_weights_only(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1), "payload": NotATensor()}, path)

    with pytest.raises(WeightsError, match="objects other than tensors.*NotATensor"):
        read_state_dict(path)


def test_mismatched_checkpoint_lists_every_difference_and_loads_nothing(saved, tmp_path) -> None:
    source, _, _ = saved
    state = dict(source.state_dict())
    del state["conv1.weight"]
    state["layer1.0.renamed.weight"] = state.pop("layer1.0.conv1.conv.weight")
    state["bn1.weight"] = torch.ones(7)
    path = tmp_path / "other.pth"
    torch.save(state, path)
    model = small_model(seed=1)
    before = params(model)

    with pytest.raises(WeightsError) as info:
        load_weights(model, str(path))

    message = str(info.value)
    assert "missing keys (2)" in message
    assert "conv1.weight" in message and "layer1.0.conv1.conv.weight" in message
    assert "unexpected keys (1)" in message and "layer1.0.renamed.weight" in message
    assert "mismatched shapes (1)" in message
    assert "bn1.weight: checkpoint (7,) vs model (32,)" in message
    assert_same_params(params(model), before)


def test_long_difference_lists_are_cut_with_a_count(saved, tmp_path: Path) -> None:
    source, _, _ = saved
    path = tmp_path / "prefixed.pth"
    torch.save({f"backbone.{k}": v for k, v in source.state_dict().items()}, path)

    ten_then_count = r"unexpected keys \(\d+\):(\n.*){10}\n    \.\.\. and \d+ more"
    with pytest.raises(WeightsError, match=ten_then_count):
        load_weights(create_model(ARCH, num_classes=10), str(path))


def test_other_head_size_loads_the_backbone_and_keeps_a_fresh_head(saved, caplog) -> None:
    source, path, _ = saved
    model = create_model(ARCH, num_classes=5)
    fresh_head = params(model.fc)

    with caplog.at_level(logging.WARNING, logger="skray.weights.files"):
        loaded = load_weights(model, str(path))

    assert loaded.head_reset
    assert loaded.class_names == default_class_names(5)
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    loaded_backbone = {k: v for k, v in params(model).items() if not k.startswith("fc.")}
    assert_same_params(loaded_backbone, backbone)
    assert_same_params(params(model.fc), fresh_head)
    assert "checkpoint head has 10 classes, model has 5" in caplog.text


def test_load_model_with_other_num_classes_is_fine_tuning(saved) -> None:
    _, path, _ = saved
    model, loaded = load_model(weights=str(path), num_classes=4)
    assert model.num_classes == 4 and loaded.head_reset


def test_missing_local_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="weights file not found"):
        fetch(str(tmp_path / "nope.pth"))


def test_local_file_with_wrong_explicit_hash_is_refused(saved) -> None:
    _, path, _ = saved
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        fetch(str(path), sha256="0" * 64)


# --- pinned weights ----------------------------------------------------------------


def test_pinned_path_keeps_the_uri_and_the_sha256_of_its_bytes(saved) -> None:
    _, path, digest = saved
    pinned = pin_weights(str(path))
    assert pinned == PinnedWeights(str(path), str(path), digest)
    assert PinnedWeights.from_dict(pinned.to_dict()) == pinned
    assert pin_weights(None) is None


def test_pinned_weights_replaced_behind_the_same_path_are_refused_naming_both_hashes(
    saved, tmp_path: Path
) -> None:
    _, path, digest = saved
    target = tmp_path / "model.safetensors"
    target.write_bytes(path.read_bytes())
    pinned = pin_weights(target)
    save_weights(small_model(seed=1), target, architecture=ARCH)  # same path, other model
    replaced = file_sha256(target)

    with pytest.raises(WeightsError, match=f"sha256 mismatch .*expected {digest}, got {replaced}"):
        load_model(weights=pinned)
    model = create_model(ARCH, num_classes=10)
    before = params(model)
    with pytest.raises(WeightsError, match=f"expected {digest}, got {replaced}"):
        load_weights(model, pinned)
    assert_same_params(params(model), before)


def test_pinning_pretrained_of_a_model_without_published_weights_fails_at_once() -> None:
    with pytest.raises(WeightsError, match="has no published weights"):
        pin_weights("pretrained", ARCH)


def test_pinned_weights_never_show_credentials(saved) -> None:
    _, path, digest = saved
    url = "https://user:s3cretpassw0rd@host/m.safetensors?X-Amz-Signature=abc"
    pinned = PinnedWeights(url, url, digest)
    assert "s3cretpassw0rd" not in repr(pinned) and "abc" not in repr(pinned)
    assert pinned.redacted()["source"] == "https://***@host/m.safetensors?***"


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("postgresql://user:pass@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("postgresql://user:p@ss@db/mlflow", "postgresql://***@db/mlflow"),
        ("https://token@mlflow.example.com/", "https://***@mlflow.example.com/"),
        ("user:s3cret@host:/weights.pth", "***@host:/weights.pth"),
        ("git@github.com:org/repo", "***@github.com:org/repo"),
        ("https://h/x.parquet?X-Amz-Signature=abc#f", "https://h/x.parquet?***#***"),
        ("https://u:p/ss@host/x", "https://***@host/x"),
        ("s3://AKIAEXAMPLE:se/cr+et#1@bucket/in", "s3://***@bucket/in"),
        ("https://host/x#token=abc", "https://host/x#***"),
        ("s3://bucket/shard.tar#sample/0001", "s3://bucket/shard.tar#sample/0001"),
        ("http://h/m.pth?token=abc&v=1", "http://h/m.pth?***"),
        ("postgresql://db/mlflow?password=abc", "postgresql://db/mlflow?***"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("models:/skray@best", "models:/skray@best"),
        ("s3://bucket/key@v2.safetensors", "s3://bucket/key@v2.safetensors"),
        ("/tmp/model.safetensors", "/tmp/model.safetensors"),
    ],
)
def test_redact_uri_masks_user_info_and_query(uri: str, shown: str) -> None:
    assert redact_uri(uri) == shown


# --- https: downloaded once, verified, atomic -----------------------------------


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory, counts GETs, and cuts the body of files listed in ``truncate``."""

    requests: list[str]
    truncate: set[str]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        if self.path not in self.truncate:
            return super().do_GET()
        body = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.close_connection = True

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_dir(tmp_path: Path, monkeypatch) -> Iterator[tuple[Path, str, type[CountingHandler]]]:
    """(served directory, base URL, handler class with its request log)."""
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    served = tmp_path / "served"
    served.mkdir()
    handler = type("Handler", (CountingHandler,), {"requests": [], "truncate": set()})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(served))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}", handler
    server.shutdown()
    server.server_close()


def test_https_weights_are_downloaded_once_then_read_from_cache(saved, http_dir, tmp_path) -> None:
    _, path, _ = saved
    served, base, handler = http_dir
    remote = named_by_hash(served, "small", path.read_bytes())
    cache = tmp_path / "cache"
    url = f"{base}/{remote.name}"

    first = fetch(url, cache_dir=cache)
    second = fetch(url, cache_dir=cache)
    loaded = load_weights(create_model(ARCH, num_classes=10), url, cache_dir=cache)

    assert first == second and first.parent == cache and first.name.endswith(remote.name)
    assert handler.requests == [f"/{remote.name}"]
    assert list(cache.iterdir()) == [first]
    assert loaded.source == url and loaded.sha256 == file_sha256(path)


def test_same_file_name_at_two_uris_gets_two_cache_entries(saved, http_dir, tmp_path) -> None:
    _, path, digest = saved
    served, base, _ = http_dir
    for folder, data in (("a", path.read_bytes()), ("b", b"other bytes, same name")):
        (served / folder).mkdir()
        (served / folder / "model.safetensors").write_bytes(data)
    cache = tmp_path / "cache"

    first = fetch(f"{base}/a/model.safetensors", sha256=digest, cache_dir=cache)
    second = fetch(f"{base}/b/model.safetensors", cache_dir=cache)

    assert first != second and len(list(cache.iterdir())) == 2
    assert fetch(f"{base}/a/model.safetensors", sha256=digest, cache_dir=cache) == first
    assert file_sha256(first) == digest


def test_file_name_claiming_another_hash_is_refused_and_nothing_cached(http_dir, tmp_path) -> None:
    served, base, _ = http_dir
    (served / "small-0123abcd.safetensors").write_bytes(b"not what the name says")
    cache = tmp_path / "cache"

    with pytest.raises(WeightsError, match="mismatch .* expected 0123abcd, got [0-9a-f]{64}"):
        fetch(f"{base}/small-0123abcd.safetensors", cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_wrong_explicit_sha256_is_refused_and_nothing_cached(saved, http_dir, tmp_path) -> None:
    _, path, digest = saved
    served, base, _ = http_dir
    (served / "model.safetensors").write_bytes(path.read_bytes())
    cache = tmp_path / "cache"
    wrong = digest[::-1]

    with pytest.raises(WeightsError, match=f"expected {wrong}, got {digest}"):
        fetch(f"{base}/model.safetensors", sha256=wrong, cache_dir=cache)
    assert list(cache.iterdir()) == []
    assert fetch(f"{base}/model.safetensors", sha256=digest, cache_dir=cache).is_file()


def test_truncated_download_is_refused_and_nothing_cached(saved, http_dir, tmp_path) -> None:
    _, path, _ = saved
    served, base, handler = http_dir
    remote = named_by_hash(served, "small", path.read_bytes())
    handler.truncate.add(f"/{remote.name}")
    cache = tmp_path / "cache"

    with pytest.raises(WeightsError, match="truncated download"):
        fetch(f"{base}/{remote.name}", cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_http_error_is_a_weights_error(http_dir, tmp_path) -> None:
    _, base, _ = http_dir
    with pytest.raises(WeightsError, match="cannot download .*404"):
        fetch(f"{base}/absent-0123abcd.pth", cache_dir=tmp_path)


# --- s3 ----------------------------------------------------------------------


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch, request) -> str:
    """A fresh bucket on the moto server, with the AWS environment pointing at it."""
    env = {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    bucket = request.node.name.lower().replace("_", "-")[:63]
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    return bucket


def test_weights_load_from_s3(saved, s3_bucket: str, s3_server: str, tmp_path: Path) -> None:
    model, path, digest = saved
    boto3.client("s3", endpoint_url=s3_server).put_object(
        Bucket=s3_bucket, Key="runs/x.safetensors", Body=path.read_bytes()
    )
    restored = create_model(ARCH, num_classes=10)

    loaded = load_weights(restored, f"s3://{s3_bucket}/runs/x.safetensors", cache_dir=tmp_path)

    assert torch.equal(logits(restored), logits(model))
    assert loaded.sha256 == digest and loaded.class_names == list("abcdefghij")


def test_missing_s3_object_is_refused(s3_bucket: str, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="weights file not found"):
        fetch(f"s3://{s3_bucket}/absent.safetensors", cache_dir=tmp_path)


def test_save_weights_to_s3_round_trips(saved, s3_bucket: str, tmp_path: Path) -> None:
    model, _, _ = saved
    uri = f"s3://{s3_bucket}/out/model.safetensors"

    digest = save_weights(model, uri, architecture=ARCH)
    restored, loaded = load_model(weights=uri, sha256=digest)

    assert torch.equal(logits(restored), logits(model))
    assert loaded.sha256 == digest


def test_storage_round_trips_bytes_on_s3_and_locally(s3_bucket: str, tmp_path: Path) -> None:
    uris = (f"s3://{s3_bucket}/a/b.bin", str(tmp_path / "a" / "b.bin"), f"file://{tmp_path}/c.bin")
    for uri in uris:
        assert not storage.exists(uri)
        storage.write_bytes_atomic(uri, b"hello")
        storage.write_bytes_atomic(uri, b"world")
        assert storage.exists(uri)
        assert storage.read_bytes(uri) == b"world"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b.bin", "c.bin"]


def test_s3_options_come_from_the_standard_aws_environment(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://generic:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")

    options = storage.s3_options_from_env({"region": "us-west-2"})

    assert options["endpoint_override"] == "127.0.0.1:9000" and options["scheme"] == "http"
    assert options["access_key"] == "key" and options["secret_key"] == "secret"
    assert options["region"] == "us-west-2"
    assert "session_token" not in options
    fs, path = storage.filesystem_for("s3://bucket/key.bin")
    assert path == "bucket/key.bin"
    assert fs is storage.filesystem_for("s3://bucket/other")[0]
    assert "secret" not in repr(fs)


def test_is_remote() -> None:
    assert storage.is_remote("s3://b/k") and storage.is_remote("https://h/x.pth")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp/x")
