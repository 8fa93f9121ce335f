r"""Model-only throughput: skray's eager model and inference fast path, next to timm's.

Every variant is timed interleaved, round by round, in one process so that machine
noise hits them alike; warm-up and compilation run before the first timed round.
The table reports medians and ratios to timm eager and timm compiled (Inductor with
freezing, timm's best CPU inference) when timm is importable (``pip install skray[bench]``).
timm eager runs twice: as ``timm.create_model`` returns it (NCHW, the layout timm's own
benchmark and validate scripts use unless told ``--channels-last``) and channels_last, the
layout skray's fast path uses, so the ratio to each is visible. skray's fast path also runs
under bf16 autocast (``precision: bf16``), eager and compiled, on the CPU as on a GPU; the
CPU's model and ISA flags come first (bf16 pays on AMX, not on AVX-512 alone). On a GPU,
timm's compiled model also runs under bf16 autocast, like skray's.

    python benchmarks/model_throughput.py [--model skresnext50_32x4d] [--batch 16] [--size 224] \
        [--rounds 20]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import torch
from torch import nn

from skray.core.hardware import cpu_summary
from skray.core.model import create_model, prepare_for_inference
from skray.core.specs import DEFAULT_MODEL

Runner = Callable[[torch.Tensor], torch.Tensor]
FAST_COMPILE = "skray fast + torch.compile"
FAST_BF16, FAST_COMPILE_BF16 = "skray fast + bf16 autocast", "skray fast + compile + bf16 autocast"
TIMM_EAGER, TIMM_EAGER_CL = "timm eager (NCHW, as created)", "timm eager channels_last"
TIMM_COMPILED, TIMM_COMPILED_BF16 = (
    "timm compile + freezing",
    "timm compile + freezing + bf16 autocast",
)


def images_per_second(fn: Runner, x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return x.shape[0] / (time.perf_counter() - start)


def channels_last_inference(module: nn.Module | Runner) -> Runner:
    """NCHW float batches in, run channels_last under inference mode (what the fast path does)."""

    @torch.inference_mode()
    def forward(x: torch.Tensor) -> torch.Tensor:
        return module(x.contiguous(memory_format=torch.channels_last))

    return forward


def frozen(module: nn.Module) -> Runner:
    """``torch.compile`` with Inductor freezing: weights become constants, folded and prepacked."""
    return channels_last_inference(torch.compile(module, dynamic=False, options={"freezing": True}))


def bf16_autocast(fn: Runner) -> Runner:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return fn(x).float()

    return run


def timm_variants(name: str, device: torch.device) -> dict[str, Runner]:
    """timm's model of the same name: eager as created and channels_last, and compiled with
    freezing (torch.compile's fastest CPU inference; bf16 autocast too on a GPU): the bar skray
    is held to."""
    try:
        import timm
    except ImportError:
        print("timm is not installed (pip install skray[bench]): no timm columns")
        return {}
    if name not in timm.list_models():
        print(f"timm has no {name}: no timm columns")
        return {}
    model = timm.create_model(name, pretrained=False).eval().to(device)
    variants = {TIMM_EAGER: torch.inference_mode()(model)}
    model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    variants |= {TIMM_EAGER_CL: channels_last_inference(model), TIMM_COMPILED: frozen(model)}
    if device.type == "cuda":
        variants[TIMM_COMPILED_BF16] = bf16_autocast(frozen(model))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    print(cpu_summary(), flush=True)
    model = create_model(args.model).eval().to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)

    def synced(fn: Runner) -> Runner:
        def run(batch: torch.Tensor) -> torch.Tensor:
            out = fn(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out

        return run

    variants = {
        "skray eager": torch.inference_mode()(model),
        "skray fast (BN fold + SK fuse + channels_last)": prepare_for_inference(model, device),
        FAST_COMPILE: prepare_for_inference(model, device, compile=True),
        "skray fast + compile + freezing (as timm's)": frozen(
            prepare_for_inference(model, device).module
        ),
        **timm_variants(args.model, device),
    }
    # bf16 as ``precision: bf16`` runs it (what ``auto`` picks on AMX CPUs and bf16 GPUs)
    variants[FAST_BF16] = prepare_for_inference(model, device, amp_dtype=torch.bfloat16)
    variants[FAST_COMPILE_BF16] = prepare_for_inference(
        model, device, compile=True, amp_dtype=torch.bfloat16
    )
    variants = {name: synced(fn) for name, fn in variants.items()}
    for name, fn in variants.items():  # warm-up: compilation and allocator, never timed
        started = time.perf_counter()
        fn(x)
        fn(x)
        print(f"  warm-up {name}: {time.perf_counter() - started:.1f} s", flush=True)

    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            rates[name].append(images_per_second(fn, x))
    medians = {name: statistics.median(values) for name, values in rates.items()}

    references = [
        r
        for r in (
            "skray eager",
            FAST_COMPILE,
            TIMM_EAGER,
            TIMM_EAGER_CL,
            TIMM_COMPILED,
            TIMM_COMPILED_BF16,
        )
        if r in medians
    ]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"\n{args.model}, batch {args.batch}, {args.size} px, {device_name}, "
        f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds "
        "(warm-up and compilation excluded)"
    )
    print("| variant | img/s | " + " | ".join(f"x {r}" for r in references) + " |")
    print("|---|---:|" + "---:|" * len(references))
    for name, rate in medians.items():
        print(
            f"| {name} | {rate:.1f} | "
            + " | ".join(f"{rate / medians[r]:.2f}" for r in references)
            + " |"
        )


if __name__ == "__main__":
    main()
