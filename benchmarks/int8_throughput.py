"""int8 on CPU against skray's fp32 fast path: throughput, and how often int8 keeps fp32's top-1.

Four classifiers of the same (seeded) weights, each behind ``Classifier.logits`` (uint8 crops
in, normalize, forward in fixed batches): fp32 fast path, fp32 fast path + ``torch.compile``,
``precision="bf16"`` + compile (the no-calibration alternative on AMX / AVX512-BF16 CPUs) and
``precision="int8"``. They are timed interleaved, round by round, in one process, so machine
noise hits them alike; warm-up and compilation run before the first timed round.

Agreement is top-1 of int8 and of bf16 against fp32 on real photos
(``skray.dev.testing.photo_corpus``; int8 calibrated on other crops of them). Random weights
have tiny top-1 margins, so ``--digits`` also trains the small variant briefly on
scikit-learn's real handwritten digits and reports int8 agreement on the held-out digits
(calibrated on training digits).

    python benchmarks/int8_throughput.py [--model skresnext50_32x4d] [--batch 16] [--size 224]
        [--rounds 20] [--photos 256] [--calibration 256] [--digits]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from skray.core.hardware import cpu_summary
from skray.core.images import decode_for_eval
from skray.core.model import create_model, prepare_for_inference
from skray.core.preprocessing import PreprocessingConfig
from skray.core.specs import DEFAULT_MODEL
from skray.core.transforms import normalize
from skray.dev.testing import DIGIT_CLASSES, digit_png, photo_corpus
from skray.inference.classifier import Classifier
from skray.inference.quantize import quantize_int8

SMALL = "skresnext14_8x4d_half"


def photo_crops(n: int, seed: int, cfg: PreprocessingConfig) -> torch.Tensor:
    return torch.stack(
        [torch.from_numpy(decode_for_eval(data, cfg)) for _, data in photo_corpus(n, seed=seed)]
    )


def compare(reference: torch.Tensor, quantized: torch.Tensor) -> str:
    agreement = (reference.argmax(1) == quantized.argmax(1)).float().mean().item()
    delta = (quantized - reference).abs()
    return (
        f"top-1 agreement {agreement:.1%} on {len(reference)} images; |logit delta| max "
        f"{delta.max().item():.4f}, mean {delta.mean().item():.4f} (fp32 logits' std "
        f"{reference.std().item():.4f})"
    )


def logits_in_batches(forward, x: torch.Tensor, batch: int) -> torch.Tensor:
    """``forward`` over ``x`` in batches of exactly ``batch`` (the last zero-padded)."""
    out = []
    for chunk in x.split(batch):
        padded = torch.cat([chunk, chunk.new_zeros(batch - len(chunk), *chunk.shape[1:])])
        out.append(forward(padded)[: len(chunk)])
    return torch.cat(out)


def digits_agreement(seconds: float, calibration: int) -> str:
    """Train the small variant on real digits for about ``seconds``, then int8 vs fp32 on the
    held-out ones: trained weights have real margins, unlike random ones."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    cfg = PreprocessingConfig(image_size=32, crop_pct=1.0)
    images = torch.stack(
        [torch.from_numpy(decode_for_eval(digit_png(p), cfg)) for p in digits.images]
    )
    labels = torch.as_tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    val, train = order[:360], order[360:]
    torch.manual_seed(0)
    net = create_model(SMALL, num_classes=len(DIGIT_CLASSES))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=0.05)
    x_train = normalize(images[train], cfg.mean, cfg.std)
    started, epochs = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        net.train()
        for idx in torch.randperm(len(train)).split(64):
            loss = nn.functional.cross_entropy(net(x_train[idx]), labels[train][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        epochs += 1
    x_val = normalize(images[val], cfg.mean, cfg.std)
    reference = prepare_for_inference(net)(x_val)
    top1 = (reference.argmax(1) == labels[val]).float().mean().item()
    int8 = quantize_int8(net, images[train][:calibration], 32, cfg)
    quantized = logits_in_batches(int8, x_val, 32)
    return f"digits ({epochs} epochs, fp32 val top-1 {top1:.1%}): " + compare(reference, quantized)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--photos", type=int, default=256)
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--digits",
        type=float,
        default=0,
        metavar="SECONDS",
        help="also train on real digits this long and report int8 agreement there",
    )
    args = parser.parse_args()
    print(cpu_summary(), flush=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = PreprocessingConfig(image_size=args.size)
    photos, calibration = photo_crops(args.photos, 0, cfg), photo_crops(args.calibration, 1, cfg)

    started = time.perf_counter()
    int8 = Classifier(
        args.model,
        device="cpu",
        preprocessing=cfg,
        batch_size=args.batch,
        precision="int8",
        calibration=calibration,
    )
    int8_setup = time.perf_counter() - started
    variants = {
        "fp32 fast": Classifier(args.model, device="cpu", preprocessing=cfg, batch_size=args.batch),
        "fp32 fast + compile": Classifier(
            args.model, device="cpu", preprocessing=cfg, batch_size=args.batch, compile=True
        ),
        "bf16 fast + compile": Classifier(
            args.model,
            device="cpu",
            preprocessing=cfg,
            batch_size=args.batch,
            compile=True,
            precision="bf16",
        ),
        "int8": int8,
    }
    batch = photos[: args.batch]
    for classifier in variants.values():  # warm-up: compilation happens here
        classifier.logits(batch)
        classifier.logits(batch)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate who goes first
            start = time.perf_counter()
            variants[name].logits(batch)
            rates[name].append(len(batch) / (time.perf_counter() - start))

    medians = {name: statistics.median(values) for name, values in rates.items()}
    base = medians["fp32 fast + compile"]
    print(
        f"\n{args.model}, batch {args.batch}, {args.size} px, {torch.get_num_threads()} threads, "
        f"median of {args.rounds} interleaved rounds (warm-up and compilation excluded); "
        f"int8 set-up (export, calibration on {len(calibration)} photos, convert, compile) "
        f"{int8_setup:.0f} s\n"
    )
    print("| variant | img/s | vs fp32 fast + compile |\n|---|---:|---:|")
    for name, rate in medians.items():
        print(f"| {name} | {rate:.1f} | {rate / base:.2f} |")
    print()
    reference = variants["fp32 fast"].logits(photos)
    print("photos, int8: " + compare(reference, int8.logits(photos)))
    print("photos, bf16: " + compare(reference, variants["bf16 fast + compile"].logits(photos)))
    print(f"int8 vs bf16 fast + compile: {medians['int8'] / medians['bf16 fast + compile']:.2f}x")
    if args.digits:
        print(digits_agreement(args.digits, args.calibration))


if __name__ == "__main__":
    main()
