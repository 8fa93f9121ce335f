"""What a labeling run still has to do: the current listing merged with what the output holds.

Image files are planned by *key*, not by position: the keys already in committed
parts are left out, and only the rest are cut into units whose ids hash their
keys. So files added anywhere in the key order, or removed, change nothing that
was committed, and a rerun labels exactly the keys not yet in the output. Tar
shards and Parquet files are units of their own, done when their part exists.

Planning memory does not grow with the bucket: the committed keys are read part by part into
sorted runs (spilled to local disk past ``run_rows``, :mod:`skray.io.external_sort`) and the
listing streams in sorted tables; the two sorted streams are merged a listing table at a
time. What stays is the plan itself — the pending units, as Arrow — and one entry per shard
(Ray Data's own checkpointing keeps every processed id as a Python object, about 9 GB for
115M ids: ray#60200). A key is assumed to be in at most one part.

Rows an earlier version committed for a storage failure (``EARLIER_IO_ERROR``) do not count
as done: their keys are planned again, and the plan names the parts to heal — an image part
loses those rows, a shard's part goes — which the job does before any new part is written.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from skray.core.concurrency import ordered_map
from skray.io.external_sort import sorted_tables
from skray.io.sources import LISTING_SCHEMA, UNIT_SCHEMA, Format, Listing, Unit, shard_unit, unit_id
from skray.io.sources.rows import EARLIER_IO_ERROR
from skray.label.sinks import part_name, part_paths

PARTS_IN_FLIGHT = 16
SHARD_FORMATS: tuple[Format, ...] = ("webdataset", "parquet")


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
    """The units still to do, and how the listing relates to the output."""

    todo: pa.Table  # the units still to do, in order: rows of ``Unit.to_row`` (UNIT_SCHEMA)
    listed: int  # input files listed (images, shards and Parquet files)
    committed_parts: int  # parts already in the output
    committed_rows: int  # rows already in the output
    removed_rows: int  # rows of the output whose key is no longer in the input
    heal: tuple[Heal, ...] = ()  # parts to heal before any new part is written

    @property
    def units(self) -> list[Unit]:
        """The units to do as objects: for a plan small enough to hold so."""
        return [Unit.from_row(row) for row in self.todo.to_pylist()]

    def units_of(self, ids: Iterable[str]) -> list[Unit]:
        """The units to do with these ids, as objects."""
        wanted = pc.is_in(self.todo.column("id"), pa.array(list(ids), pa.string()))
        return [Unit.from_row(row) for row in self.todo.filter(wanted).to_pylist()]

    @property
    def pending_rows(self) -> int | None:
        rows = self.todo.column("rows")
        return None if rows.null_count else pc.sum(rows).as_py() or 0


def _shard_part(name: str, key: str) -> bool:
    """Whether the part ``name`` is a shard's or a Parquet file's, from one of its keys
    (``file#member`` or, for the file's own error row, ``file``)."""
    sources = {key, key.split("#", 1)[0], key.rsplit("#", 1)[0]}
    return any(name == part_name(unit_id(kind, [s])) for kind in SHARD_FORMATS for s in sources)


@dataclass
class _Committed:
    """What the output holds, read once: counts, shard parts by name, earlier I/O errors."""

    parts: int = 0
    rows: int = 0  # committed rows but those of shard parts to heal whole
    shard_rows: dict[str, int] = field(default_factory=dict)  # shard part name -> its rows
    stale: dict[str, pa.Array] = field(default_factory=dict)  # image part -> earlier I/O errors
    stale_shards: dict[str, tuple[int, int]] = field(default_factory=dict)  # -> (other, stale)


def _committed_keys(
    fs: pafs.FileSystem, paths: list[str], committed: _Committed
) -> Iterator[pa.Table]:
    """The image keys of the output's parts, a part at a time (key and error columns only),
    recording the rest in ``committed``. Rows of earlier runs' I/O errors are left out; a
    shard's part is counted, not streamed: its rows never match an image key.

    Parts are read one by one (a few in flight, for S3's latency): a dataset scan over
    thousands of small files holds far more memory than the keys themselves."""

    def read(path: str) -> tuple[str, pa.Table]:
        return path, pq.ParquetFile(path, filesystem=fs).read(columns=["key", "error"])

    for path, part in ordered_map(read, paths, PARTS_IN_FLIGHT):
        committed.parts += 1
        name, keys = posixpath.basename(path), part.column("key")
        earlier = pc.fill_null(
            pc.match_substring_regex(part.column("error"), EARLIER_IO_ERROR), False
        )
        stale = pc.sum(earlier).as_py() or 0
        if part.num_rows and _shard_part(name, keys[0].as_py()):
            if stale:
                committed.stale_shards[name] = (part.num_rows - stale, stale)
            else:
                committed.shard_rows[name] = part.num_rows
                committed.rows += part.num_rows
            continue
        if stale:
            committed.stale[path] = keys.filter(earlier).combine_chunks().cast(pa.string())
            keys = keys.filter(pc.invert(earlier))
        committed.rows += len(keys)
        yield pa.table({"key": keys.cast(pa.string())})


class _Cursor:
    """A sorted stream of tables read forward by upper bound. Its first table is taken at
    once: a sort yields nothing before it has read all its input."""

    def __init__(self, tables: Iterator[pa.Table]) -> None:
        first = next(tables, None)
        self.tables, self.held = tables, [] if first is None else [first.column("key")]

    def upto(self, bound: str) -> pa.Array:
        """The stream's next keys, up to ``bound`` included."""
        taken = []
        while True:
            if not self.held:
                table = next(self.tables, None)
                if table is None:
                    break
                self.held = [table.column("key")]
            keys = self.held[0]
            upto = pc.sum(pc.less_equal(keys, bound)).as_py() or 0
            taken.append(keys.slice(0, upto))
            if upto < len(keys):
                self.held = [keys.slice(upto)]
                break
            self.held = []
        return pa.chunked_array(taken, pa.string()).combine_chunks()


class _Cutter:
    """Pending image files, in order, cut into units of ``files_per_unit`` named after their
    keys, kept as Arrow tables of UNIT_SCHEMA built a listing table at a time."""

    def __init__(self, files_per_unit: int) -> None:
        self.files_per_unit = files_per_unit
        self.rest = LISTING_SCHEMA.empty_table()  # files not in a unit yet
        self.units: list[pa.Table] = []

    def add(self, files: pa.Table, last: bool = False) -> None:
        rest = pa.concat_tables([self.rest, files])
        ids, counts, unsized = [], [], []
        start = 0
        while rest.num_rows - start >= self.files_per_unit or (last and rest.num_rows > start):
            chunk = rest.slice(start, self.files_per_unit)
            ids.append(unit_id("images", chunk.column("key").to_pylist()))
            counts.append(chunk.num_rows)
            unsized.append(chunk.column("size").null_count > 0)
            start += chunk.num_rows
        if ids:
            cut = rest.slice(0, start).combine_chunks()
            offsets = pa.array(np.concatenate([[0], np.cumsum(counts)]), pa.int32())
            self.units.append(
                pa.Table.from_arrays(
                    [
                        pa.array(ids, pa.string()),
                        pa.array(["images"] * len(ids), pa.string()),
                        pa.ListArray.from_arrays(offsets, cut.column("key").chunk(0)),
                        pa.array(counts, pa.int64()),
                        pa.ListArray.from_arrays(
                            offsets, cut.column("size").chunk(0), mask=pa.array(unsized)
                        ),
                    ],
                    schema=UNIT_SCHEMA,
                )
            )
        self.rest = rest.slice(start)

    def table(self) -> pa.Table:
        self.add(LISTING_SCHEMA.empty_table(), last=True)
        return pa.concat_tables([UNIT_SCHEMA.empty_table(), *self.units])


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


def _tables(files: Iterable[pa.Table] | Listing | Sequence[str]) -> Iterable[pa.Table]:
    """The listing as sorted tables of key and size (null where the caller knows none)."""
    if isinstance(files, Listing):
        return [pa.table({"key": files.keys, "size": files.sizes}, schema=LISTING_SCHEMA)]
    if isinstance(files, Sequence) and all(isinstance(f, str) for f in files):
        keys = pa.array(files, pa.string())
        return [pa.table({"key": keys, "size": pa.nulls(len(keys), pa.int64())})]
    return files


def make_plan(
    files: Iterable[pa.Table] | Listing | Sequence[str],
    output: str,
    fmt: Format | Literal["auto"] = "auto",
    files_per_unit: int = 256,
    parquet_columns: tuple[str, ...] = ("image",),
    run_rows: int | None = None,
) -> Plan:
    """Merge the sorted listing ``files`` (the tables of
    :func:`~skray.io.sources.listing_tables`, or a whole listing) with the keys committed under
    ``output``, holding about ``run_rows`` committed keys at a time (see
    :func:`~skray.io.external_sort.sorted_tables`). Sizes the listing gives
    travel in the units."""
    fs, paths = part_paths(output)  # listed once: on S3 a listing of every part
    committed = _Committed()
    done = _Cursor(sorted_tables(_committed_keys(fs, paths, committed), "key", run_rows))
    stale = pa.concat_arrays([pa.array([], pa.string()), *committed.stale.values()])
    cutter = _Cutter(files_per_unit)
    shards: list[tuple[str, str, int | None]] = []  # (format, uri, size)
    listed = matched = 0
    stale_listed: list[str] = []
    for table in _tables(files):
        listed += table.num_rows
        by_format = _formats(table, fmt)
        for kind in SHARD_FORMATS:
            rows = by_format.get(kind)
            if rows is not None and rows.num_rows:
                shards += [(kind, r["key"], r["size"]) for r in rows.to_pylist()]
        images = by_format.get("images")
        if images is None or not images.num_rows:
            continue
        keys = images.column("key")
        hit = pc.is_in(keys, value_set=done.upto(keys[-1].as_py()))
        matched += pc.sum(hit).as_py() or 0
        cutter.add(images.filter(pc.invert(hit)))
        if len(stale):
            stale_listed += keys.filter(pc.is_in(keys, value_set=stale)).to_pylist()
    todo = cutter.table()
    by_name = {part_name(unit_id(kind, [uri])): (kind, uri, size) for kind, uri, size in shards}
    heal = _heal(committed, set(stale_listed), by_name)
    whole = {h.part for h in heal if h.keys is None}
    rows = committed.rows + sum(
        other for name, (other, _) in committed.stale_shards.items() if name not in whole
    )
    listed_shard_rows = sum(committed.shard_rows.get(name, 0) for name in by_name)
    done_shards = (committed.shard_rows.keys() | committed.stale_shards.keys()) - whole
    shard_units = [
        shard_unit(kind, uri, parquet_columns, size).to_row()
        for name, (kind, uri, size) in by_name.items()
        if name not in done_shards
    ]
    return Plan(
        todo=pa.concat_tables([todo, pa.Table.from_pylist(shard_units, schema=UNIT_SCHEMA)]),
        listed=listed,
        committed_parts=committed.parts,
        committed_rows=rows,
        removed_rows=rows - matched - listed_shard_rows,
        heal=heal,
    )


def _heal(
    committed: _Committed, stale_listed: set[str], shards: dict[str, tuple]
) -> tuple[Heal, ...]:
    """The parts to heal: a listed shard's part goes whole; an image part loses the rows of
    its listed keys (the keys no longer listed stay as they are: nothing reads them again)."""
    heal = [
        Heal(name, None, count)
        for name, (_, count) in committed.stale_shards.items()
        if name in shards
    ]
    for path, keys in committed.stale.items():
        again = tuple(k for k in keys.to_pylist() if k in stale_listed)
        if again:
            heal.append(Heal(posixpath.basename(path), again, len(again)))
    return tuple(heal)
