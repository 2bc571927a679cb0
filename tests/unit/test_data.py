from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import BPE
from trainer.config import UserError
from trainer.data import DistributedLoader, TokenWindows, load_manifest
from trainer.tokenizer import resolve

ROOT = Path(__file__).resolve().parents[2]


def make_dir(path: Path, shard_sizes: dict[str, list[int]], version: int = 1) -> Path:
    """A data dir in prepare's format whose tokens name their place: shard k, position p
    holds (1000*k + p) % 50000, so a window tells where it came from."""
    path.mkdir(parents=True)
    splits = {}
    for split, sizes in shard_sizes.items():
        splits[split] = []
        for k, n in enumerate(sizes):
            name = f"{split}_{k:06d}.bin"
            ((1000 * k + np.arange(n)) % 50000).astype("<u2").tofile(path / name)
            splits[split].append({"file": name, "tokens": n})
    manifest = {"format_version": version, "dtype": "uint16", "eot": 50256,
                "vocab_size": 50257, "tokenizer": {"name": "gpt2", "bpe_file": ""},
                "splits": splits,
                "num_tokens": {s: sum(v) for s, v in shard_sizes.items()}}
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    # seq_len 8: shard 0 has (100-1)//8 = 12 windows, shard 1 (57-1)//8 = 7, shard 2 none.
    return make_dir(tmp_path / "d", {"train": [100, 57, 5], "val": [40]})


def where(x: torch.Tensor) -> list[tuple[int, int]]:
    """(shard, offset) of each window, read off its first token."""
    return [(int(t) // 1000, int(t) % 1000) for t in x[:, 0]]


def test_windows_tile_each_shard_and_y_is_shifted(data):
    w = TokenWindows(data, "train", seq_len=8, seed=3)
    assert w.num_windows == len(w) == 12 + 7
    x, y = w.get(np.arange(w.num_windows))
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (19, 8)
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y[:, -1], x[:, -1] + 1)  # the +1 token, from the same shard
    assert sorted(where(x)) == [(0, 8 * k) for k in range(12)] + [(1, 8 * k) for k in range(7)]
    assert torch.equal(x, x[:, :1] + torch.arange(8))  # consecutive tokens inside one shard


def test_stateless_deterministic_and_seeded(data):
    a = TokenWindows(data, "train", 8, seed=3)
    b = TokenWindows(data, "train", 8, seed=3)
    idx = [5, 0, 17, 40, 5]
    assert torch.equal(a.get(idx)[0], b.get(idx)[0])
    assert torch.equal(a.get(idx)[0][0], a.get(idx)[0][4])  # same i, same window
    assert torch.equal(a.get([17])[0][0], a.get(idx)[0][2])
    other = TokenWindows(data, "train", 8, seed=4)
    assert not torch.equal(a.get(range(19))[0], other.get(range(19))[0])
    plain = TokenWindows(data, "train", 8, shuffle=False)
    assert where(plain.get(range(19))[0]) == sorted(where(plain.get(range(19))[0]))
    assert a.permutation(0).tolist() == np.random.default_rng([3, 0]).permutation(19).tolist()


def test_epoch_wrap_gives_a_new_permutation(data):
    w = TokenWindows(data, "train", 8, seed=1)
    n = w.num_windows
    e0, e1, e2 = (where(w.get(range(e * n, (e + 1) * n))[0]) for e in range(3))
    assert sorted(e0) == sorted(e1) == sorted(e2)  # every window once per epoch
    assert e0 != e1 and e1 != e2
    # A batch across the epoch boundary takes the end of one order and the start of the next.
    assert where(w.get([n - 1, n])[0]) == [e0[-1], e1[0]]


def loader_steps(data, world: int, micro: int, accum: int, steps: int) -> list[list[int]]:
    """Per optimizer step, the window indices each rank's batches covered, all ranks pooled."""
    w = TokenWindows(data, "train", 8, seed=0)
    loaders = [DistributedLoader(w, micro, r, world) for r in range(world)]
    out = []
    for _ in range(steps):
        seen: list[list[int]] = [[] for _ in range(world)]
        for _ in range(accum):
            for r, ld in enumerate(loaders):
                idx = ld.indices()
                x, _ = ld.next_batch()
                assert torch.equal(x, w.get(idx)[0])
                seen[r] += idx.tolist()
        flat = [i for s in seen for i in s]
        assert len(set(flat)) == len(flat)  # ranks never share a window within a step
        out.append(sorted(flat))
    return out


def test_same_global_batch_same_windows_for_any_world(data):
    one = loader_steps(data, world=1, micro=4, accum=2, steps=5)
    two = loader_steps(data, world=2, micro=4, accum=1, steps=5)
    four = loader_steps(data, world=4, micro=2, accum=1, steps=5)
    assert one == two == four
    assert one[0] == list(range(8)) and one[4] == list(range(32, 40))  # runs past one epoch


def test_rank_takes_its_slice_of_each_round(data):
    w = TokenWindows(data, "train", 8)
    ld = DistributedLoader(w, micro_batch=3, rank=1, world=2)
    assert ld.indices().tolist() == [3, 4, 5]
    ld.next_batch()
    assert ld.position == 1 and ld.indices().tolist() == [9, 10, 11]
    with pytest.raises(ValueError):
        DistributedLoader(w, micro_batch=3, rank=2, world=2)


def test_resume_from_state_dict_continues_identically(data):
    w = TokenWindows(data, "train", 8, seed=9)
    a = DistributedLoader(w, 3, rank=1, world=2)
    for _ in range(4):
        a.next_batch()
    state = a.state_dict()
    assert state == {"position": 4}
    want = [a.next_batch() for _ in range(6)]
    fresh = TokenWindows(data, "train", 8, seed=9)  # as after a restart: a new process
    b = DistributedLoader(fresh, 3, rank=1, world=2)
    b.load_state_dict(json.loads(json.dumps(state)))
    c = DistributedLoader(fresh, 3, rank=1, world=2, position=4)
    for (x, y) in want:
        for ld in (b, c):
            bx, by = ld.next_batch()
            assert torch.equal(bx, x) and torch.equal(by, y)
    assert b.position == c.position == 10


def test_too_short_split_is_a_user_error(tmp_path):
    d = make_dir(tmp_path / "short", {"train": [100], "val": [6]})
    with pytest.raises(UserError) as e:
        TokenWindows(d, "val", seq_len=8)
    msg = str(e.value)
    assert msg == (f"the val split of {d} has 6 tokens, fewer than one sequence of "
                   "seq_len+1 = 9; use a shorter train.seq_len or more data")
    assert TokenWindows(d, "val", seq_len=5).num_windows == 1
    tiny = make_dir(tmp_path / "tiny", {"train": [6, 6, 6]})
    with pytest.raises(UserError, match="--shard-tokens"):
        TokenWindows(tiny, "train", seq_len=8)


def test_manifest_and_shard_errors_are_one_line(tmp_path):
    cases = []
    missing = tmp_path / "nope"
    with pytest.raises(UserError) as e:
        load_manifest(missing)
    assert "python -m trainer.prepare --text FILE --out" in str(e.value)
    cases.append(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="manifest.json not found") as e:
        load_manifest(tmp_path / "empty")
    cases.append(e)
    old = make_dir(tmp_path / "old", {"train": [100]}, version=0)
    with pytest.raises(UserError, match="format_version 0") as e:
        load_manifest(old)
    cases.append(e)
    cut = make_dir(tmp_path / "cut", {"train": [100]})
    (cut / "train_000000.bin").write_bytes(b"\0" * 10)
    with pytest.raises(UserError, match="should hold 100 tokens") as e:
        TokenWindows(cut, "train", 8)
    cases.append(e)
    with pytest.raises(UserError, match="no 'val' split") as e:
        TokenWindows(cut, "val", 8)
    cases.append(e)
    assert all("\n" not in str(c.value) for c in cases)


@pytest.mark.usefixtures("shared")
def test_reads_what_prepare_writes(tmp_path, monkeypatch):
    from trainer import prepare

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # if datasets is not imported yet
    text = tmp_path / "data_story.txt"
    text.write_text("\n\n".join(f"Paragraph {i} says hello to the loader." for i in range(30)))
    out = tmp_path / "prepared"
    assert prepare.main(["--text", str(text), "--out", str(out), "--tokenizer-file",
                         str(BPE), "--workers", "1", "--val-fraction", "0"]) == 0
    m = load_manifest(out)
    w = TokenWindows(out, "train", seq_len=16, shuffle=False)
    assert w.num_windows == (m["num_tokens"]["train"] - 1) // 16
    x, y = w.get([0])
    enc = resolve(data_dir=str(out))  # the BPE file prepare recorded in the manifest
    assert enc.name == "gpt2" and x[0, 0] == 50256  # EOT before the first document
    assert enc.decode(x[0, 1:].tolist()).startswith("Paragraph 0 says hello")
