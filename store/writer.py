"""StoreWriter: creates a run's store, writes captures chunk-aligned per rank, commits them.

Commit protocol (docs/store.md): every rank writes its chunks of slot c, then
mark_done(c, rank); rank 0 commits (captures/step[c] = step) only once all_done(c).
Readers see a slot only when captures/step[c] != -1, so a crash at any point leaves a torn
capture invisible. numpy and zarr only: no torch here.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.storage import LocalStore

from ._chunks import ChunkCodec, make_sink
from ._common import (array_meta, as_array, layout_of, local_path, now_iso, open_array,
                      open_store, read_root, syncfs, url_str)
from ._create import capacity, check_layout, create, done_slot, grow, list_keys, reconcile
from ._io import delete
from .errors import StoreError, StoreNotFound
from .schema import FULL, STATS, STATUSES, SUMMARY, Layout, repeated_positions
from .snapshots import delete_snapshot_marker, snapshot_steps, write_snapshot

# Threads writing the chunks of one call (benchmarks/store_write.py: on 2 cores, 2 and 4
# are alike and beat 1). STORE_WRITE_THREADS overrides.
DEFAULT_THREADS = int(os.environ.get("STORE_WRITE_THREADS", "2"))


# ----------------------------------------------------------------------------- the writer

class StoreWriter:
    """Writes one run's store. Rank 0: create_or_open; the other ranks: open."""

    def __init__(self, store: Store, url: str, attrs: dict, durable: bool = True,
                 threads: int | None = None):
        self._store, self.url = store, url
        self.layout = layout_of(attrs, url)
        self._arrays: dict[str, zarr.Array] = {}
        self._lock = threading.Lock()
        self._local = store.root if isinstance(store, LocalStore) else None
        self._durable = bool(durable) and self._local is not None
        self._sink = make_sink(store, DEFAULT_THREADS if threads is None else threads)
        self._codecs: dict[str, ChunkCodec | None] = {}
        self._cap = capacity(store)  # capture slots; rank 0 grows it (reserve)

    # ------------------------------------------------------------------ opening

    @classmethod
    def create_or_open(cls, url: str, layout: Layout, storage_options: dict | None = None, *,
                       durable: bool = True, threads: int | None = None) -> "StoreWriter":
        """Rank 0 only. A new store: create the group and every array (SLOT_BLOCK capture
        slots, metadata only). An existing one (a resumed run): check that a capture's
        arrays match `layout`, extend the metrics if max_steps grew, reset the done flags if
        `world` changed. Captures are appended (`reserve`, then `commit`), whatever the
        schedule: a resume may change it freely."""
        layout.validate()
        u = url_str(url)
        store = open_store(url, storage_options, read_only=False)
        try:
            attrs = read_root(store, u)
        except StoreNotFound:
            attrs = None
        if attrs is None:
            try:
                attrs = create(store, layout)
            except OSError as e:
                # an object store refusing the first write (no such bucket, access denied)
                # raises its fsspec backend's OSError from deep inside zarr: one line instead
                raise StoreError(f"cannot create the capture store at {u}: "
                                 f"{type(e).__name__}: {e}") from None
        else:
            attrs = reconcile(store, u, attrs, layout)
        return cls(store, u, attrs, durable=durable, threads=threads)

    @staticmethod
    def check_compatible(url: str, layout: Layout, storage_options: dict | None = None
                         ) -> bool:
        """Before a run writes anything: whether it may append to the store at `url` (True:
        a store is there; False: none yet). StoreError (one line) when its capture layout
        differs. Reads only; every rank may call it."""
        layout.validate()
        u = url_str(url)
        path = local_path(url)
        if path is not None and not path.is_dir():
            return False
        store = open_store(url, storage_options, read_only=True)
        try:
            attrs = read_root(store, u)
        except StoreNotFound:
            return False
        check_layout(store, u, attrs, layout)
        return True

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
        if slot >= self._cap:  # rank 0 may have grown the capture axis since we looked
            with self._lock:
                self._cap = capacity(self._store)
                self._arrays.clear()
        if not 0 <= slot < self._cap:
            raise StoreError(f"slot {slot} is out of range: the store has {self._cap} "
                             f"capture slots (rank 0 reserves a slot before it is written)")
        return slot

    def reserve(self, slot: int) -> None:
        """Rank 0, before any rank writes `slot`: grow the capture axis to hold it (a
        metadata write per array, once every SLOT_BLOCK captures). The caller orders it
        before the other ranks' writes (the trainer: a collective after it)."""
        if int(slot) < self._cap:
            return
        cap = grow(self._store, self.layout, int(slot) + 1)
        with self._lock:
            self._cap = cap
            self._arrays.clear()

    def next_slot(self) -> int:
        """The slot after the last committed capture (0 for none): where a run that has
        just rolled back (`rollback_after`) appends its next capture."""
        cur = np.asarray(self._array("captures/step")[:])
        done = np.nonzero(cur >= 0)[0]
        return int(done.max()) + 1 if done.size else 0

    def _seqs(self, start: int, n: int, limit: int | None = None) -> int:
        P = self.layout.n_seqs if limit is None else limit
        start = int(start)
        if start < 0 or start + n > P or n < 1:
            raise StoreError(f"sequences {start}..{start + n - 1} are out of range 0..{P - 1}")
        return start

    def _barrier(self) -> None:
        if self._durable:
            syncfs(self._local)

    def _codec(self, path: str) -> ChunkCodec | None:
        if path not in self._codecs:
            self._codecs[path] = ChunkCodec.of(self._array(path), array_meta(self._store, path))
        return self._codecs[path]

    def _put_chunks(self, path: str, blocks: list[tuple[tuple[int, ...], np.ndarray]]) -> bool:
        """Write whole chunks (chunk coords, block of the chunk's shape) concurrently;
        False when the array's codecs are not ours to encode (then the caller uses zarr)."""
        codec = self._codec(path)
        if codec is None:
            return False
        sink = self._sink

        def put(item: tuple[tuple[int, ...], np.ndarray]) -> None:
            sink.put(f"{path}/{codec.encode_key(item[0])}", codec.encode(item[1]))

        sink.map(put, blocks)
        return True

    def _row_jobs(self, path: str, slot: int, row: np.ndarray) -> list[Callable[[], None]]:
        """Jobs writing arr[slot] = row for an array [C, D, ...] chunked (cc, dn, ...): whole
        chunks when cc == 1, else read-modify-write of the chunks holding the row (rank 0
        is these arrays' only writer, so that is safe)."""
        codec = self._codec(path)
        if codec is None:
            arr = self._array(path)

            def fallback() -> None:
                arr[slot] = row
            return [fallback]
        cc, dn = codec.shape[0], codec.shape[1]
        ci, r = divmod(slot, cc)
        rest = (0,) * (len(codec.shape) - 2)
        sink, D = self._sink, row.shape[0]

        def job(j: int) -> Callable[[], None]:
            w = min(dn, D - j * dn)
            key = f"{path}/{codec.encode_key((ci, j, *rest))}"

            def run() -> None:
                block = codec.empty() if cc == 1 else codec.decode(sink.get(key))
                block[r, :w] = row[j * dn:j * dn + w]
                sink.put(key, codec.encode(block))
            return run

        return [job(j) for j in range(-(-D // dn))]

    def _run(self, jobs: list[Callable[[], None]]) -> None:
        self._sink.map(lambda f: f(), jobs)

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
        if tuple(arr.chunks) != (1, 1, T, D) or not self._put_chunks(
                f"acts/{hook}", [((slot, start + i, 0, 0), a[i][None, None])
                                 for i in range(a.shape[0])]):
            arr[slot, start:start + a.shape[0]] = a  # other chunks or codecs: zarr's way

    def write_tokens(self, slot: int, seq_start: int, tokens: np.ndarray) -> None:
        """tokens [n, T]: the inputs of this capture, sequences seq_start..seq_start+n."""
        t = np.asarray(tokens)
        if t.ndim != 2 or t.shape[1] != self.layout.seq_len:
            raise StoreError(f"write_tokens: expected [n, {self.layout.seq_len}], "
                             f"got {list(t.shape)}")
        slot, start = self._slot(slot), self._seqs(seq_start, t.shape[0])
        t = np.ascontiguousarray(t, dtype=np.int32)
        if self._array("inputs/tokens").chunks[1] != 1 or not self._put_chunks(
                "inputs/tokens", [((slot, start + i, 0), t[i][None, None])
                                  for i in range(t.shape[0])]):
            self._array("inputs/tokens")[slot, start:start + t.shape[0]] = t

    def write_attn(self, layer: int, slot: int, seq: int, pattern: np.ndarray) -> None:
        """pattern [H, Ta, Ta] float16 of sequence `seq` (< attn_seqs), Ta = attn_len; a
        whole [H, T, T] pattern is cut to its first Ta query and key positions."""
        L = self.layout
        if int(layer) not in L.stored_attn_layers:
            raise StoreError(f"attention of layer {layer} is not stored; stored layers: "
                             f"{', '.join(map(str, L.stored_attn_layers)) or '(none)'}")
        slot, seq = self._slot(slot), self._seqs(seq, 1, L.attn_seqs)
        Ta, p = L.attn_len, np.asarray(pattern)
        if Ta < L.seq_len and p.shape == (L.n_heads, L.seq_len, L.seq_len):
            p = p[:, :Ta, :Ta]
        p = as_array(p, "float16", (L.n_heads, Ta, Ta), f"write_attn layer {layer}")
        path = f"attn/{int(layer)}"
        if self._array(path).chunks[1] != 1 or not self._put_chunks(
                path, [((slot, seq, 0, 0, 0), p[None, None])]):
            self._array(path)[slot, seq] = p

    def write_repeated_attn(self, layer: int, slot: int, rseq: int, pattern: np.ndarray
                            ) -> None:
        """pattern [H, Na, Na] float16 of repeated-token sequence `rseq` (< Ar): its rows and
        columns at repeated_positions(N, Na); a whole [H, N, N] pattern is cut so here.
        Written by rank rseq % W (every rank runs the whole repeated probe)."""
        L = self.layout
        if not L.repeat_attn_seqs or int(layer) not in L.stored_attn_layers:
            raise StoreError(f"no repeated-probe attention of layer {layer} in this store")
        slot, rseq = self._slot(slot), self._seqs(rseq, 1, L.repeat_attn_seqs)
        Na, N, p = L.repeat_attn_len, self._array("probe/repeated").shape[1], \
            np.asarray(pattern)
        if Na < N and p.shape == (L.n_heads, N, N):
            keep = repeated_positions(N, Na)
            p = p[:, keep][:, :, keep]
        p = as_array(p, "float16", (L.n_heads, Na, Na), f"write_repeated_attn layer {layer}")
        path = f"attn_repeated/{int(layer)}"
        if not self._put_chunks(path, [((slot, rseq, 0, 0, 0), p[None, None])]):
            self._array(path)[slot, rseq] = p

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
        slot, D = self._slot(slot), self._stat_width(hook)
        rows = {st: as_array(stats[st], "float32", (D,), f"write_stats {hook} {st}")
                for st in STATS}
        self._run([job for st in STATS for job in
                   self._row_jobs(f"stats/{hook}/{st}", slot, rows[st])])

    def write_topk(self, hook: str, slot: int, value: np.ndarray, index: np.ndarray) -> None:
        """value [D, k] float32, index [D, k] int32 = seq * T + pos (-1: none)."""
        slot, D, k = self._slot(slot), self._stat_width(hook), self.layout.topk
        v = as_array(value, "float32", (D, k), f"write_topk {hook} value")
        i = as_array(index, "int32", (D, k), f"write_topk {hook} index")
        if i.size and (i.min() < -1 or i.max() >= self.layout.n_seqs * self.layout.seq_len):
            raise StoreError(f"write_topk {hook}: index out of range -1..P*T-1")
        self._run(self._row_jobs(f"topk/{hook}/value", slot, v)
                  + self._row_jobs(f"topk/{hook}/index", slot, i))

    def _stat_width(self, hook: str) -> int:
        if hook not in self.layout.stat_hooks:
            raise StoreError(f"hook {hook!r} has no statistics in this store; hooks with "
                             f"statistics: {', '.join(self.layout.stat_hooks) or '(none)'}")
        return self.layout.stat_hooks[hook]

    def write_token_loss(self, slot: int, loss: np.ndarray, icl: float) -> None:
        """The per-token probe loss [P, T] (NaN at position 0), gathered over all ranks,
        and the in-context-learning score derived from it."""
        L = self.layout
        if not L.token_loss:
            raise StoreError("this store keeps no per-token loss (layout token_loss is false)")
        slot = self._slot(slot)
        a = as_array(loss, "float32", (L.n_seqs, L.seq_len), "write_token_loss")
        jobs = self._row_jobs("loss/token", slot, a)
        self._run(jobs + self._cell_jobs("loss/icl", slot, np.float32(icl)))

    def _cell_jobs(self, path: str, slot: int, value) -> list[Callable[[], None]]:
        """Jobs writing arr[slot] = value for a 1-D array [C] (read-modify-write of its
        chunk: rank 0 is its only writer)."""
        codec = self._codec(path)
        arr = self._array(path)
        if codec is None:
            def fallback() -> None:
                arr[slot] = value
            return [fallback]
        ci, r = divmod(slot, codec.shape[0])
        key = f"{path}/{codec.encode_key((ci,))}"
        sink = self._sink

        def run() -> None:
            block = codec.decode(sink.get(key))
            block[r] = value
            sink.put(key, codec.encode(block))
        return [run]

    def write_head_scores(self, slot: int, scores: dict[str, np.ndarray]) -> None:
        """Each stored head score as [L, H] float32, already reduced over all ranks."""
        L = self.layout
        if set(scores) != set(L.head_scores):
            raise StoreError(f"write_head_scores: expected exactly "
                             f"{', '.join(L.head_scores) or '(none stored)'}; got "
                             f"{', '.join(sorted(scores))}")
        slot = self._slot(slot)
        rows = {k: as_array(v, "float32", (L.n_layers, L.n_heads), f"write_head_scores {k}")
                for k, v in scores.items()}
        self._run([job for k, row in rows.items()
                   for job in self._row_jobs(f"heads/{k}", slot, row)])

    def write_lens(self, slot: int, loss: np.ndarray) -> None:
        """The logit lens' loss after each block, [L] float32, reduced over all ranks."""
        L = self.layout
        if not L.logit_lens:
            raise StoreError("this store keeps no logit lens (layout logit_lens is false)")
        row = as_array(loss, "float32", (L.n_layers,), "write_lens")
        self._run(self._row_jobs("lens/loss", self._slot(slot), row))

    def write_dla(self, layer: int, slot: int, top_token: np.ndarray, top_value: np.ndarray,
                  bottom_token: np.ndarray, bottom_value: np.ndarray) -> None:
        """Layer `layer`'s neuron logit effects: [M, K] token ids (int32) and values."""
        L = self.layout
        if int(layer) not in L.dla_layers:
            raise StoreError(f"no neuron logit effects stored for layer {layer}; stored: "
                             f"{', '.join(map(str, L.dla_layers)) or '(none)'}")
        slot, shape = self._slot(slot), (L.d_mlp, L.dla_k)
        jobs = []
        for end, tok, val in (("top", top_token, top_value), ("bottom", bottom_token,
                                                              bottom_value)):
            t = as_array(tok, "int32", shape, f"write_dla {layer} {end}_token")
            v = as_array(val, "float32", shape, f"write_dla {layer} {end}_value")
            jobs += self._row_jobs(f"dla/{int(layer)}/{end}_token", slot, t)
            jobs += self._row_jobs(f"dla/{int(layer)}/{end}_value", slot, v)
        self._run(jobs)

    def all_done(self, slot: int) -> bool:
        """Every rank has marked `slot`."""
        return bool(np.all(self._array("captures/done")[self._slot(slot)] == 1))

    def commit(self, slot: int, step: int, tiers: int = SUMMARY | FULL) -> None:
        """Rank 0, after all_done: the capture becomes visible to readers. `tiers`: the
        bits of what it holds (SUMMARY, and FULL when it wrote the full tier)."""
        slot, step, tiers = self._slot(slot), int(step), int(tiers)
        if step < 0:
            raise StoreError(f"step must be >= 0, got {step}")
        if not tiers & SUMMARY or tiers & ~(SUMMARY | FULL):
            raise StoreError(f"tiers must be SUMMARY or SUMMARY | FULL, got {tiers}")
        flags = self._array("captures/done")[slot]
        if not np.all(flags == 1):
            raise StoreError(f"cannot commit step {step}: ranks "
                             f"{', '.join(str(r) for r in np.nonzero(flags != 1)[0])} have not "
                             f"marked it done")
        self._array("captures/tier")[slot] = tiers  # read only for committed slots
        self._barrier()  # rank 0's own chunks (stats, top-k, tier) before the commit
        self._array("captures/step")[slot] = step
        self._barrier()  # the commit itself

    def rollback_after(self, step: int) -> list[int]:
        """Resume from a checkpoint at `step` (-1: a fresh start): uncommit every capture
        after it, clear the done flags of every uncommitted slot, and withdraw the weight
        snapshots after it. The run then appends at `next_slot()`, overwriting what those
        slots held. Returns the slots that were committed and are not now."""
        step = int(step)
        arr = self._array("captures/step")
        cur = np.asarray(arr[:])
        rolled = np.nonzero(cur > step)[0]
        if rolled.size:
            new = cur.copy()
            new[rolled] = -1
            lo, hi = int(rolled.min()), int(rolled.max()) + 1
            arr[lo:hi] = new[lo:hi]
            cur = new
        open_slots = set(np.nonzero(cur < 0)[0].tolist())
        stale = [k for k in list_keys(self._store, "captures/done/")
                 if done_slot(k) in open_slots]
        delete(self._store, stale)
        for s in snapshot_steps(self._store):
            if s > step:
                delete_snapshot_marker(self._store, s)
        self._barrier()
        return [int(s) for s in rolled]

    # ------------------------------------------------------------------ weight snapshots

    def write_snapshot(self, step: int, files: dict[str, bytes]) -> None:
        """Rank 0: the model's weights at `step` as files (e.g. model.safetensors and
        config.json) under snapshots/<step>/, each written whole, then flushed, then the
        marker that makes the snapshot visible (store/snapshots.py)."""
        write_snapshot(self._store, self._sink, int(step), files, self._barrier)

    def snapshot_steps(self) -> list[int]:
        return snapshot_steps(self._store)

    def write_metrics(self, split: str, steps: np.ndarray, values: dict[str, np.ndarray]) -> None:
        """split "train" | "val"; steps 1-based, the value of step s at index s-1."""
        names = self.layout.metrics.get(split)
        if names is None:
            raise StoreError(f"metrics split {split!r} is not in this store; splits: "
                             f"{', '.join(self.layout.metrics)}")
        raw = np.asarray(steps, dtype=np.int64).reshape(-1)
        if raw.size == 0:
            return
        if raw.min() < 1:
            raise StoreError(f"metric steps must be >= 1, got {int(raw.min())}")
        self._grow_metrics(split, int(raw.max()))
        keep = None
        if np.any(np.diff(raw) <= 0):  # sort; of a repeated step, the last value wins
            keep = len(raw) - 1 - np.unique(raw[::-1], return_index=True)[1]
        s = raw if keep is None else raw[keep]
        contiguous = bool(np.all(np.diff(s) == 1))
        for name, v in values.items():
            if name not in names:
                raise StoreError(f"metric {split}/{name} is not in this store; {split} "
                                 f"metrics: {', '.join(names)}")
            a = as_array(v, "float32", raw.shape, f"write_metrics {split}/{name}")
            if keep is not None:
                a = a[keep]
            arr = self._array(f"metrics/{split}/{name}")
            if contiguous:
                arr[int(s[0]) - 1:int(s[-1])] = a
            else:
                arr.oindex[s - 1] = a

    def metrics_length(self, split: str) -> int:
        """Steps the split's metrics arrays hold now (they grow with the run)."""
        return int(self._array(f"metrics/{split}/{self.layout.metrics[split][0]}").shape[0])

    def _grow_metrics(self, split: str, last: int) -> None:
        """A run longer than any before it: rank 0 (the only writer of metrics) extends the
        split's arrays, in whole chunks, before writing past their end."""
        arrays = [self._array(f"metrics/{split}/{n}") for n in self.layout.metrics[split]]
        if all(a.shape[0] >= last for a in arrays):
            return
        from .schema import METRICS_CHUNK
        new = -(-last // METRICS_CHUNK) * METRICS_CHUNK
        for a in arrays:
            if a.shape[0] < new:
                a.resize((new,))

    def set_status(self, status: str) -> None:
        """"training" | "finished" | "stopped" | "failed" in the root attrs, with updated_at."""
        if status not in STATUSES:
            raise StoreError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        g = zarr.open_group(store=self._store, mode="r+", zarr_format=3, use_consolidated=False)
        g.update_attributes({"status": status, "updated_at": now_iso()})
