"""The embedded default: an S3-compatible server and a local Ray head on 127.0.0.1.

``make demo`` and the tests use these instead of a cloud: the same code paths
(S3 protocol, ``ray job submit``, token auth) against servers this module starts
and stops. Each is a context manager that cleans up what it started, and only that.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from skray.io.storage import LOOPBACK

# moto accepts any credentials; these only exist so clients sign their requests.
EMBEDDED_S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "skray-embedded",
    "AWS_SECRET_ACCESS_KEY": "skray-embedded",
}


def free_port(host: str = LOOPBACK) -> int:
    """A port free now, for servers that cannot bind port 0 and say which port they got
    (the Ray head's GCS and dashboard); another process may take it before they bind it."""
    return free_ports(1, host)[0]


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` different ports free now: each held until all are chosen, so the system
    cannot hand out one of them twice."""
    with contextlib.ExitStack() as held:
        sockets = [held.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]


def _wait_until(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")


class _Service(abc.ABC):
    """Started on ``with`` entry, stopped on exit, whatever happened inside."""

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop()

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None: ...


class EmbeddedS3(_Service):
    """moto's S3 server in a child process on 127.0.0.1 (state lives in memory).

    With ``port=0`` (the default) the server binds a port the system picks and ``port`` holds
    it once started: no window in which another process can take a port chosen for it.
    """

    def __init__(self, host: str = LOOPBACK, port: int = 0, region: str = "us-east-1") -> None:
        self.host, self.port, self.region = host, port, region
        self._process: subprocess.Popen | None = None
        self._log: tempfile._TemporaryFileWrapper | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point every client (boto3, pyarrow) here."""
        return {
            **EMBEDDED_S3_CREDENTIALS,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }

    def _listening(self) -> bool:
        """Up and answering; learns the bound port from the server's ``Running on`` line."""
        if not self.port:
            assert self._process is not None and self._log is not None
            bound = re.search(
                rf"Running on http://{re.escape(self.host)}:(\d+)",
                Path(self._log.name).read_text(errors="replace"),
            )
            if bound is None:
                if self._process.poll() is not None:
                    raise RuntimeError(
                        f"the S3 server exited with {self._process.returncode} before listening"
                    )
                return False
            self.port = int(bound[1])
        return self._responds()

    def _responds(self) -> bool:
        try:
            urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=1).close()
            return True
        except OSError:
            return False

    def start(self) -> None:
        # the server's log goes to a file, not a pipe: a pipe nobody drains would stall it
        self._log = tempfile.NamedTemporaryFile(prefix="skray-s3-", suffix=".log")
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", self.host, "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        _wait_until(self._listening, 60, f"the S3 server on {self.host} coming up")

    def stop(self) -> None:
        if self._process and self._process.poll() is None:
            self._process.terminate()
            self._process.wait(timeout=10)
        if self._log:
            self._log.close()

    def create_bucket(self, name: str) -> None:
        self._client.create_bucket(Bucket=name)

    @functools.cached_property
    def _client(self):
        """One client for every bucket: each new one costs 0.15 s or more of CPU."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=EMBEDDED_S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=EMBEDDED_S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )


def ray_cli() -> str:
    """The ``ray`` next to this interpreter, so jobs run with this venv's ``python``."""
    local = Path(sys.executable).parent / "ray"
    return str(local) if local.exists() else (shutil.which("ray") or "ray")


def ray_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for ``ray start`` / ``ray job submit``: this venv first on PATH, token auth
    on."""
    env = {**os.environ, **(extra or {})}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"
    return env


def ensure_auth_token(env: dict[str, str]) -> None:
    """Token auth stays on: create Ray's default token file (~/.ray/auth_token) when ``env``
    has no token (Ray's CLI takes 2 s to start, so only then)."""
    home = Path(env.get("HOME") or Path.home())
    token_file = Path(env.get("RAY_AUTH_TOKEN_PATH") or home / ".ray" / "auth_token")
    if env.get("RAY_AUTH_TOKEN") or token_file.is_file():
        return
    subprocess.run(
        [ray_cli(), "get-auth-token", "--generate"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


class LocalRayHead(_Service):
    """``ray start --head`` on 127.0.0.1 with token auth; ``stop`` ends its processes only.

    Environment given here (e.g. the S3 endpoint and credentials) reaches every
    worker and job on the node, which is how a real cluster gets its credentials
    (node environment or instance roles), never through job arguments.
    """

    def __init__(
        self,
        num_cpus: int = 4,
        env: dict[str, str] | None = None,
        object_store_bytes: int = 1 << 30,
    ) -> None:
        self.num_cpus, self.object_store_bytes = num_cpus, object_store_bytes
        self.env = ray_env(env)
        # Chosen, not port 0: ``ray start --head`` accepts 0 but reports the ports it got only
        # in its console text (or the shared /tmp/ray session files), nothing stable to read.
        # The agent and the client server too: Ray's fixed defaults (52365, 10001) are taken by
        # any other Ray on the machine, and then this head has no agent to run submitted jobs.
        self.gcs_port, self.dashboard_port, self._agent_port, self._client_port = free_ports(4)

    @property
    def address(self) -> str:
        """Where ``ray job submit`` and the job SDK connect."""
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        """Where ``ray start --address`` (another node) and ``ray.init`` connect."""
        return f"{LOOPBACK}:{self.gcs_port}"

    def start(self) -> None:
        ensure_auth_token(self.env)
        subprocess.run(
            [
                ray_cli(),
                "start",
                "--head",
                f"--node-ip-address={LOOPBACK}",
                f"--port={self.gcs_port}",
                f"--dashboard-host={LOOPBACK}",
                f"--dashboard-port={self.dashboard_port}",
                f"--dashboard-agent-listen-port={self._agent_port}",
                f"--ray-client-server-port={self._client_port}",
                f"--num-cpus={self.num_cpus}",
                f"--object-store-memory={self.object_store_bytes}",
                "--disable-usage-stats",
            ],
            env=self.env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _wait_until(self._dashboard_up, 90, f"the Ray dashboard at {self.address} coming up")

    def _dashboard_up(self) -> bool:
        try:
            urllib.request.urlopen(self.address + "/api/version", timeout=2).close()
            return True
        except OSError as err:
            return getattr(err, "code", None) in (401, 403)  # up, and asking for the token

    def add_worker_node(self, num_cpus: int = 2) -> None:
        """Join a second raylet to this head on the same machine (``ray start --address``).

        It shares the head's log folder, which the head's log monitor already tails; Ray runs
        one monitor per host, since a second one duplicates log lines on the drivers."""
        subprocess.run(
            [
                ray_cli(),
                "start",
                f"--address={self.gcs_address}",
                f"--node-ip-address={LOOPBACK}",
                f"--dashboard-agent-listen-port={free_port()}",
                "--include-log-monitor=False",
                f"--num-cpus={num_cpus}",
                f"--object-store-memory={self.object_store_bytes // 2}",
                "--disable-usage-stats",
            ],
            env=self.env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def submit_command(
        self,
        entrypoint: list[str],
        working_dir: str = ".",
        submission_id: str | None = None,
        wait: bool = True,
    ) -> list[str]:
        """``ray job submit --working-dir DIR -- ENTRYPOINT``, exactly what a user types."""
        options = [f"--submission-id={submission_id}"] if submission_id else []
        options += [] if wait else ["--no-wait"]
        return [
            ray_cli(),
            "job",
            "submit",
            f"--address={self.address}",
            f"--working-dir={working_dir}",
            *options,
            "--",
            *entrypoint,
        ]

    def submit(
        self,
        entrypoint: list[str],
        working_dir: str = ".",
        capture: bool = True,
        timeout_s: float = 900,
    ) -> subprocess.CompletedProcess:
        """Submit and wait; the job's logs are captured, or streamed when ``capture`` is off."""
        return subprocess.run(
            self.submit_command(entrypoint, working_dir),
            env=self.env,
            capture_output=capture,
            text=True,
            timeout=timeout_s,
        )

    def stop_job(self, submission_id: str) -> subprocess.CompletedProcess:
        """``ray job stop``, which waits for the job to end: a job a test gave up on must not
        keep loading the shared cluster."""
        return subprocess.run(
            [ray_cli(), "job", "stop", f"--address={self.address}", submission_id],
            env=self.env,
            capture_output=True,
        )

    def processes(self) -> list[int]:
        """The processes of this head and the nodes joined to it: those started with its GCS
        port on their command line (GCS, raylets, dashboard, monitors) and, recursively, what
        they started (workers, agents, job drivers). Read from Linux's /proc."""
        port = re.compile(rf"[:=]{self.gcs_port}(?![0-9])".encode())
        parents: dict[int, int] = {}
        found: set[int] = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                parents[int(entry.name)] = int(_proc_stat(entry)[1])
            except (OSError, ValueError):  # ended meanwhile
                continue
            if port.search(cmdline):
                found.add(int(entry.name))
        while children := {pid for pid, ppid in parents.items() if ppid in found} - found:
            found |= children
        return sorted(found)

    def stop(self) -> None:
        """SIGKILL this head's processes and wait until they have ended. ``ray stop`` would end
        every Ray on the machine, and waits seconds for processes that are already dead where
        nothing reaps them (zombies, as in containers)."""
        if not Path("/proc/self").exists():  # not Linux: Ray's own stop
            subprocess.run(
                [ray_cli(), "stop", "--force"],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            return
        pids = self.processes()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _wait_until(lambda: all(map(_ended, pids)), 30, "the Ray head's processes ending")
        self._forget_address()

    def _forget_address(self) -> None:
        """Ray's record of the machine's latest head (what ``ray.init()`` and ``ray status``
        connect to without an address), removed as ``ray stop`` does, if it names this head."""
        from ray._common.utils import get_ray_address_file

        record = Path(get_ray_address_file(None))
        with contextlib.suppress(FileNotFoundError):
            if record.read_text().strip().endswith(f":{self.gcs_port}"):
                record.unlink()


def _proc_stat(entry: Path) -> list[str]:
    """/proc/PID/stat after the command name: state, parent, ..."""
    return (entry / "stat").read_text().rsplit(")", 1)[1].split()


def _ended(pid: int) -> bool:
    """Gone, or a zombie (dead, not yet reaped)."""
    try:
        return _proc_stat(Path(f"/proc/{pid}"))[0] == "Z"
    except OSError:
        return True
