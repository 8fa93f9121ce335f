"""What every way of finding an input's objects shares: the tables they stream, and the error
for an input that cannot be labeled at all."""

from __future__ import annotations

import pyarrow as pa

from skray.core.errors import SkrayError

# An input's objects, a table at a time: the full key (``s3://bucket/key`` or a local path) and
# the size in bytes the listing gave (null where it gave none).
LISTING_SCHEMA = pa.schema([("key", pa.string()), ("size", pa.int64())])


class InputError(SkrayError):
    """The input cannot be labeled at all (missing, empty, unreadable): fails the job early."""
