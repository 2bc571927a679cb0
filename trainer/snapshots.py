"""Weight snapshots as models: the bf16 (or fp16) weights a run wrote into its capture store
at a Pythia-like schedule (capture.snapshot_every: 0, 1, 2, 4, ..., every N, the last
step), loaded back as our `GPT` in float32.

- `load_snapshot(store_or_url, step, device)` -> (GPT, ModelConfig, step): the snapshot of a
  store (a `RunStore`, a path or an fsspec URL).
- `load_model_at(run_dir, step, device)` -> `Loaded(model, cfg, step, source, where)`: a
  run's model at a step, from its checkpoint when one exists (full fp32 precision), else
  from the snapshot at that step in the run's store, so every snapshot step loads whatever
  `checkpoint.keep_last` pruned. With step None: the latest checkpoint (the latest snapshot
  when the run kept no checkpoint at all).

Capture writes the snapshots (capture/snapshot.py) and the store holds them
(store/snapshots.py); turning them into a model needs the model class, so it lives here.
Errors are `UserError`s: one line, naming what the run or store does have.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, NamedTuple

import torch

from store.runs import store_may_exist, store_url
from store.snapshots import steps_line
from trainer.config import ModelConfig, RunConfig, UserError, load_run_config

WEIGHTS, CONFIG = "model.safetensors", "config.json"  # the names capture/snapshot.py writes


class Loaded(NamedTuple):
    model: Any            # trainer.model.GPT, float32, eval mode, on the device asked for
    cfg: RunConfig
    step: int
    source: str           # "checkpoint" | "snapshot"
    # for messages: "checkpoint RUN/checkpoints/step_00000200" or "bf16 weight snapshot
    # in RUN/capture.zarr"
    where: str


# ----------------------------------------------------------------------------- a store


def _open(store_or_url):
    """(RunStore, its URL) from a RunStore or a path / fsspec URL; store errors as UserError."""
    from store.errors import StoreError
    from store.reader import RunStore

    if isinstance(store_or_url, RunStore):
        return store_or_url, store_or_url.url
    url = str(store_or_url)
    if not store_may_exist(url):
        raise UserError(f"capture store {url} not found")
    try:
        rs = RunStore(url)
    except StoreError as e:
        raise UserError(str(e)) from None
    return rs, rs.url


def _steps_line(steps: list[int]) -> str:
    return steps_line(steps, empty="none")


def _model_config(raw: bytes, step: int, url: str) -> tuple[ModelConfig, str]:
    """The snapshot's ModelConfig and weight dtype from its config.json."""
    try:
        meta = json.loads(raw)
        model = dict(meta["model"])
        dtype = str(meta.get("dtype", "?"))
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"weight snapshot {step} of {url} is corrupt: its {CONFIG} cannot be "
                        f"read ({type(e).__name__})") from None
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(model) - known)
    if unknown:
        raise UserError(f"weight snapshot {step} of {url} has model settings this version "
                        f"does not know ({', '.join(unknown)}): upgrade this project to load it")
    try:
        cfg = ModelConfig(**model)
        cfg.validate()
    except Exception as e:  # noqa: BLE001 - a bad value in the file: one line
        raise UserError(f"weight snapshot {step} of {url} is corrupt: its {CONFIG} holds an "
                        f"invalid model ({type(e).__name__}: {e})") from None
    return cfg, dtype


def load_snapshot(store_or_url, step: int, device: str = "cpu"):
    """Our GPT at the snapshot `step` of a store: (model, ModelConfig, step). The weights
    are cast to float32 (a bf16 snapshot then computes in float32 from bf16-rounded
    weights); a tied unembedding (not in the file) is tied to wte again."""
    from safetensors.torch import load as st_load

    from store.errors import StoreError
    from trainer.model import GPT

    rs, url = _open(store_or_url)
    step = int(step)
    try:
        have = list(rs.snapshot_steps())
    except StoreError as e:
        raise UserError(str(e)) from None
    if step not in have:
        raise UserError(f"no weight snapshot at step {step} in {url}; snapshot steps: "
                        f"{_steps_line(have)}")
    try:
        cfg, _ = _model_config(rs.snapshot_file(step, CONFIG), step, url)
        raw = rs.snapshot_file(step, WEIGHTS)
    except StoreError as e:  # CorruptStore: a file missing or of the wrong size
        raise UserError(str(e)) from None
    try:
        sd = st_load(raw)
    except Exception as e:  # noqa: BLE001 - safetensors' own error types vary by version
        raise UserError(f"weight snapshot {step} of {url} is corrupt: {WEIGHTS} cannot be "
                        f"read ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    sd = {k: v.to(torch.float32).contiguous() for k, v in sd.items()}
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # the same tensor as wte.weight
    with torch.device("meta"):
        model = GPT(cfg)  # no init: every weight is assigned next
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:  # a size mismatch
        raise UserError(f"weight snapshot {step} of {url} does not fit its own config: "
                        f"{' '.join(str(e).split())[:300]}") from None
    want_missing = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if set(missing) != want_missing or unexpected:
        lost = sorted(set(missing) - want_missing)
        raise UserError(f"weight snapshot {step} of {url} does not fit its own config: "
                        f"missing {', '.join(lost) or 'nothing'}, unexpected "
                        f"{', '.join(unexpected) or 'nothing'}")
    if cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight  # assign=True replaced wte's Parameter: re-tie
    return model.to(device).eval(), cfg, step


# ----------------------------------------------------------------------------- a run


def run_store_url(run_dir: str | Path, cfg: RunConfig) -> str:
    """Where a run's store is (store.runs: capture.store, else RUN/capture.zarr)."""
    return store_url(run_dir, cfg.capture.store)


def run_snapshot_steps(run_dir: str | Path, cfg: RunConfig) -> list[int] | None:
    """The snapshot steps of a run's store (None when the run has no store)."""
    url = run_store_url(run_dir, cfg)
    if not store_may_exist(url):
        return None
    from store.errors import StoreError

    try:
        return list(_open(url)[0].snapshot_steps())
    except (UserError, StoreError):
        return None


def load_run_snapshot(run_dir: str | Path, cfg: RunConfig, step: int,
                      device: str = "cpu") -> Loaded:
    """The run's model at `step` from the weight snapshot in its store; a UserError naming
    the run's checkpoints and snapshots when there is none."""
    from trainer.checkpoint import list_complete

    url = run_store_url(run_dir, cfg)
    snaps = run_snapshot_steps(run_dir, cfg)
    if snaps is None or int(step) not in snaps:
        ckpts = _steps_line(list_complete(run_dir))
        snap_text = (f"no capture store at {url}" if snaps is None
                     else f"snapshot steps: {_steps_line(snaps)}")
        raise UserError(f"no checkpoint or weight snapshot for step {step} in {run_dir} "
                        f"(checkpoint steps: {ckpts}; {snap_text})")
    rs, url = _open(url)
    model, mcfg, step = load_snapshot(rs, step, device)
    try:
        dtype = json.loads(rs.snapshot_file(step, CONFIG)).get("dtype", "")
    except Exception:  # noqa: BLE001 - read fine a moment ago; the label only
        dtype = ""
    if mcfg != cfg.model:  # the snapshot says what its weights are
        cfg = dataclasses.replace(cfg, model=mcfg)
    return Loaded(model, cfg, step, "snapshot",
                  f"{dtype + ' ' if dtype else ''}weight snapshot in {url}")


def load_model_at(run_dir: str | Path, step: int | None = None,
                  device: str = "cpu") -> Loaded:
    """A run's model at `step`: its checkpoint if one exists, else its weight snapshot.
    step None: the latest checkpoint, or the latest snapshot when there is no checkpoint."""
    from trainer import checkpoint

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run dir {str(run_dir)!r} not found")
    cfg = load_run_config(run_dir)
    ckpts = checkpoint.list_complete(run_dir)
    if step is None:
        if not ckpts:
            snaps = run_snapshot_steps(run_dir, cfg)
            if not snaps:
                raise UserError(f"no complete checkpoint in {checkpoint.ckpt_root(run_dir)} "
                                f"and no weight snapshot in {run_store_url(run_dir, cfg)}; "
                                f"train first")
            return load_run_snapshot(run_dir, cfg, snaps[-1], device)
        step = ckpts[-1]
    if int(step) in ckpts:
        model, cfg, step = checkpoint.load_model(run_dir, int(step), device)
        return Loaded(model, cfg, step, "checkpoint",
                      f"checkpoint {checkpoint.step_dir(run_dir, step)}")
    return load_run_snapshot(run_dir, cfg, int(step), device)


# ----------------------------------------------------------------------------- hf


def save_snapshot_hf(rs, run_dir: Path | None, step: int, out: Path,
                     tokenizer_file: str | None) -> Path:
    """The weight snapshot at `step` of store `rs` as a Hugging Face GPT-2 folder at `out`
    (`python -m capture.export --format hf`), each file renamed into place whole."""
    from trainer import hf

    hf._transformers()  # fail before the weights are read when it is not installed
    hf.quiet_cli()  # no progress bars or advisory warnings from transformers
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    model, mcfg, step = load_snapshot(rs, step)
    hf.hf_config(mcfg)  # attention-only or untied: one line, before anything is written
    encoding = _hf_encoding(rs, run_dir, tokenizer_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf.save_hf(model, tmp, encoding=encoding)
        out.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir()):  # each file whole under its final name
            os.replace(f, out / f.name)
    except OSError as e:
        raise UserError(f"cannot write {out}: {type(e).__name__}: "
                        f"{' '.join(str(e).split())[:300]}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"exported the weights of step {step} ({mcfg.num_params() / 1e6:.2f}M parameters, "
          f"from its weight snapshot) as a Hugging Face GPT-2 folder"
          f"{'' if encoding is not None else ' (no tokenizer files)'}", file=sys.stderr)
    return out


def _hf_encoding(rs, run_dir: Path | None, tokenizer_file: str | None):
    """The run's tiktoken encoding for the tokenizer files: --tokenizer-file, else the run's
    (RUN/config.toml, or the run config the store keeps), as trainer.export_hf finds it;
    None, with a warning, when there is none to be had."""
    from trainer.config import from_dict
    from trainer.tokenizer import get_encoding, resolve

    if tokenizer_file:  # asked for explicitly: a bad file is an error
        return get_encoding(tokenizer_file)
    cfg = None
    try:
        if run_dir is not None and (run_dir / "config.toml").is_file():
            cfg = load_run_config(run_dir)
        elif isinstance(rs.attrs.get("run"), dict):
            cfg = from_dict(rs.attrs["run"])
    except (UserError, ValueError, TypeError, KeyError):
        cfg = None  # then tiktoken's own, below
    try:
        return resolve(cfg=cfg)
    except UserError as e:
        print(f"warning: exporting without tokenizer files: {e}", file=sys.stderr)
        return None
