"""Whole-chunk I/O for the writer: encode a chunk as zarr would (bytes codec, optionally
zstd), and put it into the store several at a time.

zarr-python's own write path costs a few milliseconds per chunk in event-loop hops and
codec plumbing (benchmarks/store_write.py: a plain one-chunk-at-a-time loop reaches about a
fifth of numpy.tofile's speed here). Our arrays use two codec chains only, `bytes` and
`bytes, zstd`, whose encoded chunk is the chunk's C-order little-endian bytes, zstd-framed
or not, so the writer encodes whole chunks itself and writes them like zarr's LocalStore
does (temporary file, then rename: a reader sees the old chunk or the new one) from a small
thread pool; for other URLs through the zarr store's own `set`. An array with any other
codec falls back to zarr's own setitem. Reading back is zarr's business (tests check it).

What a chunk is called and how it is encoded is read from the array's own zarr.json (the
Zarr v3 spec's document: `codecs`, `chunk_key_encoding`, `chunk_grid`), not from
zarr-python's metadata classes (zarr.core, private).
"""

from __future__ import annotations

import os
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import zarr
from numcodecs.zstd import Zstd  # what zarr's ZstdCodec itself encodes with
from zarr.abc.store import Store
from zarr.storage import LocalStore

from ._io import get_bytes, io_store, set_bytes


def chunk_key_encoder(meta: dict) -> Callable[[tuple[int, ...]], str] | None:
    """The array's chunk key function (chunk coords -> key under the array), from its
    zarr.json's chunk_key_encoding: the spec's `default` ("c" + sep + coords) and `v2`
    (coords, "0" for a 0-d array) encodings; None for any other."""
    enc = meta.get("chunk_key_encoding")
    if isinstance(enc, str):
        enc = {"name": enc}
    if not isinstance(enc, dict):
        return None
    name, conf = enc.get("name"), enc.get("configuration") or {}
    if name == "default":
        sep = conf.get("separator", "/")
        if sep not in ("/", "."):
            return None
        return lambda coords: "c" + "".join(f"{sep}{int(c)}" for c in coords)
    if name == "v2":
        sep = conf.get("separator", ".")
        if sep not in ("/", "."):
            return None
        return lambda coords: sep.join(str(int(c)) for c in coords) or "0"
    return None


class ChunkCodec:
    """Encodes/decodes whole chunks of an array whose codecs are `bytes` [+ `zstd`]."""

    def __init__(self, arr: zarr.Array, zstd: Zstd | None,
                 encode_key: Callable[[tuple[int, ...]], str]):
        self.shape = tuple(arr.chunks)
        self.dtype = np.dtype(arr.dtype).newbyteorder("<")
        self.fill = arr.fill_value
        self.zstd = zstd
        self.encode_key = encode_key

    @classmethod
    def of(cls, arr: zarr.Array, meta: dict | None) -> "ChunkCodec | None":
        """The codec of `arr`, whose zarr.json is `meta`, or None when its chunks are not
        ours to encode (other codecs, chunk keys, grid, or a big-endian machine)."""
        if sys.byteorder != "little" or not isinstance(meta, dict) \
                or meta.get("zarr_format") != 3 or meta.get("node_type") != "array" \
                or meta.get("storage_transformers"):
            return None
        grid = meta.get("chunk_grid")
        if not isinstance(grid, dict) or grid.get("name") != "regular" or \
                list((grid.get("configuration") or {}).get("chunk_shape") or []) \
                != list(arr.chunks):
            return None
        encode_key = chunk_key_encoder(meta)
        codecs = [c if isinstance(c, dict) else {"name": c} for c in meta.get("codecs") or []]
        if encode_key is None or not codecs or codecs[0].get("name") != "bytes":
            return None
        if (codecs[0].get("configuration") or {}).get("endian", "little") != "little":
            return None
        if len(codecs) == 1:
            return cls(arr, None, encode_key)
        if len(codecs) == 2 and codecs[1].get("name") == "zstd":
            conf = codecs[1].get("configuration") or {}
            return cls(arr, Zstd.from_config({"level": int(conf.get("level", 0)),
                                              "checksum": bool(conf.get("checksum", False))}),
                       encode_key)
        return None

    def empty(self) -> np.ndarray:
        return np.full(self.shape, self.fill, self.dtype)

    def encode(self, block: np.ndarray) -> Any:
        if block.shape != self.shape:
            raise ValueError(f"chunk block {block.shape} is not the chunk shape {self.shape}")
        raw = np.ascontiguousarray(block, dtype=self.dtype)
        return raw if self.zstd is None else self.zstd.encode(raw)

    def decode(self, data: bytes | None) -> np.ndarray:
        if data is None:
            return self.empty()
        raw = data if self.zstd is None else self.zstd.decode(data)
        return np.frombuffer(raw, self.dtype).reshape(self.shape).copy()


class LocalSink:
    """Chunk files under a local directory: read, and write by temp file + rename."""

    def __init__(self, root: Path, threads: int):
        self.root, self.threads = str(root), max(1, threads)
        self._dirs: set[str] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        try:
            with open(os.path.join(self.root, key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def put(self, key: str, data: Any) -> None:
        path = os.path.join(self.root, key)
        d = os.path.dirname(path)
        if d not in self._dirs:
            os.makedirs(d, exist_ok=True)
            self._dirs.add(d)
        tmp = f"{path}.{uuid.uuid4().hex[:16]}.partial"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def map(self, fn: Callable[[Any], None], items: Iterable[Any]) -> None:
        """fn(item) for every item, `threads` at a time; the first error is raised."""
        items = list(items)
        if len(items) <= 1 or self.threads == 1:
            for it in items:
                fn(it)
            return
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="store-write")
        futures = [self._pool.submit(fn, it) for it in items]
        for fut in futures:
            fut.result()

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None


class RemoteSink(LocalSink):
    """Chunks through a zarr store's own async get/set (fsspec URLs: s3://, gs://, ...),
    run by store/_io.py."""

    def __init__(self, store: Store, threads: int):
        super().__init__(Path("."), threads)
        self.store = io_store(store)

    def get(self, key: str) -> bytes | None:
        return get_bytes(self.store, key)

    def put(self, key: str, data: Any) -> None:
        set_bytes(self.store, key, data)


def make_sink(store: Store, threads: int) -> LocalSink:
    if isinstance(store, LocalStore):
        return LocalSink(Path(store.root), threads)
    return RemoteSink(store, max(threads, 8))  # object stores: latency, not disk, bounds it
