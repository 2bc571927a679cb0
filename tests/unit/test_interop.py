"""capture.interop: a captured step as a TransformerLens ActivationCache, and one hook as
SAELens's cached-activations dataset folder (also through `python -m capture.export`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from capture.interop import activation_cache, pattern_hooks, write_saelens_dataset
from helpers import ROOT, env
from store.errors import CorruptStore, StoreError
from store.reader import RunStore
from store.schema import Layout
from store.writer import StoreWriter
from trainer.config import ModelConfig
from trainer.model import GPT

P, T, A, WORLD = 4, 6, 2, 2  # attention kept for the first A of the P sequences
L, H, E, V = 2, 2, 8, 64  # layers, heads, width, vocabulary of the tiny model
HOOKS = {"blocks.0.hook_resid_post": E, "blocks.1.hook_resid_post": E,
         "blocks.1.mlp.hook_post": 4 * E, "blocks.0.attn.hook_z": E}
ATTN_LAYERS = [0, 1]
PATTERNS = [f"blocks.{layer}.attn.hook_pattern" for layer in ATTN_LAYERS]
SCHEDULED = [0, 5, 10]
COMMITTED = [0, 5]  # step 10 is written and never committed
HOOK = "blocks.1.hook_resid_post"


def tokens_of(step: int) -> np.ndarray:
    return ((np.arange(P * T).reshape(P, T) * 7 + step * 3) % V).astype(np.int32)


def model_at(step: int) -> GPT:
    """The tiny model 'at step s': weights drawn from seed s, so every step differs."""
    torch.manual_seed(1000 + step)
    return GPT(ModelConfig(n_layer=L, n_head=H, n_embd=E, block_size=16, vocab_size=V)).eval()


def forward_cache(step: int) -> dict[str, torch.Tensor]:
    """What the model's own run_with_cache gives on that step's tokens (TransformerLens
    shapes, float32): the reference the store was written from."""
    with torch.no_grad():
        _, cache = model_at(step).run_with_cache(torch.from_numpy(tokens_of(step)).long())
    return {k: cache[k] for k in [*HOOKS, *PATTERNS]}


def build_store(url: str) -> None:
    """A store written the way the capturer writes one: each rank its sequences, float16
    activations with the heads of hook_z flattened, patterns of the first A sequences."""
    layout = Layout(n_seqs=P, seq_len=T, act_hooks=HOOKS, topk=2,
                    attn_layers=ATTN_LAYERS, n_heads=H, attn_seqs=A, max_steps=10,
                    world=WORLD, source="probe", attrs={"model": {"n_layer": L}},
                    probe_tokens=tokens_of(0))
    w = StoreWriter.create_or_open(url, layout)
    per = P // WORLD
    for slot, step in enumerate(SCHEDULED):
        w.reserve(slot)
        ref = forward_cache(step)
        for rank in range(WORLD):
            lo = rank * per
            w.write_tokens(slot, lo, tokens_of(step)[lo:lo + per])
            for hook in HOOKS:
                a = ref[hook].reshape(P, T, -1).to(torch.float16).numpy()
                w.write_acts(hook, slot, lo, a[lo:lo + per])
            for j in range(lo, min(lo + per, A)):
                for layer, name in zip(ATTN_LAYERS, PATTERNS):
                    w.write_attn(layer, slot, j, ref[name][j].to(torch.float16).numpy())
            if rank == 0:
                for hook, D in HOOKS.items():
                    a = ref[hook].reshape(-1, D).numpy()
                    w.write_stats(hook, slot, {"mean": a.mean(0), "std": a.std(0),
                                               "min": a.min(0), "max": a.max(0),
                                               "frac_active": (a > 0).mean(0)})
                    w.write_topk(hook, slot, np.zeros((D, 2), np.float32),
                                 np.zeros((D, 2), np.int32))
            w.mark_done(slot, rank)
        if step in COMMITTED:
            w.commit(slot, step)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("interop") / "run"
    run.mkdir()
    build_store(str(run / "capture.zarr"))
    return run


@pytest.fixture(scope="module")
def rs(made) -> RunStore:
    return RunStore(str(made / "capture.zarr"))


def stored(rs: RunStore, hook: str, step: int) -> torch.Tensor:
    return torch.from_numpy(rs.activations(hook, step).astype(np.float32))


def siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------- ActivationCache


@pytest.mark.parametrize("step", COMMITTED)
def test_cache_keys_shapes_and_values(rs, step):
    cache, tokens = activation_cache(rs, step)
    assert list(cache.keys()) == [*HOOKS, *PATTERNS]
    assert len(cache) == len(HOOKS) + len(PATTERNS) and cache.has_batch_dim
    assert cache.model is None
    for hook in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"):
        assert cache[hook].shape == (P, T, E) and cache[hook].dtype == torch.float32
        assert torch.equal(cache[hook], stored(rs, hook, step))
    assert cache["blocks.1.mlp.hook_post"].shape == (P, T, 4 * E)
    assert torch.equal(cache["blocks.1.mlp.hook_post"], stored(rs, "blocks.1.mlp.hook_post",
                                                                step))
    z = cache["blocks.0.attn.hook_z"]  # stored [P, T, H * d_head]: heads split out again
    assert z.shape == (P, T, H, E // H)
    assert torch.equal(z.reshape(P, T, E), stored(rs, "blocks.0.attn.hook_z", step))
    assert tokens.dtype == torch.int64 and tokens.shape == (P, T)
    assert torch.equal(tokens, torch.from_numpy(tokens_of(step)).long())


def test_pattern_is_batch_head_query_key_of_the_first_A(rs):
    cache, _ = activation_cache(rs, 5)
    for layer, name in zip(ATTN_LAYERS, PATTERNS):
        pat = cache[name]
        assert pat.shape == (A, H, T, T) and pat.dtype == torch.float32  # batch A, not P
        for a in range(A):
            assert torch.equal(pat[a], torch.from_numpy(
                rs.attention(layer, 5, seq=a).astype(np.float32)))
        assert torch.allclose(pat.sum(-1), torch.ones(A, H, T), atol=1e-2)  # over keys
        assert torch.all(pat.triu(1) == 0)  # causal: no query sees a later key


@pytest.mark.parametrize("step", COMMITTED)
def test_cache_is_what_run_with_cache_gives(rs, step):
    """The same keys, shapes and values (to float16 precision) as the model's own
    TransformerLens run_with_cache on the captured tokens."""
    cache, tokens = activation_cache(rs, step)
    ref = forward_cache(step)
    for name in HOOKS:
        assert cache[name].shape == ref[name].shape, name
        torch.testing.assert_close(cache[name], ref[name], rtol=2e-3, atol=2e-3)
    for name in PATTERNS:
        torch.testing.assert_close(cache[name], ref[name][:A], rtol=2e-3, atol=2e-3)


def test_cache_api_without_a_model(rs):
    cache, _ = activation_cache(rs, 0)
    assert torch.equal(cache["resid_post", 1], cache["blocks.1.hook_resid_post"])
    assert torch.equal(cache["post", 1], cache["blocks.1.mlp.hook_post"])
    assert torch.equal(cache["pattern", 0], cache["blocks.0.attn.hook_pattern"])
    assert list(cache) == list(cache.keys()) and len(list(cache.items())) == len(cache)
    assert cache.to("cpu") is cache and cache["blocks.0.hook_resid_post"].device.type == "cpu"
    sliced = cache.apply_slice_to_batch_dim(slice(0, A))  # every entry batch A
    assert {v.shape[0] for v in sliced.values()} == {A}
    assert torch.equal(sliced["blocks.0.hook_resid_post"], cache["blocks.0.hook_resid_post"][:A])
    with pytest.raises(AssertionError):  # P > 1
        cache.remove_batch_dim()
    with pytest.raises(AttributeError):  # negative layers need model.cfg.n_layers
        cache["resid_post", -1]


def test_chosen_hooks_and_a_model(rs):
    model = model_at(5)
    cache, tokens = activation_cache(rs, 5, hooks=[HOOK, "blocks.1.attn.hook_pattern"],
                                     model=model)
    assert list(cache.keys()) == [HOOK, "blocks.1.attn.hook_pattern"]
    assert cache.model is model
    assert tokens.shape == (P, T)
    assert pattern_hooks(rs) == dict(zip(PATTERNS, ATTN_LAYERS))


def test_cache_errors_are_store_errors(rs):
    with pytest.raises(StoreError, match="blocks.7.hook_resid_post"):
        activation_cache(rs, 5, hooks=["blocks.7.hook_resid_post"])
    with pytest.raises(StoreError, match="blocks.5.attn.hook_pattern"):
        activation_cache(rs, 5, hooks=["blocks.5.attn.hook_pattern"])
    with pytest.raises(StoreError, match="step 3 is not captured.*before 0, after 5"):
        activation_cache(rs, 3)
    with pytest.raises(StoreError, match="step 10 is not captured"):  # never committed
        activation_cache(rs, 10)


def test_cache_from_a_path(made):
    cache, _ = activation_cache(str(made / "capture.zarr"), 0, hooks=[HOOK])
    assert cache[HOOK].shape == (P, T, E)


# ----------------------------------------------------------------------------- SAELens


def test_saelens_layout_and_values(rs, tmp_path):
    """The layout SAELens's CacheActivationsRunner writes and its ActivationsStore reads
    (sae_lens/cache_activations_runner.py, sae_lens/training/activations_store.py)."""
    import datasets
    from datasets import Array2D, Sequence, Value

    out = write_saelens_dataset(rs, HOOK, 5, tmp_path / "sae" / "ds")
    assert out == tmp_path / "sae" / "ds"
    assert siblings(tmp_path / "sae") == ["ds"]  # no staging folder left
    ds = datasets.load_from_disk(str(out))
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == [HOOK, "token_ids"]
    assert ds.features[HOOK] == Array2D(shape=(T, E), dtype="float32")
    assert ds.features["token_ids"] == Sequence(Value("int32"), length=T)
    assert str(ds.data.schema.field("token_ids").type) == f"fixed_size_list<item: int32>[{T}]"
    assert ds.num_rows == P
    rows = ds.with_format("numpy")[:]
    assert rows[HOOK].dtype == np.float32 and rows[HOOK].shape == (P, T, E)
    assert np.array_equal(rows[HOOK], rs.activations(HOOK, 5).astype(np.float32))
    assert np.array_equal(rows["token_ids"], tokens_of(5))
    # read as SAELens reads it: torch format on its columns, a batch of rows
    ds.set_format(type="torch", columns=[HOOK, "token_ids"], dtype=torch.float32)
    batch = ds[1:3]
    assert batch[HOOK].shape == (2, T, E) and batch["token_ids"].shape == (2, T)
    assert ds.features[HOOK].shape == (T, E)  # SAELens's (context_size, d_in) check


def test_saelens_reads_one_sequence_at_a_time(rs, tmp_path, monkeypatch):
    seen = []
    real = RunStore.activations

    def spy(self, hook, step, seq=None):
        seen.append(seq)
        return real(self, hook, step, seq=seq)

    monkeypatch.setattr(RunStore, "activations", spy)
    write_saelens_dataset(rs, "blocks.1.mlp.hook_post", 0, tmp_path / "ds")
    assert seen == list(range(P))  # never a whole [P, T, D]


def test_saelens_replaces_an_earlier_export(rs, tmp_path):
    import datasets

    out = tmp_path / "ds"
    write_saelens_dataset(rs, HOOK, 0, out)
    write_saelens_dataset(rs, HOOK, 5, out)
    assert siblings(tmp_path) == ["ds"]
    rows = datasets.load_from_disk(str(out)).with_format("numpy")[:]
    assert np.array_equal(rows[HOOK], rs.activations(HOOK, 5).astype(np.float32))


@pytest.mark.parametrize("exc", [CorruptStore("cannot read acts: broken chunk"),
                                 KeyboardInterrupt()], ids=["store-error", "interrupt"])
@pytest.mark.parametrize("earlier", [False, True], ids=["fresh", "over-earlier"])
def test_saelens_interrupted_write_leaves_no_folder(rs, tmp_path, monkeypatch, exc, earlier):
    """Failing on the 2nd sequence: nothing under the final name (or the earlier export,
    whole), no staging folder; a store error comes out as itself."""
    import datasets

    out = tmp_path / "ds"
    if earlier:
        write_saelens_dataset(rs, HOOK, 0, out)
    real = RunStore.activations
    calls = []

    def flaky(self, hook, step, seq=None):
        calls.append(seq)
        if len(calls) == 2:
            raise exc
        return real(self, hook, step, seq=seq)

    monkeypatch.setattr(RunStore, "activations", flaky)
    with pytest.raises(type(exc)):
        write_saelens_dataset(rs, HOOK, 5, out)
    assert len(calls) == 2
    assert siblings(tmp_path) == (["ds"] if earlier else [])
    if earlier:
        rows = datasets.load_from_disk(str(out)).with_format("numpy")[:]
        assert np.array_equal(rows[HOOK], rs.activations(HOOK, 0).astype(np.float32))


def test_saelens_errors_are_store_errors(rs, tmp_path):
    with pytest.raises(StoreError, match="blocks.1.attn.hook_pattern"):
        write_saelens_dataset(rs, "blocks.1.attn.hook_pattern", 5, tmp_path / "ds")
    with pytest.raises(StoreError, match="step 4 is not captured"):
        write_saelens_dataset(rs, HOOK, 4, tmp_path / "ds")
    assert siblings(tmp_path) == []


# ----------------------------------------------------------------------------- the CLI


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "capture.export", *map(str, args)], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=120)


def test_cli_saelens_round_trip(made, tmp_path):
    import datasets

    run = tmp_path / "run"
    shutil.copytree(made, run)
    r = cli("--run-dir", run, "--step", 5, "--format", "saelens", "--hook", "blocks.1.hook_r*")
    assert r.returncode == 0, r.stderr
    out = run / "exports" / "step_5" / f"saelens_{HOOK}"
    assert r.stdout.strip().splitlines() == [str(out)]
    assert siblings(run / "exports" / "step_5") == [f"saelens_{HOOK}"]
    assert siblings(run / "exports") == ["step_5"]  # no seeds' file, no other format
    ds = datasets.load_from_disk(str(out))
    rows = ds.with_format("numpy")[:]
    rs = RunStore(str(run / "capture.zarr"))
    assert np.array_equal(rows[HOOK], rs.activations(HOOK, 5).astype(np.float32))
    assert np.array_equal(rows["token_ids"], tokens_of(5))


@pytest.mark.parametrize("hooks,msg", [
    ([], "pass exactly one --hook NAME (got 0"),
    ([HOOK, "blocks.0.hook_resid_post"], "pass exactly one --hook NAME (got 2"),
    (["blocks.*.hook_resid_post"], "--hook chose 2: blocks.0.hook_resid_post, " + HOOK),
], ids=["none", "two", "pattern-of-two"])
def test_cli_saelens_needs_exactly_one_hook(made, tmp_path, hooks, msg):
    args = [a for h in hooks for a in ("--hook", h)]
    r = cli("--run-dir", made, "--step", 5, "--format", "saelens", "--out", tmp_path, *args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --format saelens writes one hook")
    assert msg in lines[0]
    assert siblings(tmp_path) == []
