"""Job configs: YAML files validated by a pydantic schema, with ``--set a.b=c`` overrides.

Unknown keys, wrong types and impossible values all fail here, before any work
starts, with the dotted key named in the message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from skray.io.storage import redact_uri

T = TypeVar("T", bound="StrictModel")


class ConfigError(ValueError):
    """A bad config; the message names every offending key."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, values are validated on set."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def resolve_gpus(setting: Literal["auto"] | float) -> float:
    """GPUs per model actor or replica: ``auto`` is one when the connected cluster has GPUs."""
    if setting != "auto":
        return float(setting)
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


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
