"""Decode next to the model (``decode: gpu``): the same crops, labels and error rows as the Pillow
path, and a compiled model that never recompiles on a short batch.

The suite runs it on CPU (torchvision's CPU decoder); ``benchmarks/gpu_check.sh`` runs the same
tests with ``SKRAY_TEST_DEVICE=cuda``, where they cover nvJPEG, the prefetch thread's CUDA
stream, pinned copies and the batch-size probe (GPU-only code)."""

from __future__ import annotations

import io
import os
import struct

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch._dynamo
from PIL import Image

from helpers import SMALL
from skray.core.device_decode import DeviceDecoder
from skray.core.images import ImageDecodeError, decode_for_eval
from skray.core.preprocessing import PreprocessingConfig
from skray.dev.testing import photo_corpus
from skray.inference.classifier import Classifier
from skray.io.sources.rows import make_row
from skray.label.predictor import Predictor
from skray.label.read import bytes_rows

pytestmark = pytest.mark.timeout(120)

CFG = PreprocessingConfig()  # full decode (jpeg_draft off), as the device path decodes
DEVICE = torch.device(os.environ.get("SKRAY_TEST_DEVICE", "cpu"))


def jpeg(img: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **save)
    return buf.getvalue()


def generated_images() -> list[bytes]:
    """What the photo corpus lacks: EXIF rotation, CMYK and alpha (both go to Pillow), greyscale
    gradients, noise, a tiny image and a progressive JPEG."""
    gen = torch.Generator().manual_seed(0)
    noise = Image.fromarray(
        torch.randint(0, 256, (300, 420, 3), generator=gen, dtype=torch.uint8).numpy()
    )
    gradient = Image.linear_gradient("L").resize((640, 360))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 cw on display
    rgba = io.BytesIO()
    noise.convert("RGBA").resize((200, 150)).save(rgba, "PNG")
    return [
        jpeg(noise, quality=90),
        jpeg(gradient, quality=75),
        jpeg(noise.resize((1200, 900)), quality=85, exif=exif.tobytes()),
        jpeg(noise.convert("CMYK"), quality=90),
        jpeg(noise.resize((9, 7))),
        jpeg(noise, progressive=True, subsampling=2),
        rgba.getvalue(),
    ]


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [data for _, data in photo_corpus(24)] + generated_images()


def test_device_crops_match_the_pillow_crops_within_two_levels_on_photos_and_generated_images(
    images,
):
    crops, errors = DeviceDecoder(CFG, device=DEVICE)(images)
    reference = torch.stack([torch.from_numpy(decode_for_eval(data, CFG)) for data in images])

    assert crops.device.type == DEVICE.type
    crops = crops.cpu()
    diff = (crops.int() - reference.int()).abs()
    assert errors == [None] * len(images)
    assert diff.max() <= 2  # torch's bicubic vs Pillow's, in uint8 rounding
    assert diff.float().mean() < 0.05


def test_device_path_labels_agree_with_the_pillow_path(images):
    classifier = Classifier(SMALL, device=str(DEVICE))
    crops, _ = DeviceDecoder(CFG, device=DEVICE)(images)
    reference = torch.stack([torch.from_numpy(decode_for_eval(data, CFG)) for data in images])

    device_logits, pillow_logits = classifier.logits(crops), classifier.logits(reference)
    assert torch.equal(device_logits.argmax(1), pillow_logits.argmax(1))
    assert (device_logits - pillow_logits).abs().max() < 0.05 * pillow_logits.abs().max()


def pixel_bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height``; its (absent) pixels never matter."""
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    )


def hostile_inputs() -> dict[str, bytes]:
    photo = photo_corpus(1)[0][1]
    return {
        "empty": b"",
        "truncated_jpeg": photo[: len(photo) // 2],
        "jpeg_cut_before_its_end_marker": photo[:-2],
        "not_an_image": b"%PDF-1.4 hello",
        "jpeg_header_then_junk": b"\xff\xd8\xff\xe0" + os.urandom(64),
        "pixel_bomb_header": pixel_bomb_png(100_000, 100_000),
        "one_by_65000_jpeg": jpeg(Image.new("RGB", (1, 65000))),
    }


def test_hostile_inputs_fail_with_the_same_reasons_as_the_pillow_path():
    inputs = hostile_inputs()
    _, errors = DeviceDecoder(CFG, device=DEVICE)(list(inputs.values()))

    for (name, data), err in zip(inputs.items(), errors):
        with pytest.raises(ImageDecodeError) as pillow:
            decode_for_eval(data, CFG)
        assert isinstance(err, ImageDecodeError), name
        assert err.reason == pillow.value.reason, name


def test_a_compiled_model_pads_a_short_batch_to_its_shape_and_never_recompiles():
    compiled = Classifier(SMALL, device=str(DEVICE), compile=True, batch_size=4)
    eager = Classifier(SMALL, device=str(DEVICE))
    crops = torch.randint(
        0, 256, (7, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )

    compiled.logits(crops[:4])  # compiles for the batch shape
    with torch._dynamo.config.patch(
        error_on_recompile=True
    ):  # monkeypatch's undo would hide the key
        logits = compiled.logits(crops)  # a chunk of 4, then 3 padded to 4

    assert logits.shape == (7, eager.logits(crops).shape[1])
    assert torch.allclose(logits, eager.logits(crops), atol=1e-4)


def predictor_batch(blobs: list[bytes]) -> dict[str, np.ndarray]:
    """The batch a ``decode="gpu"`` read task hands the actors: rows of one unit, as bytes."""
    rows = [{**make_row(f"k{i:03d}", b), "unit": "u", "unit_rows": -1} for i, b in enumerate(blobs)]
    return {**bytes_rows(rows), "decode_s": np.zeros(len(blobs))}


def test_the_predictor_decoding_bytes_in_prefetched_chunks_labels_like_the_pillow_path(images):
    """On CPU: chunks of 8, the next decoded by the prefetch thread; on a GPU: the probed batch
    shape, decoding on a second CUDA stream from pinned memory."""
    hostile = list(hostile_inputs().values())
    blobs = images + hostile
    chunked = Predictor(
        SMALL,
        None,
        top_k=3,
        preprocessing=CFG,
        decode="gpu",
        batch_size="auto" if DEVICE.type == "cuda" else 8,
    )
    reference = Classifier(SMALL, device=str(DEVICE)).predict_bytes(blobs, top_k=3)

    table = chunked(predictor_batch(blobs)).to_pylist()

    if DEVICE.type == "cuda":
        assert chunked.classifier.batch_size >= 8, "the probe found room for a real batch"
    for row, expected in zip(table, reference):
        if isinstance(expected, ImageDecodeError):
            assert row["label"] is None and row["error"].startswith(expected.reason)
        else:
            assert row["error"] is None and row["label_id"] == expected.label_id
    assert all(row["model_s"] > 0 and row["decode_s"] > 0 for row in table)
    assert [row["read_bytes"] for row in table] == [len(b) for b in blobs]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_labeling_job_decoding_in_the_actors_gives_the_labels_of_the_cpu_decode(
    ray_cluster, tmp_path
):
    from skray.label.config import LabelConfig
    from skray.label.job import run

    data = tmp_path / "data"
    data.mkdir()
    for name, blob in [
        *photo_corpus(20),
        ("broken.jpg", photo_corpus(1)[0][1][:500]),
        ("junk.jpg", b"junk"),
    ]:
        (data / name).write_bytes(blob)
    tables = {}
    for decode in ("cpu", "gpu"):
        out = str(tmp_path / decode)
        run(LabelConfig(input=str(data), output=out, model=SMALL, batch_size=8, decode=decode))
        tables[decode] = pq.read_table(out).sort_by("key")

    cpu, gpu = tables["cpu"], tables["gpu"]
    assert cpu.num_rows == gpu.num_rows == 22
    assert gpu.column("key").to_pylist() == cpu.column("key").to_pylist()
    assert gpu.column("label_id").to_pylist() == cpu.column("label_id").to_pylist()
    assert [e and e.split(":")[0] for e in gpu.column("error").to_pylist()] == [
        e and e.split(":")[0] for e in cpu.column("error").to_pylist()
    ]
    assert gpu.column("error").null_count == 20
