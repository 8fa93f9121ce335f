"""The labeling job's commit path without a cluster: the concurrent unit committer, the
stage figures the driver sums, and how big the model actor pool starts."""

from __future__ import annotations

import json
import os
import random
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import PROMPT_RETRY, SMALL, label_row, wait_for
from skray.io.retry import IoRetry, StorageUnavailable
from skray.io.sources.rows import incomplete_error
from skray.io.storage import filesystem_for, join, write_bytes_atomic
from skray.label import commit
from skray.label.commit import UnitCommitter
from skray.label.config import ActorsConfig
from skray.label.lease import LEASE_FILE, Lease, LeaseLost
from skray.label.manifest import format_summary
from skray.label.progress import Progress, StageTimes
from skray.label.resources import actor_pool_sizes
from skray.label.sinks import LABEL_SCHEMA, PartExists, committed_units, part_name, write_part

pytestmark = pytest.mark.timeout(60)


def predictor_batch(rows: list[tuple[str, str, int]], **stages: float) -> pa.Table:
    """A table shaped like the Predictor's output, from (key, unit, unit_rows) triples; each
    ``stages`` name (``model_s=...``) becomes a float64 column with that value on every row."""
    records = [{**label_row(key), "unit": unit, "unit_rows": n, **stages} for key, unit, n in rows]
    schema = LABEL_SCHEMA.append(pa.field("unit", pa.string())).append(
        pa.field("unit_rows", pa.int64())
    )
    for name in stages:
        schema = schema.append(pa.field(name, pa.float64()))
    return pa.Table.from_pylist(records, schema=schema)


def read_part(output: str, unit_id: str) -> pa.Table:
    fs, path = filesystem_for(join(output, part_name(unit_id)))
    return pq.read_table(path, filesystem=fs)


@pytest.fixture
def writes(monkeypatch) -> list[str]:
    """The units whose part the committer wrote, in order (the real writes still happen)."""
    written: list[str] = []
    lock = threading.Lock()
    write_part = commit.write_part

    def recorded(output: str, unit_id: str, rows: pa.Table, io_retry=None) -> None:
        write_part(output, unit_id, rows, io_retry)
        with lock:
            written.append(unit_id)

    monkeypatch.setattr(commit, "write_part", recorded)
    return written


# --- the committer ---------------------------------------------------------


def test_a_unit_is_committed_once_all_its_rows_arrived_whatever_the_batch_order(tmp_path, writes):
    output = str(tmp_path / "out")
    with UnitCommitter(output) as committer:
        assert (
            committer.add(predictor_batch([("a2", "A", -1), ("b1", "B", 1), ("a1", "A", -1)])) == 3
        )
        committer.add(predictor_batch([("c1", "C", 2)]))
        assert set(committer.pending) == {"A", "C"}  # A has 2 rows but no count yet; C 1 of 2

        committer.add(predictor_batch([("a3", "A", 3)]))
        assert set(committer.pending) == {"C"}
        committer.add(predictor_batch([("c2", "C", -1)]))
        assert not committer.pending and not committer.expected

    assert sorted(writes) == ["A", "B", "C"] and committer.committed == 3
    assert read_part(output, "A").column("key").to_pylist() == ["a1", "a2", "a3"]


def test_concurrent_commits_write_every_unit_exactly_once_its_rows_sorted_by_key(tmp_path, writes):
    output = str(tmp_path / "out")
    units = {f"u{u:03d}": [f"k{u:03d}-{i:03d}" for i in range(40)] for u in range(60)}
    arrivals = [(key, unit) for unit, keys in units.items() for key in keys]
    random.Random(0).shuffle(arrivals)  # units interleaved across batches, rows out of order
    seen: set[str] = set()
    rows = []
    for key, unit in reversed(arrivals):  # the count rides on each unit's last row to arrive
        rows.append((key, unit, -1 if unit in seen else len(units[unit])))
        seen.add(unit)
    rows.reverse()

    with UnitCommitter(output, concurrency=8) as committer:
        for start in range(0, len(rows), 97):
            committer.add(predictor_batch(rows[start : start + 97]))

    assert sorted(writes) == sorted(units)  # each unit written once
    assert committed_units(output) == set(units)
    for unit, keys in units.items():
        assert read_part(output, unit).column("key").to_pylist() == keys


def test_parts_are_written_side_by_side(tmp_path, monkeypatch):
    together = threading.Barrier(4, timeout=20)  # breaks unless 4 writes are under way at once
    write_part = commit.write_part

    def meet_then_write(output: str, unit_id: str, rows: pa.Table, io_retry=None) -> None:
        together.wait()
        write_part(output, unit_id, rows, io_retry)

    monkeypatch.setattr(commit, "write_part", meet_then_write)
    with UnitCommitter(str(tmp_path), concurrency=4) as committer:
        committer.add(predictor_batch([(f"k{u}", f"u{u}", 1) for u in range(8)]))

    assert committed_units(str(tmp_path)) == {f"u{u}" for u in range(8)}


def test_parts_in_flight_never_hold_more_bytes_than_the_bound_allows(tmp_path, monkeypatch):
    in_flight, most = 0, 0
    lock = threading.Lock()
    write_part = commit.write_part

    def counted(output: str, unit_id: str, rows: pa.Table, io_retry=None) -> None:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        time.sleep(0.01)  # a slow store: with no bound, the 8 writers would all be busy
        write_part(output, unit_id, rows, io_retry)
        with lock:
            in_flight -= 1

    monkeypatch.setattr(commit, "write_part", counted)
    with UnitCommitter(str(tmp_path), concurrency=8, max_bytes_in_flight=1) as committer:
        committer.add(predictor_batch([(f"k{u}", f"u{u}", 1) for u in range(16)]))

    assert most == 1  # a part over the bound alone still goes, but never beside another
    assert len(committed_units(str(tmp_path))) == 16


def test_a_failed_write_fails_the_commit_with_no_half_part_and_no_later_write(tmp_path):
    output = tmp_path / "out"
    (output / part_name("B")).mkdir(parents=True)  # B's part name is taken: its write fails

    with pytest.raises(OSError):
        with UnitCommitter(str(output), concurrency=1) as committer:
            committer.add(predictor_batch([("a", "A", 1), ("b", "B", 1), ("c", "C", 1)]))

    assert committed_units(str(output)) == {"A"}  # C, queued behind B, is never written
    assert sorted(os.listdir(output)) == [
        part_name("A"),
        part_name("B"),
    ]  # and no temporary file is left


def test_a_unit_still_incomplete_at_the_end_fails_the_commit_and_is_not_written(tmp_path):
    with pytest.raises(RuntimeError, match="1 units ended incomplete"):
        with UnitCommitter(str(tmp_path)) as committer:
            committer.add(predictor_batch([("a1", "A", 2), ("b1", "B", 1)]))

    assert committed_units(str(tmp_path)) == {"B"}


def test_a_lost_lease_stops_every_write_not_yet_started(tmp_path, monkeypatch):
    output = str(tmp_path / "out")
    lease = Lease(output, ttl_s=0.6)
    lease.acquire()
    first_write, carry_on = threading.Event(), threading.Event()
    write_part = commit.write_part

    def held_write(output: str, unit_id: str, rows: pa.Table, io_retry=None) -> None:
        first_write.set()
        carry_on.wait(20)
        write_part(output, unit_id, rows, io_retry)

    monkeypatch.setattr(commit, "write_part", held_write)
    try:
        with pytest.raises(LeaseLost):
            with UnitCommitter(output, lease.check, concurrency=1) as committer:
                committer.add(
                    predictor_batch([("a", "A", 1), ("b", "B", 1)])
                )  # A is being written, B queued
                assert first_write.wait(20)
                stolen = {
                    "run_id": "other",
                    "host": "elsewhere",
                    "pid": 1,
                    "started": time.time(),
                    "expires": time.time() + 300,
                }
                write_bytes_atomic(join(output, LEASE_FILE), json.dumps(stolen).encode())
                wait_for(lambda: lease.lost, 20, "the heartbeat to notice the takeover")
                carry_on.set()
    finally:
        carry_on.set()
        lease.release()

    assert committed_units(output) == {"A"}


# --- stage figures ---------------------------------------------------------


def test_stage_seconds_are_summed_into_figures_and_never_reach_a_part(tmp_path):
    stages = StageTimes()
    batches = [
        predictor_batch([("a1", "A", -1), ("a2", "A", 2)], decode_s=0.5, model_s=0.1, wait_s=0.025),
        predictor_batch([("b1", "B", 1)], decode_s=1.0, model_s=0.2, wait_s=0.2),
    ]
    with UnitCommitter(str(tmp_path)) as committer:
        for batch in batches:
            stages.add(batch)
            committer.add(batch)

    assert stages.figures() == {  # 3 rows; 2 s decoding, 0.4 s in the model, 0.25 s waiting
        "decode_img_per_s": 1.5,
        "model_img_per_s": 7.5,
        "actor_busy_fraction": 0.6154,
        "actor_wait_s": 0.25,
    }
    assert read_part(str(tmp_path), "A").schema == LABEL_SCHEMA
    assert read_part(str(tmp_path), "B").schema == LABEL_SCHEMA


def test_without_stage_columns_there_are_no_figures_and_the_progress_line_is_plain():
    stages = StageTimes()
    stages.add(predictor_batch([("a", "A", 1)]))
    progress = Progress(total=1, interval_s=60, stages=stages)
    progress.add(1)

    assert stages.figures() == {}
    assert progress.line().endswith("img/s, ETA 0s")


def test_the_progress_line_and_the_summary_show_the_stage_figures():
    stages = StageTimes()
    stages.add(
        predictor_batch([("a", "A", 1), ("b", "A", 1)], decode_s=0.01, model_s=0.004, wait_s=0.001)
    )
    progress = Progress(total=4, interval_s=60, stages=stages)
    progress.add(2)
    manifest = {
        "output": "out",
        "inputs": 2,
        "labeled": 2,
        "failed": 0,
        "failed_by_reason": {},
        "skipped_already_done": 0,
        "duplicates": 0,
        "model": SMALL,
        "random_weights": False,
        "top_labels": [],
        "timings": {"img_per_s": 9.0, "total_s": 1.0, **stages.figures()},
    }

    assert progress.line().endswith(
        "(decode 100.0 img/s/task; model 250.0 img/s/actor; actors busy 80%; actors waited 0.0s)"
    )
    assert "\n  model 250.0 img/s/actor\n  actors busy 80%\n" in format_summary(manifest)


# --- the model actor pool --------------------------------------------------


@pytest.mark.parametrize(
    ("actors", "gpus_per_actor", "cluster_gpus", "sizes"),
    [
        ((1, 8), 1.0, 16, (8, 8)),  # GPUs to spare: all 8 start at once
        ((2, 8), 1.0, 4, (4, 8)),  # 4 GPUs: 4 start, more may join as GPU nodes do
        ((1, 8), 0.5, 2, (4, 8)),  # half a GPU each
        ((1, 4), 1.0, 0, (1, 4)),  # no GPU yet (an autoscaling cluster): one to start
        ((2, 8), 0.0, 0, (2, 8)),  # CPU actors autoscale from min
        ((3, 1), 0.0, 0, (3, 3)),  # max below min means min
    ],
)
def test_the_actor_pool_starts_full_on_gpus_and_at_min_on_cpus(
    actors, gpus_per_actor, cluster_gpus, sizes
):
    config = ActorsConfig(min=actors[0], max=actors[1])

    assert actor_pool_sizes(config, gpus_per_actor, cluster_gpus) == sizes


# --- storage faults: a unit left unread is never committed; parts are create-only -------


def test_a_unit_whose_read_ended_incomplete_is_not_committed_and_is_counted(tmp_path):
    batch = predictor_batch([("a1", "A", 2), ("b1", "B", 2), ("b2", "B", 2)])
    why = incomplete_error("unavailable", "reading a: storage kept failing")
    marker = predictor_batch([("a#<not read>", "A", 2)])
    for name, value in (("reason", why.reason), ("error", str(why))):
        marker = marker.set_column(LABEL_SCHEMA.get_field_index(name), name, pa.array([value]))

    with UnitCommitter(str(tmp_path)) as committer:
        committer.add(batch)
        committer.add(marker)

    assert committed_units(str(tmp_path)) == {"B"}
    assert committer.incomplete == {"A": "incomplete: unavailable: reading a: storage kept failing"}


def test_a_part_another_writer_committed_stops_the_run_and_is_not_overwritten(location: str):
    output = location + "/out"
    write_part(output, "U", [label_row("theirs")])

    with pytest.raises(PartExists, match="written by another run"):
        write_part(output, "U", [label_row("ours")])
    write_part(output, "U", [label_row("theirs")])  # the same bytes: a retry of our own write

    assert read_part(output, "U").column("key").to_pylist() == ["theirs"]


def test_a_part_write_rides_out_an_outage(bucket: str, faulty_s3):
    faulty_s3.outage = 1  # longer than pyarrow's and boto's own retries
    threading.Timer(4.0, faulty_s3.heal).start()

    write_part(f"{bucket}/out", "U", [label_row("k")], PROMPT_RETRY)

    assert read_part(f"{bucket}/out", "U").column("key").to_pylist() == ["k"]


def test_a_part_write_failing_past_its_budget_names_the_part(bucket: str, faulty_s3):
    faulty_s3.outage = 1

    with pytest.raises(StorageUnavailable, match="writing s3://.*part-U.*storage kept failing"):
        write_part(f"{bucket}/out", "U", [label_row("k")], IoRetry(total_s=1.0))
