"""One run per output: a lease file taken before any work, renewed by a heartbeat.

The lease is ``_lease.json`` in the output, naming its holder (host, pid, start
time). It is created exclusively (``O_EXCL`` locally; a conditional PUT with
``If-None-Match: *`` on S3), renewed every ``ttl_s / 3`` by a background thread
(a conditional PUT on the ETag it last wrote), and deleted at the end. A second
run finds it and fails at once, naming the holder. A lease whose heartbeat
stopped (its run was killed) is taken over once it expires, or at once when its
holder was a process on this host that no longer exists; a takeover is itself
conditional, so two runs racing for a stale lease cannot both win.

A holder stops writing once it *could* have lost the lease (Chubby's jeopardy): its local
deadline is the last successful renewal + TTL - a margin, on the monotonic clock, and
:meth:`Lease.check` (called before every part, the manifest and the report) refuses past
it. A failed renewal is retried until then; a paused, partitioned or starved holder so
stops before another run may take over. Parts are also create-only
(:func:`skray.label.sinks.write_part`): even a write already under way cannot overwrite.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Protocol

from skray.core.errors import SkrayError
from skray.io.storage import filesystem_for, is_remote, s3_client

log = logging.getLogger(__name__)

LEASE_FILE = "_lease.json"
DEFAULT_TTL_S = 60.0


class LeaseHeld(SkrayError):
    """Another run holds the output."""


class LeaseLost(SkrayError):
    """This run's lease was taken over, or could have been: it must stop committing."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, and until when (wall clock; renewed by the heartbeat)."""

    run_id: str
    host: str
    pid: int
    started: float
    expires: float

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"run {self.run_id} (host {self.host}, pid {self.pid}, started {started})"

    def stale(self, now: float) -> bool:
        """Expired, or held by a process of this host that no longer exists."""
        return now > self.expires or (self.host == socket.gethostname() and not _alive(self.pid))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Store(Protocol):
    """Compare-and-swap on one small object; a version token stands for its content."""

    def read(self) -> tuple[bytes, str] | None: ...
    def create(self, data: bytes) -> str | None: ...
    def replace(self, data: bytes, token: str) -> str | None: ...
    def delete(self, token: str) -> None: ...


class _LocalStore:
    """A file; each operation runs under an ``flock`` on a sibling lock file, so
    read-compare-write is atomic between processes of this machine."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.lock = self.path.with_name(self.path.name + ".lock")

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read(self) -> tuple[bytes, str] | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return data, hashlib.sha256(data).hexdigest()

    def _write(self, data: bytes) -> str:
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)
        return hashlib.sha256(data).hexdigest()

    def read(self) -> tuple[bytes, str] | None:
        with self._locked():
            return self._read()

    def create(self, data: bytes) -> str | None:
        with self._locked():
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return None
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            return hashlib.sha256(data).hexdigest()

    def replace(self, data: bytes, token: str) -> str | None:
        with self._locked():
            current = self._read()
            if current is None or current[1] != token:
                return None
            return self._write(data)

    def delete(self, token: str) -> None:
        with self._locked():
            current = self._read()
            if current is not None and current[1] == token:
                self.path.unlink()


class _S3Store:
    """An object, with S3's conditional writes: ``If-None-Match: *`` and ``If-Match: ETag``."""

    def __init__(self, uri: str) -> None:
        _, path = filesystem_for(uri)
        self.bucket, self.key = path.split("/", 1)
        self.client = s3_client()

    def _conditional(self, **kwargs: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, **kwargs)["ETag"]
        except ClientError as err:
            if err.response["Error"]["Code"] in (
                "PreconditionFailed",
                "ConditionalRequestConflict",
                "NoSuchKey",
            ):
                return None
            raise

    def read(self) -> tuple[bytes, str] | None:
        from botocore.exceptions import ClientError

        try:
            got = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as err:
            if err.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None
            raise
        return got["Body"].read(), got["ETag"]

    def create(self, data: bytes) -> str | None:
        return self._conditional(Body=data, IfNoneMatch="*")

    def replace(self, data: bytes, token: str) -> str | None:
        return self._conditional(Body=data, IfMatch=token)

    def delete(self, token: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=token)
        except ClientError as err:
            if err.response["Error"]["Code"] not in ("PreconditionFailed", "NoSuchKey"):
                raise


class Lease:
    """``with Lease(output):`` holds the output for one run; ``check()`` raises once it was lost."""

    def __init__(self, output: str, ttl_s: float = DEFAULT_TTL_S) -> None:
        uri = output.rstrip("/") + "/" + LEASE_FILE
        self.uri = uri
        self.store: _Store = (
            _S3Store(uri) if is_remote(uri) else _LocalStore(filesystem_for(uri)[1])
        )
        self.ttl_s = ttl_s
        self.holder = Holder(
            uuid.uuid4().hex[:12], socket.gethostname(), os.getpid(), time.time(), 0.0
        )
        self.token: str | None = None
        self.lost = False
        self.lost_why = ""
        self.renewed = 0.0  # time.monotonic() of the last successful write of the lease
        self.margin_s = ttl_s / 4  # for clock drift and a write under way at the deadline
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def _body(self) -> bytes:
        holder = Holder(**{**asdict(self.holder), "expires": time.time() + self.ttl_s})
        return json.dumps(asdict(holder)).encode()

    @property
    def deadline(self) -> float:
        """The monotonic time past which this holder may no longer write."""
        return self.renewed + self.ttl_s - self.margin_s

    def acquire(self) -> None:
        """Take the lease, or raise :class:`LeaseHeld` naming the live holder."""
        self.renewed = time.monotonic()  # before the write: the deadline errs early
        self.token = self.store.create(self._body())
        if self.token is None:
            self._take_over()
        self._thread = threading.Thread(target=self._heartbeat, name="skray-lease", daemon=True)
        self._thread.start()

    def _take_over(self) -> None:
        current = self.store.read()
        if current is None:  # released between our create and read
            self.token = self.store.create(self._body())
        else:
            data, token = current
            holder = _parse(data)
            if holder is not None and not holder.stale(time.time()):
                raise LeaseHeld(
                    f"{self.uri} is held by {holder.describe()}: one run per output. "
                    "If that run is gone, its lease expires within "
                    f"{max(holder.expires - time.time(), 0):.0f} s."
                )
            self.renewed = time.monotonic()
            self.token = self.store.replace(self._body(), token)
            if self.token is not None:
                log.warning(
                    "took over the stale lease of %s",
                    holder.describe() if holder else "an unreadable lease",
                )
        if self.token is None:
            raise LeaseHeld(f"{self.uri}: another run took the lease at the same moment")

    def _heartbeat(self) -> None:
        """Renew every TTL/3; a failed renewal is retried every TTL/10 until the deadline (a
        store that answers nothing may answer again: until then the lease is still ours).
        Past the deadline the lease is given up for good: writers were told to stop."""
        interval = self.ttl_s / 3
        while not self._stop.wait(interval):
            with self._mutex:
                if self._stop.is_set() or self.token is None or self.lost:
                    return
                attempt = time.monotonic()
                try:
                    token = self.store.replace(self._body(), self.token)
                except Exception as err:  # noqa: BLE001 - any failure of the store: try again
                    log.warning("lease %s: renewal failed, retrying: %s", self.uri, err)
                    if time.monotonic() > self.deadline:
                        self._give_up(self._unrenewed())
                        return
                    interval = self.ttl_s / 10
                    continue
                if token is None:
                    self._give_up(
                        f"{self.uri} was taken over by another run: "
                        "stopping without committing more"
                    )
                    return
                self.token, self.renewed, interval = token, attempt, self.ttl_s / 3

    def _unrenewed(self) -> str:
        return (
            f"{self.uri} could not be renewed for {time.monotonic() - self.renewed:.0f} s "
            f"(lease_ttl_s={self.ttl_s:g}): another run may hold it by now, so this run "
            "stops without committing more. Rerun to finish"
        )

    def _give_up(self, why: str) -> None:
        self.lost, self.lost_why = True, why
        log.error("%s", why)

    def check(self) -> None:
        """Raise :class:`LeaseLost` once the lease is lost or past its local deadline (for
        good: a holder past its deadline never writes again, even if the store comes back)."""
        if not self.lost and time.monotonic() > self.deadline:
            self._give_up(self._unrenewed())
        if self.lost:
            raise LeaseLost(self.lost_why)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._mutex:
            if self.token is not None and not self.lost:
                self.store.delete(self.token)
            self.token = None

    def __enter__(self) -> "Lease":
        if self.token is None:  # ``with`` over a lease taken earlier holds it until the block ends
            self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _parse(data: bytes) -> Holder | None:
    try:
        return Holder(**json.loads(data))
    except (ValueError, TypeError):
        return None
