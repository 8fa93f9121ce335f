"""What JPEG draft decoding and the device decode path cost in agreement, and buy in speed.

Three preprocessing paths over one real-photo corpus (:func:`skray.dev.testing.photo_corpus`),
measured side by side in one run:

* ``full``: Pillow, full decode (timm's eval pipeline, ``jpeg_draft: false``), the reference;
* ``draft``: Pillow with libjpeg's 1/2-1/8 draft downscaling (``jpeg_draft: true``);
* ``device``: :class:`skray.core.device_decode.DeviceDecoder` (torchvision decode + torch resize;
  on this machine its CPU decoder, on a GPU nvJPEG).

For each, against ``full``: crop pixel difference, top-1 agreement and logits delta under a
model; and decode images/s. Models: the 50-layer model with its seeded random weights: no
trained ImageNet weights can be downloaded here, and its top-1 margins are tiny, so the
agreement it shows is a pessimistic bound; the logits delta is the figure that transfers.

    python benchmarks/decode_agreement.py --images 120
"""

from __future__ import annotations

import argparse
import time

import torch

from skray.core.device_decode import DeviceDecoder
from skray.core.images import decode_for_eval
from skray.core.preprocessing import PreprocessingConfig
from skray.dev.testing import photo_corpus
from skray.inference.classifier import Classifier


def decode_all(path: str, blobs: list[bytes]) -> tuple[torch.Tensor, float]:
    """Crops for every blob by one path, and its decode images/s (one thread)."""
    start = time.perf_counter()
    if path == "device":
        crops, errors = DeviceDecoder(PreprocessingConfig())(blobs)
        assert not any(errors)
    else:
        cfg = PreprocessingConfig(jpeg_draft=path == "draft")
        crops = torch.stack([torch.from_numpy(decode_for_eval(b, cfg)) for b in blobs])
    return crops, len(blobs) / (time.perf_counter() - start)


def agreement(
    classifier: Classifier, crops: dict[str, torch.Tensor], batch: int = 32
) -> dict[str, tuple]:
    """Per path: (top-1 agreement with full, mean |logit delta|, max |logit delta|,
    mean top-1 margin of full)."""
    logits = {
        path: torch.cat([classifier.logits(c[i : i + batch]) for i in range(0, len(c), batch)])
        for path, c in crops.items()
    }
    ref = logits["full"]
    top2 = ref.softmax(1).topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1]).mean().item()
    out = {}
    for path, value in logits.items():
        delta = (value - ref).abs()
        agree = (value.argmax(1) == ref.argmax(1)).float().mean().item()
        out[path] = (agree, delta.mean().item(), delta.max().item(), margin)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--model", default="skresnext50_32x4d")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    corpus = photo_corpus(args.images)
    jpegs = [b for name, b in corpus if name.endswith(".jpg")]
    large = [
        b
        for name, b in corpus
        if name.endswith(".jpg") and max(map(int, name[:-4].rsplit("-", 1)[1].split("x"))) >= 1000
    ]
    print(
        f"corpus: {len(corpus)} photos, {len(jpegs)} JPEGs ({len(large)} with a side >= 1000 px, "
        f"which draft decoding shrinks)"
    )

    crops, speed = {}, {}
    for path in ("full", "draft", "device"):
        decode_all(path, [b for _, b in corpus[:4]])  # warm-up
        crops[path], speed[path] = decode_all(path, [b for _, b in corpus])
        _, speed[path + "_large"] = decode_all(path, large)

    print(
        "\n| path | crop |diff| mean / max (levels) | decode img/s, all | x full "
        "| img/s, >= 1000 px JPEGs | x full |"
    )
    print("|---|---|---|---|---|---|")
    for path in crops:
        diff = (crops[path].int() - crops["full"].int()).abs()
        print(
            f"| {path} | {diff.float().mean():.3f} / {diff.max()} | {speed[path]:.1f} | "
            f"{speed[path] / speed['full']:.2f} | {speed[path + '_large']:.1f} | "
            f"{speed[path + '_large'] / speed['full_large']:.2f} |"
        )

    models = [(f"{args.model}, seeded random weights", Classifier(args.model))]
    print(
        "\n| model | path | top-1 agreement with full | mean |logit delta| | max |logit delta| "
        "| mean top-1 margin (full) |"
    )
    print("|---|---|---|---|---|---|")
    for name, classifier in models:
        for path, (agree, mean, worst, margin) in agreement(classifier, crops).items():
            if path != "full":
                print(
                    f"| {name} | {path} | {agree:.3f} | {mean:.4f} | {worst:.4f} | {margin:.4f} |"
                )


if __name__ == "__main__":
    main()
