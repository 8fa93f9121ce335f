"""The labeling config: unknown keys, wrong types and impossible values fail naming the key;
--set overrides win over values, which win over the file."""

from __future__ import annotations

import pytest

from helpers import PROJECT
from skray.io.config import ConfigError, load_config, parse_overrides
from skray.label.config import LabelConfig

pytestmark = pytest.mark.timeout(60)


REQUIRED = {"input": "data/", "output": "labels/"}


def config_error(overrides: list[str] = (), values: dict | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(LabelConfig, overrides=overrides, values=REQUIRED if values is None else values)
    return str(err.value)


def test_config_rejects_unknown_keys_at_top_level_and_nested_naming_them():
    assert "inptu: unknown key" in config_error(values={**REQUIRED, "inptu": "x"})
    assert "actors.maxx: unknown key" in config_error(["actors.maxx=3"])


def test_config_rejects_a_wrong_type_naming_the_key():
    message = config_error(["batch_size=abc"])

    assert "batch_size:" in message and "'abc'" in message


def test_config_rejects_impossible_values_naming_the_key():
    assert "top_k:" in config_error(["top_k=0"])
    assert "preprocessing.crop_pct:" in config_error(["preprocessing.crop_pct=1.5"])


def test_config_rejects_an_unknown_model_naming_it():
    message = config_error(["model=resnet9000"])

    assert "model:" in message and "unknown model 'resnet9000'" in message


def test_config_requires_input_and_output():
    message = config_error(values={"output": "labels/"})

    assert "input:" in message and "output:" not in message


def test_config_set_overrides_win_over_values_which_win_over_the_file(tmp_path):
    path = tmp_path / "label.yaml"
    path.write_text(
        "input: from-file\noutput: from-file\ntop_k: 3\nbatch_size: 8\nactors: {max: 2}\n"
    )

    cfg = load_config(
        LabelConfig,
        path,
        overrides=["top_k=7", "actors.max=4"],
        values={"top_k": 4, "batch_size": 16, "output": "from-values"},
    )

    assert (cfg.top_k, cfg.batch_size, cfg.actors.max) == (7, 16, 4)
    assert (cfg.input, cfg.output) == ("from-file", "from-values")


def test_parse_overrides_parses_values_as_yaml_into_nested_sections():
    assert parse_overrides(["a.b=3", "c=[1, 2]", "d=null", "e=", "f=text", "g.h.i=0.5"]) == {
        "a": {"b": 3},
        "c": [1, 2],
        "d": None,
        "e": None,
        "f": "text",
        "g": {"h": {"i": 0.5}},
    }


def test_parse_overrides_rejects_a_pair_without_equals_or_key():
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["top_k"])
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["=3"])


def test_parse_overrides_rejects_a_value_that_is_not_yaml_naming_the_key():
    with pytest.raises(ConfigError, match="--set exclude: .*not valid YAML"):
        parse_overrides(["exclude=[*.tmp]"])  # a bare * starts a YAML alias
    assert parse_overrides(['exclude=["*.tmp"]']) == {"exclude": ["*.tmp"]}


def test_the_project_label_yaml_is_a_valid_config():
    cfg = load_config(LabelConfig, PROJECT / "configs/label.yaml")

    assert cfg.input and cfg.output
    assert cfg.files_per_unit == 64 and cfg.actors.gpus == "auto"
