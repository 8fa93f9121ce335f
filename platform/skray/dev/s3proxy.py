"""An S3 proxy that fails the way object storage fails, in front of the embedded S3 server.

The embedded server answers every request in a millisecond and never fails, which hides
how many requests a job makes and what it does when storage misbehaves. This proxy counts
requests by kind and, as switched from the test or benchmark that owns it while a run
works, adds latency, answers ``503 SlowDown`` to a fraction of requests, cuts response
bodies half way, goes down for an outage (every request ``503``), or refuses with ``403``
(expired credentials). A fault can be limited to keys holding a substring
(``_lease.json``). It is a process of its own, so it never competes for the GIL of the
driver it serves, and Ray workers reach it on 127.0.0.1 like any endpoint.
"""

from __future__ import annotations

import http.client
import multiprocessing
import random
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from skray.io.storage import LOOPBACK

KINDS = ("HEAD", "GET", "GET_RANGE", "LIST", "PUT", "POST", "DELETE")
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length"}
_KEY_BYTES = 256


def _error(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
        f"<Message>{message}</Message></Error>"
    ).encode()


def request_kind(command: str, path: str, headers: Any) -> str:
    """What S3 bills a request as: a ranged GET apart from a whole one, a LIST apart from both."""
    if command == "GET":
        bucket_only = path.split("?")[0].strip("/").count("/") == 0
        if bucket_only:
            return "LIST"
        return "GET_RANGE" if headers.get("Range") else "GET"
    return command


def _serve(state: dict[str, Any], upstream: str) -> None:
    host, upstream_port = upstream.removeprefix("http://").split(":")
    local = threading.local()
    rng = random.Random()

    def matches(path: str, field: str = "only_keys") -> bool:
        """Whether the request names a key holding the field's substring (a LIST by its
        ``prefix``), or the field is empty."""
        key = state[field].value.decode()
        return not key or key in urllib.parse.unquote(path)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the S3 clients expect
        disable_nagle_algorithm = True  # no delayed-ACK stalls the real S3 does not have

        def log_message(self, *args: object) -> None:
            pass

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def _answer(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _upstream(self) -> http.client.HTTPConnection:
            if not hasattr(local, "upstream"):
                local.upstream = http.client.HTTPConnection(host, int(upstream_port), timeout=60)
                local.upstream.connect()
                local.upstream.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return local.upstream

        def _forward(self) -> None:
            body = self._body()
            kind = request_kind(self.command, self.path, self.headers)
            counted = matches(self.path, "counted_keys")
            counts = state["counts"]
            if counted:
                with counts.get_lock():
                    counts[KINDS.index(kind)] += 1
            if state["delayed"][KINDS.index(kind)]:
                time.sleep(state["latency_s"].value)
            if matches(self.path):
                if state["outage"].value:
                    self._answer(503, _error("ServiceUnavailable", "outage"))
                    return
                if state["forbidden"].value:
                    self._answer(403, _error("ExpiredToken", "the token has expired"))
                    return
                if rng.random() < state["slowdown_rate"].value:
                    self._answer(503, _error("SlowDown", "reduce your request rate"))
                    return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            headers["Content-Length"] = str(len(body))
            connection = self._upstream()
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            self.send_response(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() not in HOP_HEADERS:
                    self.send_header(name, value)
            length = response.getheader("Content-Length", "0")
            self.send_header("Content-Length", length if self.command == "HEAD" else str(len(data)))
            self.end_headers()
            if self.command == "HEAD":
                return
            if counted:
                with state["bytes"].get_lock():
                    state["bytes"].value += len(data)
            cut = (
                kind in ("GET", "GET_RANGE")
                and len(data) > 1
                and matches(self.path)
                and rng.random() < state["cut_rate"].value
            )
            if cut:  # half the body promised, then the connection drops
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

    server = ThreadingHTTPServer((LOOPBACK, 0), Handler)
    server.daemon_threads = True
    state["port"].value = server.server_address[1]
    server.serve_forever()


class FaultyS3Proxy:
    """Counts, delays and fails requests on their way to ``upstream``; switch faults with the
    attributes (``outage``, ``forbidden``, ``slowdown_rate``, ``cut_rate``, ``latency_s``,
    ``only_keys``; ``counted_keys`` limits the counts alike) at any time, from the process
    that started it. ``latency_s`` delays the request kinds in ``delayed`` (all by default:
    real S3's first-byte latency)."""

    def __init__(
        self, upstream: str, latency_s: float = 0.0, delayed: tuple[str, ...] = KINDS
    ) -> None:
        context = multiprocessing.get_context("spawn")
        self._state = {
            "port": context.Value("l", 0),
            "counts": context.Array("l", len(KINDS)),
            "latency_s": context.Value("d", latency_s),
            "delayed": context.Array("b", [kind in delayed for kind in KINDS]),
            "outage": context.Value("b", 0),
            "forbidden": context.Value("b", 0),
            "slowdown_rate": context.Value("d", 0.0),
            "cut_rate": context.Value("d", 0.0),
            "only_keys": context.Array("c", _KEY_BYTES),
            "counted_keys": context.Array("c", _KEY_BYTES),
            "bytes": context.Value("q", 0),
        }
        self._process = context.Process(target=_serve, args=(self._state, upstream), daemon=True)

    def __getattr__(self, name: str) -> Any:
        state = self.__dict__.get("_state", {})
        if name in state and name not in ("counts", "port", "delayed", "bytes"):
            value = state[name].value
            return value.decode() if isinstance(value, bytes) else value
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        state = self.__dict__.get("_state", {})
        if name in state and name not in ("counts", "port", "delayed", "bytes"):
            if name in ("only_keys", "counted_keys"):
                encoded = value.encode()
                if len(encoded) >= _KEY_BYTES:
                    raise ValueError(f"{name} is at most {_KEY_BYTES - 1} bytes")
                state[name].value = encoded
            else:
                state[name].value = value
            return
        super().__setattr__(name, value)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self._state['port'].value}"

    def counts(self) -> dict[str, int]:
        """Requests seen so far, by kind (failed ones included: S3 bills those too); with
        ``counted_keys`` set, only those for keys holding it."""
        return dict(zip(KINDS, self._state["counts"][:]))

    def bytes_sent(self) -> int:
        """Response body bytes sent so far (of counted requests)."""
        return self._state["bytes"].value

    def reset_counts(self) -> None:
        counts = self._state["counts"]
        with counts.get_lock():
            counts[:] = [0] * len(KINDS)
        self._state["bytes"].value = 0

    def heal(self) -> None:
        """Every fault off; latency and counts kept."""
        self.outage = self.forbidden = 0
        self.slowdown_rate = self.cut_rate = 0.0
        self.only_keys = ""

    def __enter__(self) -> FaultyS3Proxy:
        self._process.start()
        deadline = time.monotonic() + 30
        while self._state["port"].value == 0:
            if time.monotonic() > deadline or not self._process.is_alive():
                raise RuntimeError("the S3 proxy did not come up")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self._process.terminate()
        self._process.join(10)
