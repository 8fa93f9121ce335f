"""Planning a rerun at scale: time and peak driver memory for N listed keys, 90% committed.

For each size, the committed 90% are written as real output parts (the label schema,
``files_per_unit`` keys each) into a temporary folder; then a fresh process builds
the listing (an Arrow array, as a streamed listing would be held) and runs
``skray.label.plan.make_plan`` against that output. Printed per size: parts, seconds to plan,
the process's peak RSS, what the listing alone takes, and the peak over the listing.
Target (issue 10): 10M keys under 2 GiB.

    python benchmarks/plan_scale.py                 # 1M and 10M
    python benchmarks/plan_scale.py --sizes 100000  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from skray.io.storage import join
from skray.label.sinks import LABEL_SCHEMA, part_name

PREFIX = "s3://bucket/images/"


def listing(n: int) -> pa.Array:
    """``n`` sorted keys like ``s3://bucket/images/0001234/00012345678.jpg`` (fixed width, so
    sorted)."""
    ids = pc.utf8_lpad(pa.array(np.arange(n)).cast(pa.string()), 11, "0")
    folders = pc.utf8_slice_codeunits(ids, 0, 7)
    return pc.binary_join_element_wise(PREFIX, folders, "/", ids, ".jpg", "")


def committed_mask(n: int) -> np.ndarray:
    return np.random.default_rng(0).random(n) < 0.9


def write_parts(output: str, keys: pa.Array, files_per_unit: int) -> int:
    """The committed keys as label parts; every column but ``key`` is null (only its size
    matters)."""

    def write(start: int) -> None:
        chunk = keys[start : start + files_per_unit]
        columns = [chunk if f.name == "key" else pa.nulls(len(chunk), f.type) for f in LABEL_SCHEMA]
        pq.write_table(
            pa.Table.from_arrays(columns, schema=LABEL_SCHEMA),
            join(output, part_name(f"bench{start:012d}")),
            compression="zstd",
        )

    starts = range(0, len(keys), files_per_unit)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, starts))
    return len(starts)


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(n: int, output: str, files_per_unit: int) -> dict:
    """Run in a fresh process: build the listing, plan, report."""
    from skray.label.plan import make_plan

    before = rss_mib()
    keys = listing(n)
    with_listing = rss_mib()
    started = time.perf_counter()
    result = make_plan(keys, output, "images", files_per_unit)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "keys": n,
        "pending": sum(u.rows for u in result.units),
        "committed": result.committed_rows,
        "plan_s": round(seconds, 1),
        "peak_mib": round(peak),
        "listing_mib": round(with_listing - before),
        "over_listing_mib": round(peak - with_listing),
    }


def run_size(n: int, files_per_unit: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="skray-plan-") as output:
        keys = listing(n)
        started = time.perf_counter()
        parts = write_parts(output, keys.filter(pa.array(committed_mask(n))), files_per_unit)
        setup_s = time.perf_counter() - started
        del keys
        child = subprocess.run(
            [sys.executable, __file__, "--child", str(n), output, str(files_per_unit)],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(child.stdout.strip().splitlines()[-1])
        return {**row, "parts": parts, "setup_s": round(setup_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--files-per-unit", type=int, default=256)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        n, output, fpu = args.child
        print(json.dumps(measure(int(n), output, int(fpu))))
        return
    print(
        f"{'listed keys':>12} {'committed':>10} {'to do':>9} {'parts':>7} {'plan s':>7} "
        f"{'peak MiB':>9} {'listing MiB':>12} {'peak/listing':>13}"
    )
    for n in args.sizes:
        r = run_size(n, args.files_per_unit)
        assert r["pending"] + r["committed"] == n, r
        print(
            f"{n:>12,} {r['committed']:>10,} {r['pending']:>9,} {r['parts']:>7,} {r['plan_s']:>7} "
            f"{r['peak_mib']:>9,} {r['listing_mib']:>12,} "
            f"{r['peak_mib'] / r['listing_mib']:>13.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
