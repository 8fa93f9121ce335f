"""One streaming pass over a labeling output: counts, score histograms, failures and
per-label samples, in memory bounded by the number of labels, never by the number of rows.

Parts are read with only the columns needed, a few ahead on threads (S3 latency
overlaps), and folded in a record batch at a time: counts and histograms are summed
in numpy, and samples are the ``k`` smallest values of a sort key per label (a
random priority gives a uniform sample; the score gives the lowest-scoring rows),
merged batch by batch. Only the kept rows ever become Python objects.

A row with no error and no label is *low confidence* (the model abstained under
``min_score``); those rows form a stratum of their own, under the label ``None``.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from skray.core.concurrency import ordered_map
from skray.io.storage import redact_uri
from skray.label.sinks import LABEL_SCHEMA, OutputError, part_paths, reason_codes

SCORE_BINS = 50  # histogram bins over [0, 1]
BATCH_ROWS = 65_536  # rows folded in at a time
READ_AHEAD = 8  # parts read at once: memory is this many parts' needed columns
FAILURE_EXAMPLES = 5  # example keys kept per failure reason
BASE_COLUMNS = ("key", "label", "score", "reason", "error")


def smallest_per_group(
    groups: np.ndarray, values: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the ``k`` smallest ``values`` within each group, and their rank there
    (0 = smallest), ordered by group then value; ties keep their order."""
    order = np.lexsort((values, groups))
    ordered = groups[order]
    starts = np.zeros(len(order), dtype=np.int64)
    boundaries = np.flatnonzero(ordered[1:] != ordered[:-1]) + 1
    starts[boundaries] = boundaries
    rank = np.arange(len(order)) - np.maximum.accumulate(starts)
    keep = rank < k
    return order[keep], rank[keep]


@dataclass
class _Sample:
    """The ``k`` rows per label with the smallest ``_order`` seen so far."""

    k: int
    rows: pa.Table | None = None

    def add(self, rows: pa.Table) -> None:
        if self.k <= 0 or rows.num_rows == 0:
            return
        rows = rows if self.rows is None else pa.concat_tables([self.rows, rows])
        keep, _ = smallest_per_group(
            rows.column("_group").to_numpy(), rows.column("_order").to_numpy(), self.k
        )
        self.rows = rows.take(keep)


@dataclass
class Scan:
    """What one pass over an output found. Label index ``i`` is ``labels[i]``."""

    parts: int = 0
    rows: int = 0
    failed: int = 0
    labels: list[str | None] = field(default_factory=list)
    label_counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    score_hist: np.ndarray = field(default_factory=lambda: np.zeros((0, SCORE_BINS), np.int64))
    failures: collections.Counter = field(default_factory=collections.Counter)
    failure_examples: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    random: pa.Table | None = None  # up to k random rows per label
    lowest: pa.Table | None = None  # the k lowest-scoring rows per label

    @property
    def low_confidence(self) -> int:
        return int(self.label_counts[self.labels.index(None)]) if None in self.labels else 0

    @property
    def labeled(self) -> int:
        return self.rows - self.failed - self.low_confidence

    def top_labels(self, n: int) -> list[tuple[str, int]]:
        """(label, count), most frequent first, ties by label; abstentions left out."""
        pairs = [
            (label, int(c)) for label, c in zip(self.labels, self.label_counts) if label is not None
        ]
        return sorted(pairs, key=lambda pair: (-pair[1], pair[0]))[:n]

    def histogram(self, label: str | None) -> np.ndarray:
        """Score counts per bin of one label (``None``: low confidence)."""
        return self.score_hist[self.labels.index(label)]

    def rows_of(self, table: pa.Table | None, label: str | None) -> list[dict]:
        """The kept rows of one label, by ascending sort key."""
        if table is None or label not in self.labels:
            return []
        picked = table.filter(pc.equal(table.column("_group"), self.labels.index(label)))
        return picked.sort_by("_order").to_pylist()


class _Folder:
    """Folds record batches into a :class:`Scan`."""

    def __init__(self, random_k: int, lowest_k: int, keep: tuple[str, ...], seed: int) -> None:
        self.scan = Scan()
        self.index: dict[str | None, int] = {}
        self.random, self.lowest = _Sample(random_k), _Sample(lowest_k)
        self.keep = keep
        self.rng = np.random.default_rng(seed)

    def _codes(self, labels: pa.Array) -> np.ndarray:
        """Each row's label index, new labels appended (nulls are the ``None`` stratum)."""
        encoded = pc.dictionary_encode(labels, null_encoding="encode")
        lookup = np.array([self._label_index(v) for v in encoded.dictionary.to_pylist()], np.int64)
        return (
            lookup[encoded.indices.to_numpy(zero_copy_only=False)]
            if len(lookup)
            else np.zeros(0, np.int64)
        )

    def _label_index(self, label: str | None) -> int:
        if label not in self.index:
            self.index[label] = len(self.scan.labels)
            self.scan.labels.append(label)
        return self.index[label]

    def add(self, batch: pa.Table) -> None:
        scan = self.scan
        scan.rows += batch.num_rows
        errors = batch.column("error")
        self._add_failures(batch.filter(pc.is_valid(errors)))
        ok = batch.filter(pc.is_null(errors))
        if ok.num_rows == 0:
            return
        codes = self._codes(ok.column("label").combine_chunks())
        n = len(scan.labels)
        scan.label_counts = np.pad(scan.label_counts, (0, n - len(scan.label_counts)))
        scan.label_counts += np.bincount(codes, minlength=n)
        scores = ok.column("score").fill_null(np.nan).to_numpy().astype(np.float64)
        valid = ~np.isnan(scores)
        bins = np.clip((scores[valid] * SCORE_BINS).astype(np.int64), 0, SCORE_BINS - 1)
        scan.score_hist = np.pad(scan.score_hist, ((0, n - len(scan.score_hist)), (0, 0)))
        scan.score_hist += np.bincount(
            codes[valid] * SCORE_BINS + bins, minlength=n * SCORE_BINS
        ).reshape(n, SCORE_BINS)
        rows = ok.select(["key", "label", "score", *self.keep]).append_column(
            "_group", pa.array(codes)
        )
        self.random.add(rows.append_column("_order", pa.array(self.rng.random(len(codes)))))
        self.lowest.add(rows.append_column("_order", pa.array(np.where(valid, scores, np.inf))))

    def _add_failures(self, failed: pa.Table) -> None:
        if failed.num_rows == 0:
            return
        scan = self.scan
        scan.failed += failed.num_rows
        reasons = reason_codes(failed)
        counts = pc.value_counts(reasons)
        for reason, count in zip(
            counts.field("values").to_pylist(), counts.field("counts").to_pylist()
        ):
            scan.failures[reason] += count
            examples = scan.failure_examples.setdefault(reason, [])
            if len(examples) < FAILURE_EXAMPLES:
                picked = failed.filter(pc.equal(reasons, reason)).slice(
                    0, FAILURE_EXAMPLES - len(examples)
                )
                examples += zip(
                    picked.column("key").to_pylist(), picked.column("error").to_pylist()
                )

    def finish(self) -> Scan:
        self.scan.random, self.scan.lowest = self.random.rows, self.lowest.rows
        return self.scan


def scan_output(
    output: str, random_k: int = 0, lowest_k: int = 0, keep: Iterable[str] = (), seed: int = 0
) -> Scan:
    """One pass over every committed part of ``output``: counts, histograms, failures,
    ``random_k`` random and the ``lowest_k`` lowest-scoring rows per label (with the
    ``keep`` columns besides key, label and score). Deterministic in ``seed``. An output
    with no committed part raises :class:`OutputError` (a wrong path, most likely)."""
    fs, paths = part_paths(output)
    if not paths:
        raise OutputError(f"no labeling output at {redact_uri(output)}: no committed part")
    keep = tuple(keep)
    columns = [*BASE_COLUMNS, *keep]
    folder = _Folder(random_k, lowest_k, keep, seed)

    def read(path: str) -> pa.Table:
        # By the schema: a part of an earlier version, with no reason column, reads as nulls.
        return pq.read_table(path, columns=columns, filesystem=fs, schema=LABEL_SCHEMA)

    for table in ordered_map(read, paths, READ_AHEAD):
        folder.scan.parts += 1
        for start in range(0, table.num_rows, BATCH_ROWS):
            folder.add(table.slice(start, BATCH_ROWS))
    return folder.finish()
