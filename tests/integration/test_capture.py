"""Capture during real training runs: the stored values are the model's own, each rank's
slice in its place; a kill -9 never exposes a torn capture; a reader polling a live run
never errors; a resumed run leaves no duplicates and no holes."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (ahead, losses, ok, popen, read_metrics, run_cli, torchrun, train_args,
                     wait_for)
from store.errors import StoreError
from store.reader import RunStore
from trainer import checkpoint
from trainer.model import GPT

pytestmark = pytest.mark.integration

# 3 layers so that "the middle block" is block 1; 4 probe sequences, 2 per rank.
CAP = ["--model.n_layer=3", "--capture.every=3", "--capture.full_every=3",
       "--capture.probe_seqs=4",
       "--capture.probe_len=16", "--capture.attn_seqs=3", "--capture.topk=5"]


def model_at(run: Path, step: int) -> GPT:
    if step == 0:  # the initial weights: the trainer seeds them with train.seed
        from trainer.config import load_run_config
        cfg = load_run_config(run)
        torch.manual_seed(cfg.train.seed)
        return GPT(cfg.model).eval()
    model, _, _ = checkpoint.load_model(run, step)
    return model


class StorePoller:
    """A reader thread polling a run's store while the run trains, as the dashboard does:
    every committed capture must read whole. `seen`: step -> when first seen; `errors`:
    what the reader raised (it stops at the first)."""

    def __init__(self, run: Path):
        self.run, self.seen, self.errors = run, {}, []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll)

    def _poll(self) -> None:
        run, seen = self.run, self.seen
        while not self.done.is_set():
            try:
                if not (run / "capture.zarr" / "zarr.json").exists():
                    time.sleep(0.02)
                    continue
                store = RunStore(str(run / "capture.zarr"))
                for s in store.steps():
                    a = store.activations("blocks.0.hook_resid_post", int(s))
                    assert a.shape[0] == 4 and np.abs(a).reshape(4, -1).max(1).min() > 0
                    st = store.stats_at("blocks.0.hook_resid_post", int(s))
                    assert np.isfinite(st["mean"]).all()
                    seen.setdefault(int(s), time.time())
                store.metrics("train")
            except BaseException as e:  # noqa: BLE001 - the test reports it
                self.errors.append(e)
                return
            time.sleep(0.01)

    def __enter__(self) -> "StorePoller":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()


@ahead("fsdp_run")
def _fsdp_run(data: Path, base: Path):
    run = base / "run"
    with StorePoller(run) as poller:
        r = run_cli(torchrun(2) + train_args(data, run, *CAP, "--checkpoint.every=1",
                                             steps=6)[1:])
    return run, r, poller


@pytest.fixture(scope="module")
def fsdp_run(runs_ahead, shakespeare_data):
    """2 FSDP ranks, 6 steps, a checkpoint every step, trained ahead (helpers.ahead); a
    StorePoller read the store all the while it trained
    (test_reader_polling_a_live_run_sees_only_whole_captures)."""
    run, r, poller = runs_ahead.take("fsdp_run")
    ok(r)
    return run, r, poller


def test_store_holds_the_models_own_activations_per_rank_slice(fsdp_run):
    run, r, _ = fsdp_run
    assert "capture plan for 6 steps" in r.stdout and r.stdout.count("total: ") == 1
    store = RunStore(str(run / "capture.zarr"))
    assert list(store.steps()) == [0, 1, 2, 3, 6]  # init, log-spaced early, every 3, final
    assert list(store.steps("full")) == [0, 1, 2, 3, 6]
    assert store.status == "finished"
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
             "blocks.2.hook_resid_post", "blocks.1.mlp.hook_post"]
    assert sorted(store.act_hooks) == sorted(hooks)
    # the summary tier: statistics of every block's residual stream and MLP neurons
    assert sorted(store.hooks) == sorted(hooks + ["blocks.0.mlp.hook_post",
                                                  "blocks.2.mlp.hook_post"])
    probe = store.probe_tokens()
    assert probe.shape == (4, 16)
    for step in store.steps():
        assert (store.tokens(step) == probe).all()
        model = model_at(run, int(step))
        names = set(hooks) | {f"blocks.{i}.attn.hook_pattern" for i in range(3)}
        with torch.no_grad():
            _, cache = model.run_with_cache(torch.from_numpy(probe).long(),
                                            names_filter=names.__contains__)
        for hook in hooks:
            want = cache[hook].numpy()
            got = store.activations(hook, int(step)).astype(np.float32)
            # sequence by sequence: rank 1's slice (2, 3) must not sit in rank 0's place
            for seq in range(4):
                np.testing.assert_allclose(got[seq], want[seq], atol=2e-3, rtol=2e-3,
                                           err_msg=f"{hook} step {step} seq {seq}")
            flat = want.reshape(-1, want.shape[-1])
            st = store.stats_at(hook, int(step))
            np.testing.assert_allclose(st["mean"], flat.mean(0), atol=1e-5, rtol=1e-4)
            np.testing.assert_allclose(st["std"], flat.std(0), atol=1e-4, rtol=1e-3)
            np.testing.assert_allclose(st["max"], flat.max(0), atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(st["min"], flat.min(0), atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(st["frac_active"], (flat > 0).mean(0), atol=1e-6)
            v, seq, pos = store.topk(hook, int(step), neuron=3)
            np.testing.assert_allclose(v, np.sort(flat[:, 3])[::-1][:5], atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(want[seq, pos, 3], v, atol=1e-5, rtol=1e-5)
        for layer in range(3):
            pat = cache[f"blocks.{layer}.attn.hook_pattern"].numpy()
            for seq in range(3):
                np.testing.assert_allclose(store.attention(layer, int(step), seq),
                                           pat[seq], atol=1e-3)


@torch.no_grad()
def test_dynamics_equal_a_recomputation_from_each_checkpoint(fsdp_run):
    """Head scores, logit lens and neuron logit effects written by 2 FSDP ranks equal the
    same quantities computed here in one process, by plain loops and full logits, from
    the model at that step."""
    run, _, _ = fsdp_run
    store = RunStore(str(run / "capture.zarr"))
    assert store.head_score_names == ["entropy", "prev_token", "duplicate", "induction"]
    assert store.has_lens and store.dla_layers == [0, 1, 2] and store.dla_k == 10
    probe = torch.from_numpy(store.probe_tokens()).long()
    rep = torch.from_numpy(store.repeated_tokens()).long()
    n = rep.shape[1] // 2
    assert rep.shape == (4, 16) and (rep[:, :n] == rep[:, n:]).all()
    lens_steps, lens = store.logit_lens()
    for i, step in enumerate(store.steps()):
        model = model_at(run, int(step))
        _, nat = model.run_with_cache(probe)
        _, rc = model.run_with_cache(rep, names_filter=lambda x: x.endswith("pattern"))
        for layer in range(3):
            p = nat[f"blocks.{layer}.attn.hook_pattern"].double()  # [P, H, T, T]
            r = rc[f"blocks.{layer}.attn.hook_pattern"].double()
            T = p.shape[-1]
            ent = torch.stack([-(p[:, :, q, :q + 1] * p[:, :, q, :q + 1].clamp_min(1e-30).log())
                               .sum(-1) for q in range(1, T)], -1).mean((0, 2))
            prev = torch.stack([p[:, :, q, q - 1] for q in range(1, T)], -1).mean((0, 2))
            dup = torch.stack([r[:, :, q, q - n] for q in range(n, 2 * n)], -1).mean((0, 2))
            ind = torch.stack([r[:, :, q, q - n + 1] for q in range(n, 2 * n)], -1).mean((0, 2))
            for name, want in (("entropy", ent), ("prev_token", prev), ("duplicate", dup),
                               ("induction", ind)):
                got = store.head_scores(name)[1][i, layer]
                np.testing.assert_allclose(got, want.numpy(), atol=1e-4,
                                           err_msg=f"{name} layer {layer} step {step}")
            # logit lens: this block's output through ln_final and the full unembedding
            logits = model.lm_head(model.ln_final(nat[f"blocks.{layer}.hook_resid_post"]))
            want = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).double(), probe[:, 1:].flatten())
            assert lens_steps[i] == step
            np.testing.assert_allclose(lens[i, layer], want.item(), rtol=1e-4)
            # neuron logit effects of neuron 5: centred W_out row, ln_final's gain, W_U
            w = model.blocks[layer].mlp.c_proj.weight[:, 5].double()
            eff = ((w - w.mean()) * model.ln_final.weight.double()) @ \
                model.lm_head.weight.double().t()
            d = store.neuron_logits(layer, int(step), 5)
            top = eff.topk(10)
            np.testing.assert_array_equal(d["top_token"], top.indices.numpy())
            np.testing.assert_allclose(d["top_value"], top.values.numpy(), rtol=1e-4,
                                       atol=1e-7)
            bottom = eff.topk(10, largest=False)
            np.testing.assert_array_equal(d["bottom_token"], bottom.indices.numpy())


def test_training_curves_are_in_the_store(fsdp_run):
    run, _, _ = fsdp_run
    store = RunStore(str(run / "capture.zarr"))
    m = store.metrics("train")
    assert list(m["step"]) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(m["loss"], losses(run), rtol=1e-6)
    assert np.isfinite(m["lr"]).all() and np.isfinite(m["grad_norm"]).all()


@ahead("train_source_run")
def _train_source_run(data: Path, base: Path):
    run = base / "run"
    return run, run_cli(train_args(data, run, "--model.n_layer=5", "--capture.source=train",
                                   "--capture.hooks=blocks.4.hook_resid_post",
                                   "--capture.every=2", "--capture.full_every=2",
                                   "--capture.log_early=false", "--capture.at_init=false",
                                   "--capture.attn_layers=none", "--checkpoint.every=2",
                                   steps=4))


@pytest.fixture(scope="module")
def train_source_run(runs_ahead, shakespeare_data) -> Path:
    """4 steps capturing the live micro-batch (capture.source = train), trained ahead
    (helpers.ahead)."""
    run, r = runs_ahead.take("train_source_run")
    ok(r)
    return run


def test_train_source_captures_the_live_micro_batch(train_source_run):
    run = train_source_run
    store = RunStore(str(run / "capture.zarr"))
    assert list(store.steps()) == [2, 4] and store.source == "train"
    from trainer.data import DistributedLoader, TokenWindows
    from trainer.config import load_run_config
    cfg = load_run_config(run)
    loader = DistributedLoader(TokenWindows(cfg.data.dir, "train", cfg.seq_len,
                                            seed=cfg.data.seed), 4, 0, 1)
    accum = 2  # 256 tokens per step = 2 micro-batches of 4 x 32 on one rank
    for step in (2, 4):
        x, _ = loader.windows.get(loader.indices((step - 1) * accum))
        assert (store.tokens(step) == x.numpy()).all()
        model = model_at(run, step)
        with torch.no_grad():
            _, cache = model.run_with_cache(x, names_filter="blocks.4.hook_resid_post")
        np.testing.assert_allclose(store.activations("blocks.4.hook_resid_post", step),
                                   cache["blocks.4.hook_resid_post"].numpy(), atol=2e-3,
                                   rtol=2e-3)


def _torn_slots(store_dir: Path, sched: list[int]) -> list[int]:
    """Slots with some chunks on disk but not committed: a capture being written. (Slot i
    is the run's i-th capture: captures are appended, and nothing was rolled back yet.)"""
    try:
        committed = set(RunStore(str(store_dir)).steps().tolist())
    except Exception:  # noqa: BLE001 - the store is still being created
        return []
    acts = store_dir / "acts"
    written = {int(p.name.split(".")[1]) for p in acts.glob("*/c.*")}  # chunk c.SLOT.SEQ.0.0
    return [i for i, s in enumerate(sched) if i in written and s not in committed]


def test_kill9_during_capture_hides_the_torn_capture_and_resume_fills_it(
        shakespeare_data, tmp_path):
    """Large captures (many probe sequences) keep the writer busy; the run is killed while
    a capture's chunks are being written. The store stays readable, shows only whole
    captures, and the resumed run ends with every scheduled capture exactly once."""
    big = ["--model.n_layer=2", "--capture.every=2", "--capture.full_every=2",
           "--capture.probe_seqs=96",
           "--capture.probe_len=32", "--capture.attn_seqs=96",
           "--capture.hooks=blocks.*.hook_resid_*,blocks.*.hook_attn_out,blocks.*.hook_mlp_out",
           "--capture.log_early=false", "--checkpoint.every=4"]
    sched = [0, 2, 4, 6, 8, 10]
    run = tmp_path / "run"
    store_dir = run / "capture.zarr"
    p = popen(train_args(shakespeare_data, run, *big, steps=10))
    # Killed while a capture after the first checkpoint (step 4) is being written.
    wait_for(lambda: checkpoint.latest_step(run) is not None
             and any(i >= 3 for i in _torn_slots(store_dir, sched)), p)
    os.killpg(p.pid, signal.SIGKILL)
    p.communicate()
    torn = _torn_slots(store_dir, sched)
    assert torn, "the kill did not land inside a capture"
    store = RunStore(str(store_dir))
    committed = [int(s) for s in store.steps()]
    # The writer commits captures in order: every one before the torn capture is visible,
    # none from it on (no hole, nothing half-written shown) ...
    assert committed == sched[:min(torn)], (committed, torn)
    for i in torn:  # ... and the torn capture's chunks on disk are not served
        with pytest.raises(StoreError, match="not captured"):
            store.activations("blocks.1.hook_resid_post", sched[i])
    for s in committed:  # every visible capture is whole: each sequence written
        a = store.activations("blocks.1.hook_resid_post", s)
        assert np.abs(a).reshape(96, -1).max(axis=1).min() > 0, s
    last = checkpoint.latest_step(run)
    assert last is not None
    r = ok(run_cli(train_args(shakespeare_data, run, *big, "--resume", steps=10)))
    assert f"resumed from step {last}" in r.stdout
    store = RunStore(str(store_dir))
    assert list(store.steps()) == sched
    m = store.metrics("train")
    assert list(m["step"]) == list(range(1, 11))  # contiguous, one value per step
    assert list(read_metrics(run)) == list(range(1, 11))


def test_reader_polling_a_live_run_sees_only_whole_captures(fsdp_run):
    """The reader that polled fsdp_run's store while it trained never failed, and saw every
    capture."""
    _, _, poller = fsdp_run
    assert not poller.errors, poller.errors
    assert sorted(poller.seen) == [0, 1, 2, 3, 6]
