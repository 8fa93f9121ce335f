"""A finished labeling output written by hand: real photos as image files, WebDataset
members and Parquet cells, parts in the real label schema, and a manifest.

Rows are chosen so every report feature has something to show: four labels, two
low-confidence rows, three failure reasons, and among the lowest scores of the most
frequent label a deleted file, a file now holding no image, and a file over the
configured pixel limit.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from helpers import SMALL, label_row, parquet_bytes, tar_bytes
from skray.dev.testing import photo_corpus
from skray.io.storage import filesystem_for, join, write_bytes_atomic, write_json
from skray.label.sinks import MANIFEST, write_part

MAX_PIXELS = 2_600_000  # the manifest's preprocessing.max_pixels
LABELS = {"tabby": 14, "rocket": 9, "coffee mug": 6, "daisy": 3}  # rows per label (image files)
FAILURES = {"not_an_image": 3, "too_large": 2, "broken_tar": 1}


@dataclass
class Output:
    root: str  # sources under root/src
    uri: str  # the labeling output, root/labels
    rows: list[dict]
    deleted: str  # an image file removed after labeling
    garbage: str  # an image file overwritten with text after labeling
    bomb: str  # an image file over MAX_PIXELS
    tar_keys: list[str]
    parquet_keys: list[str]


def _row(key: str, label: str | None, score: float, error: str | None = None) -> dict:
    row = label_row(key, label, error)
    if error is None:
        row.update(
            label=label,
            score=score,
            label_id=None if label is None else 1,
            topk_scores=[score, 0.0],
        )
    return row


def write_labeled_output(root: str, progress: bool = True) -> Output:
    """Sources under ``root/src``, the labeling output under ``root/labels``."""
    photos = [data for _, data in photo_corpus(40, png_every=0)]
    files, rows = [], []
    i = 0
    for label, count in LABELS.items():
        for n in range(count):
            uri = join(root, f"src/images/{label.replace(' ', '_')}-{n:02d}.jpg")
            write_bytes_atomic(uri, photos[i % len(photos)])
            files.append(uri)
            rows.append(_row(uri, label, 0.5 + 0.49 * (n + 1) / count))
            i += 1
    deleted, garbage, bomb = files[0], files[1], files[2]  # the three lowest "tabby" scores
    for row, score in zip(rows, (0.11, 0.12, 0.13)):
        row.update(score=score, topk_scores=[score, 0.0])
    big = io.BytesIO()
    Image.new("L", (2000, 1400)).save(big, "PNG")
    write_bytes_atomic(bomb, big.getvalue())

    shard = join(root, "src/shards/shard-00000.tar")
    members = [
        (f"s/{n:04d}.{ext}", data)
        for n in range(5)
        for ext, data in (("jpg", photos[20 + n]), ("cls", b"1"))
    ]
    write_bytes_atomic(shard, tar_bytes(members))
    tar_keys = [f"{shard}#s/{n:04d}" for n in range(5)]
    table = join(root, "src/tables/t.parquet")
    write_bytes_atomic(table, parquet_bytes({"image": photos[30:34]}))
    parquet_keys = [f"{table}#{n}" for n in range(4)]
    shard_rows = [_row(k, "rocket", 0.2 + 0.01 * n) for n, k in enumerate(tar_keys)]
    parquet_rows = [_row(k, "coffee mug", 0.3 + 0.01 * n) for n, k in enumerate(parquet_keys)]
    abstained = [
        _row(join(root, f"src/images/unsure-{n}.jpg"), None, 0.05 + 0.01 * n) for n in range(2)
    ]
    failed = [
        _row(join(root, f"src/bad/{reason}-{n}"), None, 0.0, f"{reason}: detail {n}")
        for reason, count in FAILURES.items()
        for n in range(count)
    ]

    output = join(root, "labels")
    parts = {
        "a": rows[:12],
        "b": rows[12:] + abstained,
        "c": shard_rows,
        "d": parquet_rows,
        "e": failed,
    }
    for unit, part in parts.items():
        write_part(output, unit, part)
    timings = {"total_s": 12.5, "img_per_s": 3.4}
    if progress:
        timings["progress"] = [[0, 0], [4, 10], [8, 30], [12, 44]]
    write_json(
        join(output, MANIFEST),
        {
            "output": output,
            "model": SMALL,
            "weights": "s3://models/w.safetensors",
            "weights_version": "3",
            "weights_sha256": "ab" * 32,
            "random_weights": False,
            "skipped_already_done": 0,
            "duplicates": 0,
            "timings": timings,
            "config": {
                "format": "auto",
                "image_column": "image",
                "id_column": None,
                "max_object_bytes": 64 * 2**20,
                "preprocessing": {"max_pixels": MAX_PIXELS},
            },
        },
    )
    fs, path = filesystem_for(deleted)
    fs.delete_file(path)
    write_bytes_atomic(garbage, b"this object no longer holds an image")
    all_rows = [r for part in parts.values() for r in part]
    return Output(root, output, all_rows, deleted, garbage, bomb, tar_keys, parquet_keys)
