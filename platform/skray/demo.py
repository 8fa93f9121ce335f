"""``make demo``: classify a few generated images (and one broken file) end to end."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw

from skray.cli import main as cli_main


def sample_images(count: int = 6, size: int = 320) -> dict[str, bytes]:
    """Synthetic pictures in several formats, plus one truncated JPEG."""
    images: dict[str, bytes] = {}
    formats = ["JPEG", "PNG", "WEBP"]
    for i in range(count):
        img = Image.new("RGB", (size, size), (40 * i % 256, 90, 200 - 30 * i % 200))
        draw = ImageDraw.Draw(img)
        draw.ellipse((size // 6, size // 6, size - size // 4, size - size // 5), fill=(220, 30 * i, 60))
        draw.rectangle((0, size - size // 5, size, size), fill=(30, 140, 40))
        buf = io.BytesIO()
        fmt = formats[i % len(formats)]
        img.save(buf, fmt)
        images[f"sample_{i:02d}.{fmt.lower()}"] = buf.getvalue()
    images["broken.jpg"] = images["sample_00.jpeg"][:300]
    return images


def run_demo(workdir: Path, model: str) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in sample_images().items():
        (workdir / name).write_bytes(data)
        paths.append(str(workdir / name))
    print(f"classifying {len(paths)} generated images in {workdir} with {model}")
    return cli_main(["predict", "--model", model, "--top-k", "3", *paths])
