"""The commit path's ceiling: rows/s the driver can commit, with no model in the way.

Synthetic batches shaped like the Predictor's output (32 rows, 256-row units, four
units interleaved, the stage-figure columns included) go through ``StageTimes`` and
``UnitCommitter`` exactly as ``skray.label.job.run`` feeds them, until every part is
written. Two stores, through skray's own storage code:

* local disk (a temporary folder, each part fsynced and renamed);
* S3: the embedded moto server as is (what the server itself takes), and behind a proxy
  on 127.0.0.1 that holds every PUT (and POST) for ``--put-ms`` (50 ms: a real S3 PUT's
  latency) before passing it on.

Each store runs once with one part written at a time (the old, sequential path) and
once with ``--concurrency`` parts at once. Target (issue 12): >= 50k rows/s on S3.

    python benchmarks/commit_throughput.py [--rows 100000] [--concurrency 32] [--put-ms 50]
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import socket
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.sharedctypes import Synchronized

import numpy as np
import pyarrow as pa

from skray.dev.embedded import EmbeddedS3
from skray.io.storage import LOOPBACK
from skray.label.commit import DEFAULT_CONCURRENCY, UnitCommitter
from skray.label.job import StageTimes
from skray.label.sinks import LABEL_SCHEMA, committed_units

BATCH_ROWS, UNIT_ROWS, INTERLEAVED = 32, 256, 4
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length"}


def _serve_slow_proxy(
    port: Synchronized, upstream: str, put_s: float, writes: Synchronized
) -> None:
    host, upstream_port = upstream.removeprefix("http://").split(":")
    local = threading.local()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the S3 clients expect
        disable_nagle_algorithm = True  # no delayed-ACK stalls the real S3 does not have

        def log_message(self, *args: object) -> None:
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _forward(self) -> None:
            body = self._body()
            if self.command in ("PUT", "POST"):  # every write request (a multipart upload's too)
                with writes.get_lock():
                    writes.value += 1
                time.sleep(put_s)
            if not hasattr(local, "upstream"):
                local.upstream = http.client.HTTPConnection(host, int(upstream_port), timeout=60)
                local.upstream.connect()
                local.upstream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            headers["Content-Length"] = str(len(body))
            local.upstream.request(self.command, self.path, body=body, headers=headers)
            response = local.upstream.getresponse()
            data = response.read()
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in HOP_HEADERS:
                    self.send_header(name, value)
            length = (
                response.getheader("Content-Length", "0")
                if self.command == "HEAD"
                else str(len(data))
            )
            self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    server = ThreadingHTTPServer(
        (LOOPBACK, 0), Handler
    )  # the system picks the port; the parent reads it
    server.daemon_threads = True
    port.value = server.server_address[1]
    server.serve_forever()


class SlowPutProxy:
    """An HTTP proxy to ``upstream`` that holds each PUT (and POST) ``put_s`` seconds: S3's
    latency on loopback. A process of its own, so it never competes for the driver's GIL."""

    def __init__(self, upstream: str, put_s: float) -> None:
        context = multiprocessing.get_context("spawn")
        self.writes = context.Value("l", 0)  # write requests seen
        self._port = context.Value("l", 0)  # set by the proxy once it listens
        self._process = context.Process(
            target=_serve_slow_proxy, args=(self._port, upstream, put_s, self.writes), daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self._port.value}"

    def _accepts(self) -> bool:
        return self._port.value != 0

    def __enter__(self) -> SlowPutProxy:
        self._process.start()
        deadline = time.monotonic() + 30
        while not self._accepts():
            if time.monotonic() > deadline or not self._process.is_alive():
                raise RuntimeError(f"the proxy on {self.url} did not come up")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.terminate()
        self._process.join(10)


def predictor_batches(rows: int, seed: int = 0) -> list[pa.Table]:
    """``rows`` rows as the Predictor returns them, ``BATCH_ROWS`` a batch, units of ``UNIT_ROWS``
    arriving ``INTERLEAVED`` at a time; a unit's count rides on its last batch."""
    rng = np.random.default_rng(seed)
    batches = []
    for first in range(0, rows // UNIT_ROWS, INTERLEAVED):
        units = range(first, min(first + INTERLEAVED, rows // UNIT_ROWS))
        for start in range(0, UNIT_ROWS, BATCH_ROWS):
            for unit in units:
                batches.append(_batch(rng, unit, start, last=start + BATCH_ROWS >= UNIT_ROWS))
    return batches


def _batch(rng: np.random.Generator, unit: int, start: int, last: bool) -> pa.Table:
    n, k = BATCH_ROWS, 5
    ids = rng.integers(0, 1000, (n, k), dtype=np.int32)
    scores = np.sort(rng.random((n, k), dtype=np.float32), axis=1)[:, ::-1].copy()
    columns = {
        "key": [
            f"s3://bucket/images/{unit:07d}/{unit * UNIT_ROWS + start + i:011d}.jpg"
            for i in range(n)
        ],
        "label_id": ids[:, 0],
        "label": [f"class {i}" for i in ids[:, 0]],
        "score": scores[:, 0],
        "topk_ids": pa.FixedSizeListArray.from_arrays(ids.ravel(), k).cast(pa.list_(pa.int32())),
        "topk_scores": pa.FixedSizeListArray.from_arrays(scores.ravel(), k).cast(
            pa.list_(pa.float32())
        ),
        "model": ["skresnext50_32x4d"] * n,
        "weights_sha256": ["0" * 64] * n,
        "error": pa.nulls(n, pa.string()),
        "meta": pa.nulls(n, pa.string()),
        "low_confidence": [False] * n,
    }
    table = pa.table({f.name: pa.array(columns[f.name], f.type) for f in LABEL_SCHEMA})
    extra = {
        "unit": pa.array([f"unit{unit:07d}"] * n),
        "unit_rows": pa.array([UNIT_ROWS if last else -1] * n),
        "decode_s": rng.random(n) * 0.01,
        "model_s": rng.random(n) * 0.002,
        "wait_s": rng.random(n) * 1e-4,
    }
    for name, values in extra.items():
        table = table.append_column(name, pa.array(values))
    return table


def commit_rate(output: str, batches: list[pa.Table], concurrency: int) -> float:
    """rows/s through the driver's commit path, until the last part is written."""
    stages = StageTimes()
    start = time.perf_counter()
    with UnitCommitter(output, concurrency=concurrency) as committer:
        for batch in batches:
            stages.add(batch)
            committer.add(batch)
    elapsed = time.perf_counter() - start
    assert (
        len(committed_units(output))
        == committer.committed
        == len(batches) * BATCH_ROWS // UNIT_ROWS
    )
    return sum(b.num_rows for b in batches) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, default=100_000, help="rows per run (rounded down to whole units)"
    )
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    parser.add_argument(
        "--put-ms", type=float, default=50.0, help="latency the proxy adds to every PUT"
    )
    args = parser.parse_args()

    batches = predictor_batches(args.rows)
    rows = sum(b.num_rows for b in batches)
    settings = [
        ("sequential (1 part at a time)", 1),
        (f"concurrent ({args.concurrency} parts at once)", args.concurrency),
    ]
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["local disk"] = [
            commit_rate(os.path.join(tmp, str(c)), batches, c) for _, c in settings
        ]
    with EmbeddedS3() as s3:
        os.environ.update(s3.env())
        s3.create_bucket("bench")
        results["S3, no added latency (the server's own ceiling)"] = [
            commit_rate(f"s3://bench/direct{c}", batches, c) for _, c in settings
        ]
        with SlowPutProxy(s3.endpoint_url, args.put_ms / 1000) as proxy:
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            results[f"S3 (+{args.put_ms:g} ms per PUT)"] = [
                commit_rate(f"s3://bench/{c}", batches, c) for _, c in settings
            ]
            puts = proxy.writes.value

    print(
        f"\n{rows} rows per run, {rows // UNIT_ROWS} units of {UNIT_ROWS} rows, "
        f"batches of {BATCH_ROWS}; "
        f"S3: {puts / (2 * rows // UNIT_ROWS):.2f} write requests per part"
    )
    print(f"| store | {settings[0][0]} rows/s | {settings[1][0]} rows/s | ratio |")
    print("|---|---:|---:|---:|")
    for store, (old, new) in results.items():
        print(f"| {store} | {old:,.0f} | {new:,.0f} | {new / old:.1f}x |")
    s3_rate = results[f"S3 (+{args.put_ms:g} ms per PUT)"][1]
    print(
        f"\ntarget >= 50,000 rows/s through S3: {s3_rate:,.0f} rows/s "
        f"({'met' if s3_rate >= 50_000 else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
