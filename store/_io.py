"""Synchronous access to a zarr store's keys for this package: get, set, delete, list, size.

zarr-python 3's Store API (`zarr.abc.store.Store`) is asynchronous, and zarr has no public
way to run it from synchronous code: its own runner, `zarr.core.sync`, is private. So this
module runs the Store coroutines on an event loop of its own, in a daemon thread started
on first use (a forked child starts its own).

The one care: a native async fsspec file system (s3fs, gcsfs, HTTP over aiohttp) binds
its session to the event loop it first runs on, and zarr does its own I/O on the same
store, so the same file system object, on zarr's loop. For an FsspecStore over such a
file system this module therefore uses a twin store: the same file system class, options
and root path, but a separate instance (fsspec's instance cache skipped) that only this
module's loop ever uses. LocalStore, MemoryStore and the file systems zarr wraps to make
them async (memory://, ...: fsspec's AsyncFileSystemWrapper runs them in threads) bind to
no loop and are used as they are; so is a Store of any other kind.

Public zarr API only: `zarr.abc.store`, `zarr.storage`, `zarr.buffer.cpu`.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from typing import Any, Awaitable, Callable, Iterable, TypeVar

import numpy as np
from zarr.abc.store import Store
from zarr.buffer.cpu import Buffer, buffer_prototype
from zarr.storage import FsspecStore

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None
_twins: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()  # fs -> twin fs


def _reset_after_fork() -> None:
    """In a forked child the loop's thread is gone (and a held lock stays held): start over."""
    global _lock, _loop, _thread, _twins
    _lock, _loop, _thread = threading.Lock(), None, None
    _twins = weakref.WeakKeyDictionary()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _get_loop() -> asyncio.AbstractEventLoop:
    global _loop, _thread
    loop = _loop
    if loop is not None:
        return loop
    with _lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="store-io", daemon=True)
            thread.start()
            _loop, _thread = loop, thread
        return _loop


def run(make: Callable[[], Awaitable[T]]) -> T:
    """make() on this module's loop (it makes the coroutine there), waited for; its result,
    or its exception raised here."""
    loop = _get_loop()
    if threading.current_thread() is _thread:
        raise RuntimeError("store I/O called from inside its own event loop")

    async def call() -> T:
        return await make()
    return asyncio.run_coroutine_threadsafe(call(), loop).result()


def io_store(store: Store) -> Store:
    """The store to run this module's I/O on: `store` itself, or for an FsspecStore on a
    loop-bound (native async) file system, its twin on a file system of this loop's own."""
    if not isinstance(store, FsspecStore):
        return store
    fs = store.fs
    try:
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper as Wrapped
    except ImportError:  # an fsspec without it: zarr cannot have wrapped this one either
        Wrapped = ()
    if not getattr(fs, "async_impl", False) or isinstance(fs, Wrapped):
        return store  # a sync file system zarr wrapped: runs in threads, binds to no loop
    with _lock:
        twin = _twins.get(fs)
        if twin is None:
            opts = {k: v for k, v in fs.storage_options.items() if k != "loop"}
            twin = type(fs)(*fs.storage_args, **{**opts, "asynchronous": True,
                                                  "skip_instance_cache": True})
            # keyed by both, so io_store(io_store(s)) is io_store(s); fsspec may call the
            # two equal (same token), which is fine: either key gives the twin
            _twins[fs] = twin
            _twins[twin] = twin
    return FsspecStore(fs=twin, path=store.path, read_only=store.read_only,
                       allowed_exceptions=store.allowed_exceptions)


def as_buffer(data: Any) -> Buffer:
    """Bytes, a bytes-like object or a numpy array as a zarr (CPU) Buffer, without a copy
    where it can."""
    if isinstance(data, np.ndarray):
        a = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    else:
        a = np.frombuffer(data, np.uint8)
    return Buffer.from_array_like(a)


def get_bytes(store: Store, key: str) -> bytes | None:
    """The value at `key`, or None when there is none."""
    s = io_store(store)
    buf = run(lambda: s.get(key, prototype=buffer_prototype))
    return None if buf is None else buf.to_bytes()


def set_bytes(store: Store, key: str, data: Any) -> None:
    s, buf = io_store(store), as_buffer(data)
    run(lambda: s.set(key, buf))


def delete(store: Store, keys: Iterable[str]) -> None:
    """Delete `keys`, concurrently."""
    s, keys = io_store(store), list(keys)

    async def drop() -> None:
        await asyncio.gather(*(s.delete(k) for k in keys))
    if keys:
        run(drop)


def delete_dir(store: Store, prefix: str) -> None:
    s = io_store(store)
    run(lambda: s.delete_dir(prefix))


def list_prefix(store: Store, prefix: str) -> list[str]:
    """Every key under `prefix` (a key prefix, e.g. "snapshots/")."""
    s = io_store(store)

    async def collect() -> list[str]:
        return [k async for k in s.list_prefix(prefix)]
    return run(collect)


def getsize_prefix(store: Store, prefix: str) -> int:
    s = io_store(store)
    return int(run(lambda: s.getsize_prefix(prefix)))
