"""The dashboard's page loads against store size: a store of N captures and one of 10N.

    python benchmarks/dashboard_load.py                 # N=100 and 1,000, a few minutes
    python benchmarks/dashboard_load.py --n 20 --reps 3

Both stores are written through store.writer.StoreWriter (schema 2: each slot reserved,
then committed with its tiers) at GPT-2 124M shapes: 12 hooks blocks.{l}.hook_resid_post 768
wide and blocks.6.mlp.hook_post 3072 wide, top-16, 12 heads with attention at layers 0, 5
and 11 for A=2 sequences, P=4 probe sequences of T=32 tokens (small P and T keep 1,000
captures to minutes). Every capture is a summary one: statistics, top-k, tokens, the
training dynamics (four head scores [12, 12], the logit lens [12]) and the per-token probe
loss with its in-context-learning score. The last 3 are also full (as a run that keeps
few): activations, attention and the logit effects of every MLP layer (3072 neurons x 10
tokens each way). Captures every 10 steps, so the metrics arrays are 10 x N steps long;
weight snapshots (small stand-in files) at every 10th capture.

Each page's data loading (dashboard/data.py, called directly, no Streamlit server) is timed
on a fresh RunStore (median of --reps) and its peak Python memory taken with tracemalloc:

- training:  training_data (train and val metrics, captured and full steps, snapshots)
- neurons:   neuron_table at the last step + neuron_history + neuron_heatmap (64 neurons)
             + top_tokens (at a full step, context coloured from the activations)
- neurons*:  top_tokens at a summary step (top values only; no activation is read)
- attention: attention_data at the last full step (12 heads x Ta x Ta, token labels)
- dynamics:  the Dynamics page: head_grid of the four scores, phase_change, lens_frame,
             icl_data, events_data of the MLP hook, nearest_full (its links), logit_effects
             of one neuron at the last (full) step
- store:     captures_table (each step's tiers, the snapshots) + arrays_table (shapes,
             chunks, codecs; the Store page's default above 200 captures)
- store+size: arrays_table with bytes on disk (lists every chunk file: opt-in checkbox)

The target: every page under 1 s, and memory that does not grow with the store (the
training curves and the neuron-across-steps answers grow with it by nature: C values, or
10 C metric steps; heatmaps are capped at 240 step columns). No assertions: figures printed.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dashboard import data as D  # noqa: E402
from dashboard import dynamics as DYN  # noqa: E402
from store.reader import RunStore  # noqa: E402
from store.schema import FULL, HEAD_SCORES, STATS, SUMMARY, Layout  # noqa: E402
from store.writer import StoreWriter  # noqa: E402

HOOKS = {**{f"blocks.{layer}.hook_resid_post": 768 for layer in range(12)},
         "blocks.6.mlp.hook_post": 3072}
MLP = "blocks.6.mlp.hook_post"
K, H, A, P, T = 16, 12, 2, 4, 32
ATTN_LAYERS = [0, 5, 11]
EVERY = 10
ACT_CAPTURES = 3  # the last captures are full ones
SNAPSHOT_EVERY = 10  # captures
LAYERS, DLA_K, D_MLP = 12, 10, 3072


def build(url: Path, n: int) -> float:
    steps = [(i + 1) * EVERY for i in range(n)]
    rng = np.random.default_rng(0)
    probe = rng.integers(0, 50257, (P, T)).astype(np.int32)
    lay = Layout(n_seqs=P, seq_len=T, act_hooks=HOOKS, topk=K,
                 attn_layers=ATTN_LAYERS, n_heads=H, attn_seqs=A, max_steps=steps[-1],
                 world=1, source="probe", probe_tokens=probe,
                 attrs={"bench": True, "model": {"n_layer": 12, "n_embd": 768}},
                 n_layers=LAYERS, head_scores=list(HEAD_SCORES), logit_lens=True,
                 repeated_tokens=np.tile(probe[:4, :T // 2], (1, 2)), token_loss=True,
                 dla_layers=list(range(LAYERS)), d_mlp=D_MLP, dla_k=DLA_K)
    dla_tok = rng.integers(0, 50257, (D_MLP, DLA_K)).astype(np.int32)
    dla_val = np.sort(rng.standard_normal((D_MLP, DLA_K)).astype(np.float32), axis=1)
    acts = {d: rng.standard_normal((P, T, d)).astype(np.float16) for d in (768, 3072)}
    attn = np.tril(rng.random((H, T, T))).astype(np.float16)
    noise = {d: rng.standard_normal(d).astype(np.float32) for d in (768, 3072)}
    topi = {d: rng.integers(0, P * T, (d, K)).astype(np.int32) for d in (768, 3072)}
    t0 = time.perf_counter()
    w = StoreWriter.create_or_open(str(url), lay, durable=False)
    loss = rng.random((P, T)).astype(np.float32) + 3
    loss[:, 0] = np.nan
    for slot, step in enumerate(steps):
        full = slot >= n - ACT_CAPTURES
        w.reserve(slot)  # rank 0, before any rank writes the slot
        w.write_tokens(slot, 0, probe)
        if full:
            for hook, d in HOOKS.items():
                w.write_acts(hook, slot, 0, acts[d])
            for layer in ATTN_LAYERS:
                for s in range(A):
                    w.write_attn(layer, slot, s, attn)
        w.mark_done(slot, 0)
        for hook, d in HOOKS.items():
            base = noise[d] + np.float32(step / 1000)
            w.write_stats(hook, slot, {st: base + i for i, st in enumerate(STATS)})
            w.write_topk(hook, slot, np.sort(np.tile(base[:, None], (1, K)), axis=1)[:, ::-1],
                         topi[d])
        frac = min(1.0, step / steps[-1])  # scores rising through the run
        w.write_head_scores(slot, {k: np.full((LAYERS, H), frac, np.float32)
                                   for k in HEAD_SCORES})
        w.write_lens(slot, np.linspace(10, 3, LAYERS, dtype=np.float32) * (1.5 - frac))
        w.write_token_loss(slot, loss - frac, -frac)
        if full:
            for layer in range(LAYERS):
                w.write_dla(layer, slot, dla_tok, dla_val[:, ::-1], dla_tok, dla_val)
        w.commit(slot, step, SUMMARY | FULL if full else SUMMARY)
        if slot % SNAPSHOT_EVERY == 0 or slot == n - 1:
            w.write_snapshot(step, {"model.safetensors": b"\0" * 4096, "config.json": b"{}"})
    S = steps[-1]
    s = np.arange(1, S + 1)
    w.write_metrics("train", s, {"loss": 10 / np.sqrt(s), "lr": np.full(S, 6e-4),
                                 "grad_norm": np.ones(S), "tokens_per_s": np.full(S, 1e5)})
    v = s[EVERY - 1::EVERY * 5]
    w.write_metrics("val", v, {"loss": 10 / np.sqrt(v)})
    w.set_status("finished")
    w.close()
    return time.perf_counter() - t0


def pages(url: str) -> dict:
    rs0 = RunStore(url)
    steps, full = rs0.steps(), rs0.steps("full")
    last, no_acts = int(full[-1]), int(steps[0])
    assert no_acts not in full and len(full) == min(ACT_CAPTURES, len(steps))
    neuron = 7
    decode = D.make_decoder(None)  # token ids: no tokenizer file in a synthetic store

    def neurons(rs: RunStore) -> None:
        D.neuron_table(rs, MLP, last)
        D.neuron_history(rs, MLP, neuron)
        D.neuron_heatmap(rs, MLP, "mean", 0, 64)
        rows = D.top_tokens(rs, MLP, last, neuron, decode)
        assert rows and all(np.isfinite(rows[0]["acts"]))

    def neurons_no_acts(rs: RunStore) -> None:
        rows = D.top_tokens(rs, MLP, no_acts, neuron, decode)
        assert rows and np.isnan(rows[0]["acts"]).sum() > 0 and not rows[0]["from_acts"]

    def dynamics(rs: RunStore) -> None:
        for score in HEAD_SCORES:
            DYN.head_grid(rs, score)
        DYN.phase_change(rs)
        DYN.lens_frame(rs)
        D.icl_data(rs)
        DYN.events_data(rs, MLP)
        assert D.nearest_full(rs, no_acts) == int(rs.steps("full")[0])
        DYN.logit_effects(rs, 6, last, neuron, decode)

    def store(rs: RunStore, sizes: bool) -> None:
        D.captures_table(rs)
        D.arrays_table(rs, sizes=sizes)

    return {
        "training": lambda rs: D.training_data(rs),
        "dynamics": dynamics,
        "neurons": neurons,
        "neurons*": neurons_no_acts,
        "attention": lambda rs: D.attention_data(rs, 11, last, 1, decode),
        "store": lambda rs: store(rs, False),
        "store+size": lambda rs: store(rs, True),
    }


def measure(url: str, reps: int) -> dict[str, tuple[float, float]]:
    out = {}
    for name, fn in pages(url).items():
        times = []
        for _ in range(reps):
            rs = RunStore(url)  # the dashboard caches one per URL; time the cold open too
            t0 = time.perf_counter()
            fn(rs)
            times.append(time.perf_counter() - t0)
        tracemalloc.start()
        fn(RunStore(url))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        out[name] = (statistics.median(times), peak / 2**20)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100, help="captures of the small store (x10 big)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default=None, help="where to build the stores (default: tmp)")
    ap.add_argument("--reuse", action="store_true", help="reuse stores already in --dir")
    a = ap.parse_args()
    tmp = Path(a.dir or tempfile.mkdtemp(prefix="dash_bench_"))
    res = {}
    try:
        for n in (a.n, 10 * a.n):
            url = tmp / f"c{n}" / "capture.zarr"
            if not (a.reuse and (url / "zarr.json").exists()):
                shutil.rmtree(url, ignore_errors=True)
                took = build(url, n)
                print(f"built {n} captures in {took:.1f} s ({url})", flush=True)
            res[n] = measure(str(url), a.reps)
    finally:
        if a.dir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    small, big = a.n, 10 * a.n
    print(f"\n{'page':<11}{'time ' + str(small):>12}{'time ' + str(big):>12}{'ratio':>8}"
          f"{'peak MiB ' + str(small):>16}{'peak MiB ' + str(big):>16}{'ratio':>8}")
    for page in res[small]:
        (t1, m1), (t2, m2) = res[small][page], res[big][page]
        print(f"{page:<11}{t1 * 1e3:>10.1f}ms{t2 * 1e3:>10.1f}ms{t2 / t1:>8.2f}"
              f"{m1:>16.2f}{m2:>16.2f}{m2 / m1:>8.2f}")
    worst = max(t for r in res.values() for t, _ in r.values())
    print(f"\nslowest page load: {worst * 1e3:.0f} ms (target < 1000 ms)")


if __name__ == "__main__":
    main()
