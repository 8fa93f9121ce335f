"""A labeling run on storage that fails the way S3 fails (the toolkit's FaultyS3Proxy in
front of the embedded S3): an outage within the retry budget is ridden out; past it, the
units left unread stay unwritten, the run exits 3 saying so, and the rerun labels exactly
them. No row ever says a storage fault about an image."""

from __future__ import annotations

import threading
import time

import pytest

from helpers import SMALL, label_row, output_rows, wait_for
from skray.cli import EXIT_INCOMPLETE, EXIT_REFUSED, main
from skray.dev.embedded import LocalRayHead
from skray.dev.s3proxy import FaultyS3Proxy
from skray.dev.testing import synthetic_image
from skray.io.storage import join, read_json, write_bytes_atomic
from skray.label.config import LabelConfig
from skray.label.job import run
from skray.label.sinks import MANIFEST, write_part

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def write_images(data: str, n: int) -> list[str]:
    keys = [join(data, f"{i:03d}.jpg") for i in range(n)]
    for i, key in enumerate(keys):
        write_bytes_atomic(key, synthetic_image(i))
    return keys


def reads(proxy: FaultyS3Proxy) -> int:
    """Read requests so far, refused ones included (an open is a HEAD, then GETs)."""
    counts = proxy.counts()
    return counts["HEAD"] + counts["GET"] + counts["GET_RANGE"]


def outage_mid_run(
    proxy: FaultyS3Proxy, seconds: float | None, fault: str = "outage"
) -> dict[str, int]:
    """In the background: once 8 images were read, every input request is answered 503
    (``fault`` "outage"; "forbidden": 403) — the output's bucket keys stay reachable — until
    healed, or for at least ``seconds`` and until the run has retried through it (5 refused
    reads). Returns the reads counted as the fault began and as it ended."""
    seen: dict[str, int] = {}

    def fail() -> None:
        wait_for(lambda: reads(proxy) >= 8, 120, "a unit's worth of reads", interval_s=0.02)
        proxy.only_keys = "/data/"
        setattr(proxy, fault, 1)
        seen["at_outage"], began = reads(proxy), time.monotonic()
        if seconds is None:
            return
        wait_for(
            lambda: time.monotonic() - began >= seconds and reads(proxy) > seen["at_outage"] + 5,
            240,
            "the run to retry through the outage",
            interval_s=0.05,
        )
        seen["at_heal"] = reads(proxy)
        proxy.heal()

    threading.Thread(target=fail, daemon=True).start()
    return seen


def test_an_outage_mid_run_within_the_budget_is_ridden_out(
    ray_cluster: LocalRayHead, bucket: str, faulty_s3: FaultyS3Proxy
):
    data, labels = f"{bucket}/data", f"{bucket}/labels"
    keys = write_images(data, 48)
    cfg = LabelConfig(
        input=data,
        output=labels,
        model=SMALL,
        files_per_unit=8,
        batch_size=8,
        s3={"endpoint_url": faulty_s3.url},
        io_retry={"initial_backoff_s": 0.05, "max_backoff_s": 0.5},
        mlflow={"enabled": False},
    )
    # A blip of 3 s outlasts pyarrow's own retries (2 tries, well under a second) and spans
    # six of skray's backoffs (0.05 s doubling, at most 0.5 s): the run retries through it
    # inside its budget, and is back within half a second of the heal.
    outage = outage_mid_run(faulty_s3, seconds=3.0)

    manifest = run(cfg)

    rows = output_rows(labels)
    assert manifest["complete"] and manifest["incomplete"] is None
    assert sorted(r["key"] for r in rows) == keys, "every key once"
    assert not [r for r in rows if r["error"]], "no storage fault became a row"
    assert outage["at_heal"] > outage["at_outage"], "the run's reads met the outage"


def label_flags(data: str, labels: str, endpoint: str) -> list[str]:
    """``skray label`` of ``data`` into ``labels`` through ``endpoint``: units of 8 images."""
    return [
        "label",
        "--input",
        data,
        "--output",
        labels,
        "--model",
        SMALL,
        "--batch-size",
        "8",
        "--set",
        "files_per_unit=8",
        "--set",
        f"s3.endpoint_url={endpoint}",
        "--set",
        "mlflow.enabled=false",
    ]


def test_past_the_budget_the_run_exits_3_naming_what_is_unread_and_the_rerun_labels_exactly_that(
    ray_cluster: LocalRayHead, bucket: str, faulty_s3: FaultyS3Proxy, capsys
):
    data, labels = f"{bucket}/data", f"{bucket}/labels"
    keys = write_images(data, 48)
    flags = label_flags(data, labels, faulty_s3.url)
    outage_mid_run(faulty_s3, seconds=None)

    code = main([*flags, "--set", "io_retry.total_s=1", "--set", "io_retry.initial_backoff_s=0.05"])

    out, err = capsys.readouterr()
    assert code == EXIT_INCOMPLETE, err
    first = read_json(join(labels, MANIFEST))
    unread = first["incomplete"]
    assert not first["complete"]
    assert unread["units"] >= 1 and unread["reasons"] == {"unavailable": unread["units"]}
    assert "INCOMPLETE" in out and "rerun to finish" in out
    done = [r["key"] for r in output_rows(labels)]
    assert len(done) + unread["keys"] == len(keys) and not any(
        r["error"] for r in output_rows(labels)
    ), "the unread units are not in the output at all"

    faulty_s3.heal()
    assert main(flags) == 0

    second = read_json(join(labels, MANIFEST))
    assert second["complete"] and second["timings"]["images_this_run"] == unread["keys"]
    rows = output_rows(labels)
    assert sorted(r["key"] for r in rows) == keys and not any(r["error"] for r in rows)


def test_credentials_refused_mid_run_stop_it_with_one_message_and_a_rerun_finishes(
    ray_cluster: LocalRayHead, bucket: str, faulty_s3: FaultyS3Proxy, capsys
):
    data, labels = f"{bucket}/data", f"{bucket}/labels"
    keys = write_images(data, 24)
    flags = label_flags(data, labels, faulty_s3.url)
    outage_mid_run(faulty_s3, seconds=None, fault="forbidden")  # an expired token, say

    code = main([*flags, "--set", "io_retry.total_s=1", "--set", "io_retry.initial_backoff_s=0.05"])

    err = capsys.readouterr().err
    assert code == EXIT_REFUSED
    assert err.count("was refused with the credentials from") == 1, err
    assert "rerun with working credentials" in err
    assert read_json(join(labels, MANIFEST)) is None, "an output that stopped says nothing"
    assert not any(r["error"] for r in output_rows(labels)), "no refusal became a row"

    faulty_s3.heal()
    assert main(flags) == 0
    rows = output_rows(labels)
    assert sorted(r["key"] for r in rows) == keys and not any(r["error"] for r in rows)


def test_a_rerun_labels_the_keys_an_earlier_version_left_as_storage_error_rows(
    ray_cluster: LocalRayHead, tmp_path
):
    data, labels = str(tmp_path / "data"), str(tmp_path / "labels")
    keys = write_images(data, 12)
    earlier = "unreadable: OSError: AWS Error UNKNOWN (HTTP status 503) during HeadObject operation"
    stale = keys[2:5]
    write_part(
        labels,
        "earlier",
        [label_row(k, error=earlier if k in stale else None) for k in keys],
    )

    manifest = run(LabelConfig(input=data, output=labels, model=SMALL, mlflow={"enabled": False}))

    assert manifest["complete"] and manifest["retried_from_earlier_runs"] == len(stale)
    assert manifest["timings"]["images_this_run"] == len(stale)
    assert manifest["skipped_already_done"] == len(keys) - len(stale)
    rows = output_rows(labels)
    assert sorted(r["key"] for r in rows) == keys, "every key once"
    assert not any(r["error"] for r in rows)
    relabeled = {r["key"]: r for r in rows if r["key"] in stale}
    assert all(r["label"] is not None for r in relabeled.values())
