"""Labeled datasets: every layout yields uint8 crops with the right class index."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile

import cloudpickle
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from skray.core.preprocessing import PreprocessingConfig
from skray.dev.testing import labeled_image, synthetic_image, write_labeled_folder
from skray.io.storage import write_bytes_atomic
from skray.label.read import read_and_decode
from skray.train.datasets import BAD_LABEL, DatasetError, discover, read_labeled

pytestmark = pytest.mark.timeout(60)

EVAL = PreprocessingConfig(image_size=48, crop_pct=1.0)


def read_all(data, train: bool = False) -> tuple[list[int], int]:
    units = pa.Table.from_pylist([u.to_row() for u in data.units])
    labels, images = [], 0
    for batch in read_labeled(units, data, 48, train, EVAL.model_dump(), {}, batch_size=8):
        assert batch["image"].dtype.name == "uint8" and batch["image"].shape[1:] == (3, 48, 48)
        labels += batch["label"].tolist()
        images += len(batch["image"])
    return sorted(labels), images


def test_what_ray_data_ships_of_a_dataset_unpickles_without_torch(tmp_path):
    """Ray Train's controller, dataset manager and split coordinators unpickle the dataset's
    plan: torch and torchvision would cost each of them seconds per run."""
    write_labeled_folder(str(tmp_path), classes=2, per_class=2)
    data = discover(str(tmp_path), "folder")
    shipped = cloudpickle.dumps((read_labeled, {"data": data, "eval_cfg": EVAL.model_dump()}))
    check = (
        "import pickle, sys; pickle.loads(sys.stdin.buffer.read()); "
        "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    )

    loaded = subprocess.run(
        [sys.executable, "-c", check], input=shipped, capture_output=True, check=True
    )

    assert loaded.stdout.decode().strip() == "[]"


def test_a_folder_dataset_labels_images_by_their_sorted_class_directory(tmp_path):
    write_labeled_folder(str(tmp_path), classes=3, per_class=4)
    (tmp_path / "class1" / "broken.png").write_bytes(b"nope")

    data = discover(str(tmp_path), "folder", files_per_unit=5)

    assert data.class_names == ("class0", "class1", "class2")
    assert read_all(data, train=True) == ([BAD_LABEL] + [0] * 4 + [1] * 4 + [2] * 4, 13)
    assert [u.rows for u in data.units] == [5, 5, 3]


def test_a_webdataset_dataset_takes_labels_from_cls_members_and_needs_its_classes(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(6):
            for ext, payload in (("png", labeled_image(i % 3, i)), ("cls", str(i % 3).encode())):
                info = tarfile.TarInfo(f"s{i}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    write_bytes_atomic(str(tmp_path / "shard-0.tar"), buf.getvalue())

    with pytest.raises(DatasetError, match="num_classes"):
        discover(str(tmp_path), "webdataset")
    data = discover(str(tmp_path), "webdataset", num_classes=3)

    assert read_all(data) == ([0, 0, 1, 1, 2, 2], 6)


def test_a_parquet_dataset_reads_a_label_column_of_names_or_indices(tmp_path):
    images = [labeled_image(i % 2, i) for i in range(4)]
    pq.write_table(
        pa.table({"image": images, "label": ["dog", "cat", "dog", "cat"]}),
        tmp_path / "named.parquet",
    )

    data = discover(str(tmp_path / "named.parquet"), "parquet")

    assert data.class_names == ("cat", "dog")
    assert read_all(data) == ([0, 0, 1, 1], 4)


def test_a_label_outside_the_classes_is_skipped_like_an_undecodable_image(tmp_path):
    pq.write_table(
        pa.table({"image": [labeled_image(0, 0)] * 2, "label": [0, 7]}), tmp_path / "t.parquet"
    )

    data = discover(str(tmp_path / "t.parquet"), "parquet", class_names=["a", "b"])

    assert read_all(data) == ([BAD_LABEL, 0], 2)


def test_an_empty_label_column_means_no_classes(tmp_path):
    pq.write_table(
        pa.table({"image": [labeled_image(0, 0)], "label": pa.array([None], pa.int64())}),
        tmp_path / "t.parquet",
    )

    with pytest.raises(DatasetError, match="no classes"):
        discover(str(tmp_path / "t.parquet"), "parquet")


def test_a_folder_label_comes_from_the_path_alone(tmp_path):
    write_labeled_folder(str(tmp_path), classes=2, per_class=1)
    data = discover(str(tmp_path), "folder")
    assert (
        data.label_of({"key": str(tmp_path / "class1" / "0000.png"), "meta": json.dumps({})}) == 1
    )


def test_evaluation_reads_and_crops_a_unit_exactly_as_labeling_does(tmp_path):
    write_labeled_folder(str(tmp_path), classes=2, per_class=2)
    write_bytes_atomic(
        str(tmp_path / "class0" / "big.jpg"), synthetic_image(0, (640, 480))
    )  # large: drafts
    (tmp_path / "class1" / "broken.png").write_bytes(b"nope")
    data = discover(str(tmp_path), "folder")
    units = pa.Table.from_pylist([u.to_row() for u in data.units])

    [evaluated] = read_labeled(units, data, 48, False, EVAL.model_dump(), {}, batch_size=8)
    [labeled] = read_and_decode(units, EVAL, 8, "image", None, max_object_bytes=2**20)

    assert np.array_equal(evaluated["image"], labeled["image"])
    assert [label == BAD_LABEL for label in evaluated["label"]] == [
        bool(e) for e in labeled["error"]
    ]
    assert sorted(evaluated["label"].tolist()) == [BAD_LABEL, 0, 0, 0, 1, 1]
