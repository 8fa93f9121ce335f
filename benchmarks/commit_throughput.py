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
import os
import tempfile
import time

import numpy as np
import pyarrow as pa

from skray.dev.embedded import EmbeddedS3
from skray.dev.s3proxy import FaultyS3Proxy
from skray.label.commit import DEFAULT_CONCURRENCY, UnitCommitter
from skray.label.progress import StageTimes
from skray.label.sinks import LABEL_SCHEMA, committed_units

BATCH_ROWS, UNIT_ROWS, INTERLEAVED = 32, 256, 4


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
        with FaultyS3Proxy(s3.endpoint_url, args.put_ms / 1000, ("PUT", "POST")) as proxy:
            os.environ["AWS_ENDPOINT_URL"] = proxy.url
            results[f"S3 (+{args.put_ms:g} ms per PUT)"] = [
                commit_rate(f"s3://bench/{c}", batches, c) for _, c in settings
            ]
            puts = proxy.counts()["PUT"] + proxy.counts()["POST"]

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
