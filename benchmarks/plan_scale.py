"""Planning a rerun at scale: time and peak driver memory for N listed keys, 90% committed.

For each size, the committed 90% are written as real output parts (the label schema,
``files_per_unit`` keys each) into a temporary folder; then a fresh process streams a
generated sorted listing (tables of 64k keys, as ``listing_tables`` gives them: never the
whole listing at once) into ``skray.label.plan.make_plan`` against that output. Printed per
size: parts, seconds to plan, the process's own peak RSS (``VmHWM``), the RSS of Python and
pyarrow alone, and what the plan itself holds (its pending units, as Arrow). Targets
(issue 22): 100M keys under 1 GiB, 10M under 300 MiB, time linear in the keys.

    python benchmarks/plan_scale.py                      # 1M and 10M
    python benchmarks/plan_scale.py --sizes 100000000    # 100M: ~350k parts to write first
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from skray.core.hardware import cpu_summary
from skray.io.sources.listing import CHUNK_KEYS
from skray.io.storage import join
from skray.label.sinks import LABEL_SCHEMA, part_name

PREFIX = "s3://bucket/images/"


CHUNK = CHUNK_KEYS  # keys per listing table, as listing_tables streams them


def keys_between(start: int, stop: int) -> pa.Array:
    """Keys ``start`` to ``stop`` of a sorted listing like
    ``s3://bucket/images/0001234/00012345678.jpg`` (fixed width, so sorted)."""
    ids = pc.utf8_lpad(pa.array(np.arange(start, stop)).cast(pa.string()), 11, "0")
    folders = pc.utf8_slice_codeunits(ids, 0, 7)
    return pc.binary_join_element_wise(PREFIX, folders, "/", ids, ".jpg", "")


def committed(start: int, stop: int) -> pa.Array:
    """Which of keys ``start`` to ``stop`` are committed: 90%, the same on every call."""
    return pa.array(np.random.default_rng(start).random(stop - start) < 0.9)


def listing_tables(n: int) -> Iterator[pa.Table]:
    for start in range(0, n, CHUNK):
        keys = keys_between(start, min(n, start + CHUNK))
        yield pa.table({"key": keys, "size": pa.array(np.full(len(keys), 50_000))})


def write_parts(output: str, n: int, files_per_unit: int) -> int:
    """The committed keys as label parts; every column but ``key`` is null (only its size
    matters)."""

    def write(item: tuple[str, pa.Array]) -> None:
        name, chunk = item
        columns = [chunk if f.name == "key" else pa.nulls(len(chunk), f.type) for f in LABEL_SCHEMA]
        pq.write_table(
            pa.Table.from_arrays(columns, schema=LABEL_SCHEMA),
            join(output, part_name(name)),
            compression="zstd",
        )

    def parts() -> Iterator[tuple[str, pa.Array]]:
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            keys = keys_between(start, stop).filter(committed(start, stop))
            for i in range(0, len(keys), files_per_unit):
                yield f"bench{start + i:012d}", keys[i : i + files_per_unit]

    written = 0
    with ThreadPoolExecutor(8) as pool:
        for _ in pool.map(write, parts()):
            written += 1
    return written


def peak_rss_mib() -> float:
    """This process's peak RSS since it started (``VmHWM``): ``ru_maxrss`` would carry the
    parent's peak across ``exec``."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(n: int, output: str, files_per_unit: int) -> dict:
    """Run in a fresh process: build the listing, plan, report."""
    from skray.label.plan import make_plan

    base = rss_mib()
    started = time.perf_counter()
    result = make_plan(listing_tables(n), output, "images", files_per_unit)
    seconds = time.perf_counter() - started
    peak = peak_rss_mib()
    return {
        "keys": n,
        "pending": result.pending_rows,
        "committed": result.committed_rows,
        "plan_s": round(seconds, 1),
        "peak_mib": round(peak),
        "base_mib": round(base),
        "plan_mib": round(result.todo.nbytes / 2**20),
    }


def run_size(n: int, files_per_unit: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="skray-plan-") as output:
        started = time.perf_counter()
        parts = write_parts(output, n, files_per_unit)
        setup_s = time.perf_counter() - started
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
    print(cpu_summary())
    print(
        f"{'listed keys':>12} {'committed':>11} {'to do':>10} {'parts':>8} {'setup s':>8} "
        f"{'plan s':>7} {'peak MiB':>9} {'base MiB':>9} {'plan MiB':>9}"
    )
    for n in args.sizes:
        r = run_size(n, args.files_per_unit)
        assert r["pending"] + r["committed"] == n, r
        print(
            f"{n:>12,} {r['committed']:>11,} {r['pending']:>10,} {r['parts']:>8,} "
            f"{r['setup_s']:>8} {r['plan_s']:>7} {r['peak_mib']:>9,} {r['base_mib']:>9,} "
            f"{r['plan_mib']:>9,}",
            flush=True,
        )


if __name__ == "__main__":
    main()
