"""int8 inference on x86 CPUs: PT2E static quantization, lowered through Inductor.

The fp32 fast form (BatchNorm folded, SK mix fused, channels_last: see
:func:`skray.core.model.prepare_for_inference`) is captured with ``torch.export``,
annotated by torchao's ``X86InductorQuantizer`` (uint8 activations per tensor,
int8 weights per channel), calibrated on a fixed set of real eval crops, converted,
and compiled with Inductor's freezing, which rewrites the quantize/dequantize
patterns into oneDNN int8 convolutions (VNNI/AMX where the CPU has them).

The compiled graph has one batch shape: callers pad short batches to it (see
``Classifier.logits``). A batch-dynamic compile would split into several graphs
anyway (sizes 1, 2-15, 16+ specialise separately), each a long compile met in the
middle of serving; one static shape is compiled once, at load.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import torch
from torch import nn

from skray.core.images import ImageDecodeError, decode_for_eval
from skray.core.model import prepare_for_inference
from skray.core.preprocessing import PreprocessingConfig
from skray.core.transforms import normalize
from skray.io.sources import list_inputs
from skray.io.storage import read_bytes

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "calibration_crops",
    "check_int8",
    "quantize_int8",
]

DEFAULT_BATCH_SIZE = 32  # the int8 graph's batch shape when the caller names none


def calibration_crops(uri: str, count: int, preprocessing: PreprocessingConfig) -> torch.Tensor:
    """The first ``count`` images under ``uri`` (a folder, prefix or glob, listed sorted, so
    every actor and replica calibrates on the same ones) that decode, as uint8 eval crops
    (N, 3, S, S). Files that are not images are skipped; none at all is an error."""
    crops = []
    for key in list_inputs(uri):
        try:
            crops.append(decode_for_eval(read_bytes(key), preprocessing))
        except ImageDecodeError:
            continue
        if len(crops) == count:
            break
    if not crops:
        raise ValueError(f"calibration: no decodable image under {uri}")
    return torch.from_numpy(np.stack(crops))


def check_int8(device: torch.device, calibration: torch.Tensor | None) -> None:
    """Fail before any work where int8 cannot run: off the CPU, or with nothing to calibrate on."""
    if device.type != "cpu":
        raise ValueError(
            f"precision int8 runs on CPU only (x86 oneDNN kernels), not on {device}; "
            "use fp32 (bf16 autocast) on GPUs"
        )
    if calibration is None or len(calibration) == 0:
        raise ValueError(
            "precision int8 needs calibration images (uint8 eval crops): "
            "a few hundred real images like the ones to be labeled"
        )


def quantize_int8(
    model: nn.Module,
    calibration: torch.Tensor,
    batch_size: int,
    preprocessing: PreprocessingConfig = PreprocessingConfig(),
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The model as an int8 CPU forward: normalized NCHW float batches of exactly
    ``batch_size`` -> fp32 logits, calibrated on ``calibration`` (uint8 eval crops,
    normalized here as ``Classifier`` normalizes its inputs). Compiled before it returns.

    The result's ``.module`` is the converted graph (quantize/dequantize ops around the
    convolutions), for inspection; the input model is left as it was.
    """
    # Imported here: the quantizer module registers Inductor passes process-wide.
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    check_int8(torch.device("cpu"), calibration)
    fast = prepare_for_inference(model, "cpu").module  # folded, fused, channels_last, eval
    size = calibration.shape[-1]

    def zeros(n: int) -> torch.Tensor:
        return torch.zeros(n, 3, size, size).contiguous(memory_format=torch.channels_last)

    with torch.no_grad():  # batch-dynamic capture: the last calibration chunk may be short
        graph = torch.export.export(
            fast, (zeros(max(batch_size, 2)),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
        ).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    observed = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for chunk in calibration.split(batch_size):
            observed(
                normalize(chunk, preprocessing.mean, preprocessing.std).contiguous(
                    memory_format=torch.channels_last
                )
            )
    quantized = convert_pt2e(observed)
    compiled = torch.compile(quantized, dynamic=False)

    @torch.no_grad()
    def predict(x: torch.Tensor) -> torch.Tensor:
        return compiled(x.contiguous(memory_format=torch.channels_last))

    # Freezing lets Inductor fold the weights' quantization into prepacked oneDNN int8 kernels.
    with warnings.catch_warnings(), torch._inductor.config.patch(freezing=True):
        warnings.filterwarnings("ignore", message="To copy construct from a tensor")  # Inductor's
        predict(zeros(batch_size))  # compile now, at load, not on the first real batch
    predict.module = quantized  # type: ignore[attr-defined]
    return predict
