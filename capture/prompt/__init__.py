"""Any step, any text: run your own text through a run's model at any weight snapshot (or
checkpoint) step, and get per step what the model made of it.

    from capture.prompt import run_text, snapshot_steps
    r = run_text("runs/tiny", "ROMEO: But soft, what light", steps="all",
                 hooks=["blocks.1.attn.hook_pattern", "blocks.*.hook_resid_post"], lens=True)
    r.tokens        # int64 [T]     the token ids (the run's tokenizer; or the ids passed in)
    r.token_strs    # [T] str       each token as text (None when ids were passed in)
    r.steps         # int64 [S]     the steps, ascending
    r.loss          # float32 [S, T-1]  loss[s, t] = -log p(tokens[t+1] | tokens[:t+1])
    r.top.ids       # int64 [S, T, k]   the k likeliest next tokens after each position,
    r.top.probs     # float32 [S, T, k] and their probabilities (descending)
    r["blocks.1.attn.hook_pattern"]     # float32 [S, H, T, T] (query, key); also r.acts[...]
    r["blocks.0.hook_resid_post"]       # float32 [S, T, D]; q/k/v/z flat: D = H * d_head
    r.lens          # float32 [S, L, T-1]: each block's output through the final LayerNorm
                    # and the unembedding (the logit lens), as next-token loss; lens=True only
    r.sources, r.where   # per step: "checkpoint" | "snapshot", and where it was read from
    r.index(200)    # the row of step 200 in every array

- `snapshot_steps(run_dir)`: the steps with a weight snapshot in the run's store
  (`checkpoints=True`: and those with a checkpoint); `steps="all"` is these snapshot steps.
- `load_model(run_dir, step, device)`: the run's model at a step as the project's GPT, a
  TransformerLens `HookedRootModule` (`run_with_cache`, `run_with_hooks`), float32, eval
  mode: the checkpoint of that step when the run kept one (full precision), else its
  weight snapshot (bf16 or fp16 weights, computed in float32). `trainer.snapshots` does
  the loading; the trainer is imported inside the functions that need it, never at the
  top, so `capture` keeps importing without the trainer's internals.
- `load_transformer_lens(run_dir, step, hf_dir)`: the same model as TransformerLens'
  `TransformerBridge`, booted from a Hugging Face folder of that step written to `hf_dir`.
- `induction_prompt(vocab, half, seed)`: `half` random token ids then the same again
  (capture.dynamics.repeated_tokens, as the capture's induction probe draws them).

One model is loaded at a time, run, and freed before the next, so memory holds one model
and the result arrays whatever the number of steps. Nothing is cached here (a caller, such
as the dashboard, caches what it wants). Bad input (empty text, text longer than the
model's context, a step with neither snapshot nor checkpoint, a run without snapshots and
steps="all", an unknown hook) raises `store.errors.UserError` with one line.

The command line: `python -m capture.prompt` (capture/prompt/cli.py).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from capture.dynamics import repeated_tokens
from capture.forward import token_losses
from store.errors import UserError

LOGIT_CHUNK = 64  # rows of [rows, vocab] logits at a time (capture.forward's LOSS_CHUNK)
# hooks whose activation is [batch, head, query, key]: kept as [H, T, T] per step
_SQUARE_HOOKS = ("attn.hook_pattern", "attn.hook_attn_scores")


class Top(NamedTuple):
    ids: np.ndarray    # int64 [S, T, k]
    probs: np.ndarray  # float32 [S, T, k], descending along k


@dataclass
class PromptResult:
    """What `run_text` returns; every array has the steps first (S = len(steps))."""

    tokens: np.ndarray                      # int64 [T]
    steps: np.ndarray                       # int64 [S], ascending
    loss: np.ndarray                        # float32 [S, T-1]
    top: Top                                # [S, T, k] each
    acts: dict[str, np.ndarray] = field(default_factory=dict)  # hook -> float32 [S, ...]
    lens: np.ndarray | None = None          # float32 [S, L, T-1] (lens=True)
    sources: list[str] = field(default_factory=list)  # per step: checkpoint | snapshot
    where: list[str] = field(default_factory=list)    # per step, for labels
    text: str | None = None                 # the text, when text was given
    token_strs: list[str] | None = None     # each token decoded (text given), else None

    def __getitem__(self, hook: str) -> np.ndarray:
        return self.acts[hook]

    def index(self, step: int) -> int:
        """The row of `step` in every array."""
        hit = np.nonzero(self.steps == int(step))[0]
        if not len(hit):
            raise UserError(f"step {step} is not in this result; its steps: "
                            f"{', '.join(map(str, self.steps.tolist()))}")
        return int(hit[0])


# ----------------------------------------------------------------------------- the run


def _run_config(run_dir: str | Path):
    from trainer.config import load_run_config

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run dir {str(run_dir)!r} not found")
    return load_run_config(run_dir)


def snapshot_steps(run_dir: str | Path, checkpoints: bool = False) -> list[int]:
    """The steps with a weight snapshot in the run's capture store, ascending ([] when the
    run has no store or none was written); `checkpoints`: also the steps with a complete
    checkpoint (every step `load_model` can load)."""
    from trainer.checkpoint import list_complete
    from trainer.snapshots import run_snapshot_steps

    cfg = _run_config(run_dir)
    steps = set(run_snapshot_steps(run_dir, cfg) or [])
    if checkpoints:
        steps |= set(list_complete(run_dir))
    return sorted(steps)


def _load(run_dir: str | Path, step: int | None, device: str):
    from trainer.snapshots import load_model_at

    return load_model_at(run_dir, step, _device(device))


def load_model(run_dir: str | Path, step: int | None, device: str = "cpu"):
    """The run's model at `step` (a weight snapshot or checkpoint step; None: the latest
    checkpoint, else the latest snapshot) as the project's GPT, a TransformerLens
    HookedRootModule, float32, in eval mode, on `device`."""
    return _load(run_dir, None if step is None else _int(step, "step"), device).model


def load_transformer_lens(run_dir: str | Path, step: int | None, hf_dir: str | Path,
                          device: str = "cpu", tokenizer_file: str = ""):
    """The run's model at `step` as TransformerLens' own model class, a `TransformerBridge`
    (TransformerLens 4 removed `HookedTransformer`; `enable_compatibility_mode()` on the
    bridge gives its numerics). The step is written to `hf_dir` as a Hugging Face GPT-2
    folder (with the tokenizer files when the run's tokenizer is found), which the bridge
    boots from, offline."""
    from transformer_lens.model_bridge import TransformerBridge

    from trainer import hf

    model = load_model(run_dir, step, "cpu")
    try:
        enc = _encoding(_run_config(run_dir), tokenizer_file)
    except UserError:
        enc = None  # a synthetic-vocabulary run: the bridge gets no tokenizer
    hf.save_hf(model, hf_dir, encoding=enc)
    return TransformerBridge.boot_transformers(str(hf_dir), device=_device(device)).eval()


def _device(name: str) -> str:
    name = str(name or "cpu")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r} is not a torch device (cpu, cuda, cuda:1, mps, "
                        f"auto)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but no CUDA device is visible")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r} asked for, but only {torch.cuda.device_count()} "
                        f"CUDA device(s) are visible")
    return name


def _int(x: Any, what: str) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise UserError(f"{what} must be an integer, got {x!r}")
    return int(x)


def _steps_line(steps: Sequence[int]) -> str:
    from store.snapshots import steps_line

    return steps_line(list(steps), empty="none")


def _choose_steps(run_dir: Path, cfg, steps) -> list[int]:
    """The steps asked for, ascending and each once, every one loadable."""
    from trainer.checkpoint import list_complete
    from store.runs import store_may_exist
    from trainer.snapshots import run_snapshot_steps, run_store_url

    snaps = run_snapshot_steps(run_dir, cfg)
    ckpts = list_complete(run_dir)
    if isinstance(steps, str):
        if steps != "all":
            raise UserError(f"steps must be 'all' or a list of steps, got {steps!r}")
        if not snaps:
            url = run_store_url(run_dir, cfg)
            if snaps is not None:
                where = (f"its capture store {url} holds none: capture.snapshot_every was 0, "
                         f"or none was written yet")
            elif store_may_exist(url):
                where = f"its capture store {url} cannot be read"
            else:
                where = f"it has no capture store ({url})"
            hint = (f"; pass steps with a checkpoint step (checkpoint steps: "
                    f"{_steps_line(ckpts)})" if ckpts else "")
            raise UserError(f"run {run_dir} has no weight snapshots: {where}{hint}")
        return list(snaps)
    if isinstance(steps, (int, np.integer)):
        steps = [steps]
    chosen = sorted({_int(s, "a step") for s in steps})
    if not chosen:
        raise UserError("no steps asked for: pass 'all' or at least one step")
    have = set(snaps or []) | set(ckpts)
    missing = [s for s in chosen if s not in have]
    if missing:
        raise UserError(f"no weight snapshot or checkpoint for step "
                        f"{', '.join(map(str, missing))} in {run_dir} (snapshot steps: "
                        f"{_steps_line(snaps or [])}; checkpoint steps: {_steps_line(ckpts)})")
    return chosen


# ----------------------------------------------------------------------------- inputs


def _encoding(cfg, tokenizer_file: str = ""):
    from trainer.tokenizer import resolve

    return resolve(tokenizer_file or "", cfg)


def tokenize(run_dir: str | Path, text: str, tokenizer_file: str = ""
             ) -> tuple[np.ndarray, list[str]]:
    """(int64 ids [T], each token as text) of `text` with the run's tokenizer
    (trainer.tokenizer.resolve with its config; `tokenizer_file` overrides it).
    `<|endoftext|>` in the text is the end-of-text token."""
    return _tokenize(_run_config(run_dir), text, tokenizer_file)


def _tokenize(cfg, text: str, tokenizer_file: str = "") -> tuple[np.ndarray, list[str]]:
    if not text:
        raise UserError("the text is empty: give at least one token of text")
    enc = _encoding(cfg, tokenizer_file)
    ids = enc.encode(text, allowed_special={"<|endoftext|>"})
    strs = [enc.decode_single_token_bytes(t).decode("utf-8", errors="replace") for t in ids]
    return np.asarray(ids, dtype=np.int64), strs


def _check_ids(ids, vocab: int, block_size: int) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.ndim != 1:
        raise UserError(f"token ids must be one sequence (1-D), got shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise UserError("the text is empty: give at least one token")
    if not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"token ids must be integers, got {arr.dtype}")
    bad = arr[(arr < 0) | (arr >= vocab)]
    if len(bad):
        raise UserError(f"token ids {bad[:5].tolist()} are outside this model's vocabulary "
                        f"of {vocab}")
    if len(arr) > block_size:
        raise UserError(f"the text is {len(arr)} tokens, more than this model's context of "
                        f"{block_size} tokens (model.block_size): shorten it")
    return arr.astype(np.int64)


def induction_prompt(vocab: int, half: int, seed: int = 0, low: int = 0) -> np.ndarray:
    """int64 [2 * half]: `half` uniform random token ids in [low, vocab), then the same
    again: the repeated random-token sequence on which an induction head attends from each
    second-half token to the one after its first occurrence (drawn as the capture's
    induction probe draws them: capture.dynamics.repeated_tokens, seeded, on the CPU)."""
    if half < 1:
        raise UserError(f"half must be at least 1, got {half}")
    if not 0 <= low < vocab:
        raise UserError(f"need 0 <= low < vocab, got low {low}, vocab {vocab}")
    return repeated_tokens(1, int(half), int(vocab), int(seed), int(low))[0].numpy()


def _hook_names(model) -> list[str]:
    return list(model.hook_dict)


def choose_hooks(names: Sequence[str], wanted: Sequence[str]) -> list[str]:
    """The hook names `wanted` names or matches (fnmatch patterns), in model order, each once;
    a name or pattern matching none is a UserError listing the kinds of hooks there are."""
    chosen: list[str] = []
    for pat in wanted:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise UserError(f"unknown hook {pat!r}; this model's hooks: {_hooks_line(names)}")
        chosen += [h for h in hits if h not in chosen]
    order = {n: i for i, n in enumerate(names)}
    return sorted(chosen, key=order.__getitem__)


def _hooks_line(names: Sequence[str]) -> str:
    """Every hook name in a line: the top-level ones, and each block's once as
    blocks.{0..L-1}.<name>."""
    per_block = [n[len("blocks.0."):] for n in names if n.startswith("blocks.0.")]
    n_layer = len({n.split(".")[1] for n in names if n.startswith("blocks.")})
    top = [n for n in names if not n.startswith("blocks.")]
    first, last = [n for n in top if not n.startswith("ln_final.")], \
        [n for n in top if n.startswith("ln_final.")]
    return ", ".join([*first, f"blocks.{{0..{n_layer - 1}}}.{{{', '.join(per_block)}}}",
                      *last])


def _meta_hooks(model_cfg) -> list[str]:
    """The hook names of a model of `model_cfg`, without weights (built on meta)."""
    from trainer.model import GPT

    with torch.device("meta"):
        return _hook_names(GPT(model_cfg))


# ----------------------------------------------------------------------------- the forward


@torch.no_grad()
def _forward(model, idx: torch.Tensor, hooks: list[str], top_k: int, lens: bool):
    """One step's numbers on one sequence idx [1, T] (host numpy, float32)."""
    n_layer = model.cfg.n_layer
    T = idx.shape[1]
    resid_names = [f"blocks.{i}.hook_resid_post" for i in range(n_layer)] if lens \
        else [f"blocks.{n_layer - 1}.hook_resid_post"]
    taken: dict[str, torch.Tensor] = {}

    def keep(a: torch.Tensor, hook) -> None:
        taken[hook.name] = a.detach()

    names = list(dict.fromkeys([*hooks, *resid_names]))
    with model.hooks(fwd_hooks=[(n, keep) for n in names]):
        model(idx, return_type=None)  # hooks only: the unembedding is done below, in chunks

    targets = idx[0, 1:]
    h = taken[resid_names[-1]][0]  # [T, d]: the last block's output
    W_U = model.lm_head.weight
    loss = torch.empty(T - 1, dtype=torch.float32, device=idx.device)
    k = min(top_k, W_U.shape[0])
    top_v = torch.empty(T, k, dtype=torch.float32, device=idx.device)
    top_i = torch.empty(T, k, dtype=torch.long, device=idx.device)
    for s in range(0, T, LOGIT_CHUNK):
        z = model.lm_head(model.ln_final(h[s:s + LOGIT_CHUNK])).float()
        lse = z.logsumexp(-1)
        e = min(s + LOGIT_CHUNK, T - 1)
        if e > s:
            loss[s:e] = lse[:e - s] - z[:e - s].gather(1, targets[s:e, None])[:, 0]
        if k:
            v, i = z.topk(k, dim=-1)
            top_v[s:s + LOGIT_CHUNK] = (v - lse[:, None]).exp()
            top_i[s:s + LOGIT_CHUNK] = i

    out_lens = None
    if lens:
        ln = model.ln_final
        w = ln.weight.float()
        b = ln.bias.float() if ln.bias is not None else None

        def final_ln(x: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(x.float(), x.shape[-1:], w, b, ln.eps)

        out_lens = torch.stack([token_losses(taken[n][0, :-1], final_ln, W_U, targets)
                                for n in resid_names])  # [L, T-1]

    acts = {}
    for n in hooks:
        a = taken[n][0]
        acts[n] = a if n.endswith(_SQUARE_HOOKS) else a.reshape(T, -1)
    host = lambda t: t.float().cpu().numpy()  # noqa: E731
    return (host(loss), top_i.cpu().numpy(), host(top_v), {n: host(a) for n, a in acts.items()},
            None if out_lens is None else host(out_lens))


def run_text(run_dir: str | Path, text: str | Sequence[int] | np.ndarray | torch.Tensor,
             steps: str | int | Sequence[int] = "all", hooks: Sequence[str] = (),
             device: str = "cpu", top_k: int = 5, lens: bool = False,
             tokenizer_file: str = "",
             progress: Callable[[int, int, int], None] | None = None) -> PromptResult:
    """Run `text` (a string, tokenized with the run's tokenizer; or token ids) through the
    run's model at each of `steps` ("all": every weight snapshot step; or steps of snapshots
    or checkpoints) and return a `PromptResult` (see the module docstring). `hooks`: hook
    names or fnmatch patterns whose activations to keep; `top_k`: next-token candidates per
    position (0: none); `lens`: also the logit lens; `progress(done, total, step)` is called
    after each step. One model in memory at a time; nothing cached."""
    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    top_k = _int(top_k, "top_k")
    if top_k < 0:
        raise UserError(f"top_k must be >= 0, got {top_k}")
    top_k = min(top_k, cfg.model.vocab_size)
    if isinstance(hooks, str):
        hooks = [hooks]
    device = _device(device)
    chosen_hooks = choose_hooks(_meta_hooks(cfg.model), list(hooks)) if hooks else []
    token_strs = None
    if isinstance(text, str):
        ids, token_strs = _tokenize(cfg, text, tokenizer_file)
    else:
        ids = text
    ids = _check_ids(ids, cfg.model.vocab_size, cfg.model.block_size)
    step_list = _choose_steps(run_dir, cfg, steps)

    S, T = len(step_list), len(ids)
    res = PromptResult(tokens=ids, steps=np.asarray(step_list, dtype=np.int64),
                       loss=np.empty((S, T - 1), np.float32),
                       top=Top(np.empty((S, T, top_k), np.int64),
                               np.empty((S, T, top_k), np.float32)),
                       text=text if isinstance(text, str) else None, token_strs=token_strs)
    for si, step in enumerate(step_list):
        loaded = _load(run_dir, step, device)
        res.sources.append(loaded.source)
        res.where.append(loaded.where)
        try:
            model = loaded.model
            mc = model.cfg
            if mc.block_size < T or mc.vocab_size <= int(ids.max()):
                _check_ids(ids, mc.vocab_size, mc.block_size)  # the step's own model
            if chosen_hooks:
                have = set(_hook_names(model))
                lost = [h for h in chosen_hooks if h not in have]
                if lost:
                    raise UserError(f"the model at step {step} has no hook "
                                    f"{', '.join(lost)}")
            idx = torch.as_tensor(ids, device=device)[None]
            loss, ti, tv, acts, lens_arr = _forward(model, idx, chosen_hooks, top_k, lens)
        finally:
            del loaded  # the only reference: the model is freed here (no cycles to wait for)
            model = None
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        res.loss[si], res.top.ids[si], res.top.probs[si] = loss, ti, tv
        for n, a in acts.items():
            if n not in res.acts:
                res.acts[n] = np.empty((S, *a.shape), np.float32)
            res.acts[n][si] = a
        if lens_arr is not None:
            if res.lens is None:
                res.lens = np.empty((S, *lens_arr.shape), np.float32)
            res.lens[si] = lens_arr
        if progress is not None:
            progress(si + 1, S, step)
    return res
