"""WebDataset tar shards, streamed a sample at a time: a shard is never held whole, and
no header or member can make ``tarfile`` allocate past the size cap."""

from __future__ import annotations

import json
import posixpath
import tarfile
from dataclasses import dataclass
from typing import Any, Iterator

from skray.io.objects import ResumableFile
from skray.io.retry import IoRetry, StorageUnavailable, is_missing
from skray.io.sources.listing import is_hidden
from skray.io.sources.rows import RowError, make_row, missing, too_large

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
DEFAULT_MAX_MEMBERS_PER_SAMPLE = 16
DEFAULT_MAX_SAMPLE_BYTES = 64 * 2**20  # a sample's members together
META_MAX_BYTES = 64 * 2**10  # of one metadata member, kept in ``meta``

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


class BoundedTarInfo(tarfile.TarInfo):
    """Refuses a pax header or GNU long name over TAR_HEADER_MAX_BYTES: ``tarfile``
    reads those into memory whole, before it yields the member they describe."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _TAR_HEADER_TYPES and self.size > TAR_HEADER_MAX_BYTES:
            raise tarfile.HeaderError(
                f"a header block claims {self.size} bytes, over {TAR_HEADER_MAX_BYTES}"
            )
        return super()._proc_member(tar)


def _member_problem(info: tarfile.TarInfo, max_bytes: int) -> RowError | None:
    """Why a member's data must not be read: it is no regular file (a link points
    elsewhere; a GNU sparse member claims a size its archive does not hold), or it is too large."""
    if info.issparse():
        return RowError(
            "tar_member_not_regular", f"{info.name} is a sparse file claiming {info.size} bytes"
        )
    if info.type not in _REGULAR_TAR_TYPES:
        kind = _TAR_KINDS.get(info.type, f"of tar type {info.type!r}")
        return RowError("tar_member_not_regular", f"{info.name} is {kind}")
    if info.size > max_bytes:
        return too_large(info.name, info.size, max_bytes)
    return None


def member_name(name: str) -> str | None:
    """A member's name as WebDataset means it: ``./`` (``tar -C dir .``) and a leading ``/``
    stripped; None for one that climbs out of the archive (``..``)."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    return None if ".." in parts else "/".join(parts)


@dataclass(frozen=True)
class SampleLimits:
    """What one sample may hold: members, and their bytes together (each member is also
    capped by ``max_object_bytes``), so no sample makes a task hold more than that."""

    max_members: int = DEFAULT_MAX_MEMBERS_PER_SAMPLE
    max_bytes: int = DEFAULT_MAX_SAMPLE_BYTES


def _sample_problem(key: str, members: int, size: int, limits: SampleLimits) -> RowError | None:
    if members > limits.max_members:
        return RowError(
            "too_large",
            f"sample {key} has over {limits.max_members} members (max_members_per_sample)",
        )
    if size > limits.max_bytes:
        return RowError(
            "too_large", f"sample {key} holds over {limits.max_bytes} bytes (max_sample_bytes)"
        )
    return None


def _split(key: str) -> RowError:
    return RowError(
        "split_sample",
        f"members of sample {key} are not next to each other in the tar "
        "(WebDataset needs them adjacent: write the shard with `tar --sort=name`)",
    )


def _is_used_member(ext: str) -> bool:
    """Whether a sample needs a member's bytes: its image or its metadata."""
    return ext.rsplit(".", 1)[-1] in IMAGE_MEMBER_EXTENSIONS or ext in METADATA_MEMBER_EXTENSIONS


def _tar_samples(
    uri: str,
    max_bytes: int,
    policy: IoRetry | None = None,
    limits: SampleLimits = SampleLimits(),
    size: int | None = None,
    buffer_bytes: int | None = None,
) -> Iterator[tuple[str, dict[str, bytes], RowError | None]]:
    """(sample key, members by extension, error) per WebDataset sample, in tar order,
    streamed: only the current sample's members are held.

    Members are grouped by basename up to the first dot (``a/b.jpg`` and
    ``a/b.cls`` form sample ``a/b``), their names normalised first (:func:`member_name`;
    one that climbs out is a row of its own). Only image and metadata members are read;
    others are named, with empty bytes. A sample with a member that is no
    regular file or is over ``max_bytes``, or past ``limits``, gets that error, and no more
    of its members are read. A tar that breaks off inside a member yields an error for
    the sample it broke in. One that breaks off between or inside headers reads,
    to ``tarfile``, like a short archive: the missing end-of-archive blocks give
    it away, and it yields a ``<truncated>`` error. The shard is read through a
    :class:`~skray.io.objects.ResumableFile` (``size``: the shard's, from the listing;
    ``buffer_bytes`` per request): a storage fault resumes the stream where it broke, or raises
    :class:`~skray.io.retry.StorageUnavailable`, never a row.
    """
    current: str | None = None  # the sample's key as yielded
    group: str | None = None  # the key its members share
    seen: set[str] = set()  # keys yielded: a sample whose members are apart is told once
    members: dict[str, bytes] = {}
    problem: RowError | None = None
    count = size_read = 0
    with ResumableFile(uri, policy, buffer_bytes, size) as stream:
        size = stream.size
        try:
            with tarfile.open(fileobj=stream, mode="r|", tarinfo=BoundedTarInfo) as tar:
                for info in tar:
                    tar.members.clear()  # tarfile keeps every header it read: a shard's worth
                    name = member_name(info.name)
                    if name is None:
                        if current is not None:
                            yield current, members, problem
                        current, group, members, problem = None, None, {}, None
                        count = size_read = 0
                        climbs = f"{info.name!r} climbs out of the archive"
                        yield info.name, {}, RowError("unsafe_member_name", climbs)
                        continue
                    if info.isdir() or not name or is_hidden(name):
                        continue
                    dirname, basename = posixpath.split(name)
                    stem, _, ext = basename.partition(".")
                    key, ext = posixpath.join(dirname, stem), ext.lower()
                    if key != group:
                        if current is not None:
                            yield current, members, problem
                        members, problem, count, size_read = {}, None, 0, 0
                        group, current = key, key
                        if key in seen:  # one key, one row: the stray members are one error
                            current, problem = f"{key}@{info.offset}", _split(key)
                        seen.add(key)
                    count += 1
                    if problem is not None:
                        continue
                    used = _is_used_member(ext)
                    if used:
                        problem = _member_problem(info, max_bytes)
                        size_read += info.size
                    problem = problem or _sample_problem(key, count, size_read, limits)
                    if problem is None:
                        members[ext] = tar.extractfile(info).read() if used else b""
        except StorageUnavailable:
            raise
        except (tarfile.TarError, OSError, EOFError) as err:
            yield (current or "<tar>"), {}, RowError("broken_tar", str(err))
            return
    if current is not None:
        yield current, members, problem
    if size < tar.offset + 2 * tarfile.BLOCKSIZE:
        yield (
            "<truncated>",
            {},
            RowError(
                "broken_tar", "the archive ends without its end-of-archive blocks (truncated)"
            ),
        )


def _decode_member(data: bytes, ext: str) -> Any:
    """A metadata member's value: JSON or a class number where it parses as one, else its
    text (at most META_MAX_BYTES of it). Nothing a member holds can raise here."""
    text = data[:META_MAX_BYTES].decode("utf-8", errors="replace").strip()
    try:
        if ext == "json":
            return json.loads(text)
        if ext == "cls" and text.isascii():
            return int(text)
    except (ValueError, RecursionError):  # not JSON, no number, or nested past the stack
        pass
    return text


def _meta_json(members: dict[str, bytes]) -> str:
    meta = {e: _decode_member(members[e], e) for e in members if e in METADATA_MEMBER_EXTENSIONS}
    if not meta:
        return ""
    try:
        return json.dumps(meta, sort_keys=True)
    except (ValueError, RecursionError):  # parsed, but too deep to write out again: the text
        return json.dumps(
            {e: members[e][:META_MAX_BYTES].decode("utf-8", "replace") for e in meta},
            sort_keys=True,
        )


def _sample_row(uri: str, key: str, members: dict[str, bytes], error: RowError | None) -> dict:
    full_key = f"{uri}#{key}"
    if error:
        return make_row(full_key, error=error)
    image_ext = next((e for e in members if e.rsplit(".", 1)[-1] in IMAGE_MEMBER_EXTENSIONS), None)
    meta_json = _meta_json(members)
    if image_ext is None:
        return make_row(
            full_key,
            error=RowError("no_image_member", f"sample has only {sorted(members)}"),
            meta=meta_json,
        )
    return make_row(full_key, members[image_ext], meta=meta_json)


def read_webdataset(
    uri: str,
    max_bytes: int,
    policy: IoRetry | None = None,
    limits: SampleLimits = SampleLimits(),
    size: int | None = None,
    buffer_bytes: int | None = None,
) -> Iterator[dict]:
    """One row per sample of the shard at ``uri`` (of ``size`` bytes, where known), its
    metadata members as ``meta``; a shard deleted since the listing is one ``missing`` row."""
    try:
        for key, members, error in _tar_samples(uri, max_bytes, policy, limits, size, buffer_bytes):
            yield _sample_row(uri, key, members, error)
    except OSError as err:
        if not is_missing(err):
            raise
        yield make_row(uri, error=missing(uri))
