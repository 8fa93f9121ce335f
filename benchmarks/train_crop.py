"""The training crop: torchvision's transforms vs skray's (Pillow + numpy), side by side.

Two costs of a training run's read tasks, measured in one run on the same real photos
(skray.dev.testing.photo_corpus):

* a cold read task: a fresh interpreter that decodes a photo file, imports what the crop
  needs, builds it and crops the photo. Ray starts such processes mid-epoch whenever more read
  tasks run at once than the node keeps idle workers (one per CPU by default, fractional
  ``data.decode_cpus`` runs more);
* a warm one: ms per photo, RandomResizedCrop (bicubic, the models' interpolation) + flip to
  uint8 (3, S, S), after decoding.

    python benchmarks/train_crop.py [--size 224] [--photos 200] [--starts 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CROPS = {
    "torchvision v2": (
        "from torchvision.transforms import InterpolationMode, v2\n"
        "crop = v2.Compose([v2.RandomResizedCrop({size}, antialias=True,"
        " interpolation=InterpolationMode.BICUBIC), v2.RandomHorizontalFlip(), v2.PILToTensor()])\n"
    ),
    "skray.core.augment": (
        "from skray.core.augment import train_augment\ncrop = train_augment({size})\n"
    ),
}


def cold_start_s(setup: str, size: int, photo: str) -> float:
    """Wall seconds of a fresh interpreter that decodes the photo file ``photo`` as a read task
    does, builds the crop and crops it."""
    code = (
        "from pathlib import Path\n"
        "from skray.core.images import decode_image\n"
        f"image = decode_image(Path({photo!r}).read_bytes())\n"
        + setup.format(size=size)
        + "crop(image)\n"
    )
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - started


def warm_ms(setup: str, size: int, photos: int) -> float:
    """ms per photo of the crop on decoded photos, in this process."""
    from skray.core.images import decode_image
    from skray.dev.testing import photo_corpus

    images = [decode_image(data) for _, data in photo_corpus(photos)]
    scope: dict = {}
    exec(setup.format(size=size), scope)
    crop = scope["crop"]
    crop(images[0])
    started = time.perf_counter()
    for image in images:
        crop(image)
    return (time.perf_counter() - started) * 1000 / len(images)


def main() -> None:
    from skray.core.hardware import cpu_summary

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--starts", type=int, default=3, help="cold starts per crop (median)")
    args = parser.parse_args()
    from skray.dev.testing import photo_corpus

    print(cpu_summary())
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        photo = str(Path(tmp) / "photo.jpg")
        Path(photo).write_bytes(photo_corpus(1)[0][1])
        for name, setup in CROPS.items():
            starts = [cold_start_s(setup, args.size, photo) for _ in range(args.starts)]
            rows[name] = (statistics.median(starts), warm_ms(setup, args.size, args.photos))
    base_cold, base_warm = rows["torchvision v2"]
    print(f"\n| crop ({args.size} px) | cold read task, s | x | warm, ms/photo | x |")
    print("|---|---:|---:|---:|---:|")
    for name, (cold, warm) in rows.items():
        ratios = f"{base_cold / cold:.2f} | {warm:.2f} | {base_warm / warm:.2f}"
        print(f"| {name} | {cold:.2f} | {ratios} |")


if __name__ == "__main__":
    main()
