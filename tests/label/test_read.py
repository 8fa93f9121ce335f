"""skray.label.read, the read stage, without a Ray cluster: units read and decoded into crops."""

from __future__ import annotations

import pyarrow as pa
import pytest

from skray.dev.testing import synthetic_image, webdataset_shard
from skray.inference.classifier import PreprocessingConfig
from skray.io.sources import Unit
from skray.io.storage import write_bytes_atomic
from skray.label.read import read_and_decode

pytestmark = pytest.mark.timeout(60)


def test_read_and_decode_yields_crops_batch_by_batch_with_the_count_in_the_last(tmp_path):
    shard = str(tmp_path / "shard.tar")
    write_bytes_atomic(shard, webdataset_shard(0, 3))
    units = pa.Table.from_pylist([Unit("s", "webdataset", (shard,)).to_row()])
    preprocessing = PreprocessingConfig(image_size=32)

    batches = list(read_and_decode(units, preprocessing, 2, "image", None, max_object_bytes=10**6))

    assert [list(b["unit_rows"]) for b in batches] == [[-1, -1], [3]]
    assert batches[0]["image"].shape == (2, 3, 32, 32) and list(batches[1]["error"]) == [""]


def test_read_and_decode_keeps_a_read_error_and_types_a_decode_error_each_with_a_blank_crop(
    tmp_path,
):
    paths = [str(tmp_path / name) for name in ("big.jpg", "bad.png", "ok.jpg")]
    for path, data in zip(paths, [synthetic_image(0), b"nope", synthetic_image(1)]):
        write_bytes_atomic(path, data)
    units = pa.Table.from_pylist([Unit("u", "images", tuple(paths), 3, (10**6, 4, 10)).to_row()])

    [batch] = read_and_decode(
        units, PreprocessingConfig(image_size=32), 8, "image", None, max_object_bytes=10**5
    )

    assert [e.split(":")[0] for e in batch["error"]] == ["too_large", "not_an_image", ""]
    assert not batch["image"][:2].any() and batch["image"][2].any()
