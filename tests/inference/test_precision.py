"""Precision follows the hardware: ``auto`` is bf16 only where bf16 matrix units exist (AMX
CPUs, bf16 GPUs), and bf16 runs the fast path under autocast with fp32 logits out."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import SMALL
from skray.core import hardware
from skray.core.model import create_model
from skray.core.preprocessing import PreprocessingConfig
from skray.core.transforms import preprocess
from skray.dev.testing import write_digits_folder
from skray.inference import precision as precision_module
from skray.inference.classifier import Classifier
from skray.inference.precision import choose_precision
from skray.label.config import ActorsConfig, LabelConfig

pytestmark = pytest.mark.timeout(300)

AMX_XEON = frozenset({"avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"})
ZEN4_EPYC = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})
VNNI_ONLY = frozenset({"avx2", "avx512f", "avx512_vnni"})


@pytest.mark.parametrize(
    "configured, device, flags, cuda_bf16, expected, why",
    [
        ("auto", "cpu", AMX_XEON, False, "bf16", "AMX-BF16"),
        ("auto", "cpu", ZEN4_EPYC, False, "bf16", "AVX512-BF16"),
        ("auto", "cpu", VNNI_ONLY, False, "fp32", "no AMX-BF16 or AVX512-BF16"),
        ("auto", "cuda", frozenset(), True, "bf16", "GPU has bf16"),
        ("auto", "cuda", AMX_XEON, False, "fp32", "GPU has no bf16"),
        ("fp32", "cpu", AMX_XEON, False, "fp32", "as configured"),
        ("bf16", "cpu", VNNI_ONLY, False, "bf16", "as configured"),
        ("int8", "cpu", AMX_XEON, False, "int8", "as configured"),
    ],
)
def test_auto_picks_bf16_only_where_the_hardware_has_bf16_matrix_units(
    configured, device, flags, cuda_bf16, expected, why
):
    chosen, reason = choose_precision(configured, device, flags, cuda_bf16)
    assert chosen == expected and why in reason


def test_the_cpu_flags_are_read_from_cpuinfo():
    text = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8488C\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n\nprocessor\t: 1\nflags\t: fpu\n"  # noqa: E501

    model, flags = hardware.parse_cpuinfo(text)

    assert model == "Intel(R) Xeon(R) Platinum 8488C" and {"amx_bf16", "amx_tile"} <= flags


@pytest.fixture
def crops() -> torch.Tensor:
    return torch.randint(0, 256, (4, 3, 64, 64), generator=torch.Generator().manual_seed(0)).to(
        torch.uint8
    )


def test_bf16_on_the_cpu_runs_under_autocast_and_gives_fp32_logits_close_to_fp32(crops):
    fp32 = Classifier(SMALL, device="cpu", precision="fp32")
    bf16 = Classifier(SMALL, device="cpu", precision="bf16")

    exact, rounded = fp32.logits(crops), bf16.logits(crops)

    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert rounded.dtype == torch.float32
    assert not torch.equal(exact, rounded), "bf16 computed nothing in bf16"
    assert (exact - rounded).abs().max() < 0.05 * exact.abs().max()


def test_a_classifier_left_on_auto_takes_bf16_on_an_amx_cpu_and_fp32_on_vnni_alone(
    monkeypatch, crops
):
    monkeypatch.setattr(precision_module, "cpu", lambda: ("Xeon", AMX_XEON))
    amx = Classifier(SMALL, device="cpu", precision="auto")
    monkeypatch.setattr(precision_module, "cpu", lambda: ("Xeon", VNNI_ONLY))
    vnni = Classifier(SMALL, device="cpu", precision="auto")

    assert (amx.precision, vnni.precision) == ("bf16", "fp32")
    assert "AMX-BF16" in amx.precision_reason and "no AMX-BF16" in vnni.precision_reason


def test_the_label_fingerprint_holds_the_resolved_precision(monkeypatch):
    def fingerprint(precision: str) -> str:
        actors = ActorsConfig(precision=precision, gpus=0)
        return LabelConfig(input="in/", output="out/", actors=actors).fingerprint()

    monkeypatch.setattr(precision_module, "cpu", lambda: ("Xeon", VNNI_ONLY))
    assert fingerprint("auto") == fingerprint("fp32") != fingerprint("bf16")
    monkeypatch.setattr(precision_module, "cpu", lambda: ("Xeon", AMX_XEON))
    assert fingerprint("auto") == fingerprint("bf16") != fingerprint("fp32")


DIGITS = PreprocessingConfig(image_size=32)


@pytest.fixture(scope="module")
def trained_digits(tmp_path_factory) -> tuple[Path, list[bytes], list[int]]:
    """The small variant trained on the real digits' train split (3 epochs of SGD on the eval
    crops, in-process): a model with real margins, where agreement means something. Returns
    its weights and the held-out images with their classes."""
    pytest.importorskip("sklearn")
    root = tmp_path_factory.mktemp("digits")
    data = write_digits_folder(str(root))

    def split(name: str) -> tuple[list[bytes], list[int]]:
        paths = sorted(Path(data[name]).rglob("*.png"))
        return [p.read_bytes() for p in paths], [int(p.parent.name[-1]) for p in paths]

    images, classes = split("train")
    inputs = torch.stack([preprocess(image, DIGITS) for image in images])
    targets = torch.tensor(classes)
    torch.manual_seed(0)
    model = create_model(SMALL, num_classes=10)
    epochs, batch = 3, 32
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, 0.05, total_steps=epochs * -(-len(inputs) // batch)
    )
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(inputs))
        for start in range(0, len(inputs), batch):
            step = order[start : start + batch]
            loss = F.cross_entropy(model(inputs[step]), targets[step])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    weights = root / "digits.pth"
    torch.save(model.state_dict(), weights)
    return (weights, *split("val"))


def test_bf16_keeps_fp32s_top1_on_at_least_995_permille_of_held_out_real_digits(trained_digits):
    weights, images, classes = trained_digits
    top1 = {
        precision: [
            p.label_id
            for p in Classifier(
                SMALL, str(weights), device="cpu", precision=precision, preprocessing=DIGITS
            ).predict_bytes(images, 1)
        ]
        for precision in ("fp32", "bf16")
    }
    accuracy = sum(a == b for a, b in zip(top1["fp32"], classes)) / len(classes)
    agree = sum(a == b for a, b in zip(top1["fp32"], top1["bf16"])) / len(classes)
    print(f"digits: fp32 top-1 {accuracy:.1%}; bf16 agrees on {agree:.2%} of {len(classes)}")

    assert len(classes) == 359 and accuracy >= 0.85, "the model learned the digits"
    assert agree >= 0.995
