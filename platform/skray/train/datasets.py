"""Labeled image datasets for training and evaluation, streamed through Ray Data.

Three layouts, local or ``s3://``, read and decoded like the labeling job's input
(:mod:`skray.io.sources`, :mod:`skray.core.crops`) so every input path and bad-image rule is shared:

* ``folder``: ``ROOT/<class name>/<image>``, classes sorted by name;
* ``webdataset``: tar shards whose samples carry a ``.cls`` member (an index);
* ``parquet``: an image-bytes column and a label column (index or name).

Rows leave a read task as uint8 crops (random-resized for training, the eval
crop otherwise) with an int64 ``label``; an image that does not decode keeps a
blank crop and ``label = -1`` so that the training loop can count and skip it.

This module does not import torch: Ray Train's controller, its dataset manager and the
split coordinators unpickle the dataset's plan, and so import this module and whatever its
arguments are made of — torch and torchvision cost each of them seconds of CPU per run. The
decode step imports them where it runs, and the plan carries the eval preprocessing as plain
values.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import posixpath
import random
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from skray.io.retry import StorageUnavailable
from skray.io.sources import InputError, Unit, group_units, list_inputs, table_batches
from skray.io.sources.listing import is_hidden
from skray.io.sources.rows import incomplete_reason
from skray.io.sources.webdataset import BoundedTarInfo
from skray.io.storage import filesystem_for

if TYPE_CHECKING:
    from skray.core.preprocessing import PreprocessingConfig

DatasetFormat = Literal["folder", "webdataset", "parquet"]
BAD_LABEL = -1


class DatasetError(InputError):
    """A dataset that cannot be trained or evaluated on (no classes, an empty class...)."""


@dataclass(frozen=True)
class LabeledData:
    """What a labeled dataset holds: its units to read, its class names, where labels come from."""

    uri: str
    format: DatasetFormat
    units: tuple[Unit, ...]
    class_names: tuple[str, ...]
    label_column: str = "label"
    image_column: str = "image"

    @property
    def num_images(self) -> int | None:
        counts = [u.rows for u in self.units]
        return None if None in counts else sum(counts)

    @functools.cached_property
    def class_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.class_names)}

    def label_of(self, row: dict[str, Any]) -> int:
        """The class index of a row read by :func:`skray.io.sources.unit_batches`."""
        if self.format == "folder":
            return self.class_index[_relative(self.uri, row["key"]).split("/", 1)[0]]
        meta = json.loads(row["meta"]) if row["meta"] else {}
        value = meta.get("cls" if self.format == "webdataset" else self.label_column)
        if isinstance(value, str) and not value.lstrip("-").isdigit():
            return self.class_index[value]
        if value is None or not 0 <= int(value) < len(self.class_names):
            raise ValueError(f"label {value!r} out of range for {len(self.class_names)} classes")
        return int(value)


def _relative(root: str, uri: str) -> str:
    base = root.rstrip("/") + "/"
    return uri[len(base) :] if uri.startswith(base) else posixpath.basename(uri)


def _folder_classes(uri: str, files: list[str]) -> tuple[str, ...]:
    fs, path = filesystem_for(uri)
    dirs = [
        posixpath.basename(i.path)
        for i in fs.get_file_info(pafs.FileSelector(path))
        if i.type == pafs.FileType.Directory
        and not posixpath.basename(i.path).startswith((".", "_"))
    ]
    populated = {_relative(uri, f).split("/", 1)[0] for f in files if "/" in _relative(uri, f)}
    empty = sorted(set(dirs) - populated)
    if empty:
        raise DatasetError(f"class directory {uri.rstrip('/')}/{empty[0]} holds no images")
    if not populated:
        raise DatasetError(f"no classes in {uri}: a folder dataset is ROOT/<class name>/<image>")
    return tuple(sorted(populated))


def _parquet_classes(files: list[str], label_column: str) -> tuple[str, ...]:
    values: set = set()
    for uri in files:
        fs, path = filesystem_for(uri)
        values.update(
            pq.read_table(path, filesystem=fs, columns=[label_column]).column(0).to_pylist()
        )
    values.discard(None)
    if not values:
        raise DatasetError(f"no classes: the {label_column!r} column of {files[0]} is empty")
    if all(isinstance(v, int) for v in values):
        return tuple(f"class_{i}" for i in range(max(values) + 1))
    return tuple(sorted(str(v) for v in values))


def discover(
    uri: str,
    fmt: DatasetFormat = "folder",
    *,
    class_names: list[str] | None = None,
    num_classes: int | None = None,
    image_column: str = "image",
    label_column: str = "label",
    files_per_unit: int = 64,
) -> LabeledData:
    """List a labeled dataset and settle its classes, failing early with a clear message."""
    files = list_inputs(uri).keys  # images are one GET each: their sizes are not needed
    if fmt == "folder":
        # Listing order is class by class: a fixed shuffle makes every unit (and so every
        # streamed block, and batch) a mix of classes without a costly shuffle buffer.
        units = group_units(random.Random(0).sample(files, len(files)), "images", files_per_unit)
        names = tuple(class_names) if class_names else _folder_classes(uri, files)
    elif fmt == "webdataset":
        units = group_units(files, "webdataset", files_per_unit)
        if not class_names and not num_classes:
            raise DatasetError(
                "a webdataset dataset needs data.class_names or data.num_classes "
                "(its .cls members are indices)"
            )
        names = tuple(class_names or (f"class_{i}" for i in range(num_classes or 0)))
    else:
        units = group_units(files, "parquet", files_per_unit, (image_column, label_column))
        names = tuple(class_names) if class_names else _parquet_classes(files, label_column)
    return LabeledData(uri, fmt, tuple(units), names, label_column, image_column)


def count_tar_samples(uri: str) -> int:
    """The samples a WebDataset shard holds, as :func:`read_labeled` will yield them (members
    grouped by their key, hidden and directory entries left out), from the tar headers only:
    the reader seeks past every member's data. A shard that breaks off counts the samples
    before the break plus the one error row its reader yields there, an empty shard as one."""
    fs, path = filesystem_for(uri)
    count, current = 0, None
    with fs.open_input_file(path) as f:
        try:
            with tarfile.open(fileobj=f, mode="r:", tarinfo=BoundedTarInfo) as tar:
                for info in tar:
                    tar.members.clear()
                    if info.isdir() or is_hidden(info.name):
                        continue
                    dirname, basename = posixpath.split(info.name)
                    key = posixpath.join(dirname, basename.partition(".")[0])
                    if key != current:
                        count, current = count + 1, key
        except (tarfile.TarError, OSError, EOFError):
            count += 1
    return max(count, 1)  # an empty shard still yields one (error) row


def with_row_counts(data: LabeledData, threads: int = 32) -> LabeledData:
    """``data`` with every unit's row count known, so a training schedule can be laid out
    in steps: WebDataset shards are counted from their tar headers, in parallel (I/O bound,
    one thread per shard at a time); folder and Parquet units already carry theirs (file
    listing, Parquet footers). A Parquet file whose footer cannot be read counts as the one
    error row its reader yields."""
    unknown = [i for i, u in enumerate(data.units) if u.rows is None]
    if not unknown:
        return data
    units = list(data.units)
    if data.format == "webdataset":
        with ThreadPoolExecutor(max_workers=min(threads, len(unknown))) as pool:
            counts = list(pool.map(lambda i: count_tar_samples(units[i].uris[0]), unknown))
    else:
        counts = [1] * len(unknown)
    for i, rows in zip(unknown, counts):
        units[i] = dataclasses.replace(units[i], rows=rows)
    return dataclasses.replace(data, units=tuple(units))


def read_labeled(
    units: pa.Table,
    data: LabeledData,
    image_size: int,
    train: bool,
    eval_cfg: dict[str, Any],
    augment: dict[str, Any],
    batch_size: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data UDF: units -> batches of {image: uint8 (N, 3, S, S), label: int64}, read and
    decoded like the labeling job's (:func:`skray.core.crops.crop_rows`), with a random
    training crop or the eval crop of ``eval_cfg`` (a ``PreprocessingConfig``'s values). A row
    that does not read or decode is labeled BAD_LABEL; storage that keeps failing past its
    retry budget fails the task instead (Ray Data retries it; a transient fault never counts
    as a skipped image)."""
    from skray.core.augment import train_augment
    from skray.core.crops import crop_rows
    from skray.core.images import decode_for_eval, decode_for_train
    from skray.core.preprocessing import PreprocessingConfig

    eval_cfg = PreprocessingConfig.model_validate(eval_cfg)
    if train:
        crop = functools.partial(
            decode_for_train,
            augment=train_augment(image_size, **augment),
            max_pixels=eval_cfg.max_pixels,
        )
    else:
        crop = functools.partial(decode_for_eval, cfg=eval_cfg)
    meta_columns = (data.label_column,) if data.format == "parquet" else ()
    for rows in table_batches(
        units, batch_size, image_column=data.image_column, meta_columns=meta_columns
    ):
        if reason := incomplete_reason(rows[-1]["error"]):  # storage failed, not the image
            raise StorageUnavailable(rows[-1]["error"], reason)
        images, _, errors = crop_rows(rows, crop, image_size)
        labels = [
            BAD_LABEL if err else _label(data, row) for row, err in zip(rows, errors, strict=True)
        ]
        yield {"image": images, "label": np.array(labels, dtype=np.int64)}


def _label(data: LabeledData, row: dict[str, Any]) -> int:
    """The row's class index; BAD_LABEL for a label outside the classes, skipped like an
    undecodable image."""
    try:
        return data.label_of(row)
    except (ValueError, KeyError):
        return BAD_LABEL


def ray_dataset(
    data: LabeledData,
    *,
    image_size: int,
    train: bool,
    eval_cfg: PreprocessingConfig,
    augment: dict[str, Any] | None = None,
    batch_size: int = 64,
    num_cpus: float = 0.5,
):
    """The streaming Ray Dataset of a labeled dataset: nothing is materialized."""
    import ray.data

    ds = ray.data.from_items([u.to_row() for u in data.units], override_num_blocks=len(data.units))
    if train:
        ds = ds.randomize_block_order()
    return ds.map_batches(
        read_labeled,
        fn_kwargs={
            "data": data,
            "image_size": image_size,
            "train": train,
            "eval_cfg": eval_cfg.model_dump(),
            "augment": augment or {},
            "batch_size": batch_size,
        },
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=num_cpus,
    )
