"""The capture store: a run's activations in one Zarr v3 group (docs/store.md).

    from store.reader import RunStore      # lazy reader (dashboard, export)
    from store.writer import StoreWriter   # the trainer's capture writer
    from store.schema import Layout, SCHEMA_VERSION

numpy and zarr only: this package never imports torch (the dashboard loads it and must
start fast). `import store` itself loads neither zarr nor the reader until asked.
"""

from __future__ import annotations

from .errors import CorruptStore, SchemaVersionError, StoreError, StoreNotFound
from .schema import SCHEMA_VERSION, STATS, Layout

__all__ = ["SCHEMA_VERSION", "STATS", "Layout", "RunStore", "StoreWriter", "StoreError",
           "StoreNotFound", "SchemaVersionError", "CorruptStore"]


def __getattr__(name: str):
    if name == "RunStore":
        from .reader import RunStore
        return RunStore
    if name == "StoreWriter":
        from .writer import StoreWriter
        return StoreWriter
    raise AttributeError(f"module 'store' has no attribute {name!r}")
