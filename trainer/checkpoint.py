"""Sharded, atomic checkpoints with torch.distributed.checkpoint (DCP).

Layout: RUN/checkpoints/step_00001000/ holds DCP's shards of model and optimizer state,
`rng_rank{r}.pt` (each rank's RNG state) and `meta.json` (step, data position, model shape).

Atomicity: every rank writes into a hidden `.step_XXXXXXXX.tmp` folder; after a barrier
rank 0 writes meta.json and renames the folder into place. A rename within one directory is
atomic on POSIX filesystems (and on Lustre/GPFS/NFS), so a reader sees either no checkpoint
for that step or a complete one. A folder without meta.json, or still hidden, is never
picked, which covers a kill -9 at any point of the save.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_state_dict,
    set_state_dict,
)

from trainer import dist as tdist
from trainer.config import RunConfig, UserError, load_run_config

_STEP_DIR = re.compile(r"^step_(\d{8})$")
META = "meta.json"


def ckpt_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir(run_dir: str | Path, step: int) -> Path:
    return ckpt_root(run_dir) / f"step_{step:08d}"


def list_complete(run_dir: str | Path) -> list[int]:
    """Steps of complete checkpoints, oldest first (hidden or meta-less folders are torn)."""
    root = ckpt_root(run_dir)
    if not root.is_dir():
        return []
    steps = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / META).is_file() and (p / ".metadata").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_step(run_dir: str | Path) -> int | None:
    steps = list_complete(run_dir)
    return steps[-1] if steps else None


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """DCP's view of model (and optimizer) state: sharded tensors under FSDP, keyed by the
    parameters' names, so any world size can load what another saved."""
    if optimizer is None:
        return {"model": get_state_dict(model, [])[0]}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


@contextlib.contextmanager
def _quiet_single_process():
    # DCP warns that it "assumes" a single process when no process group exists: that is
    # exactly the intent of a one-process run, not something the user needs to read.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    cfg: RunConfig,
    info: tdist.DistInfo,
    extra: dict[str, Any] | None = None,
    keep_last: int = 0,
) -> Path:
    """Save on every rank (DCP's save is a collective every rank must reach)."""
    root = ckpt_root(run_dir)
    final = step_dir(run_dir, step)
    tmp = root / f".{final.name}.tmp"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a save that was killed
            shutil.rmtree(tmp)
        tmp.mkdir()
    tdist.barrier(info)

    state = _state(model, optimizer)
    with _quiet_single_process():
        dcp.save(state, checkpoint_id=str(tmp))  # collective; fsyncs every file it writes
    torch.save(_rng_state(), tmp / f"rng_rank{info.rank}.pt")
    tdist.barrier(info)  # every rank's part is on disk before the checkpoint becomes visible

    if info.is_main:
        meta = {
            "step": step,
            "world_size": info.world,
            "has_optimizer": optimizer is not None,
            "model": cfg.to_dict()["model"],
            **(extra or {}),
        }
        with open(tmp / META, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step saved again (e.g. a rerun): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        if keep_last > 0:
            for old in list_complete(run_dir)[:-keep_last]:
                shutil.rmtree(step_dir(run_dir, old), ignore_errors=True)
    tdist.barrier(info)  # nobody races ahead to read or prune while rank 0 renames
    return final


def read_meta(path: Path) -> dict[str, Any]:
    with open(path / META) as f:
        return json.load(f)


def load(
    run_dir: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    info: tdist.DistInfo,
    step: int | None = None,
) -> dict[str, Any] | None:
    """Load the given (or else the newest complete checkpoint that loads) into model and
    optimizer, on every rank (a collective). A checkpoint that fails to load (a truncated
    or unreadable file) is reported in one line and the one before it tried: DCP raises on
    every rank alike, so every rank moves on together, and each attempt loads the whole
    state again. Returns the meta, or None when the run has no checkpoint."""
    steps = list_complete(run_dir) if step is None else [step]
    if not steps:
        return None
    failed: list[int] = []
    first_why = ""
    for s in reversed(steps):
        try:
            meta = _load_step(run_dir, s, model, optimizer, info)
        except UserError:
            raise
        # DCP's (a BaseException, carrying every rank's failure), torch.load's, a bad meta.json
        except (Exception, CheckpointException) as e:
            why = _brief(e)
            first_why = first_why or why
            if step is not None:
                raise UserError(f"checkpoint {step_dir(run_dir, s)} cannot be loaded: {why}"
                                ) from None
            if info.is_main:
                print(f"warning: checkpoint {step_dir(run_dir, s)} cannot be loaded ({why}); "
                      f"trying the one before it", file=sys.stderr, flush=True)
            failed.append(s)
            continue
        if failed and info.is_main:
            print(f"resuming from step {s}, the newest checkpoint that loads "
                  f"(not {', '.join(map(str, failed))})", file=sys.stderr, flush=True)
        return meta
    raise UserError(f"no checkpoint in {ckpt_root(run_dir)} can be loaded (steps "
                    f"{', '.join(map(str, steps))}); the newest failed with: "
                    f"{first_why}; start a new --run-dir (or delete {ckpt_root(run_dir)} to "
                    f"start this run over)")


def _brief(e: BaseException) -> str:
    """One line for a failed load: the first rank's own exception (DCP wraps every rank's
    failure, tracebacks included, in one CheckpointException)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))  # (exception, its traceback's frames)
        e = inner[0] if isinstance(inner, tuple) else getattr(inner, "exception", inner)
    text = (str(e).strip().splitlines() or [""])[0][:200]
    if not text and isinstance(e, EOFError):
        text = "a file ends early (truncated)"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _load_step(run_dir: str | Path, step: int, model: torch.nn.Module,
               optimizer: torch.optim.Optimizer | None, info: tdist.DistInfo
               ) -> dict[str, Any]:
    path = step_dir(run_dir, step)
    if not (path / META).is_file():
        raise UserError(f"no complete checkpoint for step {step} in {ckpt_root(run_dir)}")
    meta = read_meta(path)
    with_optim = optimizer is not None and meta.get("has_optimizer", False)
    state = _state(model, optimizer if with_optim else None)
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path))
    if with_optim:
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
    else:
        set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
    rng = path / f"rng_rank{info.rank}.pt"
    if meta.get("world_size") == info.world and rng.is_file():
        _set_rng_state(torch.load(rng, weights_only=False))
    return meta


# --------------------------------------------------------------- single-process helpers

def load_model(run_dir: str | Path, step: int | None = None, device: str = "cpu"):
    """Weights of a run for inference or export, in one process whatever the world size
    that saved them: (model, cfg, step)."""
    from trainer.model import GPT

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run dir {str(run_dir)!r} not found")
    cfg = load_run_config(run_dir)
    if step is None:
        step = latest_step(run_dir)
        if step is None:
            raise UserError(f"no complete checkpoint in {ckpt_root(run_dir)}; train first")
    elif step not in list_complete(run_dir):
        have = ", ".join(map(str, list_complete(run_dir))) or "none"
        raise UserError(f"no complete checkpoint for step {step} in {run_dir} (have: {have})")
    model = GPT(cfg.model)
    sd = model.state_dict()
    if cfg.model.tie_embeddings:
        sd.pop("lm_head.weight", None)  # tied to wte.weight: load it once
    with _quiet_single_process():
        dcp.load({"model": sd}, checkpoint_id=str(step_dir(run_dir, step)))
    model.load_state_dict(sd, strict=False)
    return model.to(device).eval(), cfg, step


def save_model_only(run_dir: str | Path, model: torch.nn.Module, cfg: RunConfig,
                    step: int = 0) -> Path:
    """A weights-only checkpoint from one process (e.g. imported official weights)."""
    return save(run_dir, step, model, None, cfg, tdist.DistInfo(), extra={"data": {}})
