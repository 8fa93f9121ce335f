"""Labeling throughput and memory: model-only vs the end-to-end Ray Data job.

One run, same generated images, same model, batch size and threads:

* model-only: uint8 crops already in memory through the actor's own Classifier;
* the job on N images and on 10 x N images: img/s from the moment the first model
  actor was ready (its model loaded) to the end of the job, the job's own steady
  rate (after the first batch arrived), total img/s with start-up, and peak memory
  (driver PSS, all Ray worker PSS, object store) sampled every second (sampling
  costs CPU on a 2-core machine).

The two windows differ on purpose: read+decode tasks run ahead while the model actor
starts, so by the first batch a backlog of decoded images is waiting and "after the
first batch" flatters the job (it once read faster than the model alone). From actor
ready is the honest one: no image can be labeled before it.

    python benchmarks/label_throughput.py [--model skresnext50_32x4d] [--images 64] [--batch 16]
        [--precision fp32|bf16|auto]
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import threading
import time
from pathlib import Path

import ray
import torch

from skray.core.hardware import cpu_summary
from skray.core.specs import DEFAULT_MODEL
from skray.dev.testing import write_sample_dataset
from skray.inference.classifier import Classifier
from skray.io.storage import read_bytes
from skray.label.config import ActorsConfig, LabelConfig
from skray.label.job import run

MIB = 1 << 20


def pss_bytes(pid: str) -> int:
    """Proportional set size: shared pages (torch's libraries in every worker) counted once
    overall."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def ray_worker_pids() -> list[str]:
    pids = []
    for pid in filter(str.isdigit, (p.name for p in Path("/proc").iterdir())):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::"):
                pids.append(pid)
        except OSError:
            continue
    return pids


def object_store_bytes() -> int:
    from ray._private.internal_api import memory_summary

    match = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
    return int(match.group(1)) * MIB if match else 0


class PeakMemory:
    """Samples memory in a thread until stopped; keeps the peaks."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.peak = {"driver": 0, "workers": 0, "object_store": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            sample = {
                "driver": pss_bytes("self"),
                "workers": sum(pss_bytes(p) for p in ray_worker_pids()),
                "object_store": object_store_bytes(),
            }
            self.peak = {k: max(v, sample[k]) for k, v in self.peak.items()}
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def model_only(
    model: str, files: list[str], batch: int, threads: int, rounds: int, precision: str
) -> float:
    torch.set_num_threads(threads)
    classifier = Classifier(model, precision=precision)  # as the actor holds it
    crops = torch.stack([classifier.decode(read_bytes(f)) for f in files[:batch]])
    classifier.predict_tensors(crops)  # warm-up
    start = time.perf_counter()
    for _ in range(rounds):
        classifier.predict_tensors(crops)
    return rounds * batch / (time.perf_counter() - start)


def first_model_actor_ready(since: float) -> float | None:
    """Unix time the first Ray Data map actor (a Predictor with its model loaded) of a job
    started after ``since`` became ALIVE: GCS stamps ``StartTime`` when the actor's
    ``__init__`` returned."""
    from ray._private.state import actors

    started = [
        a["StartTime"] / 1000
        for a in actors().values()
        if "MapWorker" in a["ActorClassName"] and a["StartTime"] / 1000 >= since
    ]
    return min(started, default=None)


def labeling_job(
    model: str, data: str, output: str, batch: int, threads: int, precision: str
) -> tuple[dict, dict]:
    cfg = LabelConfig(
        input=data,
        output=output,
        model=model,
        batch_size=batch,
        files_per_unit=batch,
        decode_concurrency=2,
        actors=ActorsConfig(threads=threads, precision=precision),
        progress_interval_s=30,
    )
    started = time.time()
    with PeakMemory() as memory:
        manifest = run(cfg)
    finished, timings = time.time(), manifest["timings"]
    ready = first_model_actor_ready(started)
    if ready is None:
        raise RuntimeError("no model actor found in Ray's actor table for this job")
    timings["actor_ready_s"] = ready - started
    timings["from_ready_img_per_s"] = timings["images_this_run"] / (finished - ready)
    return timings, memory.peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--images", type=int, default=256, help="N; the large run labels 10 x N")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in the model actor")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16", "auto"],
        default="fp32",
        help="the actors' precision; model-only runs at the same one",
    )
    args = parser.parse_args()
    print(cpu_summary())

    ray.init(num_cpus=4, logging_level="ERROR", include_dashboard=False)
    root = Path(tempfile.mkdtemp(prefix="skray-bench-"))
    small = write_sample_dataset(str(root / "small"), files=args.images, shards=0, broken=False)
    write_sample_dataset(str(root / "large"), files=10 * args.images, shards=0, broken=False)

    def reference() -> float:
        rounds = max(2, args.images // args.batch)
        return model_only(args.model, small, args.batch, args.threads, rounds, args.precision)

    job_args = (args.batch, args.threads, args.precision)
    # Model-only is measured before, between and after the job runs; the median is the reference.
    references = [reference()]
    runs = {"N": labeling_job(args.model, str(root / "small"), str(root / "out-small"), *job_args)}
    references.append(reference())
    runs["10N"] = labeling_job(args.model, str(root / "large"), str(root / "out-large"), *job_args)
    references.append(reference())
    reference = statistics.median(references)

    print(
        f"\n{args.model}, precision {args.precision}, batch {args.batch}, "
        f"{args.threads} torch threads, "
        f"N = {args.images} images ({torch.get_num_threads()} threads in this process), "
        "Ray with 4 logical CPUs"
    )
    print(
        "| run | images | actor ready after s | img/s from actor ready | x model-only "
        "| img/s after first batch | x model-only | total img/s (with start-up) "
        "| peak driver MiB | peak workers MiB | peak object store MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| model-only (median of {', '.join(f'{r:.2f}' for r in references)}) | {args.batch} x "
        f"{max(2, args.images // args.batch)} | | {reference:.2f} | 1.00 | | | | | | |"
    )
    for name, (t, peak) in runs.items():
        ready, first = t["from_ready_img_per_s"], t["steady_img_per_s"]
        print(
            f"| job {name} | {t['images_this_run']} | {t['actor_ready_s']:.1f} | {ready:.2f} "
            f"| {ready / reference:.2f} | {first:.2f} | {first / reference:.2f} "
            f"| {t['img_per_s']:.2f} | {peak['driver'] / MIB:.0f} | {peak['workers'] / MIB:.0f} "
            f"| {peak['object_store'] / MIB:.0f} |"
        )
    (small_t, small_m), (large_t, large_m) = runs["N"], runs["10N"]
    total = lambda m: m["driver"] + m["workers"] + m["object_store"]  # noqa: E731
    print(
        f"\n10x images: peak memory x{total(large_m) / total(small_m):.2f} (target <= 1.25), "
        f"time per image x{small_t['from_ready_img_per_s'] / large_t['from_ready_img_per_s']:.2f} "
        "(target within 1.10)"
    )
    print(
        f"from actor ready vs model-only: {small_t['from_ready_img_per_s'] / reference:.2f} / "
        f"{large_t['from_ready_img_per_s'] / reference:.2f} (target >= 0.85); "
        f"after the first batch: {small_t['steady_img_per_s'] / reference:.2f} / "
        f"{large_t['steady_img_per_s'] / reference:.2f}"
    )


if __name__ == "__main__":
    main()
