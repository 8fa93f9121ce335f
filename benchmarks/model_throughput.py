"""Model-only throughput: the plain eager model vs its inference fast path.

Variants are timed interleaved, round by round, in one process so that machine
noise hits them alike; the table reports medians and the ratio to plain eager.

    python benchmarks/model_throughput.py [--model skresnext50_32x4d] [--batch 16] [--size 224]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from skray.model import DEFAULT_MODEL, create_model, prepare_for_inference


def images_per_second(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x)
    return x.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    model = create_model(args.model).eval().to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)

    def synced(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(batch: torch.Tensor) -> torch.Tensor:
            out = fn(batch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return out

        return run

    variants = {
        "plain eager fp32": synced(torch.inference_mode()(model)),
        "fast (BN fold + SK fuse + channels_last)": synced(prepare_for_inference(model, device)),
        "fast + torch.compile": synced(prepare_for_inference(model, device, compile=True)),
    }
    if device.type == "cuda":
        variants["fast + compile + bf16 autocast"] = synced(
            prepare_for_inference(model, device, compile=True, amp_dtype=torch.bfloat16)
        )
    for fn in variants.values():  # warm-up, compilation included
        fn(x)
        fn(x)

    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            rates[name].append(images_per_second(fn, x))

    base = statistics.median(rates["plain eager fp32"])
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.model}, batch {args.batch}, {args.size} px, {device_name}, "
          f"{torch.get_num_threads()} threads, median of {args.rounds} interleaved rounds")
    print(f"| variant | img/s | x plain |\n|---|---:|---:|")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"| {name} | {rate:.1f} | {rate / base:.2f} |")


if __name__ == "__main__":
    main()
