"""Reading one stored object through storage faults: a whole small object, or a large one as
a seekable file that resumes where a fault broke it off.

A stream cut half way (a reset, a 503 mid-body, an outage) is re-read from the byte it
broke at, so a tar shard or a Parquet file read through :class:`ResumableFile` never yields
a sample twice or loses one; what outlasts the retry budget raises
:class:`~skray.io.retry.StorageUnavailable`.
"""

from __future__ import annotations

import io

from skray.io.retry import IoRetry, call_with_retry
from skray.io.storage import filesystem_for, read_range, redact_uri

DEFAULT_BUFFER_BYTES = 16 * 2**20  # one ranged read: a 6 MB shard is one GET


def read_object(uri: str, limit: int, policy: IoRetry | None = None) -> bytes:
    """The bytes of the object at ``uri``, at most ``limit`` of them, in one request (on S3
    one GET: no HEAD first), retried as a whole on a fault."""
    return call_with_retry(lambda: read_range(uri, 0, limit), f"reading {redact_uri(uri)}", policy)


class ResumableFile(io.RawIOBase):
    """A read-only, seekable view of one object, read ``buffer_bytes`` at a time by offset,
    each piece one ranged GET; a failed read is retried at the same offset. ``size`` from
    the listing saves the one HEAD that would look it up: a shard then costs
    ``ceil(size / buffer_bytes)`` requests."""

    def __init__(
        self,
        uri: str,
        policy: IoRetry | None = None,
        buffer_bytes: int | None = None,
        size: int | None = None,
    ) -> None:
        super().__init__()
        self.uri, self.policy = uri, policy
        self.buffer_bytes = buffer_bytes or DEFAULT_BUFFER_BYTES
        self._pos = 0
        self._buffer, self._buffer_at = b"", 0
        self.size = self._looked_up_size() if size is None else size

    def _looked_up_size(self) -> int:
        fs, path = filesystem_for(self.uri)

        def size() -> int:
            info = fs.get_file_info(path)
            if info.size is None:  # not a file (gone since the listing)
                raise FileNotFoundError(f"{redact_uri(self.uri)} does not exist")
            return info.size

        return call_with_retry(size, f"opening {redact_uri(self.uri)}", self.policy)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(base + offset, 0)
        return self._pos

    def read(self, size: int = -1) -> bytes:
        end = self.size if size is None or size < 0 else min(self._pos + size, self.size)
        parts: list[bytes] = []
        while self._pos < end:
            if not 0 <= self._pos - self._buffer_at < len(self._buffer):
                self._fill(max(end - self._pos, self.buffer_bytes))
            offset = self._pos - self._buffer_at
            if not 0 <= offset < len(self._buffer):  # the object is shorter than it was
                break
            piece = self._buffer[offset : offset + end - self._pos]
            parts.append(piece)
            self._pos += len(piece)
        return b"".join(parts)

    def readinto(self, target) -> int:
        data = self.read(len(target))
        target[: len(data)] = data
        return len(data)

    def _fill(self, length: int) -> None:
        # An object no larger than the buffer is read whole, wherever the reader starts:
        # a Parquet reader reads the footer first and the data after, both in this one GET.
        whole = self.size <= self.buffer_bytes
        at = 0 if whole else self._pos
        length = self.size if whole else min(length, self.size - at)
        self._buffer = call_with_retry(
            lambda: read_range(self.uri, at, length),
            f"reading {redact_uri(self.uri)} at {at}",
            self.policy,
        )
        self._buffer_at = at

    def close(self) -> None:
        self._buffer = b""
        super().close()
