"""The training recipe, checkpoint state, resume safety and DDP, proven piece by piece.

Most of these call the functions ``train_loop`` is made of directly, without Ray; only
the DDP test starts Ray Train, since splitting and averaging across workers is its point.
"""

from __future__ import annotations

import math
import random
import sys

import pyarrow as pa
import pytest
import torch
from torch import nn

import skray.train.driver as driver_module
from helpers import SMALL
from skray.core.model import create_model
from skray.core.preprocessing import PreprocessingConfig
from skray.dev.testing import write_labeled_folder
from skray.io.config import ConfigError, dump_config
from skray.io.storage import join, write_bytes_atomic, write_json
from skray.train.checkpoints import checkpoint_state
from skray.train.config import TrainConfig
from skray.train.datasets import BAD_LABEL, LabeledData, discover, read_labeled
from skray.train.driver import CONFIG_FILE, RUN_FILE, build_trainer, check_run_dir, run
from skray.train.loop import (
    EPOCH_SCORES,
    build_training_state,
    device_images,
    share_buffers,
    train_epoch,
    uses_channels_last,
)
from skray.train.recipe import batch_loss, build_optimizer, lr_at, param_groups
from skray.weights.files import save_weights

pytestmark = pytest.mark.timeout(300)
CPU = torch.device("cpu")


def config(**overrides) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "data": {"train": "unused"},
            "model": {"name": SMALL},
            "amp": "off",
            "batch_size": 32,
            "scaling": {"workers": 2, "use_gpu": False},
            **overrides,
        }
    )


def one_step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int = 0) -> None:
    """One SGD step of ``model`` (4 classes) on a tiny seeded batch."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    labels = torch.tensor([0, 1, 2, 3])
    optimizer.zero_grad()
    batch_loss(model(images), labels, 0.1).backward()
    optimizer.step()


# --- the LR schedule ------------------------------------------------------------


def test_lr_warms_up_linearly_then_follows_a_cosine_down_to_min_lr():
    # lr 0.4 at base batch 256 -> 0.05 at batch 32; 5 steps an epoch:
    # warm-up is steps 0-9, cosine 10-49.
    cfg = config(optim={"lr": 0.4, "warmup_epochs": 2, "min_lr": 0.001}, epochs=10)
    assert cfg.lr == pytest.approx(0.05)

    def at(step: int) -> float:
        return lr_at(step, 5, cfg)

    assert at(0) == pytest.approx(0.005), "1/10 of the peak on the first warm-up step"
    assert at(4) == pytest.approx(0.025)
    assert at(9) == pytest.approx(0.05), "the peak on the last warm-up step"
    assert at(10) == pytest.approx(0.05), "the cosine starts at the peak"
    assert at(20) == pytest.approx(0.001 + 0.5 * 0.049 * (1 + math.cos(math.pi / 4)))
    assert at(30) == pytest.approx((0.05 + 0.001) / 2), "halfway through the cosine: halfway down"
    assert at(49) == pytest.approx(0.001 + 0.5 * 0.049 * (1 + math.cos(math.pi * 39 / 40)))
    assert at(50) == pytest.approx(0.001) and at(60) == pytest.approx(0.001), (
        "then it stays at min_lr"
    )
    steps = [at(s) for s in range(50)]
    assert steps[:10] == sorted(steps[:10]) and steps[10:] == sorted(steps[10:], reverse=True)


def test_without_warm_up_the_schedule_starts_at_the_peak():
    cfg = config(optim={"lr": 0.4, "warmup_epochs": 0}, epochs=4)
    assert lr_at(0, 10, cfg) == pytest.approx(0.05)
    assert lr_at(20, 10, cfg) == pytest.approx(0.025)


# --- weight decay -----------------------------------------------------------------


def norm_and_bias_params(model: nn.Module) -> set[int]:
    """Every normalization layer's parameters and every bias, by identity."""
    norms = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
    found = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, norms) or name == "bias":
                found.add(id(param))
    return found


def test_weight_decay_applies_to_conv_and_linear_weights_only():
    model = create_model(SMALL, num_classes=4)
    exempt = norm_and_bias_params(model)
    everything = list(model.parameters())

    decay, no_decay = param_groups(model, 1e-4, skip_norm_and_bias=True)

    assert {id(p) for p in no_decay["params"]} == exempt
    assert {id(p) for p in decay["params"]} == {id(p) for p in everything} - exempt
    assert len(decay["params"]) + len(no_decay["params"]) == len(everything), "each parameter once"
    norms = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    biases = sum(
        getattr(m, "bias", None) is not None
        for m in model.modules()
        if not isinstance(m, nn.BatchNorm2d)
    )
    assert len(no_decay["params"]) == 2 * norms + biases, (
        "a weight and a bias per BatchNorm, every other bias"
    )
    assert len(decay["params"]) == sum(
        isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules()
    )
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (1e-4, 0.0)
    (single,) = param_groups(model, 1e-4, skip_norm_and_bias=False)
    assert len(single["params"]) == len(everything) and single["weight_decay"] == 1e-4


def test_the_optimizer_decays_weights_and_leaves_norms_and_biases_alone():
    cfg = config(optim={"lr": 25.6, "weight_decay": 0.01})  # lr 3.2 at batch 32
    model = create_model(SMALL, num_classes=4)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    exempt = norm_and_bias_params(model)
    optimizer = build_optimizer(model, cfg)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # a step driven by weight decay alone

    optimizer.step()

    for name, p in model.named_parameters():
        expected = before[name] if id(p) in exempt else before[name] * (1 - 3.2 * 0.01)
        torch.testing.assert_close(p.detach(), expected, msg=f"{name} after a zero-gradient step")


# --- the loss -------------------------------------------------------------------


def test_label_smoothing_mixes_the_true_class_with_a_uniform_target():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.0, 3.0]])
    labels = torch.tensor([0, 2])
    eps = 0.1

    def expected(row: list[float], label: int) -> float:
        log_z = math.log(sum(math.exp(v) for v in row))
        nll = [log_z - v for v in row]  # -log softmax
        return (1 - eps) * nll[label] + eps * sum(nll) / len(row)

    want = (expected([2.0, 0.0, -1.0], 0) + expected([0.5, 1.0, 3.0], 2)) / 2
    assert batch_loss(logits, labels, eps).item() == pytest.approx(want, rel=1e-6)
    unsmoothed = nn.functional.cross_entropy(logits, labels).item()
    assert batch_loss(logits, labels, 0.0).item() == pytest.approx(unsmoothed, rel=1e-6)
    assert batch_loss(logits, labels, eps).item() > unsmoothed, "confident right answers cost more"


def test_undecodable_rows_weigh_nothing_in_the_loss():
    logits = torch.tensor([[2.0, 0.0, -1.0], [9.0, -9.0, 0.0], [0.5, 1.0, 3.0]])
    labels = torch.tensor([0, BAD_LABEL, 2])
    good_only = batch_loss(logits[[0, 2]], labels[[0, 2]], 0.1)
    assert batch_loss(logits, labels, 0.1).item() == pytest.approx(good_only.item(), rel=1e-6)
    assert batch_loss(logits[[1]], labels[[1]], 0.1).item() == 0.0


# --- augmentation -----------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> LabeledData:
    root = tmp_path_factory.mktemp("images")
    write_labeled_folder(str(root), classes=2, per_class=4, seed=0)
    return discover(str(root), "folder")


def crops(data, *, train: bool, augment: dict, seed: int) -> torch.Tensor:
    random.seed(seed)  # the boxes and flips
    torch.manual_seed(seed)  # RandAugment
    units = pa.Table.from_pylist([u.to_row() for u in data.units])
    batches = list(
        read_labeled(
            units,
            data,
            48,
            train,
            PreprocessingConfig(image_size=48).model_dump(),
            augment,
            batch_size=64,
        )
    )
    assert all((b["label"] != BAD_LABEL).all() for b in batches)
    return torch.cat([torch.from_numpy(b["image"]) for b in batches])


def test_randaugment_changes_the_training_crops(folder):
    plain = crops(folder, train=True, augment={"randaugment": False}, seed=3)
    augmented = crops(
        folder, train=True, augment={"randaugment": True, "randaugment_magnitude": 9}, seed=3
    )

    assert torch.equal(plain, crops(folder, train=True, augment={"randaugment": False}, seed=3)), (
        "seeded"
    )
    changed = sum(not torch.equal(a, b) for a, b in zip(plain, augmented))
    assert changed >= len(plain) // 2, f"RandAugment changed only {changed} of {len(plain)} crops"


def test_randaugment_never_touches_the_eval_crops(folder):
    plain = crops(folder, train=False, augment={}, seed=3)
    for seed in (3, 4):
        asked = crops(
            folder,
            train=False,
            augment={"randaugment": True, "randaugment_magnitude": 30},
            seed=seed,
        )
        assert torch.equal(asked, plain)


def test_the_trainer_augments_the_train_dataset_and_not_the_val_one_and_keeps_the_best_k(
    monkeypatch,
):
    made: dict[bool, dict] = {}
    monkeypatch.setattr(
        driver_module, "ray_dataset", lambda data, **kw: made.setdefault(kw["train"], kw)
    )
    cfg = config(randaugment=True, keep_checkpoints=3)

    trainer = build_trainer(
        cfg, None, None, None, name="n", storage_path="/tmp/unused", run_id=None, tracking_uri=None
    )

    assert made[True]["augment"]["randaugment"] is True
    assert not (made[False].get("augment") or {}).get("randaugment"), (
        "validation is never augmented"
    )
    kept = trainer.run_config.checkpoint_config
    assert (kept.num_to_keep, kept.checkpoint_score_attribute, kept.checkpoint_score_order) == (
        3,
        "val_top1",
        "max",
    )
    assert "val_top1" in EPOCH_SCORES, "the loop reports the score the checkpoints are ranked by"


# --- checkpoint state and resume ------------------------------------------------


def test_a_checkpoint_holds_the_optimizer_and_scaler_state_and_continues_exactly(tmp_path):
    cfg = config()
    _, model, optimizer, _ = build_training_state(cfg, 4, CPU)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=1024.0)  # as on a GPU with fp16
    one_step(model, optimizer)

    state = checkpoint_state(
        model,
        optimizer,
        scaler,
        epoch=3,
        best_top1=55.0,
        config={"k": 1},
        class_names=["a", "b", "c", "d"],
    )
    torch.save(state, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)

    params = list(model.parameters())
    assert len(state["optimizer"]["state"]) == len(params), "a momentum buffer for every parameter"
    assert all("momentum_buffer" in s for s in state["optimizer"]["state"].values())
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [1e-4, 0.0]
    assert state["scaler"]["scale"] == 1024.0
    assert (state["epoch"], state["best_top1"], state["class_names"]) == (
        3,
        55.0,
        ["a", "b", "c", "d"],
    )

    _, restored, restored_optimizer, _ = build_training_state(cfg, 4, CPU, state=state)
    one_step(model, optimizer, seed=1)
    one_step(restored, restored_optimizer, seed=1)
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        torch.testing.assert_close(
            a, b, msg=f"{name} differs after the same step from the checkpoint"
        )


@pytest.mark.parametrize("move", ["meta device", "float64"])
def test_restored_optimizer_state_lives_where_the_prepared_model_does(move):
    """prepare_model moves the model to the training device; a restore must follow it.
    On CPU a move to the meta device (or to float64) stands in for the move to a GPU."""
    cfg = config()
    _, model, optimizer, _ = build_training_state(cfg, 4, CPU)
    one_step(model, optimizer)
    state = checkpoint_state(
        model,
        optimizer,
        torch.amp.GradScaler("cpu", enabled=False),
        epoch=0,
        best_top1=0.0,
        config={},
        class_names=list("abcd"),
    )
    target = torch.device("meta") if move == "meta device" else torch.float64

    prepared, raw, restored, _ = build_training_state(
        cfg, 4, CPU, state=state, prepare=lambda m: m.to(target)
    )

    params = list(raw.parameters())
    assert {id(p) for g in restored.param_groups for p in g["params"]} == {id(p) for p in params}, (
        "the optimizer steps the prepared model's parameters"
    )
    for p in params:
        buffer = restored.state[p]["momentum_buffer"]
        assert (buffer.device, buffer.dtype) == (p.device, p.dtype)


# --- run directories --------------------------------------------------------------


def fake_run(run_dir: str, class_names: list[str]) -> None:
    """What an earlier run leaves: its record, its config and a checkpoint."""
    write_json(
        join(run_dir, RUN_FILE), {"mlflow_run_id": "0" * 32, "name": run_dir.rsplit("/", 1)[1]}
    )
    save_weights(
        create_model(SMALL, num_classes=len(class_names)),
        join(join(run_dir, "checkpoint_2024-01-01_00-00-00.000000"), "model.safetensors"),
        architecture=SMALL,
        class_names=class_names,
    )


def test_a_new_run_refuses_a_directory_that_holds_a_run(location):
    run_dir = join(location, "runs/taken")
    check_run_dir(run_dir, resume=False, class_names=["a", "b"])  # nothing there yet
    fake_run(run_dir, ["a", "b"])

    with pytest.raises(ConfigError, match=f"{run_dir} already holds a run.*--resume {run_dir}"):
        check_run_dir(run_dir, resume=False, class_names=["a", "b"])
    check_run_dir(run_dir, resume=True, class_names=["a", "b"])


def test_resume_refuses_data_whose_classes_differ_from_the_checkpoint(tmp_path):
    run_dir = str(tmp_path / "run")
    fake_run(run_dir, ["cat", "dog", "fox"])

    with pytest.raises(
        ConfigError,
        match="3 in the checkpoint, 3 in the data.*not in the data: fox; new in the data: owl",
    ):
        check_run_dir(run_dir, resume=True, class_names=["cat", "dog", "owl"])
    with pytest.raises(ConfigError, match="another order"):
        check_run_dir(run_dir, resume=True, class_names=["dog", "cat", "fox"])
    with pytest.raises(ConfigError, match="new in the data: eel"):
        check_run_dir(run_dir, resume=True, class_names=["cat", "dog", "fox", "eel"])


def test_run_refuses_before_it_opens_an_mlflow_run_or_starts_ray(
    tmp_path, mlflow_store, monkeypatch
):
    import mlflow

    write_labeled_folder(str(tmp_path / "data"), classes=2, per_class=2)
    cfg = config(
        data={"train": str(tmp_path / "data")}, storage_path=str(tmp_path / "runs"), name="taken"
    )
    fake_run(str(tmp_path / "runs" / "taken"), ["class0", "class1"])
    monkeypatch.setattr("ray.init", lambda *a, **k: pytest.fail("Ray started"))

    with pytest.raises(ConfigError, match="already holds a run"):
        run(cfg)
    assert mlflow.search_runs(search_all_experiments=True).empty

    write_bytes_atomic(
        str(tmp_path / "runs" / "taken" / CONFIG_FILE), dump_config(cfg, redact=False).encode()
    )
    (tmp_path / "data" / "class1").rename(tmp_path / "data" / "class9")
    with pytest.raises(ConfigError, match="not in the data: class1; new in the data: class9"):
        run(None, resume=str(tmp_path / "runs" / "taken"))


# --- DDP ------------------------------------------------------------------------


def ddp_data(rows: int) -> list[dict]:
    """Rows with an id, a seeded 4x4 uint8 image and one of 4 labels."""
    generator = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (rows, 3, 4, 4), dtype=torch.uint8, generator=generator)
    return [{"id": i, "image": images[i].numpy(), "label": i % 4} for i in range(rows)]


def tiny_model() -> nn.Module:
    """No BatchNorm: per-worker batch statistics would make 2 x B/2 differ from B by design."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


@pytest.mark.slow
def test_two_workers_see_disjoint_halves_and_one_step_equals_one_worker_on_the_whole_batch(
    ray_cluster, tmp_path
):
    import ray.cloudpickle
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    batch = 8
    cfg = config(
        batch_size=batch, optim={"lr": 25.6, "warmup_epochs": 0, "label_smoothing": 0.1}, epochs=1
    )  # lr 0.8: a step that moves the weights well past float noise
    out = tmp_path / "workers"
    out.mkdir()

    def one_ddp_step(loop_config: dict) -> None:  # the per-worker part of train_loop, one step
        import ray.train.torch

        cfg = TrainConfig.model_validate(loop_config["config"])
        context = ray.train.get_context()
        model = ray.train.torch.prepare_model(tiny_model())
        raw = model.module if hasattr(model, "module") else model
        optimizer = build_optimizer(raw, cfg)
        seen: list[int] = []

        def batches():
            shard = ray.train.get_dataset_shard("train")
            for b in shard.iter_torch_batches(
                batch_size=cfg.batch_size // context.get_world_size(), drop_last=True
            ):
                seen.extend(b.pop("id").tolist())
                yield b

        train_epoch(
            model,
            raw,
            optimizer,
            torch.amp.GradScaler("cpu", enabled=False),
            batches(),
            cfg,
            device=torch.device("cpu"),
            epoch=0,
            steps_per_epoch=1,
        )
        norm = nn.BatchNorm1d(2)  # statistics each worker's own batches left behind
        norm.running_mean.fill_(context.get_world_rank() + 1.0)
        share_buffers(norm, context.get_world_size())
        torch.save(
            {"ids": seen, "weights": raw.state_dict(), "norm_mean": norm.running_mean},
            f"{loop_config['out']}/rank{context.get_world_rank()}.pt",
        )

    # Workers cannot import this test module: its functions travel by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    TorchTrainer(
        one_ddp_step,
        train_loop_config={"config": cfg.model_dump(mode="json"), "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
        run_config=ray.train.RunConfig(name="ddp", storage_path=str(tmp_path / "runs")),
        datasets={"train": ray.data.from_items(ddp_data(batch))},
    ).fit()

    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [len(r["ids"]) for r in ranks] == [batch // 2, batch // 2], (
        "each worker gets half the batch"
    )
    assert set(ranks[0]["ids"]).isdisjoint(ranks[1]["ids"]), "and not the other's half"
    assert set(ranks[0]["ids"]) | set(ranks[1]["ids"]) == set(range(batch))
    assert ranks[1]["norm_mean"].tolist() == [1.0, 1.0], (
        "validation uses rank 0's (checkpointed) statistics"
    )
    alone = tiny_model()
    rows = ddp_data(batch)
    whole = {
        "image": torch.stack([torch.from_numpy(r["image"]) for r in rows]),
        "label": torch.tensor([r["label"] for r in rows]),
    }
    train_epoch(
        alone,
        alone,
        build_optimizer(alone, cfg),
        torch.amp.GradScaler("cpu", enabled=False),
        [whole],
        cfg,
        device=CPU,
        epoch=0,
        steps_per_epoch=1,
    )
    before = tiny_model().state_dict()
    for name, expected in alone.state_dict().items():
        assert not torch.allclose(expected, before[name], atol=1e-3), f"{name}: the step moved it"
        for r in ranks:
            torch.testing.assert_close(
                r["weights"][name],
                expected,
                rtol=1e-5,
                atol=1e-6,
                msg=f"{name}: 2 workers x {batch // 2} differ from 1 worker x {batch}",
            )


def test_channels_last_is_for_gpus_and_turns_the_model_and_its_inputs_nhwc():
    cfg = config()
    crops = torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8)

    assert cfg.channels_last and not uses_channels_last(cfg, CPU)
    assert uses_channels_last(cfg, torch.device("cuda"))
    assert not uses_channels_last(config(channels_last=False), torch.device("cuda"))
    nhwc = device_images(crops, cfg.preprocessing, CPU, channels_last=True)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and not nhwc.is_contiguous()
    assert torch.equal(nhwc, device_images(crops, cfg.preprocessing, CPU, channels_last=False))
