"""store/_io.py (synchronous store I/O on a loop of its own) and the writer's own chunk
encoding: the writer encodes chunks itself wherever it should, under the keys zarr reads,
and an fsspec file system bound to one event loop (as s3fs and gcsfs are) keeps working
although zarr does its own I/O on its own loop."""

from __future__ import annotations

import asyncio
import threading

import fsspec
import numpy as np
import pytest
import zarr
from fsspec.asyn import AsyncFileSystem

import store_util as u
from store import _io
from store._chunks import ChunkCodec
from store._common import array_meta, open_store
from store.reader import RunStore
from store.writer import StoreWriter


class LoopBoundFS(AsyncFileSystem):
    """An in-memory async file system that, like s3fs on aiohttp, belongs to the event loop
    it first ran on: used from any other loop it raises."""

    protocol = "loopbound"
    files: dict[str, bytes] = {}
    lock = threading.Lock()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._bound = None

    async def _check(self) -> None:
        loop = asyncio.get_running_loop()
        if self._bound is None:
            self._bound = loop
        elif self._bound is not loop:
            raise RuntimeError("LoopBoundFS used from a different event loop")
        await asyncio.sleep(0)

    def _under(self, path: str) -> list[str]:
        path = self._strip_protocol(path)
        with self.lock:
            return sorted(k for k in self.files if k == path or k.startswith(path + "/"))

    async def _cat_file(self, path, start=None, end=None, **kw):
        await self._check()
        try:
            return self.files[self._strip_protocol(path)][start:end]
        except KeyError:
            raise FileNotFoundError(path) from None

    async def _cat_ranges(self, paths, starts, ends, **kw):
        return [await self._cat_file(p, s, e) for p, s, e in zip(paths, starts, ends)]

    async def _pipe_file(self, path, value, **kw):
        await self._check()
        with self.lock:
            self.files[self._strip_protocol(path)] = bytes(value)

    async def _rm(self, path, recursive=False, **kw):
        await self._check()
        paths = path if isinstance(path, list) else [path]
        gone = [k for p in paths for k in (self._under(p) if recursive
                                           else [self._strip_protocol(p)])]
        with self.lock:
            if not any(k in self.files for k in gone):
                raise FileNotFoundError(path)
            for k in gone:
                self.files.pop(k, None)

    async def _find(self, path, maxdepth=None, withdirs=False, detail=False, **kw):
        await self._check()
        return self._under(path)

    async def _ls(self, path, detail=False, **kw):
        await self._check()
        path = self._strip_protocol(path)
        kids = sorted({f"{path}/{k[len(path) + 1:].split('/')[0]}" for k in self._under(path)
                       if k != path})
        if not kids:
            raise FileNotFoundError(path)
        return kids

    async def _info(self, path, **kw):
        await self._check()
        path = self._strip_protocol(path)
        with self.lock:
            if path in self.files:
                return {"name": path, "size": len(self.files[path]), "type": "file"}
        if self._under(path):
            return {"name": path, "size": 0, "type": "directory"}
        raise FileNotFoundError(path)

    async def _exists(self, path, **kw):
        await self._check()
        return bool(self._under(path))


fsspec.register_implementation("loopbound", LoopBoundFS, clobber=True)


def _writers(url, world=2):
    return [StoreWriter.open(url) for _ in range(world)]


def test_a_loop_bound_fsspec_file_system(monkeypatch):
    """Writer, reader, snapshots, rollback and sizes on a file system that belongs to one
    event loop: zarr's calls run on zarr's loop, this package's on a twin of its own."""
    url = "loopbound://runs/s.zarr"
    w = StoreWriter.create_or_open(url, u.layout())
    ws = [w, StoreWriter.open(url)]
    u.append(ws, 0, 3)
    u.append(ws, 1, 6, full=False)
    w.write_snapshot(6, {"model.safetensors": b"weights", "config.json": b"{}"})
    rs = RunStore(url)
    assert rs.steps().tolist() == [3, 6] and rs.snapshot_steps() == [6]
    u.check_capture(rs, 3)
    u.check_capture(rs, 6, full=False)
    assert rs.snapshot_file(6) == b"weights"
    assert all(a["bytes_stored"] for a in rs.arrays() if a["path"].startswith("acts/"))
    assert w.rollback_after(3) == [1]
    assert rs.steps().tolist() == [3] and rs.snapshot_steps() == []
    assert isinstance(w._sink.store.fs, LoopBoundFS)
    assert w._sink.store.fs is not w._store.fs  # the twin: this package's loop only

    # the test has teeth: the same store, without the twin, is used from two loops
    monkeypatch.setattr(_io, "io_store", lambda s: s)
    with pytest.raises(RuntimeError, match="different event loop"):
        StoreWriter.create_or_open("loopbound://runs/other.zarr", u.layout())


@pytest.mark.parametrize("kind", ["local", "file", "memory"])
def test_the_writer_encodes_its_own_chunks_under_zarrs_keys(tmp_path, kind):
    url = {"local": str(tmp_path / "s.zarr"), "file": f"file://{tmp_path}/f.zarr",
           "memory": f"memory://runs/{tmp_path.name}.zarr"}[kind]
    w = StoreWriter.create_or_open(url, u.layout())
    hook = next(iter(u.HOOKS))
    for path in (f"acts/{hook}", f"stats/{hook}/mean", "captures/step", "inputs/tokens",
                 "captures/done"):
        assert w._codec(path) is not None, path  # the fast path, not zarr's setitem
    assert w._codec(f"acts/{hook}").encode_key((1, 2, 0, 0)) == "c.1.2.0.0"
    ws = [w, StoreWriter.open(url)]
    u.append(ws, 0, 4)
    u.check_capture(RunStore(url), 4)
    g = zarr.open_group(url, mode="r")  # plain zarr reads what the writer encoded
    np.testing.assert_array_equal(g[f"acts/{hook}"][0], u.acts(4, hook, range(u.P)))


def test_chunk_codec_of_other_arrays(tmp_path):
    """Only bytes [+ zstd] with keys it can form; then its keys are zarr's own."""
    store = open_store(str(tmp_path / "z.zarr"), None, read_only=False)
    made = {
        "slash": dict(chunk_key_encoding={"name": "default", "configuration":
                                          {"separator": "/"}}),
        "v2": dict(chunk_key_encoding={"name": "v2", "configuration": {"separator": "."}}),
        "zstd": dict(compressors=zarr.codecs.ZstdCodec(level=3, checksum=True)),
        "blosc": dict(compressors=zarr.codecs.BloscCodec()),
        "big": dict(serializer=zarr.codecs.BytesCodec(endian="big"), compressors=None),
        "sharded": dict(shards=(4, 4)),
    }
    for name, kw in made.items():
        arr = zarr.create_array(store=store, name=name, shape=(8, 8), chunks=(2, 2),
                                dtype="float32", fill_value=np.nan, zarr_format=3,
                                **{"compressors": None, **kw})
        codec = ChunkCodec.of(arr, array_meta(store, name))
        if name in ("blosc", "big", "sharded"):
            assert codec is None, name
            continue
        assert codec is not None, name
        block = np.arange(4, dtype=np.float32).reshape(2, 2) + 1
        key = f"{name}/{codec.encode_key((1, 3))}"
        _io.set_bytes(store, key, codec.encode(block))
        np.testing.assert_array_equal(zarr.open_array(store=store, path=name)[2:4, 6:8], block)
        np.testing.assert_array_equal(codec.decode(_io.get_bytes(store, key)), block)
    assert ChunkCodec.of(arr, None) is None


def test_io_runs_from_threads_and_after_fork(tmp_path):
    store = open_store(str(tmp_path / "t.zarr"), None, read_only=False)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda i: _io.set_bytes(store, f"k/{i}", str(i).encode()), range(64)))
    assert sorted(_io.list_prefix(store, "k/")) == sorted(f"k/{i}" for i in range(64))
    _io.delete(store, [f"k/{i}" for i in range(32)])
    assert len(_io.list_prefix(store, "k/")) == 32 and _io.get_bytes(store, "k/0") is None
    assert _io.getsize_prefix(store, "k/") == sum(len(str(i)) for i in range(32, 64))
    r = u.run_py("import os, sys; from store import _io; from store._common import open_store; "
                 f"s = open_store({str(tmp_path / 't.zarr')!r}, None, read_only=True); "
                 "_io.get_bytes(s, 'k/40'); pid = os.fork()\n"
                 "if pid == 0:\n"
                 "    os._exit(0 if _io.get_bytes(s, 'k/40') == b'40' else 1)\n"
                 "sys.exit(os.waitpid(pid, 0)[1] >> 8)")
    assert r.wait(timeout=60) == 0
