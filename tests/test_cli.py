"""The ``skray`` command: predict (top-k per image, errors in place, honest about random
weights), the config key listing, and one way to report a user error."""

from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from skray.cli import main
from skray.core.model import create_model
from skray.weights.files import save_weights

SMALL = "skresnext14_8x4d_half"


def write_image(path, color=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (80, 60), color).save(buf, "PNG")
    path.write_bytes(buf.getvalue())
    return str(path)


def test_predict_prints_top_k_per_image_and_the_error_of_a_broken_one(tmp_path, capsys):
    good = write_image(tmp_path / "good.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    missing = str(tmp_path / "missing.jpg")

    assert main(["predict", "--model", SMALL, "--top-k", "3", good, str(broken), missing]) == 0

    out, err = capsys.readouterr()
    assert "RANDOM weights" in err and "meaningless" in err
    lines = out.splitlines()
    assert lines[0] == good and all(line.startswith("  ") for line in lines[1:4])
    assert lines[4] == str(broken) and lines[5].startswith("  error: ")
    assert lines[6] == missing and lines[7].startswith("  error: unreadable")


def test_predict_takes_a_precision_and_says_what_auto_resolved_to(tmp_path, capsys, monkeypatch):
    from skray.inference import precision

    image = write_image(tmp_path / "good.png")
    monkeypatch.setattr(precision, "cpu", lambda: ("Xeon", frozenset({"avx512f", "amx_bf16"})))
    assert main(["predict", "--model", SMALL, "--precision", "auto", image]) == 0
    assert "precision bf16 (auto: the CPU has AMX-BF16 matrix units)" in capsys.readouterr().err

    monkeypatch.setattr(precision, "cpu", lambda: ("EPYC", frozenset({"avx512f", "avx512_vnni"})))
    assert main(["predict", "--model", SMALL, "--precision", "auto", image]) == 0
    out, err = capsys.readouterr()
    assert "precision fp32 (auto: the CPU has no AMX-BF16" in err and out.startswith(image)


def test_predict_with_saved_weights_uses_their_class_names(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model(SMALL, num_classes=3)
    weights = tmp_path / "w.safetensors"
    save_weights(model, weights, architecture=SMALL, class_names=["cat", "dog", "owl"])

    assert (
        main(
            ["predict", "--weights", str(weights), "--top-k", "2", write_image(tmp_path / "a.png")]
        )
        == 0
    )

    out, err = capsys.readouterr()
    assert "RANDOM" not in err
    named = [line.split()[1] for line in out.splitlines()[1:]]
    assert len(named) == 2 and set(named) <= {"cat", "dog", "owl"}


def test_predict_fails_when_no_image_could_be_classified(tmp_path, capsys):
    assert main(["predict", "--model", SMALL, str(tmp_path / "nope.jpg")]) == 1


def test_predict_with_weights_that_do_not_fit_says_so_and_exits_2(tmp_path, capsys):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"not a weights file")

    assert main(["predict", "--weights", str(bad), write_image(tmp_path / "a.png")]) == 2
    assert "cannot read weights file" in capsys.readouterr().err


def test_label_with_a_missing_input_fails_before_any_work_naming_it(tmp_path, capsys):
    missing = tmp_path / "nothing-here"

    assert (
        main(
            ["label", "--input", str(missing), "--output", str(tmp_path / "out"), "--model", SMALL]
        )
        == 2
    )

    assert f"input not found: {missing}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_label_with_an_unknown_config_key_names_it(tmp_path, capsys):
    config = tmp_path / "label.yaml"
    config.write_text("input: data/\noutput: out/\nbatchsize: 3\n")

    assert main(["label", "--config", str(config)]) == 2
    assert "batchsize: unknown key" in capsys.readouterr().err


@pytest.mark.parametrize("job", ["label", "train", "sweep", "serve"])
def test_config_lists_every_key_with_its_type_default_and_description(job, capsys):
    assert main(["config", job]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["key", "type", "default", "description"]
    keys = {line.split()[0] for line in lines[1:]}
    if job == "label":
        assert {"input", "actors.batch_size", "preprocessing.crop_pct", "mlflow.enabled"} <= keys
        row = next(line for line in lines if line.startswith("actors.precision "))
        # type, default, description
        assert "'fp32' | 'bf16' | 'int8' | 'auto'" in row and "calibration" in row


@pytest.mark.parametrize("job", ["label", "train", "sweep", "serve"])
def test_every_config_key_has_a_description(job):
    import importlib

    from skray.cli import CONFIG_SCHEMAS
    from skray.io.config import describe_keys

    module, name = CONFIG_SCHEMAS[job]
    rows = describe_keys(getattr(importlib.import_module(module), name))
    assert [key for key, _, _, description in rows if not description.strip()] == []


def test_config_shows_a_sections_default_as_the_job_sets_it(capsys):
    # Serving refuses smaller images than the preprocessing section's own default.
    assert main(["config", "serve"]) == 0
    (row,) = [
        r for r in capsys.readouterr().out.splitlines() if r.startswith("preprocessing.max_pixels ")
    ]
    assert row.split()[2] == "40000000"


def test_config_json_is_the_schema_with_the_descriptions(capsys):
    assert main(["config", "serve", "--json"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "max_body_bytes" in schema["properties"]
    assert "408" in schema["properties"]["body_timeout_s"]["description"]


SECRETS = ("se/cr+et", "p4ss/word", "SIGNATURE0123")


@pytest.mark.parametrize(
    "argv",
    [
        # OutputError: an output no filesystem can write
        ["label", "--input", "{data}", "--output", "https://u:p4ss/word@127.0.0.1:1/out"],
        # InputError: a listing that finds nothing
        [
            "label",
            "--input",
            "file://{data}/none-*.jpg?X-Amz-Signature=SIGNATURE0123",
            "--output",
            "{out}",
        ],
        # WeightsError: a download that fails
        [
            "predict",
            "--weights",
            "https://u:p4ss/word@127.0.0.1:1/m.safetensors?X-Amz-Signature=SIGNATURE0123",
            "{data}/a.png",
        ],
        # ConfigError: a value of the wrong type, next to a credential-bearing URI
        ["label", "--input", "s3://AKIAEXAMPLE:se/cr+et@bucket/in", "--set", "top_k=many"],
    ],
    ids=["output", "listing", "weights-fetch", "config"],
)
def test_no_error_message_shows_a_secret_of_a_uri(tmp_path, capsys, argv):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(data / "a.png")
    argv = [a.format(data=data, out=tmp_path / "out") for a in argv]

    code = main(argv)

    out, err = capsys.readouterr()
    assert code != 0 and err.strip(), "the run says why it stopped"
    assert not [s for s in SECRETS if s in out + err], out + err
