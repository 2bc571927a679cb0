"""What the writer and the reader share: opening a store from a path or URL, reading the
root metadata with one-line errors, and a few zarr helpers. numpy and zarr only."""

from __future__ import annotations

import ctypes
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore

from ._io import get_bytes
from .errors import CorruptStore, SchemaVersionError, StoreError, StoreNotFound
from .schema import RESERVED_ATTRS, SCHEMA_VERSION, Layout

KEY_ENCODING = {"name": "default", "configuration": {"separator": "."}}
LOCAL_PROTOCOLS = ("file", "local")


def url_str(url: Any) -> str:
    if isinstance(url, Store):
        return str(url)
    return os.fspath(url) if isinstance(url, os.PathLike) else str(url)


def local_path(url: Any) -> Path | None:
    """The directory of a local store (a plain path or a file:// URL), else None."""
    if isinstance(url, LocalStore):
        return Path(url.root)
    if isinstance(url, Store):
        return None
    s = url_str(url)
    if "://" not in s:
        return Path(s).expanduser()
    proto, rest = s.split("://", 1)
    if proto in LOCAL_PROTOCOLS:
        return Path(rest).expanduser()
    return None


def open_store(url: Any, storage_options: dict | None, read_only: bool) -> Store:
    """A zarr store for `url`: local paths and file:// URLs get zarr's LocalStore (atomic
    temp-file-and-rename writes), other URLs zarr's FsspecStore (s3://, gs://, memory://...).
    A zarr Store object is used as it is (tests and benchmarks wrap stores)."""
    if isinstance(url, Store):
        return url
    path = local_path(url)
    if path is not None:
        if read_only and not path.is_dir():
            raise StoreNotFound(f"no capture store at {url_str(url)}: no such directory "
                                f"(a run's store is RUN/capture.zarr)")
        if not read_only:
            path.mkdir(parents=True, exist_ok=True)
        return LocalStore(path, read_only=read_only)
    try:
        return FsspecStore.from_url(url_str(url), storage_options=storage_options,
                                    read_only=read_only)
    except (ImportError, ValueError, TypeError, OSError) as e:
        raise StoreError(f"cannot open store URL {url_str(url)}: {type(e).__name__}: {e}; "
                         f"check the URL and storage_options (is its fsspec backend "
                         f"installed?)") from None


def read_root(store: Store, url: str) -> dict:
    """The root group's attributes, checked: StoreNotFound / CorruptStore /
    SchemaVersionError, each one line."""
    try:
        raw = get_bytes(store, "zarr.json")
    except FileNotFoundError:
        raw = None
    except OSError as e:
        raise CorruptStore(f"cannot read store {url}: {type(e).__name__}: {e}") from None
    if raw is None:
        raise StoreNotFound(f"no capture store at {url}: no zarr.json there (a run's store is "
                            f"RUN/capture.zarr; is the path right?)")
    try:
        meta = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptStore(f"store {url} is corrupt: its zarr.json is not valid JSON ({e}); "
                           f"restore it from a backup or re-run the capture") from None
    if not isinstance(meta, dict):
        meta = {"zarr_format": "?", "node_type": type(meta).__name__}
    if meta.get("node_type") != "group" or meta.get("zarr_format") != 3:
        raise CorruptStore(f"store {url} is not a Zarr v3 group (its zarr.json says "
                           f"zarr_format={meta.get('zarr_format')}, "
                           f"node_type={meta.get('node_type')})")
    attrs = meta.get("attributes") or {}
    if not isinstance(attrs, dict) or "schema_version" not in attrs:
        raise CorruptStore(f"{url} is a zarr group but not a capture store: its attributes have "
                           f"no schema_version (an unfinished create? start the run again)")
    v = attrs["schema_version"]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise CorruptStore(f"store {url} is corrupt: schema_version is {v!r}, not a positive "
                           f"integer")
    if v > SCHEMA_VERSION:
        raise SchemaVersionError(f"store {url} has schema version {v}, newer than this code "
                                 f"reads (version {SCHEMA_VERSION}): upgrade this project "
                                 f"(git pull / pip install -U) to read it")
    if v < SCHEMA_VERSION:
        raise SchemaVersionError(f"store {url} has schema version {v}, older than this code "
                                 f"reads (version {SCHEMA_VERSION}): convert it in place with "
                                 f"`python -m store.upgrade {url}`")
    return attrs


def layout_of(attrs: dict, url: str) -> Layout:
    try:
        return Layout.from_json(attrs["layout"], {k: v for k, v in attrs.items()
                                                  if k not in RESERVED_ATTRS})
    except (KeyError, TypeError, ValueError, AttributeError, StoreError) as e:
        raise CorruptStore(f"store {url} is corrupt: its layout attribute cannot be read "
                           f"({type(e).__name__}: {e})") from None


def open_array(store: Store, path: str, mode: str) -> zarr.Array:
    return zarr.open_array(store=store, path=path, mode=mode, zarr_format=3)


def array_meta(store: Store, path: str) -> dict | None:
    """The array `path`'s zarr.json as a dict (the Zarr v3 spec's document), or None when
    it is missing or not a JSON object."""
    raw = get_bytes(store, f"{path}/zarr.json")
    try:
        meta = json.loads(raw) if raw is not None else None
    except (UnicodeDecodeError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


_libc = None


def syncfs(path: Path) -> None:
    """Flush the file system holding `path` to stable storage (Linux syncfs, else fsync of
    the directory). Data and renames written before it survive a power loss."""
    global _libc
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            if _libc is None:
                _libc = ctypes.CDLL(None, use_errno=True)
            if _libc.syncfs(fd) == 0:
                return
        except (OSError, AttributeError):
            pass
        os.sync()
    finally:
        os.close(fd)


def as_array(x: Any, dtype: str, shape: tuple[int, ...], what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.shape != shape:
        raise StoreError(f"{what}: expected shape {list(shape)}, got {list(a.shape)}")
    return np.ascontiguousarray(a, dtype=dtype)
