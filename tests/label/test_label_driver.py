"""The labeling driver's parts without a Ray cluster: the decode stage's resources
(skray.label.resources), ``prepare``'s checks on the output and the weights (skray.label.job),
the progress line (skray.label.progress) and the summary (skray.label.manifest)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from helpers import SMALL, label_row, parquet_bytes, write_files
from skray.core.model import create_model
from skray.dev.testing import synthetic_image
from skray.io.sources import InputError
from skray.io.storage import exists, join, read_json, write_bytes_atomic, write_json
from skray.label import progress, resources
from skray.label.config import ActorsConfig, LabelConfig
from skray.label.job import Prepared, prepare
from skray.label.lease import LEASE_FILE, LeaseHeld
from skray.label.manifest import format_summary
from skray.label.progress import Progress
from skray.label.sinks import JOB_FILE, MANIFEST, OutputError, committed_units, write_part
from skray.weights.files import WeightsError, save_weights

pytestmark = pytest.mark.timeout(60)


# --- resources: the decode stage's memory ----------------------------------


def test_decode_memory_grows_with_batch_size_and_max_object_bytes_unless_set():
    cfg = LabelConfig(input="in", output="out")
    mib = 2**20

    base = resources.decode_memory_bytes(cfg)
    bigger = resources.decode_memory_bytes(
        cfg.model_copy(update={"batch_size": cfg.batch_size + 10})
    )

    assert bigger - base >= 10 * cfg.max_object_bytes
    assert base < resources.decode_memory_bytes(
        cfg.model_copy(update={"max_object_bytes": 2 * cfg.max_object_bytes})
    )
    assert (
        resources.decode_memory_bytes(cfg.model_copy(update={"decode_memory_mb": 300})) == 300 * mib
    )
    assert base <= 8 * 2**30  # the default fits a small machine


def test_decode_memory_never_asks_for_more_than_the_largest_live_node_has():
    nodes = [
        {"Alive": True, "Resources": {"memory": 4e9}},
        {"Alive": False, "Resources": {"memory": 64e9}},
        {"Alive": True, "Resources": {"CPU": 2.0}},
    ]

    assert resources.schedulable_memory(10**9, nodes) == 10**9
    assert resources.schedulable_memory(10**10, nodes) == 4 * 10**9


# --- prepare ---------------------------------------------------------------


@pytest.fixture
def job(tmp_path) -> LabelConfig:
    """A config over 5 small image files (3 units of 2), output not yet written."""
    data = tmp_path / "data"
    write_files(str(data), [f"img{i}.jpg" for i in range(5)], synthetic_image(0))
    return LabelConfig(input=str(data), output=str(tmp_path / "out"), model=SMALL, files_per_unit=2)


@pytest.fixture
def prepared():
    """``prepare(cfg)`` that releases the run's lease when the test ends."""
    leases = []

    def run_prepare(cfg: LabelConfig) -> Prepared:
        result = prepare(cfg)
        leases.append(result.lease)
        return result

    def release() -> None:
        while leases:
            leases.pop().release()

    run_prepare.release = release
    yield run_prepare
    release()


def test_prepare_plans_units_records_the_job_and_reports_random_weights(job: LabelConfig, prepared):
    p = prepared(job)

    assert [u.rows for u in p.plan.units] == [2, 2, 1] and p.plan.committed_rows == 0
    assert read_json(join(job.output, JOB_FILE)) == {
        "fingerprint": job.fingerprint(),
        "weights_sha256": None,
        "weights_version": None,
    }
    assert p.weights["random_weights"] and p.weights["model"] == SMALL
    assert p.weights["num_classes"] == 1000


def test_prepare_lists_the_input_from_its_inventory_when_given_one(bucket: str, tmp_path, prepared):
    keys = [f"{bucket}/data/img{i}.jpg" for i in range(5)]
    for key in keys:
        write_bytes_atomic(key, synthetic_image(0))
    listing = f"{bucket}/inventory/listing.parquet"  # a Parquet listing: key and size
    rows = [(k, len(synthetic_image(0))) for k in [*reversed(keys), f"{bucket}/elsewhere/x.jpg"]]
    write_bytes_atomic(
        listing, parquet_bytes({"key": [k for k, _ in rows], "size": [n for _, n in rows]})
    )
    cfg = LabelConfig(
        input=f"{bucket}/data", output=str(tmp_path / "out"), model=SMALL, files_per_unit=2
    )

    listed = prepared(cfg).plan
    listed_units = listed.units
    prepared.release()
    from_inventory = prepared(cfg.model_copy(update={"input_inventory": listing})).plan

    assert from_inventory.units == listed_units and from_inventory.listed == 5
    missing = cfg.model_copy(update={"input_inventory": f"{bucket}/inventory/none.parquet"})
    with pytest.raises(InputError, match="none.parquet"):
        prepare(missing)


def test_prepare_leaves_out_the_keys_already_committed(job: LabelConfig, prepared):
    first = prepared(job)
    first.lease.release()
    write_part(job.output, first.plan.units[1].id, [label_row(k) for k in first.plan.units[1].uris])

    again = prepared(job)

    assert again.plan.units == [first.plan.units[0], first.plan.units[2]]
    assert again.plan.committed_rows == 2


def test_prepare_holds_the_output_so_a_second_run_is_refused_naming_the_first(
    job: LabelConfig, prepared
):
    first = prepared(job)

    with pytest.raises(LeaseHeld, match=f"pid {os.getpid()}"):
        prepare(job)
    assert first.lease.token is not None


def test_prepare_withdraws_the_manifest_of_an_earlier_run(job: LabelConfig, prepared):
    write_json(join(job.output, MANIFEST), {"old": True})

    prepared(job)

    assert not exists(join(job.output, MANIFEST))


def test_prepare_refuses_an_output_of_a_different_config_pointing_to_overwrite(job: LabelConfig):
    write_json(join(job.output, JOB_FILE), {"fingerprint": "another-job"})

    with pytest.raises(OutputError, match="--overwrite"):
        prepare(job)
    assert not exists(join(job.output, LEASE_FILE)), "a refused run leaves no lease behind"


def test_a_rerun_in_another_precision_is_refused_so_one_output_holds_one_models_labels(
    job: LabelConfig, prepared
):
    prepared(job).lease.release()
    int8 = job.model_copy(
        update={"actors": ActorsConfig(precision="int8", gpus=0, calibration="calib/")}
    )

    with pytest.raises(OutputError, match="--overwrite"):
        prepare(int8)


def test_prepare_refuses_weights_that_changed_behind_the_same_path_naming_both_hashes(
    job: LabelConfig, prepared, tmp_path
):
    weights = str(tmp_path / "w.safetensors")
    old = save_weights(create_model(SMALL, 10), weights, architecture=SMALL)
    cfg = job.model_copy(update={"weights": weights, "model": None})
    prepared(cfg).lease.release()
    new = save_weights(create_model(SMALL, 10), weights, architecture=SMALL)

    with pytest.raises(OutputError) as refused:
        prepare(cfg)
    assert old in str(refused.value) and new in str(refused.value) and old != new
    prepared(
        cfg.model_copy(update={"overwrite": True})
    )  # --overwrite starts over with the new weights


def test_prepare_with_overwrite_clears_the_earlier_output_and_proceeds(job: LabelConfig, prepared):
    write_json(join(job.output, JOB_FILE), {"fingerprint": "another-job"})
    write_part(job.output, "stale-unit", [label_row("old")])
    write_json(join(job.output, MANIFEST), {"old": True})

    p = prepared(job.model_copy(update={"overwrite": True}))

    assert p.plan.committed_rows == 0 and len(p.plan.units) == 3
    assert committed_units(job.output) == set()
    assert not exists(join(job.output, MANIFEST))
    assert read_json(join(job.output, JOB_FILE))["fingerprint"] == job.fingerprint()


def test_overwrite_deletes_nothing_when_the_new_weights_do_not_load(job: LabelConfig, tmp_path):
    write_part(job.output, "kept", [label_row("old")])
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(os.urandom(4096))

    with pytest.raises(WeightsError):
        prepare(job.model_copy(update={"weights": str(weights), "overwrite": True}))
    assert committed_units(job.output) == {"kept"}


def test_prepare_reports_the_weights_it_pinned(job: LabelConfig, prepared, tmp_path):
    weights = str(tmp_path / "w.safetensors")
    sha = save_weights(create_model(SMALL, 10), weights, architecture=SMALL)

    info = prepared(job.model_copy(update={"weights": weights, "model": None})).weights

    assert info == {
        "model": SMALL,
        "weights": weights,
        "weights_version": None,
        "weights_sha256": sha,
        "random_weights": False,
        "num_classes": 10,
    }


def test_prepare_fails_on_missing_input_before_touching_the_output(tmp_path):
    cfg = LabelConfig(input=str(tmp_path / "nope"), output=str(tmp_path / "out"), model=SMALL)

    with pytest.raises(InputError, match="input not found"):
        prepare(cfg)
    assert not (tmp_path / "out").exists()


# --- Progress and format_summary -------------------------------------------


@pytest.fixture
def clock(monkeypatch) -> SimpleNamespace:
    """A settable clock in place of progress.time.monotonic."""
    fake = SimpleNamespace(now=1000.0)
    fake_time = SimpleNamespace(monotonic=lambda: fake.now, time=lambda: fake.now)
    monkeypatch.setattr(progress, "time", fake_time)
    return fake


def test_progress_line_shows_done_of_total_rate_and_eta(clock):
    progress = Progress(total=100, interval_s=60)
    progress.add(25)
    clock.now += 5

    assert progress.line() == "[label] 25/100 images, 5.0 img/s, ETA 15s"


def test_progress_line_shows_a_question_mark_and_no_eta_when_the_total_is_unknown(clock):
    progress = Progress(total=None, interval_s=60)
    progress.add(30)
    clock.now += 10

    assert progress.line() == "[label] 30/? images, 3.0 img/s"


def test_progress_prints_a_line_once_per_interval(clock, capsys):
    progress = Progress(total=10, interval_s=5)
    progress.add(1)
    clock.now += 6
    progress.add(1)
    progress.add(1)

    assert capsys.readouterr().out.splitlines() == ["[label] 2/10 images, 0.3 img/s, ETA 24s"]


def test_format_summary_lists_failures_by_reason_labels_and_a_random_weights_warning():
    manifest = {
        "output": "s3://b/labels",
        "inputs": 10,
        "labeled": 7,
        "failed": 3,
        "failed_by_reason": {"empty": 2, "broken_tar": 1},
        "skipped_already_done": 0,
        "duplicates": 0,
        "timings": {"img_per_s": 12.5, "total_s": 4.2},
        "model": SMALL,
        "random_weights": True,
        "top_labels": [["cat", 5], ["dog", 2]],
    }

    text = format_summary(manifest)

    assert "failed              3" in text
    assert "  empty             2" in text and "  broken_tar        1" in text
    assert "RANDOM weights" in text
    assert "       5  cat" in text
    assert text.splitlines()[-2:] == [
        "Parquet             s3://b/labels",
        "report              s3://b/labels/_report/index.html",
    ]


def test_live_metrics_take_a_run_whose_row_count_is_known_only_after_reading():
    """Tar shards count their samples only when read: the driver's gauge waits, never fails."""
    from skray.label.metrics import RunMetrics

    live = RunMetrics("s3://b/labels", pending=None)
    live.received(64)
    assert live.pending is None


def test_read_decode_tasks_declare_what_the_model_actors_leave_or_the_config_fails_naming_it():
    from skray.io.config import ConfigError
    from skray.label.resources import decode_task_cpus

    assert decode_task_cpus(0.5, actor_cpus=1, actors_at_start=1, cluster_cpus=4) == 0.5
    # 2 cores, one actor of 1.5 CPUs: the task declares the 0.5 left, not the 1 asked
    assert decode_task_cpus(1, actor_cpus=1.5, actors_at_start=1, cluster_cpus=2) == 0.5
    with pytest.raises(
        ConfigError, match=r"actors\.cpus 2 x 1 actor\(s\) at start take all 2 CPUs"
    ):
        decode_task_cpus(0.5, actor_cpus=2, actors_at_start=1, cluster_cpus=2)
