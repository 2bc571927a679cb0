"""StoreWriter: creates a run's store, writes captures chunk-aligned per rank, commits them.

Commit protocol (docs/store.md): every rank writes its chunks of slot c, then
mark_done(c, rank); rank 0 commits (captures/step[c] = step) only once all_done(c).
Readers see a slot only when captures/step[c] != -1, so a crash at any point leaves a torn
capture invisible. numpy and zarr only: no torch here.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import BytesCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from ._common import (KEY_ENCODING, as_array, layout_of, now_iso, open_array,
                      open_store, read_root, syncfs, url_str)
from .errors import StoreError, StoreNotFound
from .schema import (METRICS, RESERVED_ATTRS, SCHEMA_VERSION, STATS, STATUSES, ArraySpec,
                     Layout)

# Threads writing the chunks of one write_acts call to a local disk (benchmarks/store_write.py
# measured 2 best on 2 cores; more threads only contend). STORE_WRITE_THREADS overrides.
DEFAULT_THREADS = int(os.environ.get("STORE_WRITE_THREADS", "2"))


# ----------------------------------------------------------------------------- chunk sinks

class _LocalSink:
    """Whole encoded chunks straight to files: temp file + rename, like zarr's LocalStore
    (readers see the old chunk or the new one, never half of one), several at a time."""

    def __init__(self, root: Path, threads: int):
        self.root, self.threads = str(root), max(1, threads)
        self._dirs: set[str] = set()
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def _put(self, key: str, buf: Any) -> None:
        path = os.path.join(self.root, key)
        d = os.path.dirname(path)
        if d not in self._dirs:
            os.makedirs(d, exist_ok=True)
            self._dirs.add(d)
        tmp = f"{path}.{uuid.uuid4().hex[:16]}.partial"
        try:
            with open(tmp, "wb") as f:
                f.write(buf)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def put_many(self, items: list[tuple[str, np.ndarray]]) -> None:
        if len(items) == 1 or self.threads == 1:
            for k, b in items:
                self._put(k, b)
            return
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="store-write")
        for fut in [self._pool.submit(self._put, k, b) for k, b in items]:
            fut.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class _StoreSink:
    """Whole encoded chunks through the zarr store's own async set (fsspec URLs), as many at
    a time as zarr's `async.concurrency` allows."""

    def __init__(self, store: Store):
        self.store = store

    def put_many(self, items: list[tuple[str, np.ndarray]]) -> None:
        proto = default_buffer_prototype()
        limit = int(zarr.config.get("async.concurrency") or 10)

        async def go() -> None:
            sem = asyncio.Semaphore(limit)

            async def one(key: str, a: np.ndarray) -> None:
                async with sem:
                    await self.store.set(key, proto.buffer.from_array_like(
                        a.reshape(-1).view(np.uint8)))

            await asyncio.gather(*(one(k, b) for k, b in items))

        sync(go())

    def close(self) -> None:
        pass


def _raw_chunks(arr: zarr.Array) -> bool:
    """Whether a chunk of `arr` is its C-order little-endian bytes (no compressor)."""
    codecs = arr.metadata.codecs
    return (sys.byteorder == "little" and len(codecs) == 1 and isinstance(codecs[0], BytesCodec)
            and (codecs[0].endian is None or codecs[0].endian.value == "little"))


# ----------------------------------------------------------------------------- the writer

class StoreWriter:
    """Writes one run's store. Rank 0: create_or_open; the other ranks: open."""

    def __init__(self, store: Store, url: str, attrs: dict, durable: bool = True,
                 threads: int | None = None):
        self._store, self.url = store, url
        self.layout = layout_of(attrs, url)
        self._arrays: dict[str, zarr.Array] = {}
        self._lock = threading.Lock()
        self._local = Path(store.root) if isinstance(store, LocalStore) else None
        self._durable = bool(durable) and self._local is not None
        threads = DEFAULT_THREADS if threads is None else threads
        self._sink = _LocalSink(self._local, threads) if self._local is not None \
            else _StoreSink(store)
        self._sched = np.asarray(self.layout.scheduled_steps, np.int64)

    # ------------------------------------------------------------------ opening

    @classmethod
    def create_or_open(cls, url: str, layout: Layout, storage_options: dict | None = None, *,
                       durable: bool = True, threads: int | None = None) -> "StoreWriter":
        """Rank 0 only. A new store: create the group and preallocate every array. An
        existing one (a resumed run): check it matches `layout`, extend the capture axis and
        the metrics if the schedule or max_steps grew, reset the done flags if `world`
        changed. Nothing is resized anywhere else."""
        layout.validate()
        u = url_str(url)
        store = open_store(url, storage_options, read_only=False)
        try:
            attrs = read_root(store, u)
        except StoreNotFound:
            attrs = None
        if attrs is None:
            attrs = _create(store, layout)
        else:
            attrs = _reconcile(store, u, attrs, layout)
        return cls(store, u, attrs, durable=durable, threads=threads)

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, *, durable: bool = True,
             threads: int | None = None) -> "StoreWriter":
        """The other ranks, after rank 0's create_or_open returned."""
        u = url_str(url)
        store = open_store(url, storage_options, read_only=False)
        return cls(store, u, read_root(store, u), durable=durable, threads=threads)

    def close(self) -> None:
        self._sink.close()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    def _array(self, path: str, what: str = "") -> zarr.Array:
        arr = self._arrays.get(path)
        if arr is None:
            try:
                arr = open_array(self._store, path, "r+")
            except (FileNotFoundError, KeyError) as e:
                raise StoreError(what or f"store {self.url} has no array {path} ({e})") from None
            with self._lock:
                self._arrays[path] = arr
        return arr

    def _hook(self, kind: str, hook: str) -> zarr.Array:
        if hook not in self.layout.act_hooks:
            raise StoreError(f"hook {hook!r} is not in this store; stored hooks: "
                             f"{', '.join(self.layout.act_hooks) or '(none)'}")
        return self._array(f"{kind}/{hook}")

    def _slot(self, slot: int) -> int:
        slot = int(slot)
        if not 0 <= slot < len(self._sched):
            raise StoreError(f"slot {slot} is out of range: the store has {len(self._sched)} "
                             f"capture slots")
        return slot

    def _seqs(self, start: int, n: int, limit: int | None = None) -> int:
        P = self.layout.n_seqs if limit is None else limit
        start = int(start)
        if start < 0 or start + n > P or n < 1:
            raise StoreError(f"sequences {start}..{start + n - 1} are out of range 0..{P - 1}")
        return start

    def _barrier(self) -> None:
        if self._durable:
            syncfs(self._local)

    # ------------------------------------------------------------------ every rank

    def write_acts(self, hook: str, slot: int, seq_start: int, data: np.ndarray) -> None:
        """data [n, T, D] float16: sequences seq_start..seq_start+n of capture `slot`."""
        arr = self._hook("acts", hook)
        slot = self._slot(slot)
        T, D = self.layout.seq_len, self.layout.act_hooks[hook]
        a = np.asarray(data)
        if a.ndim != 3 or a.shape[1:] != (T, D):
            raise StoreError(f"write_acts {hook}: expected [n, {T}, {D}], got {list(a.shape)}")
        start = self._seqs(seq_start, a.shape[0])
        a = np.ascontiguousarray(a, dtype=np.float16)
        if _raw_chunks(arr) and tuple(arr.chunks) == (1, 1, T, D):
            enc = arr.metadata.encode_chunk_key
            self._sink.put_many([(f"acts/{hook}/{enc((slot, start + i, 0, 0))}", a[i])
                                 for i in range(a.shape[0])])
        else:  # a store made with other codecs: zarr's own pipeline
            arr[slot, start:start + a.shape[0]] = a

    def write_tokens(self, slot: int, seq_start: int, tokens: np.ndarray) -> None:
        """tokens [n, T]: the inputs of this capture, sequences seq_start..seq_start+n."""
        t = np.asarray(tokens)
        if t.ndim != 2 or t.shape[1] != self.layout.seq_len:
            raise StoreError(f"write_tokens: expected [n, {self.layout.seq_len}], "
                             f"got {list(t.shape)}")
        slot, start = self._slot(slot), self._seqs(seq_start, t.shape[0])
        self._array("inputs/tokens")[slot, start:start + t.shape[0]] = t.astype(np.int32)

    def write_attn(self, layer: int, slot: int, seq: int, pattern: np.ndarray) -> None:
        """pattern [H, T, T] float16 of sequence `seq` (< attn_seqs)."""
        L = self.layout
        if int(layer) not in L.stored_attn_layers:
            raise StoreError(f"attention of layer {layer} is not stored; stored layers: "
                             f"{', '.join(map(str, L.stored_attn_layers)) or '(none)'}")
        slot, seq = self._slot(slot), self._seqs(seq, 1, L.attn_seqs)
        p = as_array(pattern, "float16", (L.n_heads, L.seq_len, L.seq_len),
                     f"write_attn layer {layer}")
        self._array(f"attn/{int(layer)}")[slot, seq] = p

    def mark_done(self, slot: int, rank: int) -> None:
        """This rank's part of `slot` is written (call after its writes returned)."""
        slot, rank = self._slot(slot), int(rank)
        done = self._array("captures/done")
        if not 0 <= rank < done.shape[1]:
            raise StoreError(f"rank {rank} is out of range: the store's world size is "
                             f"{done.shape[1]}")
        self._barrier()  # this rank's chunks reach the disk before its flag does
        done[slot, rank] = 1

    # ------------------------------------------------------------------ rank 0

    def write_stats(self, hook: str, slot: int, stats: dict[str, np.ndarray]) -> None:
        """Each of STATS as [D] float32, already reduced over all ranks."""
        if set(stats) != set(STATS):
            raise StoreError(f"write_stats {hook}: expected exactly {', '.join(STATS)}; got "
                             f"{', '.join(sorted(stats))}")
        if hook not in self.layout.act_hooks:
            self._hook("acts", hook)  # raises the listing error
        slot, D = self._slot(slot), self.layout.act_hooks[hook]
        for st in STATS:
            v = as_array(stats[st], "float32", (D,), f"write_stats {hook} {st}")
            self._array(f"stats/{hook}/{st}")[slot] = v

    def write_topk(self, hook: str, slot: int, value: np.ndarray, index: np.ndarray) -> None:
        """value [D, k] float32, index [D, k] int32 = seq * T + pos (-1: none)."""
        if hook not in self.layout.act_hooks:
            self._hook("acts", hook)
        slot, D, k = self._slot(slot), self.layout.act_hooks[hook], self.layout.topk
        v = as_array(value, "float32", (D, k), f"write_topk {hook} value")
        i = as_array(index, "int32", (D, k), f"write_topk {hook} index")
        if i.size and (i.min() < -1 or i.max() >= self.layout.n_seqs * self.layout.seq_len):
            raise StoreError(f"write_topk {hook}: index out of range -1..P*T-1")
        self._array(f"topk/{hook}/value")[slot] = v
        self._array(f"topk/{hook}/index")[slot] = i

    def all_done(self, slot: int) -> bool:
        """Every rank has marked `slot`."""
        return bool(np.all(self._array("captures/done")[self._slot(slot)] == 1))

    def commit(self, slot: int, step: int) -> None:
        """Rank 0, after all_done: the capture becomes visible to readers."""
        slot, step = self._slot(slot), int(step)
        if step != self._sched[slot]:
            raise StoreError(f"slot {slot} is for step {int(self._sched[slot])}, not {step}")
        flags = self._array("captures/done")[slot]
        if not np.all(flags == 1):
            raise StoreError(f"cannot commit step {step}: ranks "
                             f"{', '.join(str(r) for r in np.nonzero(flags != 1)[0])} have not "
                             f"marked it done")
        self._barrier()  # rank 0's own chunks (stats, top-k) before the commit
        self._array("captures/step")[slot] = step
        self._barrier()  # the commit itself

    def rollback_after(self, step: int) -> list[int]:
        """Resume: uncommit every slot whose step > `step` and clear the done flags of every
        slot scheduled after `step`. Returns the slots that were committed and are not now."""
        step = int(step)
        arr = self._array("captures/step")
        cur = np.asarray(arr[:])
        rolled = np.nonzero(cur > step)[0]
        if rolled.size:
            new = cur.copy()
            new[rolled] = -1
            lo, hi = int(rolled.min()), int(rolled.max()) + 1
            arr[lo:hi] = new[lo:hi]
        later = set(np.nonzero(self._sched > step)[0].tolist())
        stale = [k for k in _list_keys(self._store, "captures/done/")
                 if _done_slot(k) in later]
        if stale:
            async def drop() -> None:
                await asyncio.gather(*(self._store.delete(k) for k in stale))
            sync(drop())
        self._barrier()
        return [int(s) for s in rolled]

    def write_metrics(self, split: str, steps: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """split "train" | "val"; steps 1-based, the value of step s at index s-1."""
        names = self.layout.metrics.get(split)
        if names is None:
            raise StoreError(f"metrics split {split!r} is not in this store; splits: "
                             f"{', '.join(self.layout.metrics)}")
        s = np.asarray(steps, dtype=np.int64).reshape(-1)
        S = self.layout.max_steps
        if s.size == 0:
            return
        if s.min() < 1 or s.max() > S:
            raise StoreError(f"metric steps must be in 1..{S} (max_steps), got "
                             f"{int(s.min())}..{int(s.max())}")
        contiguous = bool(np.all(np.diff(s) == 1))
        for name, v in values.items():
            if name not in names:
                raise StoreError(f"metric {split}/{name} is not in this store; {split} "
                                 f"metrics: {', '.join(names)}")
            a = as_array(v, "float32", s.shape, f"write_metrics {split}/{name}")
            arr = self._array(f"metrics/{split}/{name}")
            if contiguous:
                arr[int(s[0]) - 1:int(s[-1])] = a
            else:
                arr.oindex[s - 1] = a

    def set_status(self, status: str) -> None:
        """"training" | "finished" | "stopped" | "failed" in the root attrs, with updated_at."""
        if status not in STATUSES:
            raise StoreError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        g = zarr.open_group(store=self._store, mode="r+", zarr_format=3, use_consolidated=False)
        g.update_attributes({"status": status, "updated_at": now_iso()})


# ----------------------------------------------------------------------------- create/resume

def _create_array(store: Store, spec: ArraySpec) -> zarr.Array:
    return zarr.create_array(
        store=store, name=spec.path, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype,
        fill_value=spec.fill, compressors=ZstdCodec(level=1) if spec.compressed else None,
        chunk_key_encoding=KEY_ENCODING, dimension_names=spec.axes, zarr_format=3,
        attributes={"meaning": spec.meaning, "written_by": spec.writer}, overwrite=True,
        config={"write_empty_chunks": False})


def _root_attrs(layout: Layout, status: str, created_at: str) -> dict:
    return {**layout.attrs, "schema_version": SCHEMA_VERSION, "layout": layout.to_json(),
            "status": status, "created_at": created_at, "updated_at": now_iso()}


def _create(store: Store, layout: Layout) -> dict:
    # The root group first, with the whole layout: a reader arriving mid-create sees a store
    # with no committed capture (captures/step, the commit record, is created last).
    attrs = _root_attrs(layout, "created", now_iso())
    zarr.create_group(store=store, attributes=attrs, zarr_format=3, overwrite=False)
    for spec in layout.array_specs():
        arr = _create_array(store, spec)
        if spec.path == "captures/scheduled_step" and spec.shape[0]:
            arr[:] = np.asarray(layout.scheduled_steps, np.int64)
        elif spec.path == "probe/tokens":
            arr[:] = np.asarray(layout.probe_tokens, np.int32)
    return attrs


def _reconcile(store: Store, url: str, attrs: dict, new: Layout) -> dict:
    old = layout_of(attrs, url)
    diffs = []
    for name in ("act_hooks", "n_seqs", "seq_len", "source", "topk", "attn_seqs"):
        if getattr(old, name) != getattr(new, name):
            diffs.append(f"{name} {getattr(old, name)} -> {getattr(new, name)}")
    if old.stored_attn_layers != new.stored_attn_layers:
        diffs.append(f"attn_layers {old.stored_attn_layers} -> {new.stored_attn_layers}")
    if new.stored_attn_layers and old.n_heads != new.n_heads:
        diffs.append(f"n_heads {old.n_heads} -> {new.n_heads}")
    if diffs:
        raise StoreError(f"store {url} was made for another layout ({'; '.join(diffs)}): use a "
                         f"new run dir or store URL, or delete {url} to start over")
    a, b = old.scheduled_steps, new.scheduled_steps
    n = min(len(a), len(b))
    if a[:n] != b[:n]:
        first = next(i for i in range(n) if a[i] != b[i])
        raise StoreError(f"store {url} has another capture schedule: slot {first} is step "
                         f"{a[first]} there, {b[first]} now; keep the capture schedule on "
                         f"resume, or use a new store")
    if new.probe_tokens is not None:
        stored = np.asarray(open_array(store, "probe/tokens", "r")[:])
        if not np.array_equal(stored, np.asarray(new.probe_tokens)):
            raise StoreError(f"store {url} holds captures of another probe set: use the same "
                             f"probe set on resume, or a new store")
    metrics = {k: list(v) for k, v in old.metrics.items()}
    for split, names in new.metrics.items():
        metrics.setdefault(split, [])
        metrics[split] += [x for x in names if x not in metrics[split]]
    merged = Layout(
        scheduled_steps=a if len(a) >= len(b) else b, n_seqs=old.n_seqs, seq_len=old.seq_len,
        act_hooks=old.act_hooks, topk=old.topk, attn_layers=new.attn_layers,
        n_heads=new.n_heads, attn_seqs=old.attn_seqs,
        max_steps=max(old.max_steps, new.max_steps), world=new.world, source=old.source,
        attrs={**{k: v for k, v in attrs.items() if k not in _OWN}, **new.attrs},
        probe_tokens=new.probe_tokens if old.source == "probe" else None, metrics=metrics)
    specs = merged.array_specs()
    C_old = len(a)
    for spec in specs:
        try:
            arr = open_array(store, spec.path, "r+")
        except (FileNotFoundError, KeyError):
            arr = None
        if arr is not None and spec.path == "captures/done" and arr.shape != spec.shape \
                and arr.shape[1] != spec.shape[1]:
            sync(store.delete_dir("captures/done"))  # another world size: flags start over
            arr = None
        if arr is None:
            arr = _create_array(store, spec)
            if spec.path == "probe/tokens":
                arr[:] = np.asarray(merged.probe_tokens, np.int32)
        elif arr.dtype != np.dtype(spec.dtype) or len(arr.shape) != len(spec.shape) \
                or tuple(arr.chunks) != spec.chunks:
            raise StoreError(f"store {url} is corrupt: {spec.path} is {arr.dtype} "
                             f"{list(arr.shape)} chunks {list(arr.chunks)}, expected "
                             f"{spec.dtype} {list(spec.shape)} chunks {list(spec.chunks)}")
        elif arr.shape != spec.shape:
            if any(x > y for x, y in zip(arr.shape, spec.shape)):
                raise StoreError(f"store {url}: {spec.path} is {list(arr.shape)}, larger than "
                                 f"{list(spec.shape)}; it cannot shrink")
            arr.resize(spec.shape)  # extension on resume only (contract 3)
        if spec.path == "captures/scheduled_step" and len(merged.scheduled_steps) > C_old:
            arr[C_old:] = np.asarray(merged.scheduled_steps[C_old:], np.int64)
    out = _root_attrs(merged, attrs.get("status", "created"),
                      attrs.get("created_at", now_iso()))
    g = zarr.open_group(store=store, mode="r+", zarr_format=3, use_consolidated=False)
    g.update_attributes(out)
    return out


_OWN = RESERVED_ATTRS


def _list_keys(store: Store, prefix: str) -> list[str]:
    async def collect() -> list[str]:
        return [k async for k in store.list_prefix(prefix)]
    try:
        return sync(collect())
    except FileNotFoundError:
        return []


def _done_slot(key: str) -> int:
    """The slot of a captures/done chunk key ("captures/done/c.<slot>.<rank>"), or -1."""
    name = key.rsplit("/", 1)[-1]
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "c" and parts[1].isdigit() and parts[2].isdigit():
        return int(parts[1])
    return -1


__all__ = ["StoreWriter", "Layout", "STATS", "METRICS"]
