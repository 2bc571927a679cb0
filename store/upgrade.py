"""Convert a schema-1 capture store in place to schema 2 (docs/store.md, "Version policy").

    python -m store.upgrade RUN/capture.zarr [--dry-run]

Schema 1 slotted captures by a schedule fixed at creation (`captures/scheduled_step`, and
`scheduled_steps` in the layout attribute); schema 2 appends them and records each
capture's tiers. The conversion keeps every chunk where it is and rewrites metadata only:

1. `captures/tier` is created (or rewritten): SUMMARY | FULL for every committed slot,
   since a schema-1 capture held everything;
2. every array with a capture axis grows to a multiple of SLOT_BLOCK slots, captures/step
   last (as `StoreWriter.reserve` grows them), and takes schema 2's dimension names and
   attributes (`attn/<layer>`: query, key -> qpos, kpos; its shape [C, A, H, T, T] is
   schema 2's with attn_len = T);
3. `captures/scheduled_step` is deleted;
4. last, one write of the root attributes: the layout without `scheduled_steps`, with
   `stat_hooks` (= act_hooks: schema 1 kept statistics of its stored hooks), `attn_len`
   (= T) and `token_loss` (false), and `schema_version` 2.

Until step 4 the store is still version 1, so a conversion cut off anywhere is finished by
running it again; every step is idempotent. Run it while no run writes the store.
Exit status: 0 converted (or would be, with --dry-run), 2 with one line on stderr when the
store is missing, not version 1, or not a store this can convert.
numpy and zarr only.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import zarr
from zarr.abc.store import Store

from ._common import now_iso, open_array, open_store, url_str
from ._create import create_array
from ._io import delete_dir, get_bytes, set_bytes
from .errors import ArgumentParser, CorruptStore, StoreError, StoreNotFound, run_cli
from .schema import FULL, RESERVED_ATTRS, SCHEMA_VERSION, SLOT_BLOCK, SUMMARY, ArraySpec, Layout

FROM_VERSION = 1
V1_ONLY = "captures/scheduled_step"


def _root(store: Store, url: str) -> dict:
    """The root attributes of a schema-1 store (read_root refuses those: it is for v2)."""
    try:
        raw = get_bytes(store, "zarr.json")
    except FileNotFoundError:
        raw = None
    if raw is None:
        raise StoreNotFound(f"no capture store at {url}: no zarr.json there (a run's store is "
                            f"RUN/capture.zarr; is the path right?)")
    try:
        meta = json.loads(raw)
        attrs = meta["attributes"]
        v = attrs["schema_version"]
    except (ValueError, KeyError, TypeError):
        raise CorruptStore(f"{url} is not a capture store: its zarr.json has no "
                           f"schema_version") from None
    if v == SCHEMA_VERSION:
        raise StoreError(f"store {url} is already schema version {SCHEMA_VERSION}: nothing "
                         f"to convert")
    if v != FROM_VERSION:
        raise StoreError(f"store {url} has schema version {v!r}; this converts version "
                         f"{FROM_VERSION} to {SCHEMA_VERSION} only")
    return attrs


def v2_layout(attrs: dict, url: str) -> Layout:
    """The schema-2 layout of a schema-1 store's `layout` attribute."""
    d = dict(attrs.get("layout") or {})
    d.pop("scheduled_steps", None)
    try:
        d.setdefault("stat_hooks", dict(d["act_hooks"]))
        d.setdefault("attn_len", int(d["seq_len"]))
        d.setdefault("token_loss", False)
        return Layout.from_json(d, {k: v for k, v in attrs.items() if k not in RESERVED_ATTRS})
    except (KeyError, TypeError, ValueError, AttributeError, StoreError) as e:
        raise CorruptStore(f"store {url} is corrupt: its layout attribute cannot be read "
                           f"({type(e).__name__}: {e})") from None


def _open(store: Store, path: str) -> zarr.Array | None:
    try:
        return open_array(store, path, "r" if store.read_only else "r+")
    except (FileNotFoundError, KeyError):
        return None


def _check(store: Store, url: str, specs: list[ArraySpec], steps: int) -> None:
    """Every array schema 2 expects is there as schema 1 made it, before anything changes."""
    for spec in specs:
        if spec.path == "captures/tier":
            continue
        arr = _open(store, spec.path)
        if arr is None:
            raise CorruptStore(f"store {url} is corrupt: array {spec.path} is missing; "
                               f"nothing was changed")
        lead = spec.axes[0] in ("capture", "step")
        if arr.dtype != np.dtype(spec.dtype) or tuple(arr.chunks) != spec.chunks or \
                tuple(arr.shape[lead:]) != spec.shape[lead:] or \
                (spec.axes[0] == "capture" and arr.shape[0] < steps):
            raise CorruptStore(f"store {url} is corrupt: {spec.path} is {arr.dtype} "
                               f"{list(arr.shape)} chunks {list(arr.chunks)}, not what schema "
                               f"{FROM_VERSION} made; nothing was changed")


def _set_meta(store: Store, spec: ArraySpec) -> bool:
    """Give an array schema 2's dimension names and attributes (its zarr.json only)."""
    key = f"{spec.path}/zarr.json"
    meta = json.loads(get_bytes(store, key))
    want = {"dimension_names": list(spec.axes),
            "attributes": {**meta.get("attributes", {}), "meaning": spec.meaning,
                           "written_by": spec.writer}}
    if all(meta.get(k) == v for k, v in want.items()):
        return False
    meta.update(want)
    set_bytes(store, key, json.dumps(meta, indent=2).encode())
    return True


def upgrade(url, dry_run: bool = False, storage_options: dict | None = None,
            say=print) -> list[str]:
    """Convert the schema-1 store at `url` to schema 2 in place; returns what it did (or,
    with dry_run, would do), a line each. StoreError (one line) when it cannot."""
    u = url_str(url)
    store = open_store(url, storage_options, read_only=True)  # creates no folder
    attrs = _root(store, u)
    if not dry_run:
        store = open_store(url, storage_options, read_only=False)
    lay = v2_layout(attrs, u)
    step_arr = _open(store, "captures/step")
    if step_arr is None:
        raise CorruptStore(f"store {u} is corrupt: array captures/step is missing; nothing "
                           f"was changed")
    steps = np.asarray(step_arr[:])
    committed = np.nonzero(steps >= 0)[0]
    cap = max(SLOT_BLOCK, -(-len(steps) // SLOT_BLOCK) * SLOT_BLOCK)
    specs = lay.array_specs(cap)
    _check(store, u, specs, len(steps))
    plan = [f"{u}: schema {FROM_VERSION} -> {SCHEMA_VERSION}, {len(committed)} committed "
            f"captures in {len(steps)} slots",
            f"captures/tier: {SUMMARY | FULL} (summary + full) for the committed slots",
            f"capture axis: {len(steps)} -> {cap} slots (metadata only)"]
    if _open(store, V1_ONLY) is not None:
        plan.append(f"delete {V1_ONLY}")
    plan.append(f"layout: drop scheduled_steps; stat_hooks = act_hooks, attn_len = "
                f"{lay.attn_len}, token_loss = false; schema_version {SCHEMA_VERSION}")
    for line in plan:
        say(("would: " if dry_run else "") + line)
    if dry_run:
        return plan

    tier_spec = next(s for s in specs if s.path == "captures/tier")
    tier = _open(store, "captures/tier")
    if tier is None or tier.dtype != np.dtype(tier_spec.dtype) \
            or tuple(tier.chunks) != tier_spec.chunks:
        tier = create_array(store, tier_spec)  # (re)made at full size: overwrite=True
    elif tier.shape[0] < cap:
        tier.resize((cap,))
    bits = np.zeros(cap, np.uint8)
    bits[committed] = SUMMARY | FULL
    tier[:] = bits
    for spec in specs:  # captures/step is the last of them
        if spec.path == "captures/tier":
            continue
        if spec.axes[0] == "capture":
            arr = open_array(store, spec.path, "r+")
            if arr.shape[0] < cap:
                arr.resize((cap, *arr.shape[1:]))
        _set_meta(store, spec)
    if _open(store, V1_ONLY) is not None:
        delete_dir(store, V1_ONLY)
    g = zarr.open_group(store=store, mode="r+", zarr_format=3, use_consolidated=False)
    g.update_attributes({"layout": lay.to_json(), "schema_version": SCHEMA_VERSION,
                         "updated_at": now_iso()})
    say(f"{u}: converted to schema version {SCHEMA_VERSION}")
    return plan


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(
        prog="python -m store.upgrade",
        description=f"Convert a schema-{FROM_VERSION} capture store in place to schema "
                    f"{SCHEMA_VERSION} (metadata only; safe to rerun after a crash). Run it "
                    f"while no run writes the store.")
    ap.add_argument("url", help="the store: RUN/capture.zarr, or a file:// or fsspec URL")
    ap.add_argument("--dry-run", action="store_true", help="say what it would do; change "
                                                           "nothing")
    return run_cli(lambda: _upgrade(ap.parse_args(argv)))


def _upgrade(args) -> None:
    upgrade(args.url, dry_run=args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
