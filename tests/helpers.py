"""The test toolkit: polling a condition, shared constants, inputs written by hand.

Fixtures live in conftest.py; everything a test imports lives here (test files never import
conftest or each other). ``wait_for`` follows Ray's ``wait_for_condition``: poll, never sleep
a fixed time for something that can be observed.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from skray.io.retry import IoRetry
from skray.io.sources.rows import RowError
from skray.io.storage import join, write_bytes_atomic

PROJECT = Path(__file__).resolve().parents[1]
SMALL = "skresnext14_8x4d_half"  # the small model variant every test uses
CLASSES = [f"class-{i}" for i in range(10)]
# The default retry budget on backoffs of at most 0.5 s, where the default's double up to 8 s:
# a call is retried within half a second of the storage coming back, so an outage test waits
# out its outage rather than skray's next backoff.
PROMPT_RETRY = IoRetry(initial_backoff_s=0.05, max_backoff_s=0.5)

T = TypeVar("T")


@functools.cache
def _mlflow_template() -> Path:
    """An empty SQLite MLflow store, its tables made once per test process (about 2 s), by a
    process of its own: no connection of this one is left open on the file."""
    path = Path(tempfile.mkdtemp(prefix="skray-mlflow-template-")) / "mlflow.db"
    code = f"from mlflow import MlflowClient; MlflowClient('sqlite:///{path}').search_experiments()"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    return path


def mlflow_store_in(directory: Path) -> str:
    """The URI of the SQLite MLflow store in ``directory``; where there is none yet, a copy of
    an empty one made once, so that no test pays for creating MLflow's tables."""
    path = Path(directory) / "mlflow.db"
    if not path.exists():
        shutil.copyfile(_mlflow_template(), path)
    return f"sqlite:///{path}"


def wait_for(condition: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    """Poll ``condition`` until it returns something truthy and return that; after
    ``timeout_s`` raise an AssertionError naming ``what`` was awaited. A condition that costs
    a process or a cluster query polls less often (``interval_s``) on this 2-core machine."""
    deadline = time.monotonic() + timeout_s
    while True:
        if value := condition():
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


def wait_ready(url: str, timeout_s: float = 120) -> dict:
    """The JSON of ``url``/healthz once it answers 200."""
    import httpx

    def healthy() -> dict | None:
        with contextlib.suppress(httpx.HTTPError):
            reply = httpx.get(url + "/healthz", timeout=5)
            if reply.status_code == 200:
                return reply.json()
        return None

    return wait_for(healthy, timeout_s, f"{url}/healthz to answer 200", interval_s=0.2)


def write_weights(path: Path, seed: int, classes: list[str] = CLASSES) -> str:
    """Random small-model weights for ``classes`` saved as skray saves them; returns the path."""
    import torch

    from skray.core.model import create_model
    from skray.weights.files import save_weights

    torch.manual_seed(seed)
    model = create_model(SMALL, num_classes=len(classes))
    save_weights(model, path, architecture=SMALL, class_names=classes)
    return str(path)


def labeled_dataset(root: Path, per_class: int) -> dict[str, str]:
    """A 4-class folder dataset with a learnable signal: train/ and a 12-per-class val/."""
    from skray.dev.testing import write_labeled_folder

    write_labeled_folder(str(root / "train"), classes=4, per_class=per_class, seed=0)
    write_labeled_folder(str(root / "val"), classes=4, per_class=12, seed=1)
    return {"train": str(root / "train"), "val": str(root / "val")}


RAY_DEFAULT_AGENT_PORT = 52365  # ``ray start --dashboard-agent-listen-port``'s default


@contextlib.contextmanager
def occupied(port: int) -> Iterator[None]:
    """``port`` on 127.0.0.1 held by a listening socket for the block (left as it is when
    something already holds it)."""
    with socket.socket() as sock:
        with contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            sock.listen()
        yield


class ReadmeCpuRun:
    """The README's CPU command, ``skray train --config configs/train_cpu_small.yaml --set
    data.train=DIR --set data.val=DIR``, on a Ray of this machine's size (2 CPUs) started by its
    own process, learning scikit-learn's real handwritten digits (1797 8x8 scans shipped in the
    package, 80/20 split) at 32 px under bf16 autocast, registered as skray-test in its own
    MLflow store.

    It shares nothing with the session's Ray, so conftest starts it in the background when the
    Serve tests begin: its minute and a half of training fills the CPUs they leave idle instead
    of adding to the suite's time. Its console output goes to a file, so a full pipe never
    stalls it.
    """

    EPOCHS = 6  # 4 epochs reached 57 % and 72 % top-1 in two runs: 6 keep the margin over 60 %

    def __init__(self, home: Path) -> None:
        from skray.dev.testing import write_digits_folder

        self.home = home
        self.data = write_digits_folder(str(home / "digits"))
        self.tracking_uri = mlflow_store_in(home)
        changes = (
            f"storage_path={home}/runs",
            "name=learns",
            "preprocessing.image_size=32",
            f"epochs={self.EPOCHS}",
            "amp=bf16",  # CPU workers train under bf16 autocast: it must learn as fp32 does
            f"mlflow.tracking_uri={self.tracking_uri}",
            "mlflow.registered_model=skray-test",
        )
        argv = ["train", "--config", str(PROJECT / "configs" / "train_cpu_small.yaml")]
        argv += [
            "--set",
            f"data.train={self.data['train']}",
            "--set",
            f"data.val={self.data['val']}",
        ]
        argv += [arg for change in changes for arg in ("--set", change)]
        script = (
            "import sys, ray; ray.init(address='local', num_cpus=2, include_dashboard=False); "
            "from skray.cli import main; sys.exit(main(sys.argv[1:]))"
        )
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["SKRAY_HOME"] = str(home)
        self.output = home / "output.txt"
        self.started = time.time()
        with self.output.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-c", script, *argv],
                cwd=PROJECT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its local Ray lives in its session: one kill ends both
            )

    def result(self, timeout_s: float) -> dict:
        """The run's summary (``skray_result.json``) with its console output, seconds and
        tracking URI, once it has finished: at most ``timeout_s`` after it started."""
        try:
            self.process.wait(timeout=max(1.0, self.started + timeout_s - time.time()))
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(
                f"the README's CPU command did not finish on 2 CPUs within {timeout_s:.0f} s:\n"
                + self.output.read_text()[-4000:]
            ) from None
        out = self.output.read_text()
        assert self.process.returncode == 0, out[-4000:]
        summary = json.loads((self.home / "runs" / "learns" / "skray_result.json").read_text())
        return {
            **summary,
            "output": out,
            "seconds": self.output.stat().st_mtime - self.started,  # its last line, as it ended
            "tracking_uri": self.tracking_uri,
            "data": self.data,
        }

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def write_files(root: str, names: list[str], data: bytes = b"x") -> None:
    for name in names:
        write_bytes_atomic(join(root, name), data)


def parquet_bytes(columns: dict[str, list]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def output_rows(output: str) -> list[dict]:
    """Every committed row of a labeling output, part by part."""
    from skray.label.sinks import part_paths

    fs, paths = part_paths(output)
    return [row for p in paths for row in pq.read_table(p, filesystem=fs).to_pylist()]


def label_row(key: str, label: str | None = "cat", error: RowError | str | None = None) -> dict:
    """One output row as the sink stores it (error None = labeled). A :class:`RowError` is this
    version's failed row; a string, the ``error`` of an earlier version's, which had no
    ``reason``."""
    ok = error is None
    return {
        "key": key,
        "label_id": 1 if ok else None,
        "label": label if ok else None,
        "score": 0.9 if ok else None,
        "topk_ids": [1, 2] if ok else None,
        "topk_scores": [0.9, 0.1] if ok else None,
        "model": SMALL,
        "weights_sha256": None,
        "reason": error.reason if isinstance(error, RowError) else None,
        "error": None if ok else str(error),
        "meta": None,
    }
