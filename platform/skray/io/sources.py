"""Input discovery and reading for the labeling job.

An input is cut into *units* (a batch of image files, one WebDataset shard, one
Parquet file). A unit is read by one task, streamed a batch at a time, and its
output is committed as one Parquet part, so a rerun can skip exactly the units
that finished. No object is read past ``max_object_bytes``: a larger one is a
``too_large`` error row.

Inside the pipeline "no error" and "no metadata" are empty strings, not None:
a column of only None has no type, and Ray Data would turn it into NaNs.
Rows carry ``key`` (stable id), ``data`` (the image bytes, or empty),
``error`` (a read problem, or ""), ``meta`` (passed-through JSON, or ""),
``unit`` and ``unit_rows`` (how many rows the unit has, in the rows of the
unit's last batch, else UNKNOWN_ROWS: the writer knows the unit is complete
once it holds that many rows, whatever order its batches came in).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import posixpath
import sys
import tarfile
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from skray.core.errors import SkrayError
from skray.io.storage import filesystem_for

Format = Literal["images", "webdataset", "parquet"]

IMAGE_MEMBER_EXTENSIONS = (
    "jpg",
    "jpeg",
    "png",
    "webp",
    "bmp",
    "gif",
    "tif",
    "tiff",
    "img",
    "image",
)
METADATA_MEMBER_EXTENSIONS = ("cls", "json", "txt")
GLOB_CHARS = "*?["
DEFAULT_MAX_OBJECT_BYTES = 64 * 2**20  # one image file, tar member or Parquet cell
UNKNOWN_ROWS = -1  # ``unit_rows`` of a row not in its unit's last batch
PARQUET_BATCH_ROWS = 16  # rows decoded from Parquet at a time: at most this many objects held
PARQUET_BUFFER_BYTES = 2**20  # column chunks are read in pieces this large, not whole


class InputError(SkrayError):
    """The input cannot be labeled at all (missing, empty, unreadable): fails the job early."""


@dataclass(frozen=True)
class Unit:
    """A piece of input read by one task and committed as one Parquet part."""

    id: str
    format: Format
    uris: tuple[str, ...]
    rows: int | None = None  # known up front for image files and Parquet, not for tar shards
    sizes: tuple[int, ...] | None = (
        None  # bytes per uri, from the listing: oversize files are never opened
    )

    def to_row(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "uris": list(self.uris),
            "sizes": None if self.sizes is None else list(self.sizes),
        }

    @staticmethod
    def from_row(row: dict[str, Any]) -> "Unit":
        sizes = None if row["sizes"] is None else tuple(row["sizes"])
        return Unit(row["id"], row["format"], tuple(row["uris"]), row["rows"], sizes)


def unit_id(fmt: str, uris: list[str]) -> str:
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
        files = [
            prefix + f.path for f in fs.get_file_info(selector) if f.type == pafs.FileType.File
        ]
    kept = []
    for file_uri in files:
        relative = file_uri[len(prefix) :][len(base_path) :].lstrip("/")
        if _is_hidden(relative) or any(fnmatch.fnmatch(relative, p) for p in exclude):
            continue
        if glob_at >= 0 and not fnmatch.fnmatch(relative, pattern):
            continue
        kept.append(file_uri)
    if not kept:
        raise InputError(
            f"no input file matched {uri}" + (f" (exclude: {exclude})" if exclude else "")
        )
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
            units += [Unit(unit_id(kind, c), kind, tuple(c), len(c)) for c in chunks]
        else:
            units += [shard_unit(kind, f, parquet_columns) for f in uris]
    return units


def shard_unit(fmt: Format, uri: str, parquet_columns: tuple[str, ...] = ("image",)) -> Unit:
    """A tar shard or a Parquet file as a unit of its own (Parquet rows counted from its footer)."""
    rows = _parquet_rows(uri, parquet_columns) if fmt == "parquet" else None
    return Unit(unit_id(fmt, [uri]), fmt, (uri,), rows)


def _parquet_rows(uri: str, columns: tuple[str, ...]) -> int | None:
    """The file's row count from its footer, after checking it has ``columns`` (a config
    mistake: fails before any work). None for an unreadable footer: a corrupt file is
    data, and becomes an ``unreadable_parquet`` row when its unit is read."""
    fs, path = filesystem_for(uri)
    try:
        parquet = pq.ParquetFile(path, filesystem=fs)
    except Exception:  # noqa: BLE001 - any unreadable footer is the file's problem, reported as a row
        return None
    names = parquet.schema_arrow.names
    missing = [c for c in columns if c not in names]
    if missing:
        raise InputError(f"{uri}: no column {missing[0]!r} (columns: {names})")
    return parquet.metadata.num_rows


# --- reading one unit ------------------------------------------------------


def _row(key: str, data: bytes = b"", error: str = "", meta: str = "") -> dict:
    return {"key": key, "data": data, "error": error, "meta": meta}


def _too_large(what: str, size: int | str, max_bytes: int) -> str:
    return f"too_large: {what} is {size} bytes, over max_object_bytes={max_bytes}"


def _read_at_most(stream: pa.NativeFile, limit: int) -> bytes:
    """Up to ``limit`` bytes: one read may return fewer than asked before the end."""
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = stream.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_image_files(unit: Unit, max_bytes: int) -> Iterator[dict]:
    """One row per file. A file over ``max_bytes`` by its listed size is not opened; one
    that grew past it since the listing is read only up to the cap: both are ``too_large``."""
    for i, uri in enumerate(unit.uris):
        try:
            fs, path = filesystem_for(uri)
            size = unit.sizes[i] if unit.sizes is not None else fs.get_file_info(path).size
            if size is not None and size > max_bytes:
                yield _row(uri, error=_too_large("the file", size, max_bytes))
                continue
            with fs.open_input_stream(path) as stream:
                data = _read_at_most(stream, max_bytes + 1)
            if len(data) > max_bytes:
                yield _row(uri, error=_too_large("the file", f"more than {max_bytes}", max_bytes))
            else:
                yield _row(uri, data)
        except OSError as err:
            yield _row(uri, error=f"unreadable: {err}")


_REGULAR_TAR_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_TAR_KINDS = {
    tarfile.SYMTYPE: "a symlink",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a device",
    tarfile.BLKTYPE: "a device",
    tarfile.FIFOTYPE: "a fifo",
}


TAR_HEADER_MAX_BYTES = 2**20  # a pax header or GNU long name, which tarfile reads whole
_TAR_HEADER_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses a pax header or GNU long name over TAR_HEADER_MAX_BYTES: ``tarfile``
    reads those into memory whole, before it yields the member they describe."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _TAR_HEADER_TYPES and self.size > TAR_HEADER_MAX_BYTES:
            raise tarfile.HeaderError(
                f"a header block claims {self.size} bytes, over {TAR_HEADER_MAX_BYTES}"
            )
        return super()._proc_member(tar)


def _member_problem(info: tarfile.TarInfo, max_bytes: int) -> str | None:
    """Why a member's data must not be read: it is no regular file (a link points
    elsewhere; a GNU sparse member claims a size its archive does not hold), or it is too large."""
    if info.issparse():
        return f"tar_member_not_regular: {info.name} is a sparse file claiming {info.size} bytes"
    if info.type not in _REGULAR_TAR_TYPES:
        kind = _TAR_KINDS.get(info.type, f"of tar type {info.type!r}")
        return f"tar_member_not_regular: {info.name} is {kind}"
    if info.size > max_bytes:
        return _too_large(info.name, info.size, max_bytes)
    return None


def _is_used_member(ext: str) -> bool:
    """Whether a sample needs a member's bytes: its image or its metadata."""
    return ext.rsplit(".", 1)[-1] in IMAGE_MEMBER_EXTENSIONS or ext in METADATA_MEMBER_EXTENSIONS


def _tar_samples(uri: str, max_bytes: int) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """(sample key, members by extension, error) per WebDataset sample, in tar order,
    streamed: only the current sample's members are held.

    Members are grouped by basename up to the first dot (``a/b.jpg`` and
    ``a/b.cls`` form sample ``a/b``). Only image and metadata members are read;
    others are named, with empty bytes. A sample with a member that is no
    regular file or is over ``max_bytes`` gets that error, and no more of its
    members are read. A tar that breaks off inside a member yields an error for
    the sample it broke in. One that breaks off between or inside headers reads,
    to ``tarfile``, like a short archive: the missing end-of-archive blocks give
    it away, and it yields a ``<truncated>`` error.
    """
    fs, path = filesystem_for(uri)
    size = fs.get_file_info(path).size
    current: str | None = None
    members: dict[str, bytes] = {}
    problem: str | None = None
    with fs.open_input_stream(path) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo) as tar:
                for info in tar:
                    tar.members.clear()  # tarfile keeps every header it read: a shard's worth
                    if info.isdir() or _is_hidden(info.name):
                        continue
                    dirname, basename = posixpath.split(info.name)
                    stem, _, ext = basename.partition(".")
                    key, ext = posixpath.join(dirname, stem), ext.lower()
                    if key != current and current is not None:
                        yield current, members, problem
                        members, problem = {}, None
                    current = key
                    if problem is None and not _is_used_member(ext):
                        members[ext] = b""
                    elif problem is None:
                        problem = _member_problem(info, max_bytes)
                        members[ext] = b"" if problem else tar.extractfile(info).read()
        except (tarfile.TarError, OSError, EOFError) as err:
            yield (current or "<tar>"), {}, f"broken_tar: {err}"
            return
    if current is not None:
        yield current, members, problem
    if size < tar.offset + 2 * tarfile.BLOCKSIZE:
        yield (
            "<truncated>",
            {},
            "broken_tar: the archive ends without its end-of-archive blocks (truncated)",
        )


def _sample_row(uri: str, key: str, members: dict[str, bytes], error: str | None) -> dict:
    full_key = f"{uri}#{key}"
    if error:
        return _row(full_key, error=error)
    image_ext = next((e for e in members if e.rsplit(".", 1)[-1] in IMAGE_MEMBER_EXTENSIONS), None)
    meta = {e: _decode_member(members[e], e) for e in members if e in METADATA_MEMBER_EXTENSIONS}
    meta_json = json.dumps(meta, sort_keys=True) if meta else ""
    if image_ext is None:
        return _row(
            full_key, error=f"no_image_member: sample has only {sorted(members)}", meta=meta_json
        )
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


def _read_webdataset(unit: Unit, max_bytes: int) -> Iterator[dict]:
    uri = unit.uris[0]
    try:
        for key, members, error in _tar_samples(uri, max_bytes):
            yield _sample_row(uri, key, members, error)
    except OSError as err:
        yield _row(uri, error=f"unreadable: {err}")


def _cell_sizes(column: pa.Array) -> list[int | None]:
    """Bytes per cell of a binary or string column; None where there is nothing to measure."""
    kind = column.type
    if (
        pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
    ):
        return pc.binary_length(column).to_pylist()
    return [None] * len(column)


def _batch_rows(
    uri: str,
    batch: pa.RecordBatch,
    first: int,
    image_column: str,
    id_column: str | None,
    meta_columns: tuple[str, ...],
    max_bytes: int,
) -> Iterator[dict]:
    """The rows of one record batch (``first`` is the file's index of its first row); an
    image cell over ``max_bytes`` is a ``too_large`` row and is never copied into Python."""
    images = batch.column(image_column)
    sizes = _cell_sizes(images)
    ids = batch.column(id_column).to_pylist() if id_column else [None] * batch.num_rows
    metas = {c: batch.column(c).to_pylist() for c in meta_columns}
    for i in range(batch.num_rows):
        key = f"{uri}#{ids[i] if ids[i] is not None else first + i}"
        meta = (
            json.dumps({c: metas[c][i] for c in meta_columns}, sort_keys=True)
            if meta_columns
            else ""
        )
        if sizes[i] is not None and sizes[i] > max_bytes:
            yield _row(key, error=_too_large("the cell", sizes[i], max_bytes), meta=meta)
        else:
            yield _row(key, images[i].as_py() or b"", meta=meta)


def _read_parquet(
    unit: Unit,
    image_column: str,
    id_column: str | None,
    meta_columns: tuple[str, ...],
    max_bytes: int,
) -> Iterator[dict]:
    """Rows a few at a time, row group by row group, with column chunks read in pieces:
    the file is never held whole. A file whose footer is unreadable, or a row group that
    does not decode, is one ``unreadable_parquet`` row; the other row groups still count."""
    uri = unit.uris[0]
    try:
        fs, path = filesystem_for(uri)
        parquet = pq.ParquetFile(
            path, filesystem=fs, pre_buffer=False, buffer_size=PARQUET_BUFFER_BYTES
        )
    except (pa.ArrowException, OSError) as err:
        yield _row(uri, error=f"unreadable_parquet: {err}")
        return
    columns = list(
        dict.fromkeys([image_column, *([id_column] if id_column else []), *meta_columns])
    )
    first = 0
    for group in range(parquet.num_row_groups):
        index = first
        try:
            for batch in parquet.iter_batches(
                PARQUET_BATCH_ROWS, row_groups=[group], columns=columns
            ):
                yield from _batch_rows(
                    uri, batch, index, image_column, id_column, meta_columns, max_bytes
                )
                index += batch.num_rows
        except (pa.ArrowException, OSError) as err:
            yield _row(
                f"{uri}#<row group {group}>", error=f"unreadable_parquet: row group {group}: {err}"
            )
        first += parquet.metadata.row_group(group).num_rows


def _unit_rows(
    unit: Unit,
    image_column: str,
    id_column: str | None,
    meta_columns: tuple[str, ...],
    max_bytes: int,
) -> Iterator[dict]:
    if unit.format == "images":
        return _read_image_files(unit, max_bytes)
    if unit.format == "webdataset":
        return _read_webdataset(unit, max_bytes)
    return _read_parquet(unit, image_column, id_column, meta_columns, max_bytes)


def _tagged(rows: list[dict], unit_id: str, unit_rows: int) -> list[dict]:
    for row in rows:
        row["unit"], row["unit_rows"] = unit_id, unit_rows
    return rows


def unit_batches(
    unit: Unit,
    batch_size: int,
    image_column: str = "image",
    id_column: str | None = None,
    meta_columns: tuple[str, ...] = (),
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
) -> Iterator[list[dict]]:
    """The rows of one unit, ``batch_size`` at a time as they are read, so a task holds a
    batch, never a whole shard. Rows carry ``unit`` and ``unit_rows``: UNKNOWN_ROWS, except
    in the unit's last batch, where it is the unit's row count (a full batch waits for one
    more row to learn whether it is the last). A unit without rows still yields one
    ``empty_shard`` row, so it is committed and reported. ``meta_columns`` of a Parquet
    file travel in ``meta`` (a training label, say)."""
    rows = _unit_rows(unit, image_column, id_column, meta_columns, max_object_bytes)
    batch: list[dict] = []
    count = 0
    for row in rows:
        if len(batch) == batch_size:
            yield _tagged(batch, unit.id, UNKNOWN_ROWS)
            batch = []
        batch.append(row)
        count += 1
    if not count:
        batch, count = (
            [_row(unit.uris[0], error=f"empty_shard: the {unit.format} file holds no samples")],
            1,
        )
    yield _tagged(batch, unit.id, count)


def table_batches(units: pa.Table, batch_size: int, **reading: Any) -> Iterator[list[dict]]:
    """:func:`unit_batches` (``reading``: its keyword arguments) of every unit in ``units``
    (rows of :meth:`Unit.to_row`, the block a Ray Data read task gets), one after the other."""
    for row in units.to_pylist():
        yield from unit_batches(Unit.from_row(row), batch_size, **reading)


def read_unit(
    unit: Unit,
    image_column: str = "image",
    id_column: str | None = None,
    meta_columns: tuple[str, ...] = (),
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
) -> list[dict]:
    """All rows of one unit as one batch, so each carries the unit's row count:
    for callers that hold a unit whole anyway; the labeling job streams :func:`unit_batches`."""
    [rows] = unit_batches(
        unit, sys.maxsize, image_column, id_column, meta_columns, max_object_bytes
    )
    return rows
