"""What a labeling run still has to do: the current listing merged with what the output holds.

Image files are planned by *key*, not by position: the keys already in committed
parts are left out, and only the rest are cut into units whose ids hash their
keys. So files added anywhere in the key order, or removed, change nothing that
was committed, and a rerun labels exactly the keys not yet in the output. Tar
shards and Parquet files are units of their own, done when their part exists.

Both sides stay in Arrow arrays: the listing is compared with the committed keys
one sorted slice at a time, so the planner holds the listing, the committed keys
and one slice's hash table — never a Python set of every key (Ray Data's own
checkpointing keeps every processed id as a Python object, ray#60200).
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from skray.sinks import part_name, part_paths
from skray.sources import Format, Unit, unit_id, shard_unit

SLICE_KEYS = 1 << 20  # listed keys compared at once: bounds the hash table to one slice


@dataclass(frozen=True)
class Plan:
    """The units still to label, and how the listing relates to the output."""

    units: list[Unit]  # still to do
    listed: int  # input files listed (images, shards and Parquet files)
    committed_parts: int  # parts already in the output
    committed_rows: int  # rows already in the output
    removed_rows: int  # rows of the output whose key is no longer in the input

    @property
    def pending_rows(self) -> int | None:
        known = [u.rows for u in self.units]
        return None if None in known else sum(known)


def committed_keys(output: str) -> pa.Array:
    """Every key in the output's parts, one Arrow string array (the key column only is read)."""
    fs, paths = part_paths(output)
    if not paths:
        return pa.array([], pa.string())
    table = pads.dataset(paths, filesystem=fs, format="parquet").to_table(columns=["key"])
    return table.column("key").combine_chunks().cast(pa.string())


def _slices(listed: pa.Array) -> list[tuple[pa.Array, str | None, str | None]]:
    """The sorted listing in slices, each with the key range it owns: [low, high).

    The ranges cover every string, so each committed key falls in exactly one slice."""
    out = []
    for start in range(0, max(len(listed), 1), SLICE_KEYS):
        part = listed[start : start + SLICE_KEYS]
        low = None if start == 0 else listed[start].as_py()
        high = listed[start + SLICE_KEYS].as_py() if start + SLICE_KEYS < len(listed) else None
        out.append((part, low, high))
    return out


def _owned(keys: pa.Array, low: str | None, high: str | None) -> pa.Array:
    """The keys in [low, high); None is open-ended."""
    if low is not None:
        keys = keys.filter(pc.greater_equal(keys, low))
    if high is not None:
        keys = keys.filter(pc.less(keys, high))
    return keys


def _merge(listed: pa.Array, committed: pa.Array) -> tuple[pa.Array, pa.Array]:
    """(listed keys not committed, committed keys not listed), slice by slice."""
    pending, unlisted = [], []
    for part, low, high in _slices(listed):
        mine = _owned(committed, low, high)
        pending.append(part.filter(pc.invert(pc.is_in(part, value_set=mine))))
        unlisted.append(mine.filter(pc.invert(pc.is_in(mine, value_set=part))))
    return pa.concat_arrays(pending), pa.concat_arrays(unlisted)


def _shard_source(keys: pa.Array) -> pa.Array:
    """The file a shard row came from: its key up to the first ``#`` (``shard.tar#sample``)."""
    return pc.replace_substring_regex(keys, pattern="#.*$", replacement="")


def _formats(listed: pa.Array, fmt: Format | Literal["auto"]) -> dict[str, pa.Array]:
    if fmt != "auto":
        return {fmt: listed}
    tar, parquet = pc.ends_with(listed, ".tar"), pc.ends_with(listed, ".parquet")
    return {
        "webdataset": listed.filter(tar),
        "parquet": listed.filter(parquet),
        "images": listed.filter(pc.invert(pc.or_(tar, parquet))),
    }


def image_units(keys: pa.Array, files_per_unit: int) -> list[Unit]:
    """Pending image keys, in order, cut into units named after their keys."""
    units = []
    for start in range(0, len(keys), files_per_unit):
        chunk = keys[start : start + files_per_unit].to_pylist()
        units.append(Unit(unit_id("images", chunk), "images", tuple(chunk), len(chunk)))
    return units


def plan(
    files: Sequence[str] | pa.Array,
    output: str,
    fmt: Format | Literal["auto"] = "auto",
    files_per_unit: int = 256,
    parquet_columns: tuple[str, ...] = ("image",),
) -> Plan:
    """Merge the sorted listing ``files`` with the keys committed under ``output``."""
    listed = files if isinstance(files, pa.Array) else pa.array(files, pa.string())
    by_format = _formats(listed, fmt)
    _, paths = part_paths(output)
    done_parts = {posixpath.basename(p) for p in paths}
    committed = committed_keys(output)
    images = by_format.get("images", pa.array([], pa.string()))
    pending_images, unlisted = _merge(images, committed)
    units = image_units(pending_images, files_per_unit)
    shard_uris: list[str] = []
    for kind in ("webdataset", "parquet"):
        uris = by_format.get(kind, pa.array([], pa.string())).to_pylist()
        shard_uris += uris
        units += [shard_unit(kind, uri, parquet_columns) for uri in uris
                  if part_name(unit_id(kind, [uri])) not in done_parts]
    still_listed = pc.is_in(_shard_source(unlisted), value_set=pa.array(shard_uris, pa.string()))
    return Plan(
        units=units,
        listed=len(listed),
        committed_parts=len(paths),
        committed_rows=len(committed),
        removed_rows=len(unlisted) - pc.sum(still_listed).as_py() if len(unlisted) else 0,
    )
