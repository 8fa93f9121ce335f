"""Input discovery and reading for the labeling and training jobs, one module per format
as Ray Data keeps one datasource per file: :mod:`.listing` finds the inputs, :mod:`.units`
cuts them into units and streams a unit's rows (:mod:`.rows`) from :mod:`.files`,
:mod:`.webdataset` or :mod:`.parquet`; :mod:`.inventory` reads an S3 Inventory report in place
of a LIST. The names below are the API callers import."""

from skray.io.sources.inputs import LISTING_SCHEMA, InputError
from skray.io.sources.listing import (
    Format,
    Listing,
    file_format,
    list_inputs,
    listing_tables,
)
from skray.io.sources.parquet import PARQUET_BATCH_ROWS
from skray.io.sources.rows import DEFAULT_MAX_OBJECT_BYTES
from skray.io.sources.units import (
    UNIT_SCHEMA,
    Unit,
    group_units,
    shard_unit,
    table_batches,
    unit_batches,
    unit_id,
)
from skray.io.sources.webdataset import (
    DEFAULT_MAX_MEMBERS_PER_SAMPLE,
    DEFAULT_MAX_SAMPLE_BYTES,
    SampleLimits,
)

__all__ = [
    "LISTING_SCHEMA",
    "UNIT_SCHEMA",
    "DEFAULT_MAX_MEMBERS_PER_SAMPLE",
    "DEFAULT_MAX_OBJECT_BYTES",
    "DEFAULT_MAX_SAMPLE_BYTES",
    "PARQUET_BATCH_ROWS",
    "SampleLimits",
    "Format",
    "InputError",
    "Listing",
    "Unit",
    "file_format",
    "list_inputs",
    "listing_tables",
    "group_units",
    "shard_unit",
    "table_batches",
    "unit_batches",
    "unit_id",
]
