"""The test toolkit's faulty S3 proxy: it counts what a client asks, and fails on command."""

from __future__ import annotations

import time

import pytest

from skray.dev.s3proxy import FaultyS3Proxy
from skray.io.storage import read_bytes, write_bytes_atomic

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def proxy(faulty_s3: FaultyS3Proxy) -> FaultyS3Proxy:
    return faulty_s3


def test_requests_pass_through_and_are_counted_by_kind(proxy, bucket):
    write_bytes_atomic(f"{bucket}/a.bin", b"x" * 1000)
    proxy.reset_counts()
    assert read_bytes(f"{bucket}/a.bin") == b"x" * 1000
    counts = proxy.counts()
    assert counts["GET"] + counts["GET_RANGE"] >= 1
    assert counts["PUT"] == 0


def test_counts_and_bytes_can_be_limited_to_some_keys(proxy, bucket):
    write_bytes_atomic(f"{bucket}/in/a.bin", b"x" * 1000)
    write_bytes_atomic(f"{bucket}/out/b.bin", b"y" * 10)
    proxy.reset_counts()
    proxy.counted_keys = "/in/"
    read_bytes(f"{bucket}/in/a.bin")
    read_bytes(f"{bucket}/out/b.bin")
    assert proxy.counts()["GET"] == 1 and proxy.bytes_sent() == 1000


def test_an_outage_answers_503_until_healed(proxy, bucket):
    write_bytes_atomic(f"{bucket}/a.bin", b"abc")
    proxy.outage = 1
    assert proxy.outage == 1
    with pytest.raises(Exception, match="ServiceUnavailable"):
        read_bytes(f"{bucket}/a.bin")
    proxy.heal()
    assert read_bytes(f"{bucket}/a.bin") == b"abc"


def test_a_fault_can_be_limited_to_some_keys(proxy, bucket):
    write_bytes_atomic(f"{bucket}/_lease.json", b"{}")
    write_bytes_atomic(f"{bucket}/part.bin", b"data")
    proxy.only_keys = "_lease.json"
    proxy.forbidden = 1
    with pytest.raises(Exception, match="ExpiredToken"):
        read_bytes(f"{bucket}/_lease.json")
    assert read_bytes(f"{bucket}/part.bin") == b"data"


def test_a_cut_body_fails_the_read_and_latency_applies_to_the_delayed_kinds(embedded_s3, bucket):
    write_bytes_atomic(f"{bucket}/a.bin", b"y" * 100_000)
    with FaultyS3Proxy(embedded_s3.endpoint_url, latency_s=5.0, delayed=("PUT",)) as proxy:
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ENDPOINT_URL", proxy.url)
            started = time.monotonic()
            assert read_bytes(f"{bucket}/a.bin") == b"y" * 100_000
            assert time.monotonic() - started < 5.0  # a GET is not held the PUTs' 5 s
            proxy.cut_rate = 1.0
            with pytest.raises(Exception):
                read_bytes(f"{bucket}/a.bin")
