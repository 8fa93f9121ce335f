"""The labeling job end to end: real `ray job submit`, embedded S3, kills and reruns."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import PROJECT, SMALL, wait_for
from skray.dev.embedded import LocalRayHead, ray_cli
from skray.dev.testing import synthetic_image, write_sample_dataset
from skray.io.sources import list_inputs
from skray.io.storage import exists, filesystem_for, join, read_json, write_bytes_atomic
from skray.label.config import LabelConfig
from skray.label.job import run
from skray.label.plan import make_plan
from skray.label.sinks import MANIFEST, PART_PREFIX, committed_units, part_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def output_keys(output: str) -> list[str]:
    fs, path = filesystem_for(output)
    table = pq.read_table(path, filesystem=fs, columns=["key"])
    return table.column("key").to_pylist()


def output_table(output: str) -> pa.Table:
    fs, path = filesystem_for(output)
    return pq.read_table(path, filesystem=fs)


def label_command(input_uri: str, output_uri: str, *extra: str) -> list[str]:
    return [
        "python",
        "pipelines/label.py",
        "--config",
        "configs/label.yaml",
        "--set",
        f"input={input_uri}",
        "--set",
        f"output={output_uri}",
        "--set",
        f"model={SMALL}",
        "--set",
        "batch_size=16",
        "--set",
        "progress_interval_s=1",
        *extra,
    ]


def write_parquet_images(uri: str, ids: list[str]) -> None:
    table = pa.table({"id": ids, "image": [synthetic_image(i, fmt="PNG") for i in range(len(ids))]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_atomic(uri, buf.getvalue())


def test_config_with_an_unknown_key_fails_before_any_work(
    ray_cluster: LocalRayHead, bucket: str, tmp_path
):
    job = ray_cluster.submit(
        label_command(f"{bucket}/data/", f"{bucket}/out/", "--set", "actors.maxx=3"),
        working_dir=str(PROJECT),
    )

    assert job.returncode != 0
    assert "actors.maxx: unknown key" in job.stdout + job.stderr
    fs, path = filesystem_for(f"{bucket}/out/")
    assert fs.get_file_info(path).type == pa.fs.FileType.NotFound


def driver_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "pipelines/label.py"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def test_ray_job_submit_labels_every_s3_input_exactly_once_across_a_driver_killed_mid_run(
    ray_cluster: LocalRayHead, bucket: str
):
    data, labels = f"{bucket}/data", f"{bucket}/labels"
    keys = write_sample_dataset(data, files=96, shards=2, per_shard=12)
    write_parquet_images(f"{data}/tables/part-0.parquet", ["a", "b", "c"])
    keys += [f"{data}/tables/part-0.parquet#{i}" for i in "abc"]
    args = label_command(
        data + "/", labels + "/", "--set", "id_column=id", "--set", "files_per_unit=8"
    )
    first = subprocess.Popen(
        ray_cluster.submit_command(args, working_dir=str(PROJECT)),
        env=ray_cluster.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: len(committed_units(labels)) >= 2, 300, "two committed units", interval_s=0.5
        )
        for pid in driver_pids():
            os.kill(pid, signal.SIGKILL)
        first.wait(timeout=120)
    finally:
        first.kill()
    done_before, labeled_before = len(committed_units(labels)), len(output_keys(labels))
    assert 2 <= done_before < 16, "the driver must have died mid-run (of 13 + 2 + 1 units)"

    job = ray_cluster.submit(args, working_dir=str(PROJECT))

    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout + job.stderr
    assert f"{done_before} already committed" in job.stdout or (
        f"{len(committed_units(labels))}" in job.stdout
    )
    table = output_table(labels)
    got = table.column("key").to_pylist()
    assert len(got) == len(set(got)), "no key twice"
    assert sorted(got) == sorted(keys), "no key missing"
    rows = {r["key"]: r for r in table.to_pylist()}
    errors = {k: r["error"] for k, r in rows.items() if r["error"]}
    reasons = {e.split(":")[0] for e in errors.values()}
    assert reasons == {"empty", "truncated", "not_an_image", "too_many_pixels"}
    assert errors[f"{data}/broken/zero-bytes.jpg"].startswith("empty")
    assert errors[f"{data}/broken/no-extension-text"].startswith("not_an_image")
    good = rows[f"{data}/images/00/img00009"]  # an extension-less object, recognized by content
    assert good["error"] is None and 0 <= good["label_id"] < 1000 and len(good["topk_ids"]) == 5
    assert good["label"] and good["model"] == SMALL
    assert (
        rows[f"{data}/shards/shard-00001.tar#sample100013"]["meta"]
        == '{"cls": 3, "json": {"index": 100013, "source": "demo"}}'
    )
    manifest = read_json(join(labels, MANIFEST))
    assert manifest["inputs"] == len(keys) and manifest["duplicates"] == 0
    assert manifest["failed"] == len(errors) and sum(manifest["failed_by_reason"].values()) == len(
        errors
    )
    assert manifest["config"]["input"] == data + "/"
    assert manifest["units"]["skipped"] == done_before
    assert manifest["skipped_already_done"] == labeled_before, "what the killed run committed"


def test_rerun_skips_committed_units_and_overwrite_starts_over(ray_cluster: LocalRayHead, tmp_path):
    data, labels = str(tmp_path / "data"), str(tmp_path / "labels")
    keys = write_sample_dataset(data, files=12, shards=1, per_shard=6, broken=False)
    cfg = LabelConfig(input=data, output=labels, model=SMALL, files_per_unit=4, batch_size=8)

    first = run(cfg)
    second = run(cfg)
    again = run(cfg.model_copy(update={"overwrite": True}))

    assert first["inputs"] == len(keys) and first["units"]["skipped"] == 0
    assert second["units"]["skipped"] == 4 and second["skipped_already_done"] == len(keys)
    assert second["timings"]["images_this_run"] == 0
    assert again["units"]["skipped"] == 0 and again["timings"]["images_this_run"] == len(keys)
    assert sorted(output_keys(labels)) == keys
    assert not [p for p in os.listdir(labels) if not p.startswith((PART_PREFIX, "_"))]


def test_the_units_reach_the_read_tasks_without_a_remote_task_per_unit_first(
    ray_cluster: LocalRayHead, tmp_path
):
    """Ray Data's ``from_arrow`` runs one task per table to read its metadata, before the first
    read and in workers outside the read tasks' runtime env: at 100M keys, 390k tasks. The plan's
    units enter as blocks whose metadata the driver reads."""
    from ray.util.state import list_tasks

    data, labels = str(tmp_path / "data"), str(tmp_path / "labels")
    keys = write_sample_dataset(data, files=6, shards=0, broken=False)
    started_ms = time.time() * 1000

    manifest = run(LabelConfig(input=data, output=labels, model=SMALL, files_per_unit=2))

    assert manifest["labeled"] == len(keys) and manifest["units"]["committed"] == 3
    tasks = list_tasks(
        address=ray_cluster.address, detail=True, limit=10_000, raise_on_missing_output=False
    )
    since = [t.name for t in tasks if (t.creation_time_ms or 0) >= started_ms]
    assert any("read_and_decode" in name for name in since), "the state API saw this run"
    assert "get_table_block_metadata_schema" not in since


def test_a_part_that_cannot_be_written_fails_the_run_without_a_manifest_and_the_rerun_completes(
    ray_cluster: LocalRayHead, tmp_path
):
    data, labels = str(tmp_path / "data"), str(tmp_path / "labels")
    keys = write_sample_dataset(data, files=16, shards=0, broken=False)
    cfg = LabelConfig(input=data, output=labels, model=SMALL, files_per_unit=4, batch_size=4)
    blocked = join(
        labels, part_name(make_plan(list_inputs(data, []), labels, files_per_unit=4).units[2].id)
    )
    os.makedirs(blocked)  # the third unit's part name is taken by a folder: its write fails

    with pytest.raises(OSError):
        run(cfg)
    assert len(committed_units(labels)) < 4 and not exists(join(labels, MANIFEST))

    os.rmdir(blocked)
    done = set(output_keys(labels))
    manifest = run(cfg)

    assert sorted(output_keys(labels)) == keys and manifest["rows"] == len(keys)
    timings = manifest["timings"]
    assert timings["model_img_per_s"] > 0 and timings["decode_img_per_s"] > 0
    assert 0 < timings["actor_busy_fraction"] <= 1 and timings["actor_wait_s"] >= 0
    assert timings["read_bytes"] == sum(os.path.getsize(k) for k in keys if k not in done)


def raylet_pid(socket_name: str) -> int:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            args = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if (
            args
            and args[0].endswith(b"raylet")
            and f"--raylet_socket_name={socket_name}".encode() in args
        ):
            return int(pid)
    raise AssertionError(f"no raylet with socket {socket_name}")


def job_status(head: LocalRayHead, job_id: str) -> str:
    status = subprocess.run(
        [ray_cli(), "job", "status", f"--address={head.address}", job_id],
        env=head.env,
        capture_output=True,
        text=True,
    )
    return (status.stdout + status.stderr).lower()


def test_worker_node_lost_mid_run_then_the_job_or_its_rerun_labels_every_key_once(
    ray_cluster: LocalRayHead, bucket: str
):
    import ray

    ray_cluster.add_worker_node(num_cpus=3)
    worker = wait_for(
        lambda: [
            n for n in ray.nodes() if n["Alive"] and "node:__internal_head__" not in n["Resources"]
        ],
        60,
        "the worker node",
    )[0]
    data, labels = f"{bucket}/data", f"{bucket}/labels"
    keys = write_sample_dataset(data, files=96, shards=0, broken=False)
    # Two 3-CPU actors cannot share the 4-CPU head: one runs on the worker node.
    args = label_command(
        data + "/",
        labels + "/",
        "--set",
        "files_per_unit=8",
        "--set",
        "actors.min=2",
        "--set",
        "actors.max=2",
        "--set",
        "actors.cpus=3",
    )
    job_id = f"node-loss-{time.time_ns()}"
    subprocess.run(
        ray_cluster.submit_command(args, str(PROJECT), submission_id=job_id, wait=False),
        env=ray_cluster.env,
        capture_output=True,
        check=True,
    )

    def labeling_actors_on_the_worker() -> list:
        from ray.util.state import list_actors

        alive = list_actors(
            address=ray_cluster.address,
            filters=[("node_id", "=", worker["NodeID"]), ("state", "=", "ALIVE")],
            limit=100,
        )
        return [a for a in alive if "Predictor" in a.class_name]  # MapWorker(MapBatches(Predictor))

    # The worker node's actor starts last; once it is up the job labels all 12 units in seconds,
    # so the node is killed at once (a `ray job status` first would take as long as the rest of
    # the job): the job still has units to commit, checked just below.
    wait_for(
        labeling_actors_on_the_worker, 300, "a labeling actor on the worker node", interval_s=0.2
    )
    os.kill(raylet_pid(worker["RayletSocketName"]), signal.SIGKILL)
    units = -(-len(keys) // 8)  # files_per_unit=8
    committed_at_kill = len(committed_units(labels))  # an upper bound: read just after the kill
    assert committed_at_kill < units, "the node died while the job still had units to label"
    wait_for(
        lambda: not [n for n in ray.nodes() if n["NodeID"] == worker["NodeID"] and n["Alive"]],
        120,
        "the node to be declared dead",
    )

    # Once the node is dead, the job ends in seconds or, when the lost actor had a batch in
    # flight, Ray Data's read stage can wait about two minutes for its budget (seen: 132 s):
    # past 45 s, the job is stopped and the rerun must finish it.
    try:
        finished = wait_for(
            lambda: any(s in job_status(ray_cluster, job_id) for s in ("succeeded", "failed")),
            45,
            "the job to end",
            interval_s=0.5,
        )
    except AssertionError:
        finished = False
    if not finished or "succeeded" not in job_status(ray_cluster, job_id):
        ray_cluster.stop_job(job_id)
        rerun = ray_cluster.submit(
            label_command(data + "/", labels + "/", "--set", "files_per_unit=8"),
            working_dir=str(PROJECT),
        )
        assert rerun.returncode == 0, rerun.stdout[-3000:]

    got = output_keys(labels)
    assert len(got) == len(set(got)) and sorted(got) == keys


def test_s3_endpoint_from_the_config_wins_over_the_environment(
    ray_cluster: LocalRayHead, embedded_s3, bucket: str, monkeypatch
):
    data, labels = f"{bucket}/data", f"{bucket}/labels"
    keys = write_sample_dataset(data, files=6, shards=0, broken=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there

    manifest = run(
        LabelConfig(
            input=data, output=labels, model=SMALL, s3={"endpoint_url": embedded_s3.endpoint_url}
        )
    )

    assert manifest["labeled"] == len(keys) and sorted(output_keys(labels)) == keys


def write_images(root: str, names: list[str]) -> list[str]:
    for i, name in enumerate(names):
        write_bytes_atomic(join(root, name), synthetic_image(i))
    return [join(root, name) for name in names]


def test_a_rerun_after_files_were_added_anywhere_and_some_removed_labels_only_the_new_keys(
    ray_cluster: LocalRayHead, tmp_path
):
    data, labels = str(tmp_path / "data"), str(tmp_path / "labels")
    first = write_images(data, [f"m/{i:03d}.jpg" for i in range(120)])
    cfg = LabelConfig(input=data, output=labels, model=SMALL, files_per_unit=16, batch_size=16)
    run(cfg)
    added = write_images(
        data,
        [f"a/{i:02d}.jpg" for i in range(15)]  # sort first
        + [f"m/{i:03d}x.jpg" for i in range(0, 120, 6)]  # in the middle
        + [f"z/{i:02d}.jpg" for i in range(15)],
    )  # sort last
    removed = first[3:120:25]
    for uri in removed:
        os.remove(uri)

    manifest = run(cfg)

    assert len(added) == 50 and len(removed) == 5
    assert manifest["timings"]["images_this_run"] == 50
    assert manifest["removed_from_input"] == 5 and manifest["duplicates"] == 0
    got = output_keys(labels)
    assert len(got) == len(set(got)) == 170, "every key once; rows of removed keys stay"
    assert set(got) >= set(first) | set(added)
    assert run(cfg)["timings"]["images_this_run"] == 0


def test_two_runs_on_one_output_started_a_second_apart_one_labels_and_one_is_refused_by_name(
    ray_cluster: LocalRayHead, bucket: str
):
    data, labels = f"{bucket}/data", f"{bucket}/labels"
    keys = write_sample_dataset(data, files=48, shards=0, broken=False)
    command = ray_cluster.submit_command(
        label_command(data + "/", labels + "/"), working_dir=str(PROJECT)
    )
    runs = []
    for _ in range(2):
        runs.append(
            subprocess.Popen(
                command,
                env=ray_cluster.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
        time.sleep(1)  # the scenario itself: the second run starts a second after the first
    outputs = [r.communicate(timeout=540)[0] for r in runs]

    codes = sorted(r.returncode for r in runs)
    refused = next(out for r, out in zip(runs, outputs) if r.returncode != 0)
    assert codes[0] == 0 and codes[1] != 0, outputs
    assert "is held by run" in refused and "pid" in refused and "one run per output" in refused
    got = output_keys(labels)
    assert len(got) == len(set(got)) and sorted(got) == keys


def test_hostile_files_become_error_rows_and_a_weights_url_secret_is_not_printed_or_stored(
    ray_cluster: LocalRayHead, tmp_path, capsys
):
    import http.server
    import threading
    from functools import partial

    from PIL import Image

    from skray.core.model import create_model
    from skray.weights.files import save_weights

    secret = "s3cretpassw0rd"
    served = tmp_path / "served"
    save_weights(create_model(SMALL, 4), str(served / "w.safetensors"), architecture=SMALL)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    data, labels = str(tmp_path / "data"), str(tmp_path / "labels")
    write_images(data, [f"{i}.jpg" for i in range(4)])
    bomb = io.BytesIO()
    Image.new("L", (1, 65_000)).save(bomb, "JPEG")  # 6 KB whose eval resize is 256 x 16.6M pixels
    write_bytes_atomic(join(data, "bomb.jpg"), bomb.getvalue())
    write_bytes_atomic(join(data, "huge.jpg"), os.urandom(300_000))
    weights = f"http://127.0.0.1:{server.server_port}/w.safetensors?X-Amz-Signature={secret}&token={secret}"
    try:
        manifest = run(
            LabelConfig(
                input=data, output=labels, weights=weights, batch_size=4, max_object_bytes=200_000
            )
        )
    finally:
        server.shutdown()

    assert manifest["labeled"] == 4
    assert manifest["failed_by_reason"] == {"too_many_pixels": 1, "too_large": 1}
    stored = [
        open(os.path.join(labels, name)).read()
        for name in os.listdir(labels)
        if name.endswith(".json")
    ]
    assert len(stored) >= 2 and all(secret not in text for text in stored)
    assert secret not in capsys.readouterr().out


def test_containers_as_people_and_attackers_make_them_are_rows_and_never_fail_the_job(
    ray_cluster: LocalRayHead, tmp_path, mlflow_store, capsys
):
    from mlflow import MlflowClient

    from helpers import tar_bytes
    from skray.cli import main

    data, labels, folder = tmp_path / "data", str(tmp_path / "labels"), tmp_path / "samples"
    for i in range(4):  # a shard made the common way: every member named ./...
        write_bytes_atomic(str(folder / f"{i:06d}.jpg"), synthetic_image(i))
        write_bytes_atomic(str(folder / f"{i:06d}.cls"), b"1")
    (data / "shards").mkdir(parents=True)
    gnu = ["tar", "--sort=name", "-C", str(folder), "-cf", str(data / "shards/gnu.tar"), "."]
    subprocess.run(gnu, check=True)
    hostile = [
        ("./a.jpg", synthetic_image(10)),
        ("./b.jpg", synthetic_image(11)),
        ("./deep.jpg", synthetic_image(12)),
        ("./deep.json", b"[" * 100_000),  # nested past the stack: the sample keeps its text
        ("../../etc/passwd.jpg", synthetic_image(13)),  # climbs out: a row of its own
        *[(f"many.{i}.jpg", synthetic_image(14)) for i in range(17)],  # past 16 members
    ]
    write_bytes_atomic(str(data / "shards/hostile.tar"), tar_bytes(hostile))
    hf = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": synthetic_image(20 + i), "path": f"{i}.jpg"} for i in range(3)]
    pq.write_table(pa.table({"image": pa.array(cells, hf)}), str(data / "hf.parquet"))
    ids = ['=HYPERLINK("http://evil.example","x")', "@SUM(1+1)"]
    pq.write_table(
        pa.table({"id": ids, "image": [synthetic_image(30), synthetic_image(31)]}),
        str(data / "formulas.parquet"),
    )
    write_images(str(data / "images"), [f"{i}.jpg" for i in range(3)])

    code = main(["label", "--input", str(data), "--output", labels, "--model", SMALL])

    assert code == 0, capsys.readouterr().err
    manifest = read_json(join(labels, MANIFEST))
    assert manifest["complete"] and manifest["rows"] == 4 + 5 + 3 + 2 + 3
    assert manifest["labeled"] == 4 + 3 + 3 + 2 + 3, "every ordinary sample labeled"
    assert manifest["failed_by_reason"] == {"too_large": 1, "unsafe_member_name": 1}
    failed = [row for row in output_table(labels).to_pylist() if row["error"]]
    assert sorted(row["reason"] for row in failed) == ["too_large", "unsafe_member_name"]
    assert all(row["error"].startswith(row["reason"] + ": ") for row in failed)
    assert exists(join(labels, "_report/index.html"))
    run_id = manifest["mlflow"]["run_id"]
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"
