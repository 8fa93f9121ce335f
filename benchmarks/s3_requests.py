"""S3 requests and speed of labeling, beside the same input on local disk.

Loose JPEGs and WebDataset shards are labeled by the real job twice in one run: from local
disk, and from the embedded S3 server through the toolkit's proxy, which counts the
requests for input keys by kind (the output's own requests are left out) and delays every
request by ``--latency-ms`` (real S3's first-byte latency). Printed: requests per input
object against the targets (loose images <= 1.05; a shard <= 1 + ceil(size / buffer) + 1),
bytes read, and img/s of each whole run (start-up included, alike on both sides) with the
S3 / local-disk ratio (target for shards >= 0.9). The job's report reads a sample of the
input again for its thumbnails: those reads are measured apart, by writing the report alone.

Listing is measured apart, through the same proxy: ``--listed-keys`` objects spread over
``--sub-prefixes`` folders, listed by ``listing_tables`` one sub-prefix at a time (one
sequential LIST, as before) and with the default sub-prefixes in flight. Printed: LIST
requests, seconds, keys/s and the speed-up.

    python benchmarks/s3_requests.py [--model skresnext50_32x4d] [--images 1000] [--shards 8]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import ray

from skray.core.hardware import cpu_summary
from skray.core.specs import DEFAULT_MODEL
from skray.dev.embedded import EmbeddedS3
from skray.dev.s3proxy import FaultyS3Proxy
from skray.dev.testing import synthetic_image, webdataset_shard
from skray.io.objects import DEFAULT_BUFFER_BYTES
from skray.io.sources import listing
from skray.io.storage import join, s3_client, write_bytes_atomic
from skray.label.config import ActorsConfig, LabelConfig
from skray.label.job import run
from skray.report.page import write_report

BUCKET = "bench"
INPUT_KEYS = "in/"  # the proxy counts requests for input keys only (a LIST by its prefix)


def write_inputs(root: str, images: int, shards: int, per_shard: int) -> dict[str, list[int]]:
    """``root``/loose (JPEGs) and ``root``/shards (tars); returns the object sizes by layout."""
    sizes: dict[str, list[int]] = {"loose": [], "shards": []}
    for i in range(images):
        data = synthetic_image(i)
        write_bytes_atomic(join(root, f"loose/{i:05d}.jpg"), data)
        sizes["loose"].append(len(data))
    for s in range(shards):
        data = webdataset_shard(s * per_shard, per_shard)
        write_bytes_atomic(join(root, f"shards/{s:05d}.tar"), data)
        sizes["shards"].append(len(data))
    return sizes


def put_keys(bucket: str, keys: list[str]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: s3_client().put_object(Bucket=bucket, Key=k, Body=b"x"), keys))


def timed_listing(uri: str, in_flight: int) -> tuple[int, float]:
    """Keys listed under ``uri`` with ``in_flight`` sub-prefixes at once, and the seconds."""
    default, listing.PREFIXES_IN_FLIGHT = listing.PREFIXES_IN_FLIGHT, in_flight
    try:
        started = time.perf_counter()
        keys = sum(t.num_rows for t in listing.listing_tables(uri))
        return keys, time.perf_counter() - started
    finally:
        listing.PREFIXES_IN_FLIGHT = default


def reads(counts: dict[str, int]) -> int:
    return counts["HEAD"] + counts["GET"] + counts["GET_RANGE"]


def label(data: str, output: str, model: str, batch: int) -> dict:
    cfg = LabelConfig(
        input=data,
        output=output,
        model=model,
        batch_size=batch,
        files_per_unit=64,
        decode_concurrency=2,
        actors=ActorsConfig(threads=2),
        progress_interval_s=60,
    )
    return run(cfg)["timings"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--images", type=int, default=1000, help="loose JPEGs")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--per-shard", type=int, default=250, help="samples per shard")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--listed-keys", type=int, default=20_000)
    parser.add_argument("--sub-prefixes", type=int, default=20)
    args = parser.parse_args()
    print(cpu_summary())

    local = tempfile.mkdtemp(prefix="skray-bench-s3-")
    with EmbeddedS3() as s3:
        os.environ.update(s3.env())
        s3.create_bucket(BUCKET)
        sizes = write_inputs(join(local, "in"), args.images, args.shards, args.per_shard)
        write_inputs(f"s3://{BUCKET}/in", args.images, args.shards, args.per_shard)
        per = args.listed_keys // args.sub_prefixes
        put_keys(
            BUCKET,
            [f"in/many/{p:04d}/{i:06d}.jpg" for p in range(args.sub_prefixes) for i in range(per)],
        )
        with FaultyS3Proxy(s3.endpoint_url, latency_s=args.latency_ms / 1000) as proxy:
            os.environ["AWS_ENDPOINT_URL"] = proxy.url  # before Ray starts: its workers inherit it
            proxy.counted_keys = INPUT_KEYS
            listed = []
            for in_flight in (1, listing.PREFIXES_IN_FLIGHT):
                proxy.reset_counts()
                keys, seconds = timed_listing(f"s3://{BUCKET}/in/many", in_flight)
                listed.append((in_flight, keys, proxy.counts()["LIST"], seconds))
            ray.init(num_cpus=4, logging_level="ERROR", include_dashboard=False)
            # Warm-up: worker processes and the model's first compile, counted by neither side.
            label(join(local, "in/loose"), join(local, "out/warm-up"), args.model, args.batch)
            rows = []
            for layout, objects in sizes.items():
                on_disk = label(
                    join(local, f"in/{layout}"),
                    join(local, f"out/{layout}"),
                    args.model,
                    args.batch,
                )
                output = f"s3://{BUCKET}/out/{layout}"
                proxy.reset_counts()
                on_s3 = label(f"s3://{BUCKET}/in/{layout}", output, args.model, args.batch)
                job, sent = proxy.counts(), proxy.bytes_sent()
                proxy.reset_counts()
                write_report(output)  # the job's report again, alone: its thumbnails' reads
                rows.append((layout, objects, on_disk, on_s3, job, proxy.counts(), sent))
            ray.shutdown()

    print(
        f"\n{args.model}, batch {args.batch}, {args.latency_ms:g} ms per S3 request, read buffer "
        f"{DEFAULT_BUFFER_BYTES >> 20} MiB, Ray with 4 logical CPUs"
    )
    print(
        "| input | objects | MB | labeling reads per object | target | report reads | LIST "
        "| MB read | img/s local disk | img/s S3 | S3 / local |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for layout, objects, on_disk, on_s3, job, report, sent in rows:
        labeling = reads(job) - reads(report)
        if layout == "loose":
            target = 1.05
        else:
            target = max(1 + math.ceil(size / DEFAULT_BUFFER_BYTES) + 1 for size in objects)
        local_rate, s3_rate = on_disk["img_per_s"], on_s3["img_per_s"]
        print(
            f"| {layout} | {len(objects)} | {sum(objects) / 1e6:.1f} "
            f"| {labeling / len(objects):.2f} | <= {target:g} | {reads(report)} | {job['LIST']} "
            f"| {sent / 1e6:.1f} | {local_rate:.1f} | {s3_rate:.1f} | {s3_rate / local_rate:.2f} |"
        )
        by_kind = {k: v for k, v in job.items() if v}
        print(f"  {layout} on S3, the job's requests by kind: {by_kind}")
    print(f"\nListing {args.listed_keys} keys in {args.sub_prefixes} sub-prefixes:")
    print("| sub-prefixes in flight | keys | LIST requests | s | keys/s | speed-up |")
    print("|---:|---:|---:|---:|---:|---:|")
    for in_flight, keys, lists, seconds in listed:
        print(
            f"| {in_flight} | {keys} | {lists} | {seconds:.2f} | {keys / seconds:,.0f} "
            f"| {listed[0][3] / seconds:.2f} |"
        )
    shutil.rmtree(local, ignore_errors=True)


if __name__ == "__main__":
    main()
