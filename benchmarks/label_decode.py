r"""The labeling job with ``decode: cpu`` vs ``decode: gpu``, as a fraction of the model alone.

One run, the same real photos (skray.dev.testing.photo_corpus: JPEGs up to 1600 px, every
8th a PNG, written to local disk), the same model, batch shape and settings as the
job's actors (bf16 autocast and channels_last on a GPU, ``--compile``):

* model-only: the actor's own ``Classifier`` on ready uint8 crops (measured before and
  after the jobs; the mean is the reference);
* the job, once per decode path: img/s from the moment its model actor was ready to
  the end (see label_throughput.py for why that window), the actor's busy fraction and
  the stage rates from the manifest, and the cost of 1M images at ``--usd-per-hour``
  for one accelerator (or node) at that rate.

Made for ``benchmarks/gpu_check.sh`` (one GPU, ~20k photos); it runs on CPU too, where
``decode: gpu`` is torchvision's CPU decoder inside the actor.

    python benchmarks/label_decode.py [--images 20000] [--batch 256] [--compile] \
        [--usd-per-hour 3.5]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import ray
import torch
from label_throughput import first_model_actor_ready

from skray.core.specs import DEFAULT_MODEL
from skray.dev.testing import photo_corpus
from skray.inference.classifier import Classifier
from skray.label.config import ActorsConfig, LabelConfig
from skray.label.job import run

CHUNK = 500  # photos per writer process call


def write_chunk(root: str, start: int, count: int) -> None:
    for i, (_, data) in enumerate(photo_corpus(count, seed=start)):
        suffix = ".png" if data.startswith(b"\x89PNG") else ".jpg"
        Path(root, f"{start + i:07d}{suffix}").write_bytes(data)


def write_photos(root: str, n: int) -> None:
    os.makedirs(root, exist_ok=True)
    starts = range(0, n, CHUNK)
    with ProcessPoolExecutor() as pool:
        list(
            pool.map(write_chunk, [root] * len(starts), starts, [min(CHUNK, n - s) for s in starts])
        )


def model_only(model: str, root: str, batch: int, compile: bool, rounds: int) -> float:
    """img/s of the actor's Classifier (same dtype, layout, compile, batch shape, threads) on
    ready crops."""
    amp = torch.bfloat16 if torch.cuda.is_available() else None
    classifier = Classifier(model, compile=compile, amp_dtype=amp, batch_size=batch)
    files = sorted(Path(root).iterdir())[:batch]
    crops = torch.stack([classifier.decode(f.read_bytes()) for f in files]).to(classifier.device)
    for _ in range(2):  # warm-up, compilation included
        classifier.logits(crops)
    if classifier.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(rounds):
        classifier.logits(crops).sum().item()  # .item(): the forward has finished
    return rounds * len(crops) / (time.perf_counter() - start)


def labeling_job(
    model: str, data: str, output: str, batch: int, compile: bool, decode: str, threads: int
) -> dict:
    actors = ActorsConfig(compile=compile, batch_size=batch, cpus=threads, threads=threads)
    cfg = LabelConfig(
        input=data,
        output=output,
        model=model,
        batch_size=batch,
        files_per_unit=batch,
        decode=decode,
        actors=actors,
        progress_interval_s=30,
    )
    started = time.time()
    timings = run(cfg)["timings"]
    ready = first_model_actor_ready(started)
    if ready is None:
        raise RuntimeError("no model actor found in Ray's actor table for this job")
    timings["from_ready_img_per_s"] = timings["images_this_run"] / (time.time() - ready)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile in the actors and model-only"
    )
    parser.add_argument("--rounds", type=int, default=20, help="model-only batches per measurement")
    parser.add_argument(
        "--threads", type=int, default=2, help="CPUs and torch threads of the actor and model-only"
    )
    parser.add_argument(
        "--usd-per-hour",
        type=float,
        default=3.5,
        help="price of one accelerator (or CPU node) hour, for the cost line",
    )
    args = parser.parse_args()

    address = os.environ.get("RAY_ADDRESS")
    # A local Ray gets room for the actor's CPUs plus a read+decode task beside it (on a
    # 2-core machine the actor's 2 CPUs would otherwise leave the decode task none).
    local_cpus = None if address else max(os.cpu_count() or 1, args.threads + 1)
    ray.init(address=address, num_cpus=local_cpus, logging_level="ERROR")
    root = Path(tempfile.mkdtemp(prefix="skray-label-decode-"))
    data = str(root / "photos")
    write_photos(data, args.images)
    torch.set_num_threads(args.threads)

    references = [model_only(args.model, data, args.batch, args.compile, args.rounds)]
    runs = {
        decode: labeling_job(
            args.model,
            data,
            str(root / f"out-{decode}"),
            args.batch,
            args.compile,
            decode,
            args.threads,
        )
        for decode in ("cpu", "gpu")
    }
    references.append(model_only(args.model, data, args.batch, args.compile, args.rounds))
    reference = sum(references) / len(references)

    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU ({os.cpu_count()} cores)"
    )
    print(
        f"\n{args.model}, {device}, batch {args.batch}, compile {args.compile}, "
        f"{args.images} photos on local disk, Ray {ray.cluster_resources().get('CPU', 0):g} CPUs, "
        f"${args.usd_per_hour:.2f} per hour"
    )
    print(
        "| run | img/s from actor ready | x model-only | actor busy | model img/s/actor "
        "| decode img/s/task | $ per 1M images |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    cost = lambda rate: args.usd_per_hour * 1e6 / (rate * 3600)  # noqa: E731
    print(
        f"| model-only (mean of {', '.join(f'{r:.1f}' for r in references)}) "
        f"| {reference:.1f} | 1.00 | | | | {cost(reference):.2f} |"
    )
    for decode, t in runs.items():
        rate = t["from_ready_img_per_s"]
        print(
            f"| job, decode: {decode} | {rate:.1f} | {rate / reference:.2f} "
            f"| {t.get('actor_busy_fraction', float('nan')):.0%} "
            f"| {t.get('model_img_per_s', float('nan')):.1f} "
            f"| {t.get('decode_img_per_s', float('nan')):.1f} | {cost(rate):.2f} |"
        )
    print(
        "\ndecode: gpu end to end vs model-only: "
        f"{runs['gpu']['from_ready_img_per_s'] / reference:.2f} (target on a GPU >= 0.8)"
    )


if __name__ == "__main__":
    main()
