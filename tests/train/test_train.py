"""Training on Ray Train: learning, DDP, fault tolerance, resume, MLflow, and the model it
registers."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import PROJECT, SMALL, ReadmeCpuRun, labeled_dataset, mlflow_store_in, wait_for
from skray.dev.embedded import LocalRayHead
from skray.dev.testing import (
    DIGIT_CLASSES,
    labeled_image,
    write_labeled_folder,
)
from skray.io.config import ConfigError, load_config
from skray.io.storage import join, read_json, write_bytes_atomic
from skray.train.checkpoints import save_checkpoint
from skray.train.config import TrainConfig
from skray.train.datasets import BAD_LABEL, DatasetError
from skray.train.driver import CONFIG_FILE, RUN_FILE, check_inputs, run
from skray.train.ingest import IngestStalledError, stall_guarded
from skray.train.loop import autocast_settings, evaluate_epoch, train_epoch
from skray.train.recipe import batch_loss, lr_at, steps_per_epoch
from skray.train.resources import split_cpus

pytestmark = pytest.mark.timeout(600)
CPU_CONFIG = PROJECT / "configs" / "train_cpu_small.yaml"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, str]:
    return labeled_dataset(tmp_path_factory.mktemp("data"), per_class=48)


EPOCHS = ReadmeCpuRun.EPOCHS
MIN_TOP1 = 60.0  # percent; chance is 10


@pytest.fixture(scope="module")
def learned(readme_cpu_run: ReadmeCpuRun) -> dict:
    """The README's CPU command (:class:`helpers.ReadmeCpuRun`), started in the background when
    the Serve tests began. The tests that check the command, the learning, the MLflow run and the
    registered model share this one run instead of training four times. Returns its summary
    (``skray_result.json``), its console output and its tracking URI."""
    return readme_cpu_run.result(timeout_s=540)


@contextlib.contextmanager
def tracking_to(uri: str) -> Iterator[str]:
    """This process and its children pointed at the MLflow store ``uri`` for the block."""
    import mlflow

    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        yield uri


@pytest.fixture
def learned_store(learned: dict) -> Iterator[dict]:
    """``learned``, with this process and its children pointed at its MLflow store."""
    with tracking_to(learned["tracking_uri"]):
        yield learned


def small_config(dataset: dict[str, str], tmp_path, *overrides: str) -> TrainConfig:
    return load_config(
        TrainConfig,
        CPU_CONFIG,
        [
            f"data.train={dataset['train']}",
            f"data.val={dataset['val']}",
            f"storage_path={tmp_path}/runs",
            "preprocessing.image_size=48",
            "mlflow.registered_model=skray-test",
            *overrides,
        ],
    )


def metric_history(run_id: str, key: str) -> list[float]:
    return [
        m.value
        for m in sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)
    ]


@pytest.mark.slow
def test_the_readme_cpu_command_learns_real_digits_on_a_ray_with_two_cpus(learned):
    """Its 2 workers x 1 CPU must not starve the ingest's decode tasks on a 2-CPU Ray (they used
    to wait forever, silently), and the small variant must learn real images no one here wrote."""
    top1 = learned["best"]["val_top1"]
    print(
        f"digits: best val top-1 {top1:.1f}% (top-5 {learned['best']['val_top5']:.1f}%) at epoch "
        f"{learned['best']['epoch']} of {EPOCHS}, {learned['seconds']:.0f} s"
    )

    assert "[train] done: best val_top1" in learned["output"]
    assert top1 >= MIN_TOP1, f"val top-1 {top1:.1f}% on real digits: not clearly above chance"


@pytest.mark.slow
def test_two_worker_ddp_training_learns_and_logs_everything_to_mlflow(learned_store):
    summary = learned_store

    losses = metric_history(summary["mlflow_run_id"], "train_loss")
    assert len(losses) == EPOCHS and losses[-1] < losses[0]
    client = MlflowClient()
    mlrun = client.get_run(summary["mlflow_run_id"])
    assert mlrun.data.params["optim.lr"] == "0.4" and mlrun.data.params["scaling.workers"] == "2"
    assert mlrun.data.params["amp"] == "bf16"
    assert {"git_commit", "ray_version", "torch_version", "data_uri"} <= set(mlrun.data.tags)
    for key in ("val_top1", "val_top5", "lr", "img_per_s"):
        assert len(metric_history(summary["mlflow_run_id"], key)) == EPOCHS
    assert mlrun.info.status == "FINISHED"
    version = client.get_model_version("skray-test", summary["model"]["registered_version"])
    assert version.run_id == summary["mlflow_run_id"]
    assert (
        read_json(join(summary["run_dir"], RUN_FILE))["mlflow_run_id"] == summary["mlflow_run_id"]
    )


@pytest.mark.slow
def test_the_registered_model_labels_images_through_the_batch_job_and_predict(
    ray_cluster: LocalRayHead, learned_store, tmp_path, capsys
):
    import pyarrow.parquet as pq

    from skray.cli import main
    from skray.label.config import LabelConfig
    from skray.label.job import run as label

    summary, val = learned_store, learned_store["data"]["val"]
    uri = f"models:/skray-test/{summary['model']['registered_version']}"
    image = f"{val}/digit2/" + sorted(os.listdir(f"{val}/digit2"))[0]

    manifest = label(
        LabelConfig(
            input=val,
            output=str(tmp_path / "labels"),
            weights=uri,
            preprocessing={"image_size": 32},
        )
    )
    assert main(["predict", "--weights", uri, "--top-k", "1", image]) == 0

    assert manifest["labeled"] == 359 and not manifest["random_weights"]
    rows = pq.read_table(str(tmp_path / "labels"), columns=["key", "label"]).to_pylist()
    labeled_top1 = 100 * sum(row["label"] == row["key"].rsplit("/", 2)[-2] for row in rows) / 359
    assert capsys.readouterr().out.split(image, 1)[1].split()[1] in DIGIT_CLASSES

    assert (
        main(
            [
                "evaluate",
                "--data",
                val,
                "--weights",
                uri,
                "--image-size",
                "32",
                "--mlflow-experiment",
                "skray-eval",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    top1 = float(out.split("top-1 ")[1].split()[0])
    # The batch job and evaluate share the fp32 fast path (folded BatchNorm), which may flip a
    # near-tie argmax of the plain eval: one image at most.
    assert abs(labeled_top1 - top1) <= 100 / 359 + 0.01, "the batch job scores as evaluate does"
    # Training validated under bf16 autocast, which flips a few near-ties more; a preprocessing
    # that differed from training's (size, crop, resize, normalization) would cost far more.
    assert abs(top1 - summary["best"]["val_top1"]) <= 2.0, (
        "evaluate agrees with training's validation"
    )
    assert "(359 images, 0 undecodable)" in out
    evaluation = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("skray-eval").experiment_id]
    )[0]
    assert abs(evaluation.data.metrics["top1"] - top1) < 0.01


@pytest.fixture(scope="module")
def finetuned(ray_cluster: LocalRayHead, dataset, tmp_path_factory) -> Iterator[dict]:
    """One 3-epoch run that fine-tunes 1000-class weights into a 4-class model with the backbone
    frozen for epoch 0, reading the training folder as WebDataset shards (no val split): the
    fine-tuning test and the WebDataset test share it. Its store and the pretrained model come
    with it."""
    from skray.core.model import create_model
    from skray.weights.files import save_weights

    home = tmp_path_factory.mktemp("finetuned")
    as_webdataset(dataset["train"], home / "wds", shards=3)
    pretrained = create_model(SMALL, num_classes=1000)
    save_weights(pretrained, home / "pre.safetensors", architecture=SMALL)
    cfg = small_config(
        dataset,
        home,
        "epochs=3",
        "name=finetune",
        f"data.train={home}/wds",
        "data.format=webdataset",
        "data.num_classes=4",
        "data.val=null",
        f"model.weights={home}/pre.safetensors",
        "model.freeze_backbone_epochs=1",
        "keep_checkpoints=3",
        "mlflow.registered_model=null",
    )
    with tracking_to(mlflow_store_in(home)) as uri:
        summary = run(cfg)
    yield {**summary, "cfg": cfg, "pretrained": pretrained, "tracking_uri": uri}


@pytest.mark.slow
def test_fine_tuning_starts_from_weights_with_a_new_head_and_can_freeze_the_backbone(finetuned):
    import torch

    states = [
        torch.load(p, weights_only=True)
        for p in Path(finetuned["run_dir"]).glob("checkpoint_*/state.pt")
    ]
    frozen = next(s for s in states if s["epoch"] == 0)["model"]
    before = finetuned["pretrained"].state_dict()
    assert frozen["fc.weight"].shape == (4, finetuned["pretrained"].num_features)
    assert all(torch.equal(frozen[k], before[k]) for k in before if not k.startswith("fc.")), (
        "backbone frozen"
    )
    thawed = next(s for s in states if s["epoch"] == 1)["model"]
    assert not torch.equal(thawed["conv1.weight"], before["conv1.weight"]), "then it trains"
    assert finetuned["model"]["registered_version"] is None


@pytest.mark.slow
def test_a_webdataset_run_logs_the_lr_curve_of_a_folder_run_of_the_same_size(finetuned):
    cfg, folder_steps = finetuned["cfg"], 192 // 32

    with tracking_to(finetuned["tracking_uri"]):
        logged = metric_history(finetuned["mlflow_run_id"], "lr")

    expected = [lr_at((epoch + 1) * folder_steps - 1, folder_steps, cfg) for epoch in range(3)]
    assert logged == pytest.approx(expected)
    assert expected[0] == pytest.approx(cfg.lr) and 0 < expected[1] < cfg.lr, (
        "warm-up over epoch 0, cosine after"
    )


def train_worker_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def registered_checkpoints(run_dir) -> int:
    """Checkpoints Ray Train's controller has registered (reported ones may still be in flight).
    The controller rewrites its snapshot in place, so a read can land on an empty or half-written
    file: that counts as none yet."""
    try:
        snapshot = (run_dir / "checkpoint_manager_snapshot.json").read_text()
        return len(json.loads(snapshot).get("checkpoint_results", []))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


STOPPED_EPOCHS = 10  # epochs after the cold first take about a second; the job is stopped by ~4


@pytest.fixture(scope="module")
def survived(ray_cluster: LocalRayHead, dataset, tmp_path_factory) -> Iterator[dict]:
    """One run, submitted with ``ray job submit``, that survives two faults: a training worker
    SIGKILLed after the first checkpoint (Ray Train replaces it inside the job), then the whole
    job stopped with ``ray job stop`` and resumed from its directory. The test of each fault
    reads it. Yields the resumed run's summary, what MLflow held before the resume, and the
    first run id."""
    home = tmp_path_factory.mktemp("survived")
    uri, run_dir = mlflow_store_in(home), home / "runs" / "stopped"
    job = f"train-stop-{time.time_ns()}"
    command = ray_cluster.submit_command(
        [
            "python",
            "pipelines/train.py",
            "--config",
            str(CPU_CONFIG),
            "--set",
            f"data.train={dataset['train']}",
            "--set",
            f"data.val={dataset['val']}",
            "--set",
            f"storage_path={home}/runs",
            "--set",
            "name=stopped",
            "--set",
            "preprocessing.image_size=48",
            "--set",
            f"epochs={STOPPED_EPOCHS}",
            "--set",
            f"mlflow.tracking_uri={uri}",
        ],
        str(PROJECT),
        submission_id=job,
        wait=False,
    )
    subprocess.run(command, env=ray_cluster.env, check=True, capture_output=True)
    try:
        wait_for(lambda: registered_checkpoints(run_dir), 300, "a registered checkpoint")
        os.kill(train_worker_pids()[-1], signal.SIGKILL)
        with tracking_to(uri):
            run_id = read_json(str(run_dir / RUN_FILE))["mlflow_run_id"]
            wait_for(
                lambda: max(metric_history(run_id, "resumed_at_epoch"), default=0) > 0,
                300,
                "the job's replaced worker to resume from the checkpoint",
                interval_s=0.5,
            )
            assert ray_cluster.stop_job(job).returncode == 0
            before = {key: metric_history(run_id, key) for key in ("epoch", "resumed_at_epoch")}
            finished_in_job = (run_dir / "skray_result.json").exists()
            summary = run(None, resume=str(run_dir))
            after = metric_history(run_id, "epoch")
    except BaseException:
        ray_cluster.stop_job(job)  # a fixture that failed must not leave its job training
        raise
    yield {
        **summary,
        "run_dir": run_dir,
        "first_run_id": run_id,
        "before_resume": before,
        "finished_in_job": finished_in_job,
        "epochs_logged": after,
        "tracking_uri": uri,
    }


@pytest.mark.slow
def test_a_killed_worker_is_replaced_and_training_resumes_from_the_checkpoint(survived):
    logged = survived["before_resume"]
    resumed = [at for at in logged["resumed_at_epoch"] if at > 0]

    assert resumed, "inside the job, a new worker group restored the last checkpoint"
    assert logged["epoch"].count(0) == 1, "and went on from it instead of starting over"
    assert not survived["finished_in_job"], "the job was stopped mid-run"


@pytest.mark.slow
def test_resume_continues_a_stopped_run_from_its_directory(survived):
    assert survived["final"]["epoch"] == STOPPED_EPOCHS - 1
    assert survived["final"]["resumed_at_epoch"] >= max(survived["before_resume"]["epoch"]), (
        "from the job's last checkpoint"
    )
    assert survived["mlflow_run_id"] == survived["first_run_id"]
    assert survived["epochs_logged"][-1] == STOPPED_EPOCHS - 1
    assert (survived["run_dir"] / CONFIG_FILE).is_file()


@pytest.mark.slow
def test_too_many_undecodable_images_fail_the_run_naming_the_threshold(
    ray_cluster: LocalRayHead, dataset, tmp_path, mlflow_store
):
    broken = tmp_path / "broken"
    write_labeled_folder(str(broken), classes=2, per_class=16)
    for i in range(8):
        write_bytes_atomic(str(broken / "class0" / f"bad{i}.png"), b"not a png")
    cfg = load_config(
        TrainConfig,
        CPU_CONFIG,
        [
            f"data.train={broken}",
            "data.val=null",
            f"storage_path={tmp_path}/runs",
            "preprocessing.image_size=48",
            "epochs=1",
            "mlflow.registered_model=null",
            "max_failures=0",
        ],
    )

    with pytest.raises(Exception, match="max_bad_fraction"):
        run(cfg)


# --- bad input, before any worker starts ----------------------------------------


def test_a_dataset_with_no_classes_fails_early(tmp_path):
    (tmp_path / "flat").mkdir()
    write_bytes_atomic(str(tmp_path / "flat" / "a.png"), labeled_image(0, 0))
    cfg = TrainConfig(data={"train": str(tmp_path / "flat")})

    with pytest.raises(DatasetError, match="no classes"):
        check_inputs(cfg)


def test_an_empty_class_directory_fails_early_naming_it(tmp_path):
    write_labeled_folder(str(tmp_path / "d"), classes=2, per_class=2)
    (tmp_path / "d" / "class9").mkdir()

    with pytest.raises(DatasetError, match="class9 holds no images"):
        check_inputs(TrainConfig(data={"train": str(tmp_path / "d")}))


def test_an_unknown_config_key_fails_naming_it():
    with pytest.raises(ConfigError, match="optim.learning_rate: unknown key"):
        load_config(TrainConfig, CPU_CONFIG, ["optim.learning_rate=0.1"])


def test_the_old_key_model_pretrained_fails_saying_to_use_model_weights():
    with pytest.raises(ConfigError, match="model.pretrained is now model.weights"):
        load_config(TrainConfig, CPU_CONFIG, ["model.pretrained=pretrained"])


def test_a_config_error_shows_no_credentials_from_the_config():
    secret = "s3cretpassw0rd"
    with pytest.raises(ConfigError) as error:
        load_config(
            TrainConfig,
            CPU_CONFIG,
            [
                f"data.train=s3://bucket/train?X-Amz-Signature={secret}",
                f"model.pretrained=https://h/w.pth?token={secret}",
            ],
        )
    assert "model.pretrained is now model.weights" in str(error.value) and secret not in str(
        error.value
    )


@pytest.mark.parametrize(
    "old, new",
    [
        ("image_size=48", "preprocessing.image_size"),
        ("eval_crop_pct=0.9", "preprocessing.crop_pct"),
        ("interpolation=bilinear", "preprocessing.interpolation"),
    ],
)
def test_the_old_flat_preprocessing_keys_fail_naming_their_new_place(old, new):
    with pytest.raises(ConfigError, match=f"{old.split('=')[0]} is now {new}"):
        load_config(TrainConfig, CPU_CONFIG, [old])


def test_every_jobs_preprocessing_defaults_to_its_models(monkeypatch):
    import dataclasses

    from skray.core import specs
    from skray.label.config import LabelConfig
    from skray.train.evaluate import EvaluateConfig

    spec = dataclasses.replace(
        specs.model_spec(SMALL), image_size=256, crop_pct=0.95, interpolation="bilinear"
    )
    monkeypatch.setitem(specs._MODELS, "wide_eval", spec)
    configs = [
        TrainConfig(
            data={"train": "d"},
            model={"name": "wide_eval"},
            scaling={"workers": 1},
            preprocessing={"crop_pct": 0.9},
        ),
        EvaluateConfig(data="d", model="wide_eval", preprocessing={"crop_pct": 0.9}),
        LabelConfig(input="d", output="o", model="wide_eval", preprocessing={"crop_pct": 0.9}),
    ]

    for cfg in configs:
        assert (
            cfg.preprocessing.image_size,
            cfg.preprocessing.crop_pct,
            cfg.preprocessing.interpolation,
        ) == (256, 0.9, "bilinear"), type(cfg).__name__
    assert EvaluateConfig(data="d").preprocessing.image_size == 224, "no model: the default model's"


def test_the_baseline_config_is_the_published_recipe():
    cfg = load_config(TrainConfig, PROJECT / "configs" / "train_baseline.yaml")
    assert (cfg.model.name, cfg.epochs, cfg.batch_size) == ("skresnext50_32x4d", 100, 256)
    assert cfg.preprocessing.image_size == 224
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 1e-4)
    assert (cfg.scaling.workers, cfg.scaling.use_gpu, cfg.preprocessing.crop_pct) == (
        8,
        True,
        0.875,
    )
    assert cfg.lr == 0.1
    assert (
        load_config(TrainConfig, PROJECT / "configs" / "train_baseline.yaml", ["batch_size=512"]).lr
        == 0.2
    )


# --- the cluster's CPUs, a stalled input, the schedule's steps, the loop's syncs -------------


def test_workers_that_would_take_every_cpu_leave_room_for_the_ingest_and_say_so():
    cfg = TrainConfig(
        data={"train": "unused"}, scaling={"workers": 2, "use_gpu": False, "cpus_per_worker": 1}
    )

    tight = split_cpus(cfg, cluster_cpus=2)
    roomy = split_cpus(cfg, cluster_cpus=4)

    assert 2 * tight.cpus_per_worker + tight.decode_cpus <= 2, (
        "one decode task fits beside the workers"
    )
    assert (
        tight.decode_cpus > 0
        and "scaling.cpus_per_worker" in tight.note
        and "data.decode_cpus" in tight.note
    )
    assert (roomy.cpus_per_worker, roomy.decode_cpus, roomy.note) == (1, 0.5, None), (
        "as asked when it fits"
    )


@pytest.mark.timeout(60)
def test_an_input_that_stops_delivering_batches_fails_naming_the_timeout_instead_of_hanging():
    release = threading.Event()

    def stalls_after_two():
        yield "b0"
        yield "b1"
        release.wait()  # a decode task that never gets a CPU
        yield "b2"

    got = []
    started = time.monotonic()
    with pytest.raises(
        IngestStalledError, match=r"no training batch for 0.5 s \(data.stall_timeout_s\)"
    ):
        for batch in stall_guarded(stalls_after_two(), 0.5, "training"):
            got.append(batch)
    release.set()

    assert got == ["b0", "b1"] and time.monotonic() - started < 10
    assert list(stall_guarded(iter(["a", "b"]), 5, "training")) == ["a", "b"], (
        "a flowing input passes through"
    )
    with pytest.raises(ZeroDivisionError):
        list(stall_guarded((1 / 0 for _ in range(1)), 5, "training"))


def as_webdataset(folder: str, out, shards: int) -> None:
    """The folder dataset as WebDataset shards (a .png and a .cls member per sample)."""
    import io
    import tarfile
    from pathlib import Path

    files = sorted(Path(folder).glob("class*/*.png"))
    out.mkdir()
    for s in range(shards):
        with tarfile.open(out / f"shard-{s:03d}.tar", "w") as tar:
            for i, path in enumerate(files[s::shards]):
                for ext, payload in (
                    ("png", path.read_bytes()),
                    ("cls", path.parent.name[5:].encode()),
                ):
                    info = tarfile.TarInfo(f"{path.parent.name}/{s}-{i:04d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def as_parquet(folder: str, path) -> None:
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(Path(folder).glob("class*/*.png"))
    pq.write_table(
        pa.table(
            {"image": [f.read_bytes() for f in files], "label": [f.parent.name for f in files]}
        ),
        path,
        row_group_size=50,
    )


def test_webdataset_and_parquet_datasets_get_the_schedule_of_a_folder_of_the_same_images(
    dataset, tmp_path
):
    as_webdataset(dataset["train"], tmp_path / "wds", shards=3)
    as_parquet(dataset["train"], tmp_path / "train.parquet")
    cfg = TrainConfig(data={"train": "unused"}, batch_size=32, epochs=4, optim={"warmup_epochs": 1})

    folder = check_inputs(
        cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": dataset["train"]})})
    )[0]
    webdataset = check_inputs(
        cfg.model_copy(
            update={
                "data": cfg.data.model_copy(
                    update={
                        "train": str(tmp_path / "wds"),
                        "format": "webdataset",
                        "num_classes": 4,
                    }
                )
            }
        )
    )[0]
    parquet = check_inputs(
        cfg.model_copy(
            update={
                "data": cfg.data.model_copy(
                    update={"train": str(tmp_path / "train.parquet"), "format": "parquet"}
                )
            }
        )
    )[0]

    assert folder.num_images == webdataset.num_images == parquet.num_images == 192
    steps = steps_per_epoch(folder, cfg)
    assert steps == 6 and steps_per_epoch(webdataset, cfg) == steps_per_epoch(parquet, cfg) == steps
    # the LR then warms up over the first epoch and decays over the rest, as for the folder
    assert (
        lr_at(steps - 1, steps, cfg) == pytest.approx(cfg.lr)
        and 0 < lr_at(3 * steps, steps, cfg) < cfg.lr
    )


class SyncCounter:
    """Counts device-to-host reads of a tensor's value (float(t), t.item(), bool(t)): each one
    waits for the device to finish everything queued before it."""

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    counter.syncs += 1
                return func(*args, **(kwargs or {}))

        self.syncs, self._mode = 0, Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def epoch_fixture(steps: int):
    import torch

    from skray.core.model import create_model

    torch.manual_seed(0)
    cfg = TrainConfig(
        data={"train": "unused"},
        model={"name": SMALL},
        batch_size=6,
        epochs=2,
        scaling={"workers": 1},
        optim={"label_smoothing": 0.1},
    )
    model = create_model(SMALL, num_classes=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    batches = [
        {
            "image": torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8),
            "label": torch.tensor(
                [0, 1, 2, 3, BAD_LABEL, i % 4][: 6 - i % 2] + [BAD_LABEL] * (i % 2)
            ),
        }
        for i in range(steps)
    ]
    return cfg, model, optimizer, scaler, batches


def one_epoch(cfg, model, optimizer, scaler, batches, **amp) -> dict:
    """``train_epoch`` over all of ``batches`` on the CPU, the model its own unwrapped one."""
    import torch

    return train_epoch(
        model,
        model,
        optimizer,
        scaler,
        batches,
        cfg,
        device=torch.device("cpu"),
        epoch=0,
        steps_per_epoch=len(batches),
        **amp,
    )


def test_a_training_epoch_never_reads_the_loss_back_between_steps():

    cfg, model, optimizer, scaler, batches = epoch_fixture(steps=2)

    with SyncCounter() as counter:
        one_epoch(cfg, model, optimizer, scaler, batches)

    assert counter.syncs == 0, (
        f"{counter.syncs} device syncs in 2 steps: the sums belong on the device"
    )


def test_an_epochs_train_loss_is_the_mean_of_its_steps_losses_over_the_decodable_images():

    cfg, model, optimizer, scaler, batches = epoch_fixture(steps=4)
    logits = []
    model.register_forward_hook(lambda module, args, out: logits.append(out.detach().clone()))

    sums = one_epoch(cfg, model, optimizer, scaler, batches)

    goods = [int((b["label"] != BAD_LABEL).sum()) for b in batches]
    losses = [float(batch_loss(out, b["label"], 0.1)) for out, b in zip(logits, batches)]
    assert (sums["seen"], sums["skipped"]) == (sum(goods), 4 * 6 - sum(goods))
    assert sums["loss_sum"] / sums["seen"] == pytest.approx(
        sum(x * g for x, g in zip(losses, goods)) / sum(goods)
    )
    assert sums["lr"] == lr_at(3, 4, cfg), "the last step's LR"


def test_amp_bf16_trains_on_a_cpu_worker_under_autocast_and_fp16_stays_off_there(monkeypatch):
    import torch

    from skray.inference import precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu", lambda: ("EPYC", frozenset({"avx512f", "avx512_vnni"})))
    assert autocast_settings("bf16", cpu)["use_amp"] is False, "no native bf16: fp32 steps"
    monkeypatch.setattr(precision, "cpu", lambda: ("Xeon", frozenset({"avx512f", "amx_bf16"})))
    assert autocast_settings("fp16", cpu)["use_amp"] is False
    assert autocast_settings("off", cpu)["use_amp"] is False
    bf16 = autocast_settings("bf16", cpu)
    cfg, model, optimizer, scaler, batches = epoch_fixture(steps=2)
    before = [p.detach().clone() for p in model.parameters()]
    dtypes = []
    model.fc.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))

    sums = one_epoch(cfg, model, optimizer, scaler, batches, **bf16)

    assert bf16 == {"use_amp": True, "amp_dtype": torch.bfloat16}
    assert dtypes == [torch.bfloat16, torch.bfloat16], "the forward ran in bf16"
    assert math.isfinite(sums["loss_sum"]) and sums["seen"] > 0
    assert all(p.dtype == torch.float32 for p in model.parameters()), "weights stay fp32"
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_validation_counts_top1_and_top5_over_the_decodable_images_and_skips_the_rest():
    import torch

    cfg, model, _, _, batches = epoch_fixture(steps=10)
    model.eval()
    logits = []
    model.register_forward_hook(lambda module, args, out: logits.append(out.detach().clone()))

    with SyncCounter() as counter:
        counts = evaluate_epoch(model, batches, cfg, device=torch.device("cpu"))
    assert counter.syncs == 0, (
        f"{counter.syncs} device syncs in 10 batches: the counts belong on the device"
    )

    top1 = top5 = total = 0
    for out, batch in zip(logits, batches):
        for row, label in zip(out, batch["label"].tolist()):
            if label != BAD_LABEL:
                total += 1
                top1 += int(row.argmax()) == label
                top5 += (
                    label in row.topk(4).indices.tolist()
                )  # 4 classes: every top-5 holds them all
    assert counts == {"correct1": top1, "correct5": top5, "total": total, "skipped": 10 * 6 - total}
    assert top5 == total


def test_a_checkpoint_holds_the_state_to_resume_and_the_model_to_use(tmp_path):
    import torch

    from skray.weights.resolver import load_model

    cfg, model, optimizer, scaler, _ = epoch_fixture(steps=1)
    names = ["a", "b", "c", "d"]
    save_checkpoint(
        tmp_path, model, optimizer, scaler, cfg, epoch=3, best_top1=42.0, class_names=names
    )

    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert (state["epoch"], state["best_top1"], state["class_names"]) == (3, 42.0, names)
    assert TrainConfig.model_validate(state["config"]) == cfg
    loaded, info = load_model(weights=str(tmp_path / "model.safetensors"))
    assert (info.architecture, info.class_names) == (SMALL, names)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
