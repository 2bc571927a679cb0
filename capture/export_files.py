"""The files `capture.export` writes, each written whole or not at all: under a temporary
name in its final folder, renamed into place on success and removed on failure, so an
interrupted export never leaves a partial file under a final name."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from store.errors import UserError


class _Atomic:
    """A temporary path next to `final`; renamed onto it on success, removed on failure."""

    def __init__(self, final: Path):
        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            os.replace(self.tmp, self.final)
        else:
            self.tmp.unlink(missing_ok=True)
        return False


def save_torch(obj, path: Path) -> None:
    import torch

    with _Atomic(path) as tmp:
        torch.save(obj, tmp)


def save_npy(arr: np.ndarray, path: Path) -> None:
    with _Atomic(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, arr)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str],
                      block: int = 1) -> None:
    """The safetensors format written directly (8-byte header length, JSON header, raw
    little-endian bytes), streaming the arrays `block` leading rows at a time, so a
    file-backed array is never copied into memory whole."""
    dtypes = {np.dtype("float16"): "F16", np.dtype("float32"): "F32", np.dtype("int64"): "I64",
              np.dtype("int32"): "I32"}
    header: dict = {"__metadata__": dict(meta)}
    off = 0
    for name, a in tensors.items():
        header[name] = {"dtype": dtypes[a.dtype], "shape": list(a.shape),
                        "data_offsets": [off, off + a.nbytes]}
        off += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with _Atomic(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for a in tensors.values():
                a = a.astype(a.dtype.newbyteorder("<"), copy=False)
                for i in range(0, max(len(a), 1), block):
                    f.write(np.ascontiguousarray(a[i:i + block]).tobytes())


def make_dirs(path: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first); a place where no folder
    can be made is the user's input, reported as such (not as a store that cannot be read)."""
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    if not p.is_dir():
        raise UserError(f"--out: {p} is a file, so {path} cannot be made; choose another "
                        f"--out")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out: cannot create {path} ({e.strerror}); choose a place you can "
                        f"write to") from None
    return list(reversed(missing))
