"""Training data: token windows over the shards of `python -m trainer.prepare`, and a loader
that hands each rank its part of every batch.

Windows. A split's shards are memory-mapped (uint16, read-only). A window is seq_len+1
consecutive tokens inside one shard, starting at offsets k*seq_len: the inputs of two
windows never overlap, and the extra token is the last target (y is x shifted by one).
Windows never straddle two shards, so each shard loses at most seq_len tokens at its end.

Order. Window indices are global and unbounded: index i is in epoch e = i // num_windows
and names window perm_e[i % num_windows], where perm_e is a permutation drawn from
np.random.default_rng([seed, e]) (the identity when shuffle=False). No state: the same i
always gives the same window, on any rank, in any process, after any restart.

Batches. `DistributedLoader.next_batch()` is one "round": all `world` ranks together
consume world*B consecutive indices (B = micro_batch) and rank r takes
[round*world*B + r*B, round*world*B + (r+1)*B). With gradient accumulation of A rounds per
optimizer step, step s covers exactly the windows [s*A*world*B, (s+1)*A*world*B). So:
- the windows of a step depend only on the global batch A*world*B, not on how it is split
  over ranks and accumulation rounds (world=2, A=1 sees what world=1, A=2 sees);
- the only state is `position` (rounds consumed): a resume from `state_dict()` continues
  with the very next windows. A resume with another world*B can convert it as
  position * old_world * old_B / (new_world * new_B) (see `windows_per_round`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from store.errors import UserError
from trainer.prepare import FORMAT_VERSION  # the shards' format, written by prepare


def load_manifest(data_dir: str | Path) -> dict:
    """The manifest of a data dir, checked to be one this code reads."""
    d = Path(data_dir)
    if not d.is_dir():
        raise UserError(f"data dir {str(d)} not found; make one with "
                        f"python -m trainer.prepare --text FILE --out {str(d)}")
    path = d / "manifest.json"
    if not path.is_file():
        raise UserError(f"{str(path)} not found: is {str(d)} a data dir made by "
                        "python -m trainer.prepare?")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{str(path)} is not valid JSON ({e}); re-run python -m trainer.prepare") \
            from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise UserError(f"{str(path)} has format_version {version!r}, this trainer reads "
                        f"{FORMAT_VERSION}; re-run python -m trainer.prepare") \
            from None
    return manifest


class TokenWindows:
    """Stateless, deterministic access to the seq_len+1 token windows of one split."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, seed: int = 0,
                 shuffle: bool = True):
        if seq_len <= 0:
            raise UserError(f"seq_len must be positive, got {seq_len}")
        if seed < 0:  # numpy's SeedSequence takes non-negative entropy only
            raise UserError(f"data seed must be non-negative, got {seed}")
        self.data_dir, self.split, self.seq_len = Path(data_dir), split, seq_len
        self.seed, self.shuffle = seed, shuffle
        manifest = load_manifest(data_dir)
        if manifest.get("dtype") != "uint16":
            raise UserError(f"{self.data_dir} has dtype {manifest.get('dtype')!r}; "
                            "this trainer reads uint16")
        splits = manifest.get("splits", {})
        if split not in splits:
            raise UserError(f"{self.data_dir} has no {split!r} split (it has: "
                            f"{', '.join(splits) or 'none'}); re-run python -m trainer.prepare") \
            from None
        self.shards: list[np.memmap] = []
        counts = []
        for entry in splits[split]:
            path = self.data_dir / entry["file"]
            n = int(entry["tokens"])
            size = path.stat().st_size if path.is_file() else -1
            if size != 2 * n:
                raise UserError(f"shard {str(path)} should hold {n} tokens ({2 * n} bytes) but "
                                f"{'is missing' if size < 0 else f'has {size} bytes'}; "
                                "re-run python -m trainer.prepare") \
            from None
            if n == 0:  # np.memmap cannot map an empty file; it has no window anyway
                continue
            self.shards.append(np.memmap(path, dtype=np.uint16, mode="r"))
            counts.append(max(0, (n - 1) // seq_len))
        self.num_tokens = sum(int(e["tokens"]) for e in splits[split])
        # _starts[k] = global index of shard k's first window; _starts[-1] = num_windows.
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        self.num_windows = int(self._starts[-1])
        if self.num_windows == 0:
            where = ("" if self.num_tokens < seq_len + 1 else
                     " in any one shard (re-run prepare with a larger --shard-tokens)")
            raise UserError(
                f"the {split} split of {self.data_dir} has {self.num_tokens} tokens{where}, "
                f"fewer than one sequence of seq_len+1 = {seq_len + 1}; "
                "use a shorter train.seq_len or more data")
        self._perm_cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_windows

    def permutation(self, epoch: int) -> np.ndarray:
        """Window order of one epoch (cached: a batch rarely spans more than two epochs)."""
        if not self.shuffle:
            return np.arange(self.num_windows, dtype=np.int64)
        perm = self._perm_cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            if len(self._perm_cache) >= 2:
                self._perm_cache.pop(min(self._perm_cache))
            self._perm_cache[epoch] = perm
        return perm

    def windows(self, indices: np.ndarray | list[int]) -> np.ndarray:
        """The window numbers (in shard order) that global indices name."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and idx.min() < 0:
            raise IndexError(f"window indices must be non-negative, got {idx.min()}")
        epochs, rest = np.divmod(idx, self.num_windows)
        out = np.empty_like(idx)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self.permutation(int(e))[rest[sel]]
        return out

    def get(self, indices: np.ndarray | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 [n, seq_len] each, for global window indices; y[:, t] is the token
        after x[:, t] (the next-token target), so y[:, :-1] == x[:, 1:]."""
        w = self.windows(indices)
        shard = np.searchsorted(self._starts, w, side="right") - 1
        offset = (w - self._starts[shard]) * self.seq_len
        L = self.seq_len + 1
        buf = np.empty((len(w), L), dtype=np.int64)
        for row, (k, o) in enumerate(zip(shard.tolist(), offset.tolist())):
            buf[row] = self.shards[k][o:o + L]
        t = torch.from_numpy(buf)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class DistributedLoader:
    """One rank's micro-batches: round p gives rank r the global indices
    [p*world*B + r*B, p*world*B + (r+1)*B) of `windows` (see the module docstring)."""

    def __init__(self, windows: TokenWindows, micro_batch: int, rank: int, world: int,
                 position: int = 0):
        if micro_batch <= 0 or world <= 0 or not 0 <= rank < world or position < 0:
            raise ValueError(f"bad loader setup: micro_batch={micro_batch}, rank={rank}, "
                             f"world={world}, position={position}")
        self.windows, self.micro_batch, self.rank, self.world = windows, micro_batch, rank, world
        self._position = position

    @property
    def position(self) -> int:
        """Rounds consumed so far (each round: world*micro_batch windows over all ranks)."""
        return self._position

    @property
    def windows_per_round(self) -> int:
        return self.world * self.micro_batch

    def indices(self, position: int | None = None) -> np.ndarray:
        """This rank's global window indices in round `position` (default: the next one)."""
        p = self._position if position is None else position
        start = p * self.windows_per_round + self.rank * self.micro_batch
        return np.arange(start, start + self.micro_batch, dtype=np.int64)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.windows.get(self.indices())
        self._position += 1
        return x, y

    def state_dict(self) -> dict:
        return {"position": self._position}

    def load_state_dict(self, state: dict) -> None:
        position = int(state["position"])
        if position < 0:
            raise ValueError(f"loader position must be non-negative, got {position}")
        self._position = position
