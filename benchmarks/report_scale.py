"""The report's memory stays flat as the output grows: peak RSS and time at 1M and 10M rows.

A synthetic labeling output (the real label schema, 1000 labels, 1% failures, 10k-row
parts) is written once per size: 16 distinct parts, hard-linked as often as the size
needs (the report reads every part in full either way). Keys point at a handful of real
photos in a Parquet file, so the galleries decode real thumbnails. Each measurement runs
in a fresh process and prints its peak RSS (``ru_maxrss``), beside the same process's
RSS after imports and a plain Arrow load of the same four columns for contrast.

    .venv/bin/python benchmarks/report_scale.py [--rows 1000000 10000000] [--dir /tmp/report-scale]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

PART_ROWS = 10_000
DISTINCT_PARTS = 16
LABELS = 1000
PHOTOS = 8


def _part(rng: np.random.Generator, table: str) -> pa.Table:
    from skray.label.sinks import LABEL_SCHEMA

    n = PART_ROWS
    failed = rng.random(n) < 0.01
    label_ids = rng.integers(0, LABELS, n).astype(np.int32)
    names = pa.array([f"class {i:03d}" for i in range(LABELS)])
    scores = rng.beta(5, 2, n).astype(np.float32)
    topk = rng.integers(0, LABELS, (n, 5)).astype(np.int32).ravel()
    offsets = pa.array(np.arange(0, 5 * n + 1, 5, dtype=np.int32))
    keys = pa.array([f"{table}#{i % PHOTOS}" for i in range(n)])
    reasons = np.array(["not_an_image: x", "truncated: y", "too_large: z"])
    errors = pa.array(np.where(failed, reasons[rng.integers(0, 3, n)], None).tolist(), pa.string())
    ok = pa.array(~failed)
    columns = {
        "key": keys,
        "label_id": pa.array(np.where(failed, None, label_ids).tolist(), pa.int32()),
        "label": pa.compute.if_else(
            ok, names.take(pa.array(label_ids)), pa.scalar(None, pa.string())
        ),
        "score": pa.compute.if_else(ok, pa.array(scores), pa.scalar(None, pa.float32())),
        "topk_ids": pa.ListArray.from_arrays(offsets, pa.array(topk)),
        "topk_scores": pa.ListArray.from_arrays(
            offsets, pa.array(rng.random(5 * n).astype(np.float32))
        ),
        "model": pa.array(["skresnext50_32x4d"] * n),
        "weights_sha256": pa.array(["ab" * 32] * n),
        "error": errors,
        "meta": pa.array([None] * n, pa.string()),
        "low_confidence": pa.compute.if_else(ok, False, pa.scalar(None, pa.bool_())),
    }
    return pa.table(columns).select(LABEL_SCHEMA.names).cast(LABEL_SCHEMA)


def write_output(root: str, rows: int) -> str:
    """The synthetic output for ``rows`` rows under ``root`` (sources under ``root/src``)."""
    import io

    from skray.dev.testing import photo_corpus
    from skray.io.storage import write_json
    from skray.label.sinks import MANIFEST, part_name

    output = os.path.join(root, f"labels-{rows}")
    if os.path.exists(os.path.join(output, MANIFEST)):
        return output
    table = os.path.join(root, "src", "photos.parquet")
    if not os.path.exists(table):
        os.makedirs(os.path.dirname(table), exist_ok=True)
        pq.write_table(
            pa.table({"image": [data for _, data in photo_corpus(PHOTOS, png_every=0)]}), table
        )
    os.makedirs(output, exist_ok=True)
    rng = np.random.default_rng(0)
    distinct = []
    for i in range(DISTINCT_PARTS):
        path = os.path.join(output, part_name(f"{i:06d}"))
        buffer = io.BytesIO()
        pq.write_table(_part(rng, table), buffer, compression="zstd")
        with open(path, "wb") as f:
            f.write(buffer.getvalue())
        distinct.append(path)
    for i in range(DISTINCT_PARTS, rows // PART_ROWS):
        os.link(distinct[i % DISTINCT_PARTS], os.path.join(output, part_name(f"{i:06d}")))
    write_json(
        os.path.join(output, MANIFEST),
        {
            "model": "skresnext50_32x4d",
            "random_weights": False,
            "timings": {"img_per_s": 0.0},
            "config": {"format": "auto"},
        },
    )
    return output


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(kind: str, output: str) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    from skray.report import page as report  # its imports (torch, matplotlib) are the baseline

    imported = _peak_mib()
    start = time.perf_counter()
    if kind == "report":
        report.write_report(output)
    else:
        import pyarrow.dataset as pads

        from skray.label.sinks import part_paths

        fs, paths = part_paths(output)
        pads.dataset(paths, filesystem=fs, format="parquet").to_table(
            columns=["key", "label", "score", "error"]
        )
    print(
        json.dumps(
            {
                "kind": kind,
                "imports_mib": imported,
                "peak_mib": _peak_mib(),
                "seconds": time.perf_counter() - start,
            }
        ),
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--dir", default="/tmp/report-scale")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic outputs")
    parser.add_argument("--measure", nargs=2, metavar=("KIND", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure)
        return
    results = []
    for rows in args.rows:
        start = time.perf_counter()
        output = write_output(args.dir, rows)
        print(
            f"[report_scale] {rows:,} rows written in {time.perf_counter() - start:.1f}s",
            flush=True,
        )
        for kind in ("report", "arrow_load"):
            done = subprocess.run(
                [sys.executable, __file__, "--measure", kind, output],
                check=True,
                capture_output=True,
                text=True,
            )
            results.append({"rows": rows, **json.loads(done.stdout.strip().splitlines()[-1])})
    print(
        f"\n{'rows':>12} {'what':<12} {'imports MiB':>12} {'peak MiB':>9} {'above imports':>14} "
        f"{'seconds':>8} {'rows/s':>10}"
    )
    for r in results:
        print(
            f"{r['rows']:>12,} {r['kind']:<12} {r['imports_mib']:>12.0f} {r['peak_mib']:>9.0f} "
            f"{r['peak_mib'] - r['imports_mib']:>14.0f} {r['seconds']:>8.1f} "
            f"{r['rows'] / r['seconds']:>10,.0f}"
        )
    reports = [r for r in results if r["kind"] == "report"]
    if len(reports) > 1:
        low, high = reports[0], reports[-1]
        low_above, high_above = (r["peak_mib"] - r["imports_mib"] for r in (low, high))
        print(
            f"\nreport: {high['rows'] / low['rows']:.0f}x the rows -> peak above imports "
            f"{high_above / max(low_above, 1):.2f}x, "
            f"time {high['seconds'] / low['seconds']:.1f}x"
        )
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
