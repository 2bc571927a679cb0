"""Creating a run's store, reconciling an existing one with a resumed run's layout, and
growing the capture axis (the only places anything is ever resized: contract 3)."""

from __future__ import annotations

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import ZstdCodec

from ._common import KEY_ENCODING, layout_of, now_iso, open_array
from ._io import delete_dir, list_prefix
from .errors import StoreError
from .schema import RESERVED_ATTRS, SCHEMA_VERSION, SLOT_BLOCK, ArraySpec, Layout


def create_array(store: Store, spec: ArraySpec) -> zarr.Array:
    return zarr.create_array(
        store=store, name=spec.path, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype,
        fill_value=spec.fill, compressors=ZstdCodec(level=1) if spec.compressed else None,
        chunk_key_encoding=KEY_ENCODING, dimension_names=spec.axes, zarr_format=3,
        attributes={"meaning": spec.meaning, "written_by": spec.writer}, overwrite=True,
        config={"write_empty_chunks": False})


def _root_attrs(layout: Layout, status: str, created_at: str) -> dict:
    return {**layout.attrs, "schema_version": SCHEMA_VERSION, "layout": layout.to_json(),
            "status": status, "created_at": created_at, "updated_at": now_iso()}


def _fill_constant(arr: zarr.Array, spec: ArraySpec, layout: Layout) -> None:
    if spec.path == "probe/tokens":
        arr[:] = np.asarray(layout.probe_tokens, np.int32)
    elif spec.path == "probe/repeated":
        arr[:] = np.asarray(layout.repeated_tokens, np.int32)


def create(store: Store, layout: Layout) -> dict:
    # The root group first, with the whole layout: a reader arriving mid-create sees a store
    # with no committed capture (captures/step, the commit record, is created last).
    attrs = _root_attrs(layout, "created", now_iso())
    zarr.create_group(store=store, attributes=attrs, zarr_format=3, overwrite=False)
    for spec in layout.array_specs(SLOT_BLOCK):
        _fill_constant(create_array(store, spec), spec, layout)
    return attrs


def capacity(store: Store) -> int:
    """The capture axis' length: captures/step's shape (the last array grown)."""
    return int(open_array(store, "captures/step", "r").shape[0])


def grow(store: Store, layout: Layout, slots: int) -> int:
    """Rank 0: make room for `slots` capture slots (in blocks of SLOT_BLOCK); returns the
    capacity. Every array with a capture axis grows first and captures/step last, so a
    reader that sees the new captures/step finds every other array at least that long;
    growing never moves or deletes a chunk. Call it before any rank writes those slots."""
    cap = capacity(store)
    if slots <= cap:
        return cap
    new = -(-slots // SLOT_BLOCK) * SLOT_BLOCK
    for spec in layout.array_specs(new):
        if spec.axes[0] != "capture":
            continue
        arr = open_array(store, spec.path, "r+")
        if arr.shape[0] < new:
            arr.resize((new, *arr.shape[1:]))
    return new


def _diffs(old: Layout, new: Layout) -> list[str]:
    diffs = []
    for name in ("act_hooks", "stat_hooks", "n_seqs", "seq_len", "source", "topk",
                 "attn_seqs", "attn_len", "token_loss"):
        if getattr(old, name) != getattr(new, name):
            diffs.append(f"{name} {getattr(old, name)} -> {getattr(new, name)}")
    if old.stored_attn_layers != new.stored_attn_layers:
        diffs.append(f"attn_layers {old.stored_attn_layers} -> {new.stored_attn_layers}")
    if new.stored_attn_layers and old.n_heads != new.n_heads:
        diffs.append(f"n_heads {old.n_heads} -> {new.n_heads}")
    for name in ("head_scores", "logit_lens", "dla_layers", "dla_k"):
        if getattr(old, name) != getattr(new, name):
            diffs.append(f"{name} {getattr(old, name)} -> {getattr(new, name)} (set "
                         f"capture.dynamics / capture.dla_topk as the run had them)")
    # A store without the repeated probe's attention (written before it was kept) takes it
    # from here on (reconcile adds the arrays); one with it keeps its shape.
    rep = ("repeat_attn_seqs", "repeat_attn_len")
    if old.repeat_attn_seqs and [getattr(old, k) for k in rep] != [getattr(new, k) for k in rep]:
        diffs.append(f"repeated-probe attention {old.repeat_attn_seqs} x "
                     f"{old.repeat_attn_len} -> {new.repeat_attn_seqs} x {new.repeat_attn_len}")
    if (old.head_scores or old.logit_lens) and old.n_layers != new.n_layers:
        diffs.append(f"n_layers {old.n_layers} -> {new.n_layers}")
    return diffs


def check_layout(store: Store, url: str, attrs: dict, new: Layout) -> Layout:
    """Whether a run with layout `new` may append to this store (read-only): StoreError
    (one line) when a capture's arrays would differ. Returns the store's layout."""
    old = layout_of(attrs, url)
    diffs = _diffs(old, new)
    if diffs:
        raise StoreError(f"store {url} was made for another capture layout "
                         f"({'; '.join(diffs)}): resume with the capture settings the run "
                         f"had, or use a new run dir or capture.store")
    if new.probe_tokens is not None:
        stored = np.asarray(open_array(store, "probe/tokens", "r")[:])
        if not np.array_equal(stored, np.asarray(new.probe_tokens)):
            raise StoreError(f"store {url} holds captures of another probe set (capture."
                             f"probe_seed, probe_seqs or the data changed): resume with the "
                             f"same probe set, or use a new run dir or capture.store")
    if new.repeated_tokens is not None:
        stored = np.asarray(open_array(store, "probe/repeated", "r")[:])
        if not np.array_equal(stored, np.asarray(new.repeated_tokens)):
            raise StoreError(f"store {url} holds captures of another repeated-token probe: "
                             f"keep capture.repeat_seqs, repeat_half and probe_seed on resume")
    return old


def reconcile(store: Store, url: str, attrs: dict, new: Layout) -> dict:
    """A resumed run's layout against the store's. What a capture's arrays look like must
    match (hooks, P, T, k, attention, dynamics, the probes), else one StoreError line;
    when captures happen (the cadences, max_steps) and the world size may change."""
    old = check_layout(store, url, attrs, new)
    metrics = {k: list(v) for k, v in old.metrics.items()}
    for split, names in new.metrics.items():
        metrics.setdefault(split, [])
        metrics[split] += [x for x in names if x not in metrics[split]]
    merged = Layout(
        n_seqs=old.n_seqs, seq_len=old.seq_len, act_hooks=old.act_hooks,
        stat_hooks=old.stat_hooks, topk=old.topk, attn_layers=new.attn_layers,
        n_heads=new.n_heads, attn_seqs=old.attn_seqs, attn_len=old.attn_len,
        max_steps=max(old.max_steps, new.max_steps), world=new.world, source=old.source,
        attrs={**{k: v for k, v in attrs.items() if k not in RESERVED_ATTRS}, **new.attrs},
        probe_tokens=new.probe_tokens if old.source == "probe" else None, metrics=metrics,
        token_loss=old.token_loss, n_layers=new.n_layers, head_scores=old.head_scores,
        logit_lens=old.logit_lens, repeated_tokens=new.repeated_tokens,
        dla_layers=old.dla_layers, d_mlp=new.d_mlp, dla_k=old.dla_k,
        repeat_attn_seqs=new.repeat_attn_seqs, repeat_attn_len=new.repeat_attn_len)
    C = capacity(store)
    for spec in merged.array_specs(C):
        try:
            arr = open_array(store, spec.path, "r+")
        except (FileNotFoundError, KeyError):
            arr = None
        if arr is not None and spec.path == "captures/done" and arr.shape[1] != spec.shape[1]:
            delete_dir(store, "captures/done")  # another world size: flags start over
            arr = None
        if arr is None:
            _fill_constant(create_array(store, spec), spec, merged)
        elif arr.dtype != np.dtype(spec.dtype) or len(arr.shape) != len(spec.shape) \
                or tuple(arr.chunks) != spec.chunks:
            raise StoreError(f"store {url} is corrupt: {spec.path} is {arr.dtype} "
                             f"{list(arr.shape)} chunks {list(arr.chunks)}, expected "
                             f"{spec.dtype} {list(spec.shape)} chunks {list(spec.chunks)}")
        elif spec.axes == ("step",) and arr.shape[0] < spec.shape[0]:
            arr.resize(spec.shape)  # a longer run: the metrics grow (rank 0 only)
        elif spec.axes[0] == "capture" and arr.shape[0] > C \
                and tuple(arr.shape[1:]) == spec.shape[1:]:
            pass  # a grow cut off before captures/step: the next one completes it
        elif spec.axes != ("step",) and arr.shape != spec.shape:
            raise StoreError(f"store {url} is corrupt: {spec.path} is {list(arr.shape)}, "
                             f"expected {list(spec.shape)}")
    out = _root_attrs(merged, attrs.get("status", "created"),
                      attrs.get("created_at", now_iso()))
    g = zarr.open_group(store=store, mode="r+", zarr_format=3, use_consolidated=False)
    g.update_attributes(out)
    return out


def list_keys(store: Store, prefix: str) -> list[str]:
    try:
        return list_prefix(store, prefix)
    except FileNotFoundError:
        return []


def done_slot(key: str) -> int:
    """The slot of a captures/done chunk key ("captures/done/c.<slot>.<rank>"), or -1."""
    name = key.rsplit("/", 1)[-1]
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "c" and parts[1].isdigit() and parts[2].isdigit():
        return int(parts[1])
    return -1
