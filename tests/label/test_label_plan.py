"""Planning a rerun against a changed input, and the one-run-per-output lease, without Ray."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pytest

from helpers import label_row, output_rows, parquet_bytes, tar_bytes, wait_for
from skray.io import external_sort
from skray.io.storage import join, read_json, write_bytes_atomic
from skray.label.lease import LEASE_FILE, Lease, LeaseHeld, LeaseLost
from skray.label.plan import make_plan
from skray.label.sinks import withdraw_rows, write_part

pytestmark = pytest.mark.timeout(60)


def keys(names) -> list[str]:
    return [f"/in/{n}.jpg" for n in names]


def commit(output: str, unit_keys: list[str], unit: str) -> None:
    write_part(output, unit, [label_row(k) for k in sorted(unit_keys)])


def planned_keys(p) -> list[str]:
    return sorted(uri for unit in p.units if unit.format == "images" for uri in unit.uris)


# --- plan: exactly the keys not yet committed ------------------------------


def test_plan_of_a_fresh_output_cuts_the_sorted_listing_into_units_named_after_their_keys(tmp_path):
    listing = keys(f"{i:03d}" for i in range(7))

    p = make_plan(listing, str(tmp_path / "out"), files_per_unit=3)

    assert [list(u.uris) for u in p.units] == [listing[0:3], listing[3:6], listing[6:7]]
    assert [u.rows for u in p.units] == [3, 3, 1] and p.pending_rows == 7
    assert len({u.id for u in p.units}) == 3
    assert make_plan(listing, str(tmp_path / "out"), files_per_unit=3).units == p.units


@pytest.mark.parametrize("run_rows", [3, 1 << 20], ids=["spilled", "in-memory"])
def test_a_rerun_after_files_added_first_middle_last_and_some_removed_plans_only_new_keys(
    tmp_path, monkeypatch, run_rows
):
    spilled, spill = [], external_sort._spill

    def counted(table: pa.Table, *where) -> str:
        spilled.append(table.num_rows)
        return spill(table, *where)

    monkeypatch.setattr(external_sort, "_spill", counted)
    output = str(tmp_path / "out")
    first = keys(f"m{i:03d}" for i in range(20))
    for start in range(0, 20, 8):
        commit(output, first[start : start + 8], f"u{start}")
    added = keys(["a0", "a1", "m005x", "m010x", "m010y", "z0", "z1"])  # first, middle, last
    removed = [first[0], first[9], first[19]]
    listing = sorted(set(first) - set(removed) | set(added))
    streamed = [  # as listing_tables gives it: sorted tables of a few keys each
        pa.table({"key": listing[i : i + 5], "size": [1] * len(listing[i : i + 5])})
        for i in range(0, len(listing), 5)
    ]

    p = make_plan(iter(streamed), output, files_per_unit=4, run_rows=run_rows)

    assert planned_keys(p) == sorted(added)
    assert p.committed_rows == 20 and p.committed_parts == 3
    assert p.removed_rows == 3
    assert p.listed == len(listing)
    assert sorted(spilled) == ([4, 8, 8] if run_rows == 3 else []), "a part at a time, spilled"
    assert [u.id for u in p.units] == [
        u.id for u in make_plan(listing, output, files_per_unit=4).units
    ]


def test_a_rerun_of_an_unchanged_input_plans_nothing(tmp_path):
    output = str(tmp_path / "out")
    listing = keys(range(10))
    commit(output, listing[:6], "a")
    commit(output, listing[6:], "b")

    p = make_plan(listing, output, files_per_unit=4)

    assert p.units == [] and p.removed_rows == 0 and p.pending_rows == 0


def test_shards_are_done_when_their_part_exists_and_their_rows_count_as_listed(tmp_path):
    output, data = str(tmp_path / "out"), tmp_path / "in"
    shard, table = str(data / "s.tar"), str(data / "t.parquet")
    write_bytes_atomic(shard, tar_bytes([("x.jpg", b"1")]))
    write_bytes_atomic(table, parquet_bytes({"image": [b"1", b"2"]}))
    first = make_plan([shard, table], output)
    done = next(u for u in first.units if u.format == "webdataset")
    write_part(output, done.id, [label_row(f"{shard}#x"), label_row(f"{shard}#y")])

    p = make_plan([shard, table], output)

    assert [u.uris for u in p.units] == [(table,)] and p.units[0].rows == 2
    assert p.removed_rows == 0
    assert make_plan([table], output).removed_rows == 2  # the shard left the input: its rows did


EARLIER_503 = (
    "unreadable: OSError: When reading information for key 'in/x.jpg' in bucket 'b': "
    "AWS Error UNKNOWN (HTTP status 503) during HeadObject operation: No response body."
)


def test_rows_earlier_versions_committed_for_storage_errors_are_planned_again_and_healed(
    tmp_path,
):
    output = str(tmp_path / "out")
    listing = keys(range(6))
    stale = [listing[1], listing[4]]
    write_part(
        output,
        "old",
        [label_row(k, error=EARLIER_503 if k in stale else None) for k in listing[:5]]
        + [label_row("/in/gone.jpg", error=EARLIER_503)],  # no longer listed: left alone
    )
    commit(output, listing[5:], "done")

    p = make_plan(listing, output, files_per_unit=4)

    assert planned_keys(p) == stale and p.committed_rows == 4
    assert [(h.part, h.keys, h.rows) for h in p.heal] == [("part-old.parquet", tuple(stale), 2)]
    withdraw_rows(output, "part-old.parquet", p.heal[0].keys)
    healed = make_plan(listing, output, files_per_unit=4)
    assert planned_keys(healed) == stale and healed.heal == ()
    assert sorted(r["key"] for r in output_rows(output)) == sorted(
        [k for k in listing if k not in stale] + ["/in/gone.jpg"]
    ), "the part lost exactly those rows"


def test_a_shard_whose_earlier_part_holds_a_storage_error_is_read_again_whole(tmp_path):
    output, shard = str(tmp_path / "out"), str(tmp_path / "in" / "s.tar")
    write_bytes_atomic(shard, tar_bytes([("x.jpg", b"1")]))
    unit = make_plan([shard], output).units[0]
    cut = "broken_tar: OSError: AWS Error NETWORK_CONNECTION during GetObject operation: reset"
    write_part(output, unit.id, [label_row(f"{shard}#a"), label_row(f"{shard}#b", error=cut)])
    data_error = "broken_tar: the archive ends without its end-of-archive blocks (truncated)"

    p = make_plan([shard], output)

    assert p.units == [unit] and p.committed_rows == 0
    assert [(h.keys, h.rows) for h in p.heal] == [(None, 1)]
    withdraw_rows(output, p.heal[0].part, None)
    assert output_rows(output) == [] and make_plan([shard], output).units == [unit]
    write_part(output, unit.id, [label_row(f"{shard}#a", error=data_error)])
    assert make_plan([shard], output).units == [], "a bad file's row is a verdict: kept"


# --- the lease: one run per output -----------------------------------------


@pytest.fixture
def output(location: str) -> str:
    return location + "/out"


def test_a_second_run_on_a_held_output_fails_at_once_naming_the_holder(output: str):
    with Lease(output) as first:
        with pytest.raises(LeaseHeld) as refused:
            Lease(output).acquire()
        message = str(refused.value)
        assert first.holder.run_id in message and socket.gethostname() in message
        assert f"pid {os.getpid()}" in message
    with Lease(output):  # released: the next run gets it
        pass


def write_foreign_lease(output: str, pid: int, host: str, expires: float) -> None:
    holder = {
        "run_id": "dead",
        "host": host,
        "pid": pid,
        "started": time.time() - 600,
        "expires": expires,
    }
    write_bytes_atomic(join(output, LEASE_FILE), json.dumps(holder).encode())


def test_an_expired_lease_of_another_host_is_taken_over(output: str):
    write_foreign_lease(output, 1, "elsewhere", expires=time.time() - 1)

    with Lease(output) as lease:
        assert read_json(join(output, LEASE_FILE))["run_id"] == lease.holder.run_id


def test_a_live_lease_of_another_host_is_respected_until_it_expires(output: str):
    write_foreign_lease(output, 1, "elsewhere", expires=time.time() + 300)

    with pytest.raises(LeaseHeld, match="host elsewhere"):
        Lease(output).acquire()


def test_the_lease_of_a_killed_process_on_this_host_is_taken_over_at_once(output: str):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    write_foreign_lease(output, int(dead.stdout), socket.gethostname(), expires=time.time() + 300)

    with Lease(output):
        pass


def test_the_heartbeat_renews_the_lease_and_notices_a_takeover(output: str):
    lease = Lease(output, ttl_s=0.6)
    lease.acquire()
    try:
        expires = read_json(join(output, LEASE_FILE))["expires"]
        wait_for(
            lambda: read_json(join(output, LEASE_FILE))["expires"] != expires,
            10,
            "the heartbeat to renew the lease",
        )
        write_foreign_lease(output, 1, "elsewhere", expires=time.time() + 300)  # stolen
        wait_for(lambda: lease.lost, 10, "the heartbeat to notice the takeover")
        with pytest.raises(LeaseLost, match="taken over"):
            lease.check()
    finally:
        lease.release()
    assert read_json(join(output, LEASE_FILE))["run_id"] == "dead"  # a lost lease is not deleted


def test_two_runs_racing_for_a_stale_lease_never_both_win(output: str):
    write_foreign_lease(output, 1, "elsewhere", expires=time.time() - 1)
    leases = [Lease(output) for _ in range(4)]
    results: list[str] = []

    def take(lease: Lease) -> None:
        try:
            lease.acquire()
            results.append("won")
        except LeaseHeld:
            results.append("refused")

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for lease in leases:
        lease.release()

    assert sorted(results) == ["refused"] * 3 + ["won"]


def test_a_record_read_while_it_is_rewritten_is_the_old_or_the_new_never_a_cut(output: str):
    record = join(output, "_record.json")
    versions = [{"n": "short"}, {"n": "a much longer value than the first " * 4}]
    write_bytes_atomic(record, json.dumps(versions[0]).encode())
    stop = threading.Event()

    def rewrite() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            write_bytes_atomic(record, json.dumps(versions[i % 2]).encode())

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        seen = [read_json(record) for _ in range(150)]
    finally:
        stop.set()
        writer.join(timeout=10)
    assert all(value in versions for value in seen)


def test_renewals_refused_past_the_deadline_stop_the_holder_and_a_later_run_is_the_only_writer(
    bucket: str, faulty_s3
):
    output = f"{bucket}/out"
    holder = Lease(output, ttl_s=2.0)
    holder.acquire()
    try:
        faulty_s3.only_keys, faulty_s3.outage = LEASE_FILE, 1  # parts could still commit
        refused = time.monotonic()
        wait_for(lambda: holder.lost, 10, "the holder to give up its lease")
        assert time.monotonic() - refused <= holder.ttl_s, "by its deadline, before it expires"
        with pytest.raises(LeaseLost, match="could not be renewed"):
            holder.check()
        faulty_s3.heal()
        expires = read_json(join(output, LEASE_FILE))["expires"]
        wait_for(lambda: time.time() > expires, 10, "the lease to expire")

        with Lease(output, ttl_s=2.0) as second:
            second.check()
            with pytest.raises(LeaseLost):  # the store is back, but the first never writes again
                holder.check()
    finally:
        holder.release()


HOLDER = """
import sys, time
from skray.label.lease import Lease, LeaseLost
from skray.label.sinks import part_paths, withdraw_rows, write_part
output = sys.argv[1]
lease = Lease(output, ttl_s=2.0)
lease.acquire()
print("held", flush=True)
n = 0
try:
    while True:
        lease.check()  # as the committer does before every part
        write_part(output, f"holder-{n}", [{"key": f"k{n}"}])
        n += 1
        time.sleep(0.05)
except LeaseLost as err:
    print("stopped:", err, flush=True)
"""


def test_a_holder_paused_past_the_ttl_writes_nothing_once_resumed(tmp_path):
    output = str(tmp_path / "out")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, output], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        wait_for(lambda: len(os.listdir(output)) > 3, 10, "the holder to write parts")
        os.kill(holder.pid, signal.SIGSTOP)
        parts_before = set(os.listdir(output))
        expires = read_json(join(output, LEASE_FILE))["expires"]
        wait_for(lambda: time.time() > expires, 10, "the paused holder's lease to expire")
        with Lease(output, ttl_s=2.0):  # the second run takes over
            os.kill(holder.pid, signal.SIGCONT)
            out, _ = holder.communicate(timeout=20)
            assert "stopped:" in out
            assert set(os.listdir(output)) == parts_before, "no part after the takeover"
    finally:
        holder.kill()
