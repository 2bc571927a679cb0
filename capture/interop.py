"""Captured activations in the formats of the usual interpretability tools.

    from capture.interop import activation_cache, write_saelens_dataset
    cache, tokens = activation_cache("runs/tiny/capture.zarr", step=200)
    cache["blocks.1.hook_resid_post"]            # float32 [P, T, D], as run_with_cache gives
    write_saelens_dataset(store, "blocks.1.hook_resid_post", 200, Path("sae_cache"))

`activation_cache`: one captured step as a TransformerLens `ActivationCache`.
`write_saelens_dataset`: one hook at one step as the Hugging Face `datasets` folder that
SAELens trains from (`cached_activations_path`).

Both take a `store.reader.RunStore` (or its path / URL) and read it lazily; a step that was
not captured or a hook that is not stored raises the store's `StoreError`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from store.errors import StoreError

if TYPE_CHECKING:
    import torch
    from transformer_lens import ActivationCache

    from store.reader import RunStore

PATTERN = "blocks.{layer}.attn.hook_pattern"
_HEAD_HOOKS = ("hook_q", "hook_k", "hook_v", "hook_z")  # stored flat: H * d_head
SAELENS_TOKENS = "token_ids"
_WRITER_BATCH_BYTES = 64 << 20  # rows buffered by the datasets writer before a flush
_PROGRESS_MIN_BYTES = 64 << 20


def _open(store: RunStore | str) -> RunStore:
    from store.reader import RunStore

    return store if isinstance(store, RunStore) else RunStore(str(store))


def pattern_hooks(rs: RunStore) -> dict[str, int]:
    """{`blocks.{l}.attn.hook_pattern`: l} for every layer whose attention is stored."""
    return {PATTERN.format(layer=layer): layer for layer in rs.attn_layers}


# ----------------------------------------------------------------------------- TransformerLens


def activation_cache(store: RunStore | str, step: int, hooks: list[str] | None = None,
                     model: Any = None) -> tuple[ActivationCache, torch.Tensor]:
    """The capture at `step` as a TransformerLens ActivationCache, and its input tokens.

    Returns `(cache, tokens)`:

    - `cache`: keys are the stored hook names (`hooks`, default all of them: every stored
      activation hook, then `blocks.{l}.attn.hook_pattern` of every layer whose attention is
      stored), values float32 CPU tensors (converted from the stored float16) in
      TransformerLens's shapes, batch first: [P, T, D] for residual and MLP hooks
      (`blocks.1.hook_resid_post`, `blocks.1.mlp.hook_post`), [P, T, H, d_head] for
      `attn.hook_q|k|v|z` (stored with the heads flattened), [P, T, 1] for `hook_scale`, and
      [A, H, Ta, Ta] (batch, head, query, key) for `attn.hook_pattern`, Ta = the
      store's `attn_len` (the first Ta positions; all T when it is T). Attention is stored
      only for the first A probe sequences (`RunStore.attn_seqs`), so a pattern's batch is
      A, not P: its row a is sequence a of the others. `cache.apply_slice_to_batch_dim(
      slice(0, A))` gives every entry batch A (it slices only the entries whose batch is
      the cache's most common one, P).
    - `tokens`: int64 [P, T], the token ids that capture ran on (the probe set, or the
      training micro-batch for source "train"); row p is batch row p of the cache.

    `hooks`: exact names from `RunStore.act_hooks` or `pattern_hooks(store)`; an unknown one, or
    an uncaptured step, raises `StoreError`. The whole step is read into memory (4 bytes a
    value): name only the hooks you need for a large capture.

    `model` is handed to the ActivationCache as its `model` (default None). Without one the
    dict-like cache works: keys(), items(), `cache[name]`, `cache["resid_post", 1]`
    (non-negative layers), len, iteration, `.to(device)`, `apply_slice_to_batch_dim`, and
    `remove_batch_dim()` when P is 1. What needs TransformerLens's model interface fails
    without one: negative layer indices and the analysis helpers (`accumulated_resid`,
    `decompose_resid`, `stack_activation` without `layer=`, `logit_lens`, `logit_attrs`,
    `compute_head_results`, `get_neuron_results`, `apply_ln_to_stack`, ...): they read
    `model.cfg.n_layers`, `W_U`, `W_O`, `W_out`, LayerNorm settings. This project's
    `trainer.model.GPT` (`trainer.checkpoint.load_model(run_dir, step)[0]`) may be passed,
    and is kept as `cache.model`, but does not provide that interface (its config says
    `n_layer`, its weights are nn.Linear), so those helpers fail with it too; most of them
    also need hooks a capture does not keep by default (resid_pre, hook_z, LayerNorm scales).
    """
    import torch
    from transformer_lens import ActivationCache

    rs = _open(store)
    rs.slot(step, "full")  # StoreError naming the nearest full captures
    patterns = pattern_hooks(rs)
    if hooks is None:
        hooks = list(rs.act_hooks) + list(patterns)
    unknown = [h for h in hooks if h not in rs.act_hooks and h not in patterns]
    if unknown:
        raise StoreError(f"hook {unknown[0]!r} has no stored activations; stored: "
                         f"{', '.join([*rs.act_hooks, *patterns]) or '(none)'}")
    P, A, Ta = rs.n_seqs, rs.attn_seqs, rs.attn_len
    cache: dict[str, torch.Tensor] = {}
    for hook in dict.fromkeys(hooks):
        if hook in patterns:  # the first attn_len query and key positions
            out = torch.empty((A, rs.n_heads, Ta, Ta), dtype=torch.float32)
            for a in range(A):
                out[a] = torch.from_numpy(rs.attention(patterns[hook], step, seq=a))
        else:
            out = torch.empty((P, rs.seq_len, rs.act_hooks[hook]), dtype=torch.float32)
            for p in range(P):  # one chunk at a time: no float16 copy of the whole step
                out[p] = torch.from_numpy(rs.activations(hook, step, seq=p))
            out = _tl_shape(hook, out, rs.n_heads)
        cache[hook] = out
    tokens = torch.from_numpy(np.asarray(rs.tokens(step)).astype(np.int64))
    return ActivationCache(cache, model, has_batch_dim=True), tokens


def _tl_shape(hook: str, acts: torch.Tensor, n_heads: int) -> torch.Tensor:
    """TransformerLens's shape for a hook stored as [P, T, D]: heads split out for q/k/v/z."""
    leaf = hook.rsplit(".", 1)[-1]
    D = acts.shape[-1]
    if leaf in _HEAD_HOOKS and ".attn." in hook and n_heads > 0 and D % n_heads == 0:
        return acts.view(*acts.shape[:-1], n_heads, D // n_heads)
    return acts


# ----------------------------------------------------------------------------- SAELens


def saelens_features(hook: str, context_size: int, d_in: int):
    """The `datasets.Features` of SAELens's cached activations: a column named by the hook,
    `Array2D(shape=(context_size, d_in), dtype="float32")`, and `token_ids`,
    `Sequence(Value("int32"), length=context_size)`; one row per sequence.

    Verified against SAELens's own writer and reader (decoderesearch/SAELens, formerly
    jbloomAus/SAELens, v6): `sae_lens/cache_activations_runner.py` (commit cda1d0bb,
    `CacheActivationsRunner.__init__` builds exactly these features, `_create_shard` writes
    the rows, `Dataset.save_to_disk` and `_consolidate_shards` the folder) and
    `sae_lens/training/activations_store.py` (commit b0b68e23,
    `load_cached_activation_dataset`: `datasets.load_from_disk(cached_activations_path)`,
    requires the hook column with `features[hook].shape == (context_size, d_in)`, uses
    `token_ids` when present; `_load_raw_llm_batch_from_cached` reads rows of
    [context_size, d_in] and [context_size]). float32 is SAELens's default `dtype`.
    """
    from datasets import Array2D, Features, Sequence, Value

    return Features({
        hook: Array2D(shape=(context_size, d_in), dtype="float32"),
        SAELENS_TOKENS: Sequence(Value("int32"), length=context_size),
    })


def write_saelens_dataset(store: RunStore | str, hook: str, step: int, out_dir: Path) -> Path:
    """Write `hook`'s activations at `step` as a SAELens cached-activations folder at
    `out_dir` (a `Dataset.save_to_disk` folder; returned). Point SAELens at it with
    `LanguageModelSAERunnerConfig(use_cached_activations=True, cached_activations_path=
    out_dir, hook_name=hook, context_size=T, d_in=D, store_batch_size_prompts<=P, ...)`, or
    read it with `datasets.load_from_disk(out_dir)`.

    One row per captured sequence p (P rows, in order): column `hook`, float32 [T, D] (the
    stored float16, converted), and `token_ids`, int32 [T], the tokens that row ran on.

    The store is read one sequence at a time into a generator (`Dataset.from_generator`
    with explicit features, a few rows buffered), so memory stays bounded however large
    the capture; the rows are staged in a hidden sibling folder, `.{name}.tmp-{pid}`, which
    needs about twice the dataset's size on disk while it is written, and the finished
    dataset is renamed onto `out_dir` (replacing an earlier export there). An interrupted
    or failed write leaves nothing under `out_dir`'s name and removes the staging folder.
    """
    from datasets import Dataset
    from datasets.exceptions import DatasetGenerationError
    from tqdm import tqdm

    rs = _open(store)
    rs.slot(step, "full")
    if hook not in rs.act_hooks:
        raise StoreError(f"hook {hook!r} has no stored activations; stored: "
                         f"{', '.join(rs.act_hooks) or '(none)'}")
    P, T, D = rs.n_seqs, rs.seq_len, rs.act_hooks[hook]
    row_bytes = T * D * 4
    final = Path(out_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    bar = tqdm(total=P, unit="seq", desc=f"saelens {hook} step {step}", dynamic_ncols=True,
               disable=P * row_bytes < _PROGRESS_MIN_BYTES)

    def rows() -> Iterator[dict]:
        for p in range(P):
            yield {hook: rs.activations(hook, step, seq=p).astype(np.float32),
                   SAELENS_TOKENS: rs.tokens(step, seq=p).astype(np.int32)}
            bar.update(1)

    try:
        with _quiet_datasets():
            ds = Dataset.from_generator(
                rows, features=saelens_features(hook, T, D),
                cache_dir=str(work / "cache"),  # private: never a stale shared cache hit
                fingerprint=uuid.uuid4().hex,  # no hashing of the generator's closure
                writer_batch_size=max(1, min(1000, _WRITER_BATCH_BYTES // row_bytes)))
            ds.save_to_disk(str(work / "dataset"))
            del ds
        _replace_dir(work / "dataset", final)
    except DatasetGenerationError as e:
        if isinstance(e.__cause__, StoreError):
            raise e.__cause__ from None
        raise
    finally:
        bar.close()
        shutil.rmtree(work, ignore_errors=True)
    return final


@contextlib.contextmanager
def _quiet_datasets():
    """No progress bars from `datasets` (the caller shows its own)."""
    from datasets.utils import (are_progress_bars_disabled, disable_progress_bars,
                                enable_progress_bars)

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def _replace_dir(src: Path, final: Path) -> None:
    """Rename `src` onto `final`, moving an existing `final` aside first (a directory cannot
    be renamed over a non-empty one) and deleting it after."""
    old = None
    if final.exists() or final.is_symlink():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        _remove(old)
        os.replace(final, old)
    os.replace(src, final)
    if old is not None:
        _remove(old)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
