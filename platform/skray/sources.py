"""Input discovery and reading for the labeling job.

An input is cut into *units* (a batch of image files, one WebDataset shard, one
Parquet file). A unit is read whole by one task, and its output is committed as
one Parquet part, so a rerun can skip exactly the units that finished.

Inside the pipeline "no error" and "no metadata" are empty strings, not None:
a column of only None has no type, and Ray Data would turn it into NaNs.
Rows carry ``key`` (stable id), ``data`` (the image bytes, or empty),
``error`` (a read problem, or ""), ``meta`` (passed-through JSON, or ""),
``unit`` and ``unit_rows`` (how many rows the unit has, so the writer knows
when it is complete).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import posixpath
import tarfile
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Literal

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from skray.storage import filesystem_for

Format = Literal["images", "webdataset", "parquet"]

IMAGE_MEMBER_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "img", "image")
METADATA_MEMBER_EXTENSIONS = ("cls", "json", "txt")
GLOB_CHARS = "*?["


class InputError(ValueError):
    """The input cannot be labeled at all (missing, empty, unreadable): fails the job early."""


@dataclass(frozen=True)
class Unit:
    """A piece of input read by one task and committed as one Parquet part."""

    id: str
    format: Format
    uris: tuple[str, ...]
    rows: int | None = None  # known up front for image files and Parquet, not for tar shards

    def to_row(self) -> dict[str, Any]:
        return {**asdict(self), "uris": list(self.uris)}

    @staticmethod
    def from_row(row: dict[str, Any]) -> "Unit":
        return Unit(row["id"], row["format"], tuple(row["uris"]), row["rows"])


def _unit_id(fmt: str, uris: list[str]) -> str:
    return hashlib.sha256(("\n".join([fmt, *uris])).encode()).hexdigest()[:20]


def _scheme_prefix(uri: str) -> str:
    return "s3://" if uri.startswith("s3://") else ""


def _is_hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def list_inputs(uri: str, exclude: list[str] = ()) -> list[str]:
    """Every object under ``uri`` (a file, a prefix, or a glob), recursively and sorted,
    without hidden names (``.x``, ``_x``) or those matching an ``exclude`` glob."""
    glob_at = min((uri.find(c) for c in GLOB_CHARS if c in uri), default=-1)
    base = uri if glob_at < 0 else uri[:glob_at].rsplit("/", 1)[0]
    fs, base_path = filesystem_for(base)
    info = fs.get_file_info(base_path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input not found: {base}")
    prefix = _scheme_prefix(uri)
    # The glob is matched below the base, like ``exclude``: a relative or file:// base
    # names its files by absolute path, which the glob as written would never match.
    pattern = uri[len(base) :].lstrip("/")
    if info.type == pafs.FileType.File:
        files = [prefix + base_path]
        base_path = posixpath.dirname(base_path)
    else:
        selector = pafs.FileSelector(base_path, recursive=True)
        files = [prefix + f.path for f in fs.get_file_info(selector) if f.type == pafs.FileType.File]
    kept = []
    for file_uri in files:
        relative = file_uri[len(prefix) :][len(base_path) :].lstrip("/")
        if _is_hidden(relative) or any(fnmatch.fnmatch(relative, p) for p in exclude):
            continue
        if glob_at >= 0 and not fnmatch.fnmatch(relative, pattern):
            continue
        kept.append(file_uri)
    if not kept:
        raise InputError(f"no input file matched {uri}" + (f" (exclude: {exclude})" if exclude else ""))
    return sorted(kept)


def file_format(uri: str) -> Format:
    """How ``format: auto`` reads a file: .tar shards, .parquet tables, anything else an image."""
    if uri.endswith(".tar"):
        return "webdataset"
    if uri.endswith(".parquet"):
        return "parquet"
    return "images"


def plan_units(
    files: list[str],
    fmt: Format | Literal["auto"],
    files_per_unit: int,
    parquet_columns: tuple[str, ...] = ("image",),
) -> list[Unit]:
    """Cut the sorted file list into units: image files in runs of ``files_per_unit``,
    each tar shard and each Parquet file on its own. Ids depend on the files only.
    Parquet files are checked for ``parquet_columns`` here, before any work."""
    by_format: dict[Format, list[str]] = {}
    for uri in files:
        by_format.setdefault(file_format(uri) if fmt == "auto" else fmt, []).append(uri)
    units: list[Unit] = []
    for kind, uris in by_format.items():
        if kind == "images":
            chunks = [uris[i : i + files_per_unit] for i in range(0, len(uris), files_per_unit)]
            units += [Unit(_unit_id(kind, c), kind, tuple(c), len(c)) for c in chunks]
        elif kind == "parquet":
            units += [Unit(_unit_id(kind, [f]), kind, (f,), _parquet_rows(f, parquet_columns)) for f in uris]
        else:
            units += [Unit(_unit_id(kind, [f]), kind, (f,)) for f in uris]
    return units


def _parquet_rows(uri: str, columns: tuple[str, ...]) -> int:
    fs, path = filesystem_for(uri)
    try:
        parquet = pq.ParquetFile(path, filesystem=fs)
    except Exception as err:  # noqa: BLE001 - any unreadable footer is an input problem
        raise InputError(f"cannot read Parquet file {uri}: {err}") from None
    names = parquet.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(f"{uri}: no column {missing[0]!r} (columns: {names})")
    return parquet.metadata.num_rows


# --- reading one unit ------------------------------------------------------


def _row(key: str, data: bytes = b"", error: str = "", meta: str = "") -> dict:
    return {"key": key, "data": data, "error": error, "meta": meta}


def _read_image_files(unit: Unit) -> Iterator[dict]:
    for uri in unit.uris:
        try:
            fs, path = filesystem_for(uri)
            with fs.open_input_stream(path) as stream:
                yield _row(uri, stream.readall())
        except OSError as err:
            yield _row(uri, error=f"unreadable: {err}")


def _tar_samples(uri: str) -> Iterator[tuple[str, dict[str, bytes] | None, str | None]]:
    """(sample key, members by extension, error) per WebDataset sample, in tar order.

    Members are grouped by basename up to the first dot (``a/b.jpg`` and
    ``a/b.cls`` form sample ``a/b``); a tar that breaks off inside a member
    yields an error for the sample it broke in. One that breaks off between or
    inside headers reads, to ``tarfile``, like a short archive: the missing
    end-of-archive blocks give it away, and it yields a ``<truncated>`` error.
    """
    fs, path = filesystem_for(uri)
    size = fs.get_file_info(path).size
    current: str | None = None
    members: dict[str, bytes] = {}
    with fs.open_input_stream(path) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                for info in tar:
                    if not info.isfile() or _is_hidden(info.name):
                        continue
                    dirname, basename = posixpath.split(info.name)
                    stem, _, ext = basename.partition(".")
                    key = posixpath.join(dirname, stem)
                    if key != current and current is not None:
                        yield current, members, None
                        members = {}
                    current = key
                    members[ext.lower()] = tar.extractfile(info).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            yield (current or "<tar>"), None, f"broken_tar: {err}"
            return
    if current is not None:
        yield current, members, None
    if size < tar.offset + 2 * tarfile.BLOCKSIZE:
        yield "<truncated>", None, "broken_tar: the archive ends without its end-of-archive blocks (truncated)"


def _sample_row(uri: str, key: str, members: dict[str, bytes] | None, error: str | None) -> dict:
    full_key = f"{uri}#{key}"
    if error:
        return _row(full_key, error=error)
    image_ext = next((e for e in members if e.rsplit(".", 1)[-1] in IMAGE_MEMBER_EXTENSIONS), None)
    meta = {e: _decode_member(members[e], e) for e in members if e in METADATA_MEMBER_EXTENSIONS}
    meta_json = json.dumps(meta, sort_keys=True) if meta else ""
    if image_ext is None:
        return _row(full_key, error=f"no_image_member: sample has only {sorted(members)}", meta=meta_json)
    return _row(full_key, members[image_ext], meta=meta_json)


def _decode_member(data: bytes, ext: str) -> Any:
    text = data.decode("utf-8", errors="replace").strip()
    if ext == "json":
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    if ext == "cls" and text.lstrip("-").isdigit():
        return int(text)
    return text


def _read_webdataset(unit: Unit) -> Iterator[dict]:
    uri = unit.uris[0]
    try:
        samples = list(_tar_samples(uri))
    except OSError as err:
        yield _row(uri, error=f"unreadable: {err}")
        return
    for key, members, error in samples:
        yield _sample_row(uri, key, members, error)


def _read_parquet(
    unit: Unit, image_column: str, id_column: str | None, meta_columns: tuple[str, ...]
) -> Iterator[dict]:
    uri = unit.uris[0]
    fs, path = filesystem_for(uri)
    parquet = pq.ParquetFile(path, filesystem=fs)
    columns = list(dict.fromkeys([image_column, *([id_column] if id_column else []), *meta_columns]))
    index = 0
    for batch in parquet.iter_batches(batch_size=256, columns=columns):
        rows = batch.to_pylist()
        for row in rows:
            row_id = row[id_column] if id_column else None
            key = f"{uri}#{row_id if row_id is not None else index}"
            meta = json.dumps({c: row[c] for c in meta_columns}, sort_keys=True) if meta_columns else ""
            yield _row(key, row[image_column] or b"", meta=meta)
            index += 1


def read_unit(
    unit: Unit,
    image_column: str = "image",
    id_column: str | None = None,
    meta_columns: tuple[str, ...] = (),
) -> list[dict]:
    """All rows of one unit, each tagged with the unit id and its row count.
    ``meta_columns`` of a Parquet file travel in ``meta`` (a training label, say)."""
    if unit.format == "images":
        rows = list(_read_image_files(unit))
    elif unit.format == "webdataset":
        rows = list(_read_webdataset(unit))
    else:
        rows = list(_read_parquet(unit, image_column, id_column, meta_columns))
    if not rows:  # a row still flows, so the unit is committed and reported
        rows = [_row(unit.uris[0], error=f"empty_shard: the {unit.format} file holds no samples")]
    for row in rows:
        row["unit"] = unit.id
        row["unit_rows"] = len(rows)
    return rows
