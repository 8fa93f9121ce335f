"""``make demo``: the labeling job end to end on the embedded default.

Starts an S3 server and a Ray head on 127.0.0.1, writes a sample dataset (image
files, WebDataset shards and a few broken files) to a bucket, submits the job
with ``ray job submit``, prints the summary and stops what it started.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from pathlib import Path

from PIL import Image, ImageDraw

from skray.embedded import EmbeddedS3, LocalRayHead
from skray.label import format_summary
from skray.sinks import MANIFEST
from skray.storage import join, read_json, write_bytes_atomic

FORMATS = ("JPEG", "PNG", "WEBP")


def synthetic_image(seed: int, size: tuple[int, int] = (320, 256), fmt: str = "JPEG") -> bytes:
    """A picture with a sky, a ground and a coloured blob: varied, cheap, decodable."""
    rng = random.Random(seed)
    w, h = size
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, int(h * rng.uniform(0.5, 0.8)), w, h), fill=tuple(rng.randrange(256) for _ in range(3)))
    x, y = rng.randrange(w // 2), rng.randrange(h // 2)
    draw.ellipse((x, y, x + w // 3, y + h // 3), fill=tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def broken_files() -> dict[str, bytes]:
    """One file per failure reason the job reports."""
    good = synthetic_image(0)
    bomb = io.BytesIO()
    Image.new("L", (12000, 10000)).save(bomb, "PNG")  # 120 MP: over the default pixel limit
    return {
        "broken/zero-bytes.jpg": b"",
        "broken/truncated.jpg": good[: len(good) // 3],
        "broken/not-an-image.jpg": b"%PDF-1.4 definitely not a picture",
        "broken/no-extension-text": b"plain text in an extension-less object",
        "broken/bomb.png": bomb.getvalue(),
    }


def webdataset_shard(first: int, count: int, broken_member: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(first, first + count):
            members = {"jpg": synthetic_image(i), "cls": str(i % 10).encode(),
                       "json": json.dumps({"source": "demo", "index": i}).encode()}
            if broken_member and i == first:
                members["jpg"] = members["jpg"][:200]
            for ext, data in members.items():
                info = tarfile.TarInfo(f"sample{i:06d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_sample_dataset(root: str, files: int = 120, shards: int = 2, per_shard: int = 80,
                         broken: bool = True) -> list[str]:
    """Write the demo dataset under ``root`` (local or s3://); returns every expected key."""
    keys: list[str] = []
    for i in range(files):
        fmt = FORMATS[i % len(FORMATS)]
        name = f"images/{i // 50:02d}/img{i:05d}" + ("" if i % 10 == 9 else f".{fmt.lower()}")
        write_bytes_atomic(join(root, name), synthetic_image(i, fmt=fmt))
        keys.append(join(root, name))
    for s in range(shards):
        uri = join(root, f"shards/shard-{s:05d}.tar")
        write_bytes_atomic(uri, webdataset_shard(100_000 + s * per_shard, per_shard, broken_member=broken))
        keys += [f"{uri}#sample{i:06d}" for i in range(100_000 + s * per_shard, 100_000 + (s + 1) * per_shard)]
    if broken:
        for name, data in broken_files().items():
            write_bytes_atomic(join(root, name), data)
            keys.append(join(root, name))
    return sorted(keys)


CLASS_COLORS = ((220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 210, 40), (200, 60, 210), (40, 210, 210))


def labeled_image(label: int, seed: int, size: int = 48) -> bytes:
    """A learnable picture: the class sets the blob's colour, the seed its place and the noise."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), tuple(rng.randrange(60, 200) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    r = size // 3
    x, y = rng.randrange(size - r), rng.randrange(size - r)
    color = tuple(min(255, max(0, c + rng.randrange(-25, 26))) for c in CLASS_COLORS[label])
    draw.ellipse((x, y, x + r, y + r), fill=color)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def write_labeled_folder(root: str, classes: int = 4, per_class: int = 40, size: int = 48,
                         seed: int = 0) -> list[str]:
    """ROOT/<class>/<image>.png with a learnable signal; returns the class names."""
    names = [f"class{c}" for c in range(classes)]
    for c, name in enumerate(names):
        for i in range(per_class):
            write_bytes_atomic(join(root, f"{name}/{i:04d}.png"), labeled_image(c, seed * 100_000 + c * 1000 + i, size))
    return names


def run_demo(model: str, bucket: str = "skray-demo") -> int:
    project = Path.cwd()
    if not (project / "pipelines" / "label.py").is_file():
        raise SystemExit("run the demo from the project root (where pipelines/ and configs/ are)")
    with EmbeddedS3() as s3:
        os.environ.update(s3.env())
        s3.create_bucket(bucket)
        data, labels = f"s3://{bucket}/data", f"s3://{bucket}/labels"
        keys = write_sample_dataset(data)
        print(f"[demo] S3 server on {s3.endpoint_url}: wrote {len(keys)} sample inputs to {data}/")
        with LocalRayHead(num_cpus=4, env=s3.env()) as head:
            print(f"[demo] Ray head at {head.address} (token auth on); submitting the labeling job")
            job = head.submit(
                ["python", "pipelines/label.py", "--config", "configs/label.yaml",
                 "--set", f"input={data}/", "--set", f"output={labels}/", "--set", f"model={model}",
                 "--set", "actors.threads=2"],
                working_dir=str(project), capture=False,
            )
        manifest = read_json(join(labels, MANIFEST))
        if job.returncode != 0 or manifest is None:
            print(f"[demo] the job failed (exit {job.returncode})")
            return 1
        print("\n[demo] summary (read back from " + join(labels, MANIFEST) + "):")
        print(format_summary(manifest))
        print("[demo] the S3 server and Ray head are stopped; nothing is left running")
    return 0
