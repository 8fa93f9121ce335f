"""Behaviour of skray.core.images, the one preprocessing path for eval, labeling and serving.

Every image is generated in memory with Pillow.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from skray.core.errors import IMAGE_REASONS
from skray.core.images import ImageDecodeError, decode_for_eval, decode_image, eval_crop
from skray.core.preprocessing import PreprocessingConfig
from skray.core.specs import IMAGENET_MEAN, IMAGENET_STD
from skray.core.transforms import eval_transform, normalize, preprocess, train_transform

RED, GREEN, BLUE, WHITE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (0, 0, 0)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def quadrants(size: tuple[int, int] = (32, 24)) -> Image.Image:
    """Four flat colours: few enough for GIF's palette, distinct enough to catch mix-ups."""
    w, h = size
    img = Image.new("RGB", size, WHITE)
    img.paste(RED, (0, 0, w // 2, h // 2))
    img.paste(GREEN, (w // 2, 0, w, h // 2))
    img.paste(BLUE, (0, h // 2, w // 2, h))
    return img


def smooth(size: tuple[int, int]) -> Image.Image:
    """A smooth colour image, so lossy codecs and rescaling change it only slightly."""
    channels = [
        Image.linear_gradient("L"),
        Image.radial_gradient("L"),
        Image.linear_gradient("L").rotate(90),
    ]
    return Image.merge("RGB", channels).resize(size, Image.Resampling.BILINEAR)


def row(mode: str, values: list) -> Image.Image:
    """A 1-pixel-high image of ``mode`` holding ``values`` left to right."""
    img = Image.new(mode, (len(values), 1))
    for x, value in enumerate(values):
        img.putpixel((x, 0), value)
    return img


def pixels(img: Image.Image) -> list[tuple[int, int, int]]:
    return [img.getpixel((x, 0)) for x in range(img.width)]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def handmade_png(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A structurally valid 8-bit RGB PNG whose header claims any size, with any IDAT body."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = png_chunk(b"IDAT", idat) if idat is not None else b""
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + body + png_chunk(b"IEND", b"")


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "GIF"])
def test_lossless_formats_decode_to_the_exact_source_rgb(fmt):
    source = quadrants()
    decoded = decode_image(encode(source, fmt))
    assert decoded.mode == "RGB"
    assert decoded.size == source.size
    assert decoded.tobytes() == source.tobytes()


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_lossy_formats_decode_like_pillows_reference_rgb_conversion(fmt):
    data = encode(smooth((48, 32)), fmt, quality=85)
    decoded = decode_image(data)
    reference = Image.open(io.BytesIO(data)).convert("RGB")
    assert decoded.mode == "RGB"
    assert decoded.tobytes() == reference.tobytes()


def test_animated_gif_decodes_its_first_frame():
    frames = [Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert decode_image(data).getcolors() == [(64, RED)]


def test_multipage_tiff_decodes_its_first_page():
    pages = [Image.new("RGB", (8, 8), GREEN), Image.new("RGB", (8, 8), RED)]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert decode_image(data).getcolors() == [(64, GREEN)]


def test_exif_orientation_is_applied_so_the_image_comes_back_upright():
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    decoded = decode_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95))
    assert decoded.size == (20, 40)
    # Rotated clockwise, the stored left half ends up on top.
    top, bottom = decoded.getpixel((10, 5)), decoded.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 50
    assert bottom[2] > 200 and bottom[0] < 50


# --------------------------------------------------------------------------- modes


@pytest.mark.parametrize(
    ("img", "fmt", "expected"),
    [
        pytest.param(row("1", [0, 1]), "PNG", [BLACK, WHITE], id="1"),
        pytest.param(row("L", [0, 77, 255]), "PNG", [BLACK, (77, 77, 77), WHITE], id="L"),
        pytest.param(row("RGB", [RED, (1, 2, 3)]), "PNG", [RED, (1, 2, 3)], id="RGB"),
        # CMYK all-zero is blank paper: white. Pure cyan has no red.
        pytest.param(
            row("CMYK", [(0, 0, 0, 0), (0, 0, 0, 255), (255, 0, 0, 0)]),
            "TIFF",
            [WHITE, BLACK, (0, 255, 255)],
            id="CMYK",
        ),
        # 16-bit: value >> 8.
        pytest.param(
            row("I;16", [65535, 32768, 255]), "PNG", [WHITE, (128, 128, 128), BLACK], id="I;16"
        ),
        # 32-bit int whose maximum needs 16 bits: negatives clip to 0, then value >> 8.
        pytest.param(
            row("I", [-7, 1000, 65535]), "TIFF", [BLACK, (3, 3, 3), WHITE], id="I-16bit-range"
        ),
        # 32-bit int whose maximum fits 8 bits: taken as is.
        pytest.param(
            row("I", [0, 100, 255]), "TIFF", [BLACK, (100, 100, 100), WHITE], id="I-8bit-range"
        ),
        # Float with maximum <= 1 is read as 0..1: scaled by 255 and rounded.
        pytest.param(
            row("F", [0.0, 0.5, 1.0]), "TIFF", [BLACK, (128, 128, 128), WHITE], id="F-0..1"
        ),
        # Float beyond 1 is read as 0..255: rounded and clipped.
        pytest.param(
            row("F", [-3.0, 100.2, 300.0]), "TIFF", [BLACK, (100, 100, 100), WHITE], id="F-0..255"
        ),
    ],
)
def test_opaque_modes_convert_to_rgb_by_the_documented_rule(img, fmt, expected):
    data = encode(img, fmt)
    assert Image.open(io.BytesIO(data)).mode == img.mode, "the fixture must exercise this mode"
    decoded = decode_image(data)
    assert decoded.mode == "RGB"
    assert pixels(decoded) == expected


def test_palette_image_maps_indices_through_its_palette():
    img = row("P", [0, 1, 0])
    img.putpalette([*RED, *BLUE])
    assert pixels(decode_image(encode(img, "PNG"))) == [RED, BLUE, RED]


def test_palette_transparent_index_becomes_white():
    img = row("P", [0, 1])
    img.putpalette([*RED, *BLUE])
    decoded = decode_image(encode(img, "PNG", transparency=0))
    assert pixels(decoded) == [WHITE, BLUE]


def test_rgba_is_composited_over_white_not_stripped_of_alpha():
    # Half-transparent red over white is pink; fully transparent garbage colour is hidden.
    img = row("RGBA", [(255, 0, 0, 128), (10, 20, 30, 0), (1, 2, 3, 255)])
    assert pixels(decode_image(encode(img, "PNG"))) == [(255, 127, 127), WHITE, (1, 2, 3)]


def test_grey_with_alpha_is_composited_over_white():
    img = row("LA", [(0, 128), (100, 255), (50, 0)])
    assert pixels(decode_image(encode(img, "PNG"))) == [(127, 127, 127), (100, 100, 100), WHITE]


def test_16_bit_transparency_key_is_ignored_rather_than_misapplied():
    # Scaled to 8 bits the key would hit other pixels too, so the image stays opaque.
    img = row("I;16", [1000, 256])
    assert pixels(decode_image(encode(img, "PNG", transparency=1000))) == [(3, 3, 3), (1, 1, 1)]


# --------------------------------------------------------------------------- bad input


def assert_refused(data: bytes, reason: str, **kwargs) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, **kwargs)
    assert info.value.reason == reason
    assert str(info.value).startswith(f"{reason}: ")
    return info.value


def test_empty_bytes_are_refused_as_empty():
    assert_refused(b"", "empty")


@pytest.mark.parametrize(
    "data",
    [b"hello, not an image", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< >>\nendobj\n"],
    ids=["text", "pdf"],
)
def test_non_image_bytes_are_refused_as_not_an_image(data):
    assert_refused(data, "not_an_image")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_first_half_of_a_file_is_refused_as_truncated(fmt):
    data = encode(smooth((64, 64)), fmt)
    assert_refused(data[: len(data) // 2], "truncated")


def test_image_over_the_pixel_limit_is_refused():
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    assert_refused(data, "too_many_pixels", max_pixels=100 * 100 - 1)
    assert decode_image(data, max_pixels=100 * 100).size == (100, 100)


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    # A header claiming 5000x5000 with no pixel data at all: decoding would fail
    # differently, so "too_many_pixels" proves nothing was decoded.
    data = handmade_png(5000, 5000)
    assert_refused(data, "too_many_pixels", max_pixels=1_000_000)


def test_header_beyond_pillows_own_bomb_limit_is_refused_as_too_many_pixels():
    assert_refused(handmade_png(100_000, 100_000), "too_many_pixels", max_pixels=10**12)


def test_jpeg_with_corrupted_scan_data_is_refused_as_undecodable():
    # libjpeg shrugs off most corruption; a run of 0xFF (an unterminated marker)
    # inside the entropy-coded scan is one it cannot decode through.
    data = encode(smooth((64, 64)), "JPEG", quality=95)
    start = data.index(b"\xff\xda") + 40  # well inside the scan, past its header
    corrupt = data[:start] + b"\xff" * 100 + data[start + 100 :]
    assert_refused(corrupt, "undecodable")


def test_valid_png_header_with_garbage_pixel_data_is_refused_as_undecodable():
    assert_refused(handmade_png(8, 8, idat=b"this is not zlib-compressed data"), "undecodable")


def test_decode_error_is_a_value_error_that_survives_pickling():
    # Ray ships exceptions between processes by pickling them.
    error = ImageDecodeError("truncated", "image file is truncated")
    assert isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.reason, str(copy)) == ("truncated", "truncated: image file is truncated")
    assert set(IMAGE_REASONS) == {
        "empty",
        "not_an_image",
        "truncated",
        "too_many_pixels",
        "undecodable",
    }


def test_decode_error_rejects_unknown_reason_codes():
    with pytest.raises(ValueError, match="unknown decode-error reason"):
        ImageDecodeError("broken", "whatever")


# --------------------------------------------------------------------------- eval transform


def test_default_eval_config_resizes_to_256_then_crops_224():
    cfg = PreprocessingConfig()
    assert (cfg.image_size, cfg.resize_size) == (224, 256)


@pytest.mark.parametrize(
    ("image_size", "crop_pct", "resize_size"), [(96, 1.0, 96), (288, 0.9, 320)]
)
def test_eval_config_is_configurable(image_size, crop_pct, resize_size):
    cfg = PreprocessingConfig(image_size=image_size, crop_pct=crop_pct)
    assert cfg.resize_size == resize_size
    out = eval_transform(cfg)(smooth((200, 150)))
    assert out.shape == (3, image_size, image_size)


@pytest.fixture
def wide_eval_model(monkeypatch) -> str:
    """A registered variant whose eval preprocessing differs from the default model's in every
    field."""
    import dataclasses

    from skray.core import specs

    spec = dataclasses.replace(
        specs.model_spec("skresnext14_8x4d_half"),
        image_size=256,
        crop_pct=0.95,
        interpolation="bilinear",
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
    )
    monkeypatch.setitem(specs._MODELS, "wide_eval", spec)
    return "wide_eval"


def test_preprocessing_left_unset_is_the_models_and_what_is_set_stays(wide_eval_model):
    cfg = PreprocessingConfig(crop_pct=0.9, jpeg_draft=True).for_model(wide_eval_model)

    assert (cfg.image_size, cfg.crop_pct, cfg.interpolation) == (256, 0.9, "bilinear")
    assert (cfg.mean, cfg.std, cfg.jpeg_draft) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25), True)
    assert cfg.for_model("skresnext14_8x4d_half") == cfg, (
        "resolved once: a second model changes nothing"
    )
    assert PreprocessingConfig() == PreprocessingConfig().for_model(None), (
        "unresolved: the default model's"
    )


@pytest.mark.parametrize(
    "kwargs", [{"crop_pct": 0.0}, {"image_size": 0}, {"interpolation": "fancy"}]
)
def test_eval_config_rejects_invalid_settings(kwargs):
    with pytest.raises(ValueError):
        PreprocessingConfig(**kwargs)


@pytest.mark.parametrize("size", [(224, 224), (640, 480), (480, 640)])
def test_eval_transform_outputs_float32_square_crop_for_any_aspect(size):
    out = eval_transform()(smooth(size))
    assert out.shape == (3, 224, 224)
    assert out.dtype == torch.float32
    assert type(out) is torch.Tensor


def test_eval_transform_normalises_a_uniform_image_with_imagenet_stats():
    value = 100
    out = eval_transform()(Image.new("RGB", (300, 260), (value,) * 3))
    expected = (value / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(out, expected[:, None, None].expand(3, 224, 224), atol=1e-5, rtol=0)


def test_eval_transform_centre_crop_discards_the_borders():
    # 640x480 -> 341x256 -> centre 224 keeps source columns ~109..529.
    img = Image.new("RGB", (640, 480), RED)
    img.paste((128, 128, 128), (100, 0, 540, 480))
    out = eval_transform()(img)
    grey = eval_transform()(Image.new("RGB", (640, 480), (128, 128, 128)))
    torch.testing.assert_close(out, grey, atol=1e-3, rtol=0)


def test_eval_crop_is_built_once_per_config():
    assert eval_crop(PreprocessingConfig()) is eval_crop(PreprocessingConfig())


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize(
    "size",
    [
        (224, 224),
        (256, 256),
        (263, 256),
        (256, 267),
        (257, 300),
        (640, 480),
        (1000, 333),
        (97, 2000),
    ],
)
def test_the_eval_crop_is_torchvisions_resize_centre_crop_and_pil_to_tensor_to_the_bit(
    size, interpolation
):
    """timm's eval pipeline, which the published accuracy was measured with, as torchvision
    builds it; skray's crop leaves torchvision out of the decoding processes but not one
    pixel of its result (odd margins round their corner half to even, as torchvision's)."""
    from torchvision.transforms import InterpolationMode, v2

    cfg = PreprocessingConfig(image_size=224, crop_pct=0.875, interpolation=interpolation)
    mode = InterpolationMode(interpolation)
    reference = v2.Compose(
        [
            v2.Resize(cfg.resize_size, interpolation=mode, antialias=True),
            v2.CenterCrop(cfg.image_size),
            v2.PILToTensor(),
            v2.ToPureTensor(),
        ]
    )
    img = smooth(size)
    img.putpixel((size[0] // 2, size[1] // 3), (255, 0, 255))  # a detail a shifted crop moves

    ours, theirs = eval_crop(cfg)(img), reference(img)
    assert ours.dtype == np.uint8 and ours.flags.c_contiguous
    assert torch.equal(torch.from_numpy(ours), theirs)


def test_uint8_crop_then_normalize_is_exactly_the_eval_transform():
    """Batch jobs ship uint8 crops and normalize next to the model: the same numbers."""
    img = smooth((300, 200))
    crop = eval_crop()(img)
    assert crop.dtype == np.uint8 and crop.shape == (3, 224, 224)
    assert torch.equal(normalize(torch.from_numpy(crop)[None])[0], eval_transform()(img))


def test_preprocess_is_decode_for_eval_then_normalize():
    data = encode(smooth((300, 200)), "PNG")
    assert torch.equal(preprocess(data), normalize(torch.from_numpy(decode_for_eval(data))))


# --------------------------------------------------------------------------- draft decoding


@pytest.fixture(scope="module")
def big_jpeg() -> bytes:
    return encode(smooth((4000, 3000)), "JPEG", quality=90)


def test_draft_decodes_large_jpeg_small_but_never_below_draft_size(big_jpeg):
    decoded = decode_image(big_jpeg, draft_size=256)
    assert 256 <= min(decoded.size) <= 3000 // 4
    assert decoded.width / decoded.height == pytest.approx(4 / 3, rel=0.01)


def test_draft_keeps_the_shorter_side_of_a_panorama_at_least_draft_size():
    decoded = decode_image(encode(smooth((2100, 520)), "JPEG"), draft_size=256)
    assert min(decoded.size) >= 256
    assert decoded.size != (2100, 520)


def test_preprocess_with_draft_matches_full_decode(big_jpeg):
    drafted = preprocess(big_jpeg)
    full = eval_transform()(decode_image(big_jpeg))
    assert drafted.shape == full.shape == (3, 224, 224)
    assert (drafted - full).abs().mean() < 0.05


def test_preprocess_propagates_decode_errors():
    with pytest.raises(ImageDecodeError):
        preprocess(b"hello, not an image")


# --------------------------------------------------------------------------- train transform


def test_train_transform_outputs_normalised_square_crops():
    out = train_transform(64)(smooth((120, 90)))
    assert out.shape == (3, 64, 64)
    assert out.dtype == torch.float32


def test_train_transform_is_random_between_calls():
    torch.manual_seed(0)
    transform, img = train_transform(64), smooth((120, 90))
    assert not torch.equal(transform(img), transform(img))


def test_train_transform_with_randaugment_works():
    torch.manual_seed(0)
    out = train_transform(64, randaugment=True, randaugment_magnitude=15)(smooth((120, 90)))
    assert out.shape == (3, 64, 64)
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- resize bombs


@pytest.fixture(scope="module")
def slivers() -> dict[str, bytes]:
    """A few KB each, yet the eval resize (shorter side -> 256) would want 4 and 22 G pixels."""
    return {
        "jpeg_1x65000": encode(Image.new("L", (1, 65_000)), "JPEG"),
        "png_1bit_16x5500000": encode(Image.new("1", (16, 5_500_000)), "PNG"),
    }


@pytest.mark.parametrize("name", ["jpeg_1x65000", "png_1bit_16x5500000"])
def test_extreme_aspect_ratio_is_refused_from_the_header_before_resizing(slivers, name):
    data = slivers[name]
    assert len(data) < 20_000
    started = time.perf_counter()
    with pytest.raises(ImageDecodeError) as info:
        decode_for_eval(data)
    elapsed = time.perf_counter() - started
    assert info.value.reason == "too_many_pixels" and elapsed < 0.5
    width, height = name.rsplit("_", 1)[1].split("x")
    assert f"{width}x{height} resizes to 256x" in str(info.value)


def test_resize_target_limit_is_exact_and_the_image_itself_still_decodes():
    data = encode(smooth((10, 1000)), "PNG")  # eval resize: 256 x 25600
    exact, one_less = (PreprocessingConfig(max_pixels=n) for n in (256 * 25_600, 256 * 25_600 - 1))
    assert decode_for_eval(data, exact).shape == (3, 224, 224)
    with pytest.raises(ImageDecodeError, match="resizes to 256x25600 = 6553600 pixels"):
        decode_for_eval(data, one_less)
    assert decode_image(data, max_pixels=256 * 25_600 - 1).size == (10, 1000)  # no resize asked for


# Runs in a fresh interpreter: peak RSS is per process, and the address-space cap
# turns an unbounded allocation into a quick failure instead of a swapping machine.
PEAK_MEMORY_PROBE = """
import json, resource, sys
from skray.core.images import ImageDecodeError, decode_for_eval

def vm_size():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))

resource.setrlimit(resource.RLIMIT_AS, (vm_size() + (1 << 30),) * 2)
before, outcomes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, []
for path in sys.argv[1:]:
    try:
        decode_for_eval(open(path, "rb").read())
        outcomes.append("decoded")
    except ImageDecodeError as e:
        outcomes.append(e.reason)
    except BaseException as e:
        outcomes.append(type(e).__name__)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"outcomes": outcomes, "grown_kib": grown}))
"""


def test_resize_bombs_are_refused_without_a_memory_spike(slivers, tmp_path):
    paths = []
    for name, data in slivers.items():
        paths.append(tmp_path / name)
        paths[-1].write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY_PROBE, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["outcomes"] == ["too_many_pixels"] * 2
    assert report["grown_kib"] < 32 * 1024


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (MemoryError(), "too_many_pixels"),
        (ValueError("bad size"), "undecodable"),
        (SyntaxError("broken plugin"), "undecodable"),
        (OSError("decoder error -2"), "undecodable"),
    ],
    ids=["MemoryError", "ValueError", "SyntaxError", "OSError"],
)
@pytest.mark.parametrize("step", ["resize", "convert"])
def test_any_failure_while_preparing_an_image_becomes_a_decode_error(
    monkeypatch, error, reason, step
):
    data = encode(smooth((300, 200)), "PNG")

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(Image.Image, step, fail)
    with pytest.raises(ImageDecodeError) as info:
        decode_for_eval(data)
    assert info.value.reason == reason


@pytest.mark.parametrize("size", [(1, 65_000), (65_000, 1)])
def test_train_transform_crops_before_resizing_so_slivers_cost_nothing(size):
    # RandomResizedCrop falls back to a centre crop clamped to its aspect range: a few pixels.
    image = decode_image(encode(Image.new("L", size, 128), "PNG"))
    started = time.perf_counter()
    out = train_transform(64)(image)
    assert out.shape == (3, 64, 64) and time.perf_counter() - started < 0.5


def test_labeling_turns_a_resize_bomb_into_an_error_row_and_keeps_the_others(slivers):
    from skray.label.read import decode_rows

    good = encode(smooth((300, 200)), "PNG")
    rows = [
        {
            "key": key,
            "data": data,
            "reason": None,
            "error": None,
            "meta": None,
            "unit": "u",
            "unit_rows": 2,
        }
        for key, data in [("bomb", slivers["jpeg_1x65000"]), ("good", good)]
    ]
    out = decode_rows(rows, PreprocessingConfig())
    assert out["reason"][0] == "too_many_pixels"
    assert out["error"][0].startswith("too_many_pixels: 1x65000 resizes to 256x")
    assert out["error"][1] is None and np.array_equal(out["image"][1], decode_for_eval(good))
