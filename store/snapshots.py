"""Weight snapshots inside the store: `snapshots/<step, 8 digits>/` holds the files of the
model at that step (model.safetensors and config.json, written by capture/snapshot.py) and
`snapshot.json`, the marker written last. A snapshot is visible only once its marker
exists, so a snapshot cut off mid-write is never taken for a whole one; this needs no
rename, so it holds on object stores too. numpy and zarr only: the files are bytes here."""

from __future__ import annotations

import json
from typing import Callable

from zarr.abc.store import Store

from ._common import now_iso
from ._create import list_keys
from ._io import delete, get_bytes
from .errors import CorruptStore, StoreError

SNAPSHOT_DIR = "snapshots"
MARKER = "snapshot.json"


def snapshot_key(step: int, name: str) -> str:
    return f"{SNAPSHOT_DIR}/{int(step):08d}/{name}"


def snapshot_steps(store: Store) -> list[int]:
    """Steps with a committed snapshot, ascending (one listing of snapshots/)."""
    steps = []
    for key in list_keys(store, f"{SNAPSHOT_DIR}/"):
        parts = key.split("/")
        if len(parts) == 3 and parts[2] == MARKER and parts[1].isdigit():
            steps.append(int(parts[1]))
    return sorted(steps)


def write_snapshot(store: Store, sink, step: int, files: dict[str, bytes],
                   flush: Callable[[], None]) -> None:
    if not files or MARKER in files:
        raise StoreError(f"a snapshot needs at least one file, none named {MARKER}")
    for name in files:
        if not name or "/" in name or name.startswith("."):
            raise StoreError(f"snapshot file name {name!r} must be a plain file name")
    delete_snapshot_marker(store, step)  # a snapshot of this step written again
    sink.map(lambda item: sink.put(snapshot_key(step, item[0]), item[1]), list(files.items()))
    flush()  # every file is on disk before the marker says the snapshot is whole
    marker = {"step": int(step), "files": {n: len(b) for n, b in files.items()},
              "written_at": now_iso()}
    sink.put(snapshot_key(step, MARKER), json.dumps(marker).encode())
    flush()


def delete_snapshot_marker(store: Store, step: int) -> None:
    try:
        delete(store, [snapshot_key(step, MARKER)])
    except FileNotFoundError:
        pass


def read_snapshot_file(store: Store, url: str, step: int, name: str) -> bytes:
    """One file of a committed snapshot, checked against the size its marker recorded."""
    raw = get_bytes(store, snapshot_key(step, MARKER))
    if raw is None:
        have = snapshot_steps(store)
        raise StoreError(f"no weight snapshot at step {step} in {url}; snapshots: "
                         f"{steps_line(have)}")
    try:
        sizes = json.loads(raw)["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptStore(f"snapshot {step} of {url} is corrupt: its {MARKER} cannot be read "
                           f"({type(e).__name__})") from None
    if name not in sizes:
        raise StoreError(f"snapshot {step} of {url} has no file {name!r}; it has "
                         f"{', '.join(sizes)}")
    data = get_bytes(store, snapshot_key(step, name))
    if data is None or len(data) != int(sizes[name]):
        raise CorruptStore(f"snapshot {step} of {url} is corrupt: {name} is "
                           f"{'missing' if data is None else f'{len(data)} bytes'}, its marker "
                           f"says {sizes[name]}")
    return data


def steps_line(steps: list[int], empty: str = "none (the run kept none: "
               "capture.snapshot_every)") -> str:
    """Steps for a one-line message: all of them when few, else the first, ..., the last."""
    if not steps:
        return empty
    if len(steps) <= 16:
        return ", ".join(map(str, steps))
    return f"{len(steps)}: {', '.join(map(str, steps[:8]))}, ..., {steps[-1]}"
