"""Precision follows the hardware: ``auto`` is bf16 only where bf16 matrix units exist (AMX
CPUs, bf16 GPUs), and bf16 runs the fast path under autocast with fp32 logits out."""

from __future__ import annotations

import pytest
import torch

from helpers import SMALL
from skray.core import hardware
from skray.inference import precision as precision_module
from skray.inference.classifier import Classifier
from skray.inference.precision import choose_precision
from skray.label.config import ActorsConfig, LabelConfig

pytestmark = pytest.mark.timeout(300)

AMX_XEON = frozenset({"avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"})
AVX512_EPYC = frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"})


@pytest.mark.parametrize(
    "configured, device, flags, cuda_bf16, expected, why",
    [
        ("auto", "cpu", AMX_XEON, False, "bf16", "AMX-BF16"),
        ("auto", "cpu", AVX512_EPYC, False, "fp32", "no AMX-BF16"),
        ("auto", "cuda", frozenset(), True, "bf16", "GPU has bf16"),
        ("auto", "cuda", AMX_XEON, False, "fp32", "GPU has no bf16"),
        ("fp32", "cpu", AMX_XEON, False, "fp32", "as configured"),
        ("bf16", "cpu", AVX512_EPYC, False, "bf16", "as configured"),
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


def test_a_classifier_left_on_auto_takes_bf16_on_an_amx_cpu_and_says_why(monkeypatch, crops):
    monkeypatch.setattr(precision_module, "cpu", lambda: ("Xeon", AMX_XEON))
    amx = Classifier(SMALL, device="cpu")
    monkeypatch.setattr(precision_module, "cpu", lambda: ("EPYC", AVX512_EPYC))
    epyc = Classifier(SMALL, device="cpu")

    assert (amx.precision, epyc.precision) == ("bf16", "fp32")
    assert "AMX-BF16" in amx.precision_reason and "no AMX-BF16" in epyc.precision_reason


def test_the_label_fingerprint_holds_the_resolved_precision(monkeypatch):
    def fingerprint(precision: str) -> str:
        actors = ActorsConfig(precision=precision, gpus=0)
        return LabelConfig(input="in/", output="out/", actors=actors).fingerprint()

    monkeypatch.setattr(precision_module, "cpu", lambda: ("EPYC", AVX512_EPYC))
    assert fingerprint("auto") == fingerprint("fp32") != fingerprint("bf16")
    monkeypatch.setattr(precision_module, "cpu", lambda: ("Xeon", AMX_XEON))
    assert fingerprint("auto") == fingerprint("bf16") != fingerprint("fp32")
