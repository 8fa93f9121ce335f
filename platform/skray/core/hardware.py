"""What this machine's CPU is and which matrix instructions it has, from ``/proc/cpuinfo``, and
whether it has a GPU: ``precision: auto`` and the benchmarks follow the hardware, not a guess."""

from __future__ import annotations

import functools
import glob
import os
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

# The ISA extensions the model's CPU kernels (oneDNN, FBGEMM) choose between.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def parse_cpuinfo(text: str) -> tuple[str, frozenset[str]]:
    """The first CPU's model name and flags in a ``/proc/cpuinfo`` text."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name" and not model:
            model = value.strip()
        elif name.strip() == "flags" and not flags:
            flags = frozenset(value.split())
    return model, flags


@functools.cache
def cpu() -> tuple[str, frozenset[str]]:
    """This machine's CPU model name and flags (no flags where there is no cpuinfo)."""
    try:
        model, flags = parse_cpuinfo(CPUINFO.read_text())
    except OSError:
        model, flags = "", frozenset()
    return model or platform.processor() or platform.machine(), flags


def cpu_summary() -> str:
    """``CPU model, N cores; ISA: flags...``: what every benchmark prints first, since numbers
    from two CPUs (an AMX Xeon, an AVX-512 EPYC) compare only within one run."""
    model, flags = cpu()
    isa = " ".join(f for f in ISA_FLAGS if f in flags) or "none of " + " ".join(ISA_FLAGS)
    return f"{model}, {os.cpu_count()} cores; ISA: {isa}"


@functools.cache
def cuda_available() -> bool:
    """``torch.cuda.is_available()``, asked only where a GPU driver has put its device nodes
    (``/dev/nvidia0``, ..., or ROCm's ``/dev/kfd``): elsewhere it is False without importing
    torch, which costs a driver or CLI seconds of CPU for nothing."""
    if not (glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/kfd")):
        return False
    import torch

    return torch.cuda.is_available()
