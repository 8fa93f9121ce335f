"""Which numeric precision a model worker runs, where the config says ``auto``.

bf16 pays only on hardware that computes in it: CUDA GPUs with bf16, CPUs with AMX-BF16
tiles (Xeon Sapphire Rapids and later: about 3x fp32) or AVX512-BF16 dot products (AMD Zen 4
EPYC: 2.2x fp32 + compile, measured in ``benchmarks/model_throughput.py``). Elsewhere (a CPU
with AVX-512 VNNI alone, say) bf16 is converted around fp32 kernels and is no faster, so
``auto`` stays fp32. The choice comes with its reason, which the job and the endpoint report.
"""

from __future__ import annotations

from typing import Literal

from skray.core.hardware import cpu, cuda_available
from skray.io.config import Precision

Resolved = Literal["fp32", "bf16", "int8"]


def choose_precision(
    precision: Precision, device_type: str, cpu_flags: frozenset[str], cuda_bf16: bool
) -> tuple[Resolved, str]:
    """``precision`` with ``auto`` made concrete for a worker on ``device_type``, and why."""
    if precision != "auto":
        return precision, "as configured"
    if device_type == "cuda":
        if cuda_bf16:
            return "bf16", "auto: the GPU has bf16 matrix units"
        return "fp32", "auto: the GPU has no bf16 support"
    if "amx_bf16" in cpu_flags:
        return "bf16", "auto: the CPU has AMX-BF16 matrix units"
    if "avx512_bf16" in cpu_flags:
        return "bf16", "auto: the CPU has AVX512-BF16 instructions"
    return "fp32", "auto: the CPU has no AMX-BF16 or AVX512-BF16 (bf16 would be no faster)"


def resolve_precision(precision: Precision, device_type: str) -> tuple[Resolved, str]:
    """:func:`choose_precision` with this machine's facts. On a driver without a GPU that
    plans for GPU workers, a bf16-capable GPU is assumed (set ``fp32`` for older ones)."""
    return choose_precision(precision, device_type, cpu()[1], _cuda_bf16(device_type))


def _cuda_bf16(device_type: str) -> bool:
    if device_type != "cuda":
        return False  # a CPU worker's choice does not depend on it
    if not cuda_available():
        return True  # a driver without a GPU, planning for GPU workers
    import torch

    return torch.cuda.is_bf16_supported()
