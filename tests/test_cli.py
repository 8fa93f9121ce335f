"""``skray predict``: top-k per image, errors in place, honest about random weights."""

from __future__ import annotations

import io

import torch
from PIL import Image

from skray.cli import main
from skray.model import create_model
from skray.weights import save_weights

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


def test_predict_with_saved_weights_uses_their_class_names(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model(SMALL, num_classes=3)
    weights = tmp_path / "w.safetensors"
    save_weights(model, weights, architecture=SMALL, class_names=["cat", "dog", "owl"])

    assert main(["predict", "--weights", str(weights), "--top-k", "2", write_image(tmp_path / "a.png")]) == 0

    out, err = capsys.readouterr()
    assert "RANDOM" not in err
    named = [line.split()[1] for line in out.splitlines()[1:]]
    assert len(named) == 2 and set(named) <= {"cat", "dog", "owl"}


def test_predict_fails_when_no_image_could_be_classified(tmp_path, capsys):
    assert main(["predict", "--model", SMALL, str(tmp_path / "nope.jpg")]) == 1
