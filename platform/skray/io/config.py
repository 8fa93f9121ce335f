"""Job configs: YAML files validated by a pydantic schema, with ``--set a.b=c`` overrides.

Unknown keys, wrong types and impossible values all fail here, before any work
starts, with the dotted key named in the message.
"""

from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import (
    Annotated,
    Any,
    ClassVar,
    Literal,
    Sequence,
    TypeVar,
    Union,
    get_args,
    get_origin,
)

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from skray.core.errors import SkrayError
from skray.core.preprocessing import PreprocessingConfig
from skray.core.specs import list_models
from skray.io.storage import redact_uri

T = TypeVar("T", bound="StrictModel")


class ConfigError(SkrayError):
    """A bad config; the message names every offending key."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on set."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def known_model(name: str) -> str:
    if name not in list_models():
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}")
    return name


ModelName = Annotated[str, AfterValidator(known_model)]
"""A config field holding an architecture name: unknown names fail validation, listing the known
ones."""


def _for_chosen_model(value: PreprocessingConfig, info: ValidationInfo) -> PreprocessingConfig:
    model = info.data.get("model")  # a name, None (the default), or a section holding ``name``
    return value.for_model(getattr(model, "name", model))


ModelPreprocessing = Annotated[
    PreprocessingConfig, AfterValidator(_for_chosen_model), Field(validate_default=True)
]
"""A job config's ``preprocessing`` section: what it leaves unset is the config's ``model``'s
(declared before it), so label, train, evaluate and serve resolve it alike."""


Decode = Literal["cpu", "gpu", "auto"]
"""Where images are decoded: Pillow on the CPU, or batched next to the model (nvJPEG on a GPU,
see :mod:`skray.core.device_decode`); ``auto`` is ``gpu`` when the model runs on a GPU."""

Precision = Literal["fp32", "bf16", "int8", "auto"]
"""A model worker's numbers: ``bf16`` runs under autocast (logits fp32), ``int8`` quantized on
CPU, ``auto`` bf16 where the hardware has bf16 matrix units, else fp32
(:mod:`skray.inference.precision`)."""
DEFAULT_CALIBRATION_IMAGES = 256  # activation ranges settle after a few hundred images


class PrecisionOptions(StrictModel):
    """The numeric precision of a model worker (labeling actor, Serve replica) and what int8
    needs; ``gpus_key`` names the section's GPU setting, which int8 asks to be 0."""

    gpus_key: ClassVar[str]

    precision: Precision = Field(
        "fp32",
        description=(
            "bf16: autocast (~2x fp32 with AVX512-BF16, ~3x with AMX); auto: bf16 where native; "
            "int8: a quantized model on CPU workers (always compiled), from `calibration`"
        ),
    )
    calibration: str | None = Field(
        None, description="int8: images (folder, prefix, glob) to calibrate on; read once"
    )
    calibration_images: int = Field(
        DEFAULT_CALIBRATION_IMAGES, ge=1, description="int8: the first N that decode, sorted"
    )

    @model_validator(mode="after")
    def _int8_needs_cpu_and_calibration(self) -> "PrecisionOptions":
        gpus = getattr(self, self.gpus_key)
        if self.precision == "int8" and gpus != 0:
            raise ValueError(
                f"precision: int8 runs on CPU only: set {self.gpus_key}: 0 (got {gpus!r})"
            )
        if self.precision == "int8" and not self.calibration:
            raise ValueError(
                "precision: int8 needs calibration: a folder, prefix or glob of images"
            )
        return self


class MlflowConfig(StrictModel):
    """Where a job's runs are recorded in MLflow."""

    experiment: str = Field(description="the MLflow experiment the runs go in; created if missing")
    tracking_uri: str | None = Field(
        None, description="else $MLFLOW_TRACKING_URI, else the local store in .skray/"
    )


class RegistryMlflowConfig(MlflowConfig):
    """An MLflow section for a job that registers the model it made."""

    registered_model: str | None = Field(
        "skresnext50_32x4d", description="the registry name the final weights are registered under"
    )
    alias: str | None = Field(None, description="set on the registered version, e.g. candidate")


def resolve_gpus(setting: Literal["auto"] | float) -> float:
    """GPUs per model actor or replica: ``auto`` is one when the connected cluster has GPUs."""
    if setting != "auto":
        return float(setting)
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def resolve_decode(decode: Decode, on_gpu: bool) -> Literal["cpu", "gpu"]:
    """Where images are decoded: ``auto`` decodes next to the model on a GPU (nvJPEG), else in
    the read tasks."""
    return "gpu" if decode == "gpu" or (decode == "auto" and on_gpu) else "cpu"


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``["a.b=3", "c=[1, 2]"]`` -> ``{"a": {"b": 3}, "c": [1, 2]}`` (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        node = tree
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {part!r} is set both as a value and a section")
        try:
            node[leaf] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ConfigError(
                f"--set {key.strip()}: value {raw!r} is not valid YAML (quote it): "
                f"{str(err).splitlines()[0]}"
            ) from None
    return tree


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(
    schema: type[T],
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    values: dict[str, Any] | None = None,
) -> T:
    """File, then ``values`` (from CLI flags), then ``--set`` overrides; validated once."""
    data = read_yaml(path) if path else {}
    data = deep_merge(data, values or {})
    data = deep_merge(data, parse_overrides(overrides))
    return validate(schema, data, source=str(path or "config"))


def validate(schema: type[T], data: dict[str, Any], source: str = "config") -> T:
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source=source)) from None


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid {source}:"]
    for problem in err.errors():
        key = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        if problem["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            lines.append(f"  {key}: {problem['msg']} (got {redact_values(problem.get('input'))!r})")
    return "\n".join(lines)


def redact_values(value: Any) -> Any:
    """``value`` with every URI-like string (one holding ``://``) passed through
    :func:`redact_uri`."""
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_values(v) for v in value]
    return redact_uri(value) if isinstance(value, str) and "://" in value else value


def dump_config(config: BaseModel, *, redact: bool = True) -> str:
    """The resolved config as YAML, for people and MLflow: URIs redacted, ``SecretStr`` masked.

    ``redact=False`` only for a file the job reads back (``--resume``), which needs the URIs whole.
    """
    data = config.model_dump(mode="json")
    return yaml.safe_dump(redact_values(data) if redact else data, sort_keys=False)


def describe_keys(
    schema: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None
) -> list[tuple[str, str, str, str]]:
    """Every key of ``schema``, nested sections dotted: (key, type, default, description).

    A section's defaults are those of the parent's default instance (a job may set a
    section's default apart from the section class's own)."""
    rows = []
    for name, field in schema.model_fields.items():
        key = f"{prefix}{name}"
        default = (
            getattr(defaults, name)
            if defaults is not None
            else field.get_default(call_default_factory=True)
        )
        section = field.annotation if isinstance(field.annotation, type) else None
        if section is not None and issubclass(section, BaseModel):
            rows += describe_keys(section, f"{key}.", None if field.is_required() else default)
            continue
        shown = "required" if field.is_required() and defaults is None else repr(default)
        rows.append((key, type_name(field.annotation), shown, field.description or ""))
    return rows


def type_name(annotation: Any) -> str:
    """``Literal["a", "b"] | None`` -> ``'a' | 'b' | None``: a config type as a user writes it."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "None"
    if origin is Literal:
        return " | ".join(repr(arg) for arg in args)
    if origin in (Union, UnionType):
        return " | ".join(type_name(arg) for arg in args)
    if origin is Annotated:
        return type_name(args[0])
    if origin is not None:
        return f"{origin.__name__}[{', '.join(type_name(arg) for arg in args)}]"
    return getattr(annotation, "__name__", str(annotation))
