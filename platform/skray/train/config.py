"""The ``skray train`` config: data, model, recipe, workers, MLflow.

Its own module so that the sweep, the CLI and the checks read and validate a training
config without the per-worker loop or Ray.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from skray.core.preprocessing import PreprocessingConfig
from skray.core.specs import DEFAULT_MODEL
from skray.io.config import ModelName, ModelPreprocessing, RegistryMlflowConfig, StrictModel


class DataConfig(StrictModel):
    train: str = Field(description="the training data, in `format`; local or s3://")
    val: str | None = Field(
        None,
        description="scored after each epoch; same format and classes (None: data.train)",
    )
    format: Literal["folder", "webdataset", "parquet"] = Field(
        "folder",
        description="folder: ROOT/<class>/<image>; webdataset: .cls members; parquet: label column",
    )
    class_names: list[str] | None = Field(
        None,
        description="None: folder names or Parquet labels, sorted; webdataset: this or num_classes",
    )
    num_classes: int | None = Field(
        None, ge=2, description="webdataset without class_names: classes class_0 .. class_<N-1>"
    )
    image_column: str = Field("image", description="parquet: the column of image bytes")
    label_column: str = Field("label", description="parquet: the column of class labels")
    files_per_unit: int = Field(
        64, ge=1, description="folder: images per read task; each tar or Parquet file is one"
    )
    max_bad_fraction: float = Field(
        0.01, ge=0, le=1, description="undecodable images are skipped; above this the run fails"
    )
    decode_cpus: float = Field(
        0.5, gt=0, description="per read+decode task; lowered when the workers leave no room"
    )
    stall_timeout_s: float = Field(
        600, gt=0, description="no batch for this long: the run fails saying the input stalled"
    )
    shuffle_buffer: int = Field(
        0, ge=0, description="rows shuffled on each worker; folder units are already class-mixed"
    )


class ModelConfig(StrictModel):
    name: ModelName = Field(
        DEFAULT_MODEL, description="the architecture to train (a registered name)"
    )
    weights: str | None = Field(
        None, description="fine-tuning: start from these weights, head sized by the dataset"
    )
    freeze_backbone_epochs: int = Field(
        0, ge=0, description="fine-tuning: only the head learns for the first N epochs"
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "pretrained" in data:
            raise ValueError(
                "model.pretrained is now model.weights (a path, s3://, https://, 'pretrained', "
                "models:/ or runs:/)"
            )
        return data


class OptimConfig(StrictModel):
    lr: float = Field(
        0.1, gt=0, description="at base_batch_size; the rule: lr * batch_size / base_batch_size"
    )
    base_batch_size: int = Field(256, ge=1, description="the global batch size lr is given for")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(1e-4, ge=0, description="SGD weight decay (L2)")
    no_weight_decay_on_norm_and_bias: bool = Field(
        True, description="no weight decay on 1-D tensors: norm weights and biases"
    )
    warmup_epochs: float = Field(
        5, ge=0, description="linear warm-up to the scaled lr (per step), then cosine to min_lr"
    )
    min_lr: float = Field(
        0, ge=0, description="the cosine's floor, reached at the last step; not batch-scaled"
    )
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="of the cross-entropy loss")


class WorkersConfig(StrictModel):
    workers: int = Field(
        8, ge=1, description="Ray Train workers (DDP ranks); batch_size must divide by it"
    )
    use_gpu: bool = Field(True, description="one GPU per worker (nccl); false: CPU workers (gloo)")
    cpus_per_worker: float = Field(
        1, gt=0, description="CPUs each worker reserves; lowered when the ingest would get none"
    )


class TrainMlflowConfig(RegistryMlflowConfig):
    experiment: str = Field("skray-train", description="each training run is a run in it")


_MOVED_KEYS = {
    "image_size": "preprocessing.image_size",
    "eval_crop_pct": "preprocessing.crop_pct",
    "interpolation": "preprocessing.interpolation",
}


class TrainConfig(StrictModel):
    name: str | None = Field(None, description="run name; default train-<UTC timestamp>")
    storage_path: str = Field(
        ".skray/train", description="local or s3://; the run lives in storage_path/name"
    )
    data: DataConfig
    model: ModelConfig = ModelConfig()
    # Eval crops for validation; training crops are random-resized to the same image_size, with
    # the same interpolation, mean and std. Unset fields: the model's (skray.core.specs.ModelSpec).
    preprocessing: ModelPreprocessing = PreprocessingConfig()
    optim: OptimConfig = OptimConfig()
    scaling: WorkersConfig = WorkersConfig()
    mlflow: TrainMlflowConfig = TrainMlflowConfig()
    epochs: int = Field(100, ge=1, description="passes over data.train; the LR schedule spans them")
    batch_size: int = Field(256, ge=1, description="global, across workers")
    randaugment: bool = Field(
        False, description="add RandAugment to the training crops, after crop and flip"
    )
    randaugment_magnitude: int = Field(9, ge=0, le=30, description="RandAugment's magnitude, 0..30")
    amp: Literal["off", "bf16", "fp16"] = Field(
        "bf16",
        description="bf16: autocast on bf16 GPUs and AMX/AVX512-BF16 CPUs; fp16: on GPUs only",
    )
    channels_last: bool = Field(
        True, description="on GPU only: NHWC model and inputs, what tensor cores want"
    )
    keep_checkpoints: int = Field(2, ge=1, description="best k by val_top1")
    max_failures: int = Field(
        3, ge=-1, description="worker-group restarts from the latest checkpoint"
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        moved = {k: v for k, v in _MOVED_KEYS.items() if isinstance(data, dict) and k in data}
        if moved:
            raise ValueError("; ".join(f"{old} is now {new}" for old, new in moved.items()))
        return data

    @model_validator(mode="after")
    def _batch_fits_workers(self) -> "TrainConfig":
        if self.batch_size % self.scaling.workers:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by scaling.workers "
                f"{self.scaling.workers}"
            )
        return self

    @property
    def lr(self) -> float:
        """The linear scaling rule: the recipe's LR is for base_batch_size."""
        return self.optim.lr * self.batch_size / self.optim.base_batch_size
