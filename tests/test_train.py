"""Training on Ray Train: learning, DDP, fault tolerance, resume, MLflow, and the model it registers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from skray.config import ConfigError, load_config
from skray.datasets import DatasetError
from skray.demo import labeled_image, write_labeled_folder
from skray.embedded import LocalRayHead
from skray.sinks import join, read_json
from skray.storage import write_bytes_atomic
from skray.train import CONFIG_FILE, RUN_FILE, TrainConfig, check_inputs, run

from conftest import PROJECT, labeled_dataset

pytestmark = pytest.mark.timeout(600)
CPU_CONFIG = PROJECT / "configs" / "train_cpu_small.yaml"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, str]:
    return labeled_dataset(tmp_path_factory.mktemp("data"), per_class=48)



def small_config(dataset: dict[str, str], tmp_path, *overrides: str) -> TrainConfig:
    return load_config(TrainConfig, CPU_CONFIG, [
        f"data.train={dataset['train']}", f"data.val={dataset['val']}", f"storage_path={tmp_path}/runs",
        "image_size=48", "mlflow.registered_model=skray-test", *overrides])


def metric_history(run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)]


def test_two_worker_ddp_training_learns_and_logs_everything_to_mlflow(
    ray_cluster: LocalRayHead, dataset, tmp_path, mlflow_store
):
    cfg = small_config(dataset, tmp_path, "epochs=4", "name=learns")

    summary = run(cfg)

    losses = metric_history(summary["mlflow_run_id"], "train_loss")
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert summary["best"]["val_top1"] >= 60, "well above the 25% of chance"
    client = MlflowClient()
    mlrun = client.get_run(summary["mlflow_run_id"])
    assert mlrun.data.params["optim.lr"] == "0.4" and mlrun.data.params["scaling.workers"] == "2"
    assert {"git_commit", "ray_version", "torch_version", "data_uri"} <= set(mlrun.data.tags)
    for key in ("val_top1", "val_top5", "lr", "img_per_s"):
        assert len(metric_history(summary["mlflow_run_id"], key)) == 4
    assert mlrun.info.status == "FINISHED"
    version = client.get_model_version("skray-test", summary["model"]["registered_version"])
    assert version.run_id == summary["mlflow_run_id"]
    assert read_json(join(summary["run_dir"], RUN_FILE))["mlflow_run_id"] == summary["mlflow_run_id"]


def test_the_registered_model_labels_images_through_the_batch_job_and_predict(
    ray_cluster: LocalRayHead, dataset, tmp_path, mlflow_store, capsys
):
    from skray.cli import main
    from skray.label import LabelConfig
    from skray.label import run as label

    summary = run(small_config(dataset, tmp_path, "epochs=3", "name=registers"))
    uri = f"models:/skray-test/{summary['model']['registered_version']}"

    manifest = label(LabelConfig(input=dataset["val"], output=str(tmp_path / "labels"), weights=uri,
                                 preprocessing={"image_size": 48}))
    assert main(["predict", "--weights", uri, "--top-k", "1", f"{dataset['val']}/class2/0000.png"]) == 0

    assert manifest["labeled"] == 48 and not manifest["random_weights"]
    assert set(dict(manifest["top_labels"])) <= {"class0", "class1", "class2", "class3"}
    assert "class2" in capsys.readouterr().out

    assert main(["evaluate", "--data", dataset["val"], "--weights", uri, "--image-size", "48",
                 "--mlflow-experiment", "skray-eval"]) == 0
    out = capsys.readouterr().out
    top1 = float(out.split("top-1 ")[1].split()[0])
    # The fast path (folded BatchNorm) may flip a near-tie argmax of the plain eval: one image at most.
    assert abs(top1 - summary["best"]["val_top1"]) <= 100 / 48 + 0.01, "evaluate agrees with training's validation"
    assert "top-5 100.00" in out and "(48 images, 0 undecodable)" in out
    evaluation = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("skray-eval").experiment_id])[0]
    assert abs(evaluation.data.metrics["top1"] - top1) < 0.01


def test_fine_tuning_starts_from_weights_with_a_new_head_and_can_freeze_the_backbone(
    ray_cluster: LocalRayHead, dataset, tmp_path, mlflow_store
):
    import torch

    from skray.model import create_model
    from skray.weights import save_weights

    pretrained = create_model("skresnext14_8x4d_half", num_classes=1000)
    save_weights(pretrained, tmp_path / "pre.safetensors", architecture="skresnext14_8x4d_half")
    cfg = small_config(dataset, tmp_path, "epochs=2", "name=finetune", f"model.pretrained={tmp_path}/pre.safetensors",
                       "model.freeze_backbone_epochs=1", "mlflow.registered_model=null")

    summary = run(cfg)

    states = [torch.load(p, weights_only=True) for p in (tmp_path / "runs" / "finetune").glob("checkpoint_*/state.pt")]
    frozen = next(s for s in states if s["epoch"] == 0)["model"]
    before = pretrained.state_dict()
    assert frozen["fc.weight"].shape == (4, pretrained.num_features)
    assert all(torch.equal(frozen[k], before[k]) for k in before if not k.startswith("fc.")), "backbone frozen"
    thawed = next(s for s in states if s["epoch"] == 1)["model"]
    assert not torch.equal(thawed["conv1.weight"], before["conv1.weight"]), "then it trains"
    assert summary["model"]["registered_version"] is None


def train_worker_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "RayTrainWorker"], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def registered_checkpoints(run_dir) -> int:
    """Checkpoints Ray Train's controller has registered (reported ones may still be in flight)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    return len(json.loads(snapshot.read_text()).get("checkpoint_results", [])) if snapshot.exists() else 0


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_worker_is_replaced_and_training_resumes_from_the_checkpoint(
    ray_cluster: LocalRayHead, dataset, tmp_path, mlflow_store
):
    cfg = small_config(dataset, tmp_path, "epochs=5", "name=survives")
    outcome: dict = {}
    thread = threading.Thread(target=lambda: outcome.update(run(cfg)))
    thread.start()
    wait_for(lambda: registered_checkpoints(tmp_path / "runs" / "survives"), 300, "a registered checkpoint")
    os.kill(train_worker_pids()[-1], signal.SIGKILL)
    thread.join(timeout=500)

    assert outcome["final"]["epoch"] == 4
    assert outcome["final"]["resumed_at_epoch"] > 0
    assert metric_history(outcome["mlflow_run_id"], "epoch")[-1] == 4


def test_resume_continues_a_stopped_run_from_its_directory(
    ray_cluster: LocalRayHead, dataset, tmp_path, mlflow_store
):
    run_dir = tmp_path / "runs" / "stopped"
    job = f"train-stop-{time.time_ns()}"
    command = ray_cluster.submit_command(
        ["python", "pipelines/train.py", "--config", str(CPU_CONFIG), "--set", f"data.train={dataset['train']}",
         "--set", f"data.val={dataset['val']}", "--set", f"storage_path={tmp_path}/runs", "--set", "name=stopped",
         "--set", "image_size=48", "--set", "epochs=3", "--set", f"mlflow.tracking_uri={mlflow_store}"],
        str(PROJECT), submission_id=job, wait=False)
    subprocess.run(command, env=ray_cluster.env, check=True, capture_output=True)
    wait_for(lambda: registered_checkpoints(run_dir), 300, "a registered checkpoint")
    subprocess.run([command[0], "job", "stop", f"--address={ray_cluster.address}", job],
                   env=ray_cluster.env, check=True, capture_output=True)
    first_run_id = read_json(str(run_dir / RUN_FILE))["mlflow_run_id"]

    summary = run(None, resume=str(run_dir))

    assert summary["final"]["epoch"] == 2 and summary["final"]["resumed_at_epoch"] > 0
    assert summary["mlflow_run_id"] == first_run_id
    assert (run_dir / CONFIG_FILE).is_file()


def test_too_many_undecodable_images_fail_the_run_naming_the_threshold(
    ray_cluster: LocalRayHead, dataset, tmp_path, mlflow_store
):
    broken = tmp_path / "broken"
    write_labeled_folder(str(broken), classes=2, per_class=16)
    for i in range(8):
        write_bytes_atomic(str(broken / "class0" / f"bad{i}.png"), b"not a png")
    cfg = load_config(TrainConfig, CPU_CONFIG, [
        f"data.train={broken}", "data.val=null", f"storage_path={tmp_path}/runs", "image_size=48", "epochs=1",
        "mlflow.registered_model=null", "max_failures=0"])

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


def test_the_baseline_config_is_the_published_recipe():
    cfg = load_config(TrainConfig, PROJECT / "configs" / "train_baseline.yaml")
    assert (cfg.model.name, cfg.epochs, cfg.batch_size, cfg.image_size) == ("skresnext50_32x4d", 100, 256, 224)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 1e-4)
    assert (cfg.scaling.workers, cfg.scaling.use_gpu, cfg.eval_crop_pct) == (8, True, 0.875)
    assert cfg.lr == 0.1
    assert load_config(TrainConfig, PROJECT / "configs" / "train_baseline.yaml", ["batch_size=512"]).lr == 0.2
