"""Serve load test: an async HTTP client against the endpoint, batching on and off, next to
the model alone at the same batch size, all in one run.

For each mode (batching on: ``max_batch_size=--batch``; off: ``max_batch_size=1``) the app is
deployed on a local Ray, then ``--requests`` JPEG requests are sent at each concurrency level
(``--concurrency``, default 1, 4, 16, 64) and timed client-side: req/s, p50/p95/p99 latency,
errors (any non-200), and the mean batch each request shared (``X-Skray-Batch-Size``).
Model-only img/s is the replica's
own :class:`Classifier` on ready uint8 crops at ``--batch`` with the same threads, measured
before and after the HTTP runs; the ratio column divides by their mean.

A second table says where a request's time went (means, ms): the replica's ``Server-Timing``
stages (read the body, wait for a decode slot, decode, queue for the model, forward pass) and
the rest of the client-side latency, which is the proxy (HTTP parsing, routing, the hop to the
replica and back) and the client itself.

    python benchmarks/serve_load.py [--model skresnext50_32x4d] [--requests 64] [--batch 16]
        [--concurrency 1,4,16,64] [--batching on,off] [--precision fp32|bf16|auto]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

import httpx
import ray
import torch
from ray import serve

from skray.core.hardware import cpu_summary
from skray.core.specs import DEFAULT_MODEL
from skray.dev.embedded import free_port
from skray.dev.testing import synthetic_image
from skray.inference.classifier import Classifier
from skray.io.storage import LOOPBACK
from skray.serve.api import BATCH_SIZE_HEADER, SERVER_TIMING_HEADER
from skray.serve.app import application
from skray.serve.config import ServeConfig

STAGES = ("read", "decode_wait", "decode", "queue", "forward")


def server_timing(header: str) -> dict[str, float]:
    """``read;dur=1.2, decode;dur=4.0`` -> ``{"read": 1.2, "decode": 4.0}`` (ms)."""
    stages = {}
    for entry in header.split(","):
        name, _, duration = entry.strip().partition(";dur=")
        stages[name] = float(duration)
    return stages


def model_only(classifier: Classifier, crops: torch.Tensor, rounds: int = 5) -> float:
    """Median img/s of the forward pass alone (normalize + fast path + top-k) on one batch."""
    classifier.predict_tensors(crops)
    rates = []
    for _ in range(rounds):
        started = time.perf_counter()
        classifier.predict_tensors(crops)
        rates.append(len(crops) / (time.perf_counter() - started))
    return statistics.median(rates)


async def load(url: str, images: list[bytes], requests: int, concurrency: int) -> dict[str, float]:
    """``requests`` POSTs, ``concurrency`` in flight at a time; latency measured per request."""
    latencies: list[float] = []
    batches: list[int] = []
    stages: list[dict[str, float]] = []
    errors = 0
    queue = iter(range(requests))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        for i in queue:
            started = time.perf_counter()
            try:
                reply = await client.post(
                    url, content=images[i % len(images)], headers={"content-type": "image/jpeg"}
                )
            except httpx.HTTPError:
                errors += 1
                continue
            latency = time.perf_counter() - started
            latencies.append(latency)
            if reply.status_code != 200:
                errors += 1
            else:
                batches.append(int(reply.headers[BATCH_SIZE_HEADER]))
                replica = server_timing(reply.headers[SERVER_TIMING_HEADER])
                stages.append({**replica, "proxy": 1000 * latency - replica["total"]})

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = sorted(1000 * t for t in latencies) or [float("nan")]

    def pct(p: float) -> float:
        return ms[min(len(ms) - 1, int(p / 100 * len(ms)))]

    means = {
        k: statistics.mean(s[k] for s in stages) if stages else float("nan")
        for k in (*STAGES, "proxy")
    }
    return {
        "rps": len(latencies) / elapsed,
        "p50": pct(50),
        "p95": pct(95),
        "p99": pct(99),
        "errors": errors,
        "batch": statistics.mean(batches) if batches else 0.0,
        "ms": {**means, "client": statistics.mean(ms)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--requests", type=int, default=64, help="requests per concurrency level")
    parser.add_argument("--batch", type=int, default=16, help="max_batch_size with batching on")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch threads (replica = model-only)",
    )
    parser.add_argument(
        "--concurrency", default="1,4,16,64", help="comma-separated concurrency levels"
    )
    parser.add_argument("--batching", default="on,off", help="on, off or both")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "auto"],
        default="fp32",
        help="the replica's precision; model-only runs at the same one",
    )
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    modes = {"on": args.batch, "off": 1}
    modes = {mode: modes[mode] for mode in args.batching.split(",")}

    torch.set_num_threads(args.threads)
    images = [synthetic_image(seed, (320, 256)) for seed in range(32)]
    print(cpu_summary())
    classifier = Classifier(args.model, precision=args.precision)  # as a replica holds it
    crops = torch.stack([classifier.decode(images[i % len(images)]) for i in range(args.batch)])
    alone = [model_only(classifier, crops)]

    ray.init(
        num_cpus=args.threads + 2, logging_level="ERROR", log_to_driver=False
    )  # the client, not a log tail
    port = free_port()
    serve.start(http_options={"host": LOOPBACK, "port": port})
    rows = []
    for mode, batch in modes.items():
        cfg = ServeConfig(
            model=args.model,
            max_batch_size=batch,
            batch_wait_timeout_s=0.01,
            warmup_batches=2,
            cpus_per_replica=args.threads,
            threads=args.threads,
            precision=args.precision,
        )
        serve.run(
            application(cfg, max_ongoing_requests=4 * max(levels)), name="bench", route_prefix="/"
        )
        while httpx.get(f"http://{LOOPBACK}:{port}/healthz", timeout=30).status_code != 200:
            time.sleep(0.5)
        for concurrency in levels:
            result = asyncio.run(
                load(f"http://{LOOPBACK}:{port}/v1/classify", images, args.requests, concurrency)
            )
            rows.append({"batching": mode, "concurrency": concurrency, **result})
            print(
                f"  batching {mode:3s} c={concurrency:<3d} {result['rps']:6.2f} req/s", flush=True
            )
        serve.delete("bench")
    serve.shutdown()
    ray.shutdown()
    alone.append(model_only(classifier, crops))
    reference = statistics.mean(alone)

    print(
        f"\n{args.model}, {args.requests} requests per level, 320x256 JPEGs, "
        f"{args.threads} torch threads, precision {classifier.precision}; "
        f"model-only at batch {args.batch}: "
        f"{alone[0]:.2f} / {alone[1]:.2f} img/s (before / after)"
    )
    print(
        "| batching | concurrency | req/s | p50 ms | p95 ms | p99 ms | errors | mean batch "
        "| vs model-only |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['batching']} | {r['concurrency']} | {r['rps']:.2f} | {r['p50']:.0f} "
            f"| {r['p95']:.0f} | {r['p99']:.0f} | {r['errors']} | {r['batch']:.1f} "
            f"| {r['rps'] / reference:.2f}x |"
        )
    print(
        "\nWhere a request's time went, mean ms: replica stages (Server-Timing), "
        "and proxy + client = client-side latency - replica total"
    )
    print(
        "| batching | concurrency | " + " | ".join(STAGES) + " | proxy + client | client latency |"
    )
    print("|---|---:|" + "---:|" * (len(STAGES) + 2))
    for r in rows:
        print(
            f"| {r['batching']} | {r['concurrency']} | "
            + " | ".join(f"{r['ms'][k]:.0f}" for k in (*STAGES, "proxy", "client"))
            + " |"
        )


if __name__ == "__main__":
    main()
