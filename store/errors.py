"""The store's user-facing errors: each one line, saying what is wrong and what to do."""

from __future__ import annotations


class StoreError(Exception):
    """A problem with a capture store, worded for the user in one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class StoreNotFound(StoreError):
    """No capture store at the given path or URL."""


class SchemaVersionError(StoreError):
    """The store was written with a schema this code does not read (newer, or unknown)."""


class CorruptStore(StoreError):
    """The store's metadata cannot be read, or contradicts itself."""
