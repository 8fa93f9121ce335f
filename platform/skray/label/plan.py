"""What a labeling run still has to do: the current listing merged with what the output holds.

Image files are planned by *key*, not by position: the keys already in committed
parts are left out, and only the rest are cut into units whose ids hash their
keys. So files added anywhere in the key order, or removed, change nothing that
was committed, and a rerun labels exactly the keys not yet in the output. Tar
shards and Parquet files are units of their own, done when their part exists.

The listing stays one Arrow array and the committed keys stream past it a batch at
a time, each batch hashed and probed against the whole listing: the planner holds
the listing, one flag per listed key and one batch — never a set of every key
(Ray Data's own checkpointing keeps every processed id as a Python object,
about 9 GB for 115M ids: ray#60200). Rows whose key is no longer listed are
counted, not kept; a key is assumed to be in at most one part.

Rows an earlier version committed for a storage failure (``EARLIER_IO_ERROR``) do not count
as done: their keys are planned again, and the plan names the parts to heal — an image part
loses those rows, a shard's part goes — which the job does before any new part is written.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from skray.io.sources import Format, Listing, Unit, shard_unit, unit_id
from skray.io.sources.rows import EARLIER_IO_ERROR
from skray.label.sinks import part_name, part_paths

BATCH_KEYS = 1 << 21  # committed keys hashed at once: bounds the hash table
PARTS_IN_FLIGHT = 16


@dataclass(frozen=True)
class Heal:
    """A committed part holding rows of earlier runs' I/O errors, whose keys are planned again:
    ``keys`` are the rows to take out, or None to remove the whole part (a shard's: the shard
    is read again whole)."""

    part: str  # the part's file name in the output
    keys: tuple[str, ...] | None
    rows: int  # its earlier I/O-error rows


@dataclass(frozen=True)
class Plan:
    """The units still to label, and how the listing relates to the output."""

    units: list[Unit]  # still to do
    listed: int  # input files listed (images, shards and Parquet files)
    committed_parts: int  # parts already in the output
    committed_rows: int  # rows already in the output
    removed_rows: int  # rows of the output whose key is no longer in the input
    heal: tuple[Heal, ...] = ()  # parts to heal before any new part is written

    @property
    def pending_rows(self) -> int | None:
        known = [u.rows for u in self.units]
        return None if None in known else sum(known)


def committed_batches(
    fs: pafs.FileSystem, paths: list[str], stale: dict[str, pa.Array], whole: set[str]
) -> Iterator[pa.Array]:
    """The keys of the output's parts, about ``BATCH_KEYS`` at a time (key and error columns
    only). Rows of earlier runs' I/O errors are left out and put in ``stale``, by part path; a
    part named in ``whole`` (a shard's) that holds any is left out whole.

    Parts are read one by one (a few in flight, for S3's latency): a dataset scan over
    thousands of small files holds far more memory than the keys themselves."""

    def read(path: str) -> tuple[str, pa.Table]:
        return path, pq.ParquetFile(path, filesystem=fs).read(columns=["key", "error"])

    pending: list[pa.Array] = []
    size = 0
    with ThreadPoolExecutor(PARTS_IN_FLIGHT) as pool:
        for path, part in pool.map(read, paths):
            keys = part.column("key")
            earlier = pc.fill_null(
                pc.match_substring_regex(part.column("error"), EARLIER_IO_ERROR), False
            )
            if pc.any(earlier).as_py():
                stale[path] = keys.filter(earlier).combine_chunks().cast(pa.string())
                whole_part = posixpath.basename(path) in whole
                keys = keys.slice(0, 0) if whole_part else keys.filter(pc.invert(earlier))
            pending += keys.chunks
            size += len(keys)
            if size >= BATCH_KEYS:
                yield pa.concat_arrays(pending).cast(pa.string())
                pending, size = [], 0
    if pending:
        yield pa.concat_arrays(pending).cast(pa.string())


@dataclass
class _Merge:
    """Committed keys streamed against the listing: what is done, and what is no longer listed."""

    done: pa.Array  # one flag per listed image key
    rows: int = 0
    listed_rows: int = 0  # committed rows whose key, or shard, is still in the input
    stale: dict[str, pa.Array] = field(default_factory=dict)  # earlier I/O-error keys, by part


def _merge(
    parts: tuple[pafs.FileSystem, list[str]],
    images: pa.ChunkedArray,
    shards: pa.Array,
    shard_parts: set[str],
) -> _Merge:
    merged = _Merge(pa.array(np.zeros(len(images), dtype=bool)))
    for keys in committed_batches(*parts, merged.stale, shard_parts):
        hit = pc.is_in(images, value_set=keys)
        merged.done = pc.or_(merged.done, hit)
        merged.rows += len(keys)
        merged.listed_rows += pc.sum(pc.is_in(_shard_source(keys), value_set=shards)).as_py() or 0
    merged.listed_rows += pc.sum(merged.done).as_py() or 0
    return merged


def _shard_source(keys: pa.Array) -> pa.Array:
    """The file a shard row came from: its key up to the first ``#`` (``shard.tar#sample``)."""
    return pc.replace_substring_regex(keys, pattern="#.*$", replacement="")


def _formats(listed: pa.Table, fmt: Format | Literal["auto"]) -> dict[str, pa.Table]:
    if fmt != "auto":
        return {fmt: listed}
    keys = listed.column("key")
    tar, parquet = pc.ends_with(keys, ".tar"), pc.ends_with(keys, ".parquet")
    return {
        "webdataset": listed.filter(tar),
        "parquet": listed.filter(parquet),
        "images": listed.filter(pc.invert(pc.or_(tar, parquet))),
    }


def image_units(images: pa.Table, files_per_unit: int) -> list[Unit]:
    """Pending image files (key, size), in order, cut into units named after their keys."""
    units = []
    for start in range(0, len(images), files_per_unit):
        chunk = images.slice(start, files_per_unit)
        keys, sizes = chunk.column("key").to_pylist(), chunk.column("size").to_pylist()
        known = None if None in sizes else tuple(sizes)
        units.append(Unit(unit_id("images", keys), "images", tuple(keys), len(keys), known))
    return units


def _listed(files: Listing | Sequence[str] | pa.Array | pa.ChunkedArray) -> pa.Table:
    """The listing as one table of key and size (null where the caller knows none)."""
    if isinstance(files, Listing):
        return pa.table({"key": pa.array(files.keys, pa.string()), "size": files.sizes})
    keys = files if isinstance(files, (pa.Array, pa.ChunkedArray)) else pa.array(files, pa.string())
    return pa.table({"key": keys, "size": pa.nulls(len(keys), pa.int64())})


def make_plan(
    files: Listing | Sequence[str] | pa.Array | pa.ChunkedArray,
    output: str,
    fmt: Format | Literal["auto"] = "auto",
    files_per_unit: int = 256,
    parquet_columns: tuple[str, ...] = ("image",),
) -> Plan:
    """Merge the sorted listing ``files`` with the keys committed under ``output``. Sizes a
    :class:`~skray.io.sources.Listing` holds travel in the units."""
    listed = _listed(files)
    by_format = _formats(listed, fmt)
    none = listed.slice(0, 0)
    images = by_format.get("images", none)
    image_keys = images.column("key")
    shards = {kind: by_format.get(kind, none).to_pylist() for kind in ("webdataset", "parquet")}
    fs, paths = part_paths(output)  # listed once: on S3 a listing of every part
    shard_parts = {
        part_name(unit_id(kind, [file["key"]])): (kind, file["key"], file["size"])
        for kind, files in shards.items()
        for file in files
    }
    merged = _merge(
        (fs, paths),
        image_keys,
        pa.array([uri for _, uri, _ in shard_parts.values()], pa.string()),
        set(shard_parts),
    )
    units = image_units(images.filter(pc.invert(merged.done)), files_per_unit)
    heal = _heal(merged.stale, image_keys, shard_parts)
    done_parts = {posixpath.basename(p) for p in paths} - {h.part for h in heal if h.keys is None}
    units += [
        shard_unit(kind, uri, parquet_columns, size)
        for name, (kind, uri, size) in shard_parts.items()
        if name not in done_parts
    ]
    return Plan(
        units=units,
        listed=len(listed),
        committed_parts=len(paths),
        committed_rows=merged.rows,
        removed_rows=merged.rows - merged.listed_rows,
        heal=heal,
    )


def _heal(
    stale: dict[str, pa.Array],
    images: pa.ChunkedArray,
    shard_parts: dict[str, tuple[str, str, int | None]],
) -> tuple[Heal, ...]:
    """The parts to heal: a listed shard's part goes whole; an image part loses the rows of
    its listed keys (the keys no longer listed stay as they are: nothing reads them again)."""
    heal, image_parts = [], {}
    for path, keys in stale.items():
        name = posixpath.basename(path)
        if name in shard_parts:
            heal.append(Heal(name, None, len(keys)))
        else:
            image_parts[name] = keys
    if image_parts:
        every = pa.concat_arrays(list(image_parts.values()))
        listed = set(images.filter(pc.is_in(images, value_set=every)).to_pylist())
        for name, keys in image_parts.items():
            again = tuple(k for k in keys.to_pylist() if k in listed)
            if again:
                heal.append(Heal(name, again, len(again)))
    return tuple(heal)
