"""Reading one stored object through storage faults: a whole small object, or a large one as
a seekable file that resumes where a fault broke it off.

A stream cut half way (a reset, a 503 mid-body, an outage) is re-read from the byte it
broke at, so a tar shard or a Parquet file read through :class:`ResumableFile` never yields
a sample twice or loses one; what outlasts the retry budget raises
:class:`~skray.io.retry.StorageUnavailable`.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.fs

from skray.io.retry import IoRetry, call_with_retry
from skray.io.storage import filesystem_for, redact_uri

DEFAULT_BUFFER_BYTES = 16 * 2**20  # one ranged read: a 6 MB shard is one GET


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


def read_object(
    fs: pa.fs.FileSystem, path: str, limit: int, uri: str, policy: IoRetry | None = None
) -> bytes:
    """The bytes of the object at ``path`` of ``fs`` (``uri``, for messages), at most
    ``limit`` of them, retried as a whole on a fault."""

    def attempt() -> bytes:
        with fs.open_input_stream(path) as stream:
            return _read_at_most(stream, limit)

    return call_with_retry(attempt, f"reading {redact_uri(uri)}", policy)


class ResumableFile(io.RawIOBase):
    """A read-only, seekable view of one object, read ``buffer_bytes`` at a time by offset;
    a failed read is retried (on a fresh handle) at the same offset."""

    def __init__(
        self,
        uri: str,
        policy: IoRetry | None = None,
        buffer_bytes: int | None = None,
    ) -> None:
        super().__init__()
        self.uri, self.policy = uri, policy
        self.buffer_bytes = buffer_bytes or DEFAULT_BUFFER_BYTES
        self._fs, self._path = filesystem_for(uri)
        self._handle: pa.NativeFile | None = None
        self._pos = 0
        self._buffer, self._buffer_at = b"", 0
        self.size = self._call(lambda: self._open().size(), "opening")

    def _open(self) -> pa.NativeFile:
        if self._handle is None:
            self._handle = self._fs.open_input_file(self._path)
        return self._handle

    def _call(self, fn, doing: str):
        def attempt():
            try:
                return fn()
            except OSError:
                self._drop_handle()  # the next try starts a new request
                raise

        return call_with_retry(attempt, f"{doing} {redact_uri(self.uri)}", self.policy)

    def _drop_handle(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            except OSError:
                pass
            self._handle = None

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
            offset = self._pos - self._buffer_at
            if not 0 <= offset < len(self._buffer):
                self._fill(max(end - self._pos, self.buffer_bytes))
                offset = 0
                if not self._buffer:  # the object is shorter than it was: its end came early
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
        at = self._pos
        length = min(length, self.size - at)
        self._buffer = self._call(lambda: self._open().read_at(length, at), f"reading at {at}")
        self._buffer_at = at

    def close(self) -> None:
        self._drop_handle()
        self._buffer = b""
        super().close()
