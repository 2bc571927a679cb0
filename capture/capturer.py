"""Capture during training. At each step of the schedule (capture/schedule.py) every rank
runs its slice of the probe set (or of the live batch) through the model with hooks
attached from outside (capture/forward.py), the statistics are reduced on the device, and
the rest is handed to a background writer that appends the capture to the store. At
snapshot steps the weights are gathered and written into the store too.

Capture depends on the store, on a small model protocol (TransformerLens hook points,
`hooks()`, `blocks[l].mlp.c_proj`, `lm_head`, `ln_final`) and on torch.distributed; the
trainer hands it the resolved spec, the probe tokens, the distributed facts and the config.

Costs, per capture: one forward of P/world sequences per rank (FSDP all-gathers: a
collective), a few all-reduces and all-gathers for the statistics, and the device-to-host
copies. The writing happens behind a bounded queue.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

import numpy as np
import torch

from capture.collectives import DistLike, all_gather_cat, any_rank, barrier
from capture.async_writer import AsyncWriter
from capture.config import CaptureConfig
from capture.forward import CaptureForward, reduce_dynamics, reduce_stats
from capture.plan import fmt_bytes
from capture.schedule import Schedule
from capture.snapshot import snapshot_files
from capture.spec import CaptureSpec
from store.schema import FULL, SUMMARY, Layout
from store.writer import StoreWriter

COMMIT_TIMEOUT_S = 1800.0  # rank 0 waits this long for the other ranks' parts


def icl_score(loss: np.ndarray) -> float:
    """In-context-learning score of a [P, T] per-token loss (Olsson et al. 2022: the loss
    of the 500th token minus the 50th, GPT-2's T = 1024): the mean over sequences and a
    window of max(1, T/64) positions at 500/1024 of the context minus the same at 50/1024.
    Negative when later tokens are predicted better, i.e. the model uses its context."""
    T = loss.shape[1]
    w = max(1, T // 64)
    early = max(1, round(T * 50 / 1024))
    late = max(early + w, round(T * 500 / 1024))
    late = min(late, T - w)
    if late < early + w:
        return float("nan")
    return _mean(loss[:, late:late + w]) - _mean(loss[:, early:early + w])


def _mean(a: np.ndarray) -> float:
    """Mean of the finite values, NaN when there are none (a diverged model's loss), without
    numpy's warning."""
    ok = np.isfinite(a)
    return float(a[ok].mean()) if ok.any() else float("nan")


class Capturer:
    def __init__(self, c: CaptureConfig, spec: CaptureSpec, layout: Layout, info: DistLike,
                 url: str, max_steps: int, resume_step: int, model_config: dict,
                 probe: torch.Tensor | None, repeated: torch.Tensor | None,
                 compiled: bool = False):
        self.c, self.spec, self.info, self.url = c, spec, info, url
        self.enabled = c.enabled
        self.schedule = Schedule.of(c, max_steps)
        self.probe, self.repeated = probe, repeated
        self.model_config = model_config
        P = layout.n_seqs
        self.per_rank = P // info.world
        self.seq_start = info.rank * self.per_rank
        self.layout = layout
        self.fwd = CaptureForward(spec, layout.topk, layout.attn_seqs, layout.attn_len,
                                  c.lens_tokens, c.batch_tokens, c.token_loss, info.rank,
                                  info.world, layout.repeat_attn_seqs, layout.repeat_attn_len)
        if info.is_main:
            self.store = StoreWriter.create_or_open(url, layout)
            # Captures, snapshots and metrics after the step this run starts from are
            # redone by it (a fresh run starts from -1: nothing is kept).
            self.store.rollback_after(resume_step)
            _clear_metrics_after(self.store, max(resume_step, 0))
            self.store.set_status("training")
        barrier(info)  # the store exists (and is rolled back) before the others open it
        if not info.is_main:
            self.store = StoreWriter.open(url)
        self.slot = self.store.next_slot()  # every rank reads the same committed steps
        self.writer = AsyncWriter(c.queue_size, device=info.device)
        self._metrics: list[tuple[int, dict]] = []
        self._compiled = compiled
        self._abort = threading.Event()

    # ------------------------------------------------------------------ the schedule

    def wants(self, step: int) -> bool:
        s = self.schedule
        return self.enabled and (s.summary(step) or s.snapshot(step))

    def needs_batch(self, step: int) -> bool:
        """Whether maybe_capture at `step` wants the live batch (source "train")."""
        return self.enabled and self.c.source == "train" and self.schedule.summary(step)

    # ------------------------------------------------------------------ the capture

    def maybe_capture(self, step: int, model, batch: torch.Tensor | None = None) -> bool:
        """At a step of the schedule, capture and/or snapshot (and return True). Every rank
        must call this every step: at those steps it runs collectives. `batch`: the live
        tokens [n, T] of this rank for source "train"."""
        if not self.wants(step):
            return False
        if self.info.is_main:
            self.store.reserve(self.slot)  # grown before any rank writes the slot
        if any_rank(self.writer.error is not None, self.info):  # collective, after reserve
            self._stop("a capture writer failed")
            return False
        was_training = model.training
        model.eval()
        # Outside the compiled graph: hooks would otherwise force recompilation.
        eager = torch.compiler.set_stance("force_eager") if self._compiled \
            else contextlib.nullcontext()
        try:
            with eager:
                if self.schedule.summary(step):
                    tokens = self.probe[self.seq_start:self.seq_start + self.per_rank] \
                        if self.probe is not None else batch
                    self._capture(step, model, tokens.to(self.info.device))
                if self.schedule.snapshot(step):
                    self._snapshot(step, model)
        finally:
            model.train(was_training)
        return True

    @torch.no_grad()
    def _capture(self, step: int, model, tokens: torch.Tensor) -> None:
        info, spec, lay = self.info, self.spec, self.layout
        full = self.schedule.full(step) and bool(spec.act_hooks or lay.stored_attn_layers
                                                 or spec.dla_layers)
        res = self.fwd.run(model, tokens, self.seq_start, full, self.repeated)
        stats = reduce_stats(res, list(spec.stat_hooks), info)  # collectives
        heads = lens = None
        if spec.dynamics:
            heads, lens = reduce_dynamics(res, lay.n_seqs, info)  # collective
            if self.repeated is not None:
                rep = res.repeated or self.fwd.run_repeated(
                    model, self.repeated.to(info.device), res)
                for name in ("duplicate", "induction"):
                    heads[name] = torch.stack([rep[i][name] for i in range(spec.n_layers)])
            heads = {k: v.float().cpu().contiguous().numpy() for k, v in heads.items()}
            lens = lens.numpy()
        loss = None
        if res.token_loss is not None:
            loss = all_gather_cat(res.token_loss, info).cpu().numpy()  # collective
        dla = res.dla  # this rank's layers (full captures)
        ready = None
        if info.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        self._submit(step, full, tokens.to(torch.int32).cpu().numpy(), res, stats, heads,
                     lens, loss, dla, ready)

    def _submit(self, step, full, tok, res, stats, heads, lens, loss, dla, ready) -> None:
        slot, self.slot = self.slot, self.slot + 1
        store, rank, is_main, start = self.store, self.info.rank, self.info.is_main, \
            self.seq_start
        abort, attn_seqs = self._abort, self.layout.attn_seqs
        tiers = SUMMARY | (FULL if full else 0)
        acts = res.acts if full else {}
        attn = res.attn if full else {}
        rep_attn, rep_mine = (res.rep_attn if full else {}), self.fwd.rep_mine

        def write() -> None:
            store.write_tokens(slot, start, tok)
            for name, a in acts.items():
                store.write_acts(name, slot, start, a.numpy())
            for layer, p in attn.items():
                for j in range(p.shape[0]):
                    if start + j < attn_seqs:
                        store.write_attn(layer, slot, start + j, p[j].numpy())
            for layer, p in rep_attn.items():  # this rank's repeated sequences
                for j, r in enumerate(rep_mine):
                    store.write_repeated_attn(layer, slot, r, p[j].numpy())
            if is_main:
                for name, (st, tv, ti) in stats.items():
                    store.write_stats(name, slot, st)
                    store.write_topk(name, slot, tv, ti)
                if heads is not None:
                    store.write_head_scores(slot, heads)
                    store.write_lens(slot, lens)
                if loss is not None:
                    store.write_token_loss(slot, loss, icl_score(loss))
            for layer, parts in dla.items():  # this rank's layers
                store.write_dla(layer, slot, *parts)
            store.mark_done(slot, rank)
            if is_main:
                t0 = time.monotonic()
                while not store.all_done(slot):
                    if abort.is_set():  # the run failed: the capture stays invisible
                        return
                    if time.monotonic() - t0 > COMMIT_TIMEOUT_S:
                        raise TimeoutError(f"capture at step {step}: other ranks' parts "
                                           f"missing after {COMMIT_TIMEOUT_S:.0f} s")
                    time.sleep(0.02)
                store.commit(slot, step, tiers)

        self.writer.submit(write, ready)

    def _snapshot(self, step: int, model) -> None:
        files = snapshot_files(model, self.model_config, step, self.c.snapshot_dtype,
                               self.info)  # collectives; rank 0 gets the files
        if files is not None:
            store = self.store
            self.writer.submit(lambda: store.write_snapshot(step, files))

    # ------------------------------------------------------------------ metrics, end

    def record_metrics(self, step: int, record: dict) -> None:
        """Rank 0: training curves into the store too, in batches through the writer."""
        if not self.enabled:
            return
        self._metrics.append((step, record))
        if len(self._metrics) >= 10 or self.wants(step):
            self.flush_metrics()

    def flush_metrics(self) -> None:
        if not self._metrics:
            return
        batch, self._metrics = self._metrics, []
        store = self.store

        def write() -> None:
            for split, keys, prefix in (("train", TRAIN_METRICS, ""),
                                        ("val", VAL_METRICS, "val_")):
                names = [k if k.startswith("hellaswag") else prefix + k for k in keys]
                rows = [(s, r) for s, r in batch if any(n in r for n in names)]
                if rows:
                    steps = np.array([s for s, _ in rows])
                    values = {k: np.array([r.get(n, np.nan) for _, r in rows], np.float32)
                              for k, n in zip(keys, names)}
                    store.write_metrics(split, steps, values)

        self.writer.submit(write)

    def drain(self) -> None:
        """Wait until every capture so far is committed: before a checkpoint, so that a
        checkpoint at step s implies every capture up to s is in the store."""
        if self.enabled:
            if self.info.is_main:
                self.flush_metrics()
            self.writer.drain()

    def close(self, status: str) -> None:
        """Drain the writer (a failed run does not wait for other ranks' parts)."""
        if not hasattr(self, "writer"):
            return
        if status == "failed":
            self._abort.set()
        if self.info.is_main:
            self.flush_metrics()
            store = self.store
            self.writer.submit(lambda: store.set_status(status))
        self.writer.close()
        if self.writer.error is not None:
            print(f"capture writer failed on rank {self.info.rank}: {self.writer.error}",
                  file=sys.stderr)

    def _stop(self, why: str) -> None:
        self.enabled = False
        if self.info.is_main:
            print(f"capture stopped: {why}; training and checkpoints go on", file=sys.stderr)


TRAIN_METRICS = ("loss", "lr", "grad_norm", "tokens_per_s")
VAL_METRICS = ("loss", "hellaswag_acc_norm")


def _clear_metrics_after(store: StoreWriter, step: int) -> None:
    """A resumed run rewrites the metrics after its checkpoint: NaN until it does."""
    for split, keys in (("train", TRAIN_METRICS), ("val", VAL_METRICS)):
        n = store.metrics_length(split)
        if n > step:
            steps = np.arange(step + 1, n + 1)
            store.write_metrics(split, steps, {k: np.full(len(steps), np.nan, np.float32)
                                               for k in keys})


def describe(layout: Layout, url: str, c: CaptureConfig) -> str:
    return (f"capture: {c.source} {layout.n_seqs} x {layout.seq_len} tokens, statistics of "
            f"{len(layout.stat_hooks)} hooks, activations of {len(layout.act_hooks)}, attention "
            f"of {len(layout.stored_attn_layers)} layers ({layout.attn_len} positions) into "
            f"{url}; summary {fmt_bytes(layout.bytes_per_capture('summary'))}, full + "
            f"{fmt_bytes(layout.bytes_per_capture('full'))} per capture")


class NoCapture:
    """capture.enabled = false: the same calls, doing nothing."""

    enabled = False

    def wants(self, step: int) -> bool:
        return False

    def needs_batch(self, step: int) -> bool:
        return False

    def maybe_capture(self, step: int, model, batch=None) -> bool:
        return False

    def record_metrics(self, step: int, record: dict) -> None:
        pass

    def flush_metrics(self) -> None:
        pass

    def drain(self) -> None:
        pass

    def close(self, status: str) -> None:
        pass
