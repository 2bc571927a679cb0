"""A small schema-2 store written the way the capture writer writes one, for the dashboard
tests (unit and AppTest): no tests here."""

from __future__ import annotations

import numpy as np

ACT_HOOK, STAT_HOOK = "blocks.1.hook_resid_post", "blocks.0.mlp.hook_post"


def write_store(run, steps, full, *, snapshots=(), induction=None, icl=None, attn_len=4,
                status="finished"):
    """A small schema-2 store at run/capture.zarr, written through StoreWriter as the
    capture writer does: every step a summary capture (tokens, statistics and top-k of both
    hooks, head scores, logit lens, per-token loss and ICL score), the `full` ones also the
    activations of ACT_HOOK, layer 1's attention and layer 0's neuron logit effects
    (committed SUMMARY | FULL); weight snapshots at `snapshots`. Values are functions of
    the slot, so a test can tell them apart."""
    from store.schema import FULL, STATS, SUMMARY, Layout
    from store.writer import StoreWriter

    L, H, P, T, K, M = 2, 2, 2, 8, 2, 8
    widths = {ACT_HOOK: 4, STAT_HOOK: M}
    probe = (np.arange(P * T, dtype=np.int32).reshape(P, T) + 100)
    lay = Layout(n_seqs=P, seq_len=T, act_hooks={ACT_HOOK: 4}, stat_hooks=widths, topk=K,
                 attn_layers=[1], n_heads=H, attn_seqs=1, attn_len=attn_len,
                 max_steps=max(steps), world=1, source="probe",
                 attrs={"model": {"n_layer": L, "n_embd": 4}}, probe_tokens=probe,
                 n_layers=L, head_scores=["entropy", "prev_token", "duplicate", "induction"],
                 logit_lens=True, repeated_tokens=np.tile(np.arange(4, dtype=np.int32), (2, 2)),
                 token_loss=True, dla_layers=[0], d_mlp=M, dla_k=K)
    w = StoreWriter.create_or_open(str(run / "capture.zarr"), lay, durable=False)
    for slot, step in enumerate(steps):
        w.reserve(slot)
        w.write_tokens(slot, 0, probe)
        is_full = step in full
        if is_full:
            acts = (np.arange(P * T * 4).reshape(P, T, 4) % 7 + slot).astype(np.float16)
            w.write_acts(ACT_HOOK, slot, 0, acts)
            pat = np.tril(np.full((H, T, T), 0.1 + 0.01 * slot, np.float16))
            w.write_attn(1, slot, 0, pat)  # a whole [H, T, T]: the writer cuts it to attn_len
            tok = np.tile(np.arange(K, dtype=np.int32), (M, 1)) + slot
            val = np.tile(np.array([2.0, 1.0], np.float32), (M, 1)) + slot
            w.write_dla(0, slot, tok, val, tok, -val)
        for hook, d in widths.items():
            w.write_stats(hook, slot, {k: np.full(d, slot + i, np.float32)
                                       for i, k in enumerate(STATS)})
            idx = np.tile(np.array([T + 5, 3], np.int32), (d, 1))  # (seq 1, pos 5), (0, 3)
            w.write_topk(hook, slot, np.tile(np.array([9.0, 8.0], np.float32), (d, 1)), idx)
        sc = {k: np.full((L, H), 0.1, np.float32) for k in lay.head_scores}
        if induction is not None:
            sc["induction"][1, 0] = induction[slot]
        w.write_head_scores(slot, sc)
        w.write_lens(slot, np.array([5.0, 4.0], np.float32) - slot * 0.1)
        loss = np.full((P, T), 3.0 - slot * 0.1, np.float32)
        loss[:, 0] = np.nan
        w.write_token_loss(slot, loss, -0.05 * slot if icl is None else icl[slot])
        w.mark_done(slot, 0)
        w.commit(slot, step, SUMMARY | FULL if is_full else SUMMARY)
    for s in snapshots:
        w.write_snapshot(s, {"model.safetensors": b"x" * 64, "config.json": b"{}"})
    S = max(steps)
    if S:
        s = np.arange(1, S + 1)
        w.write_metrics("train", s, {"loss": 10 / np.sqrt(s), "lr": np.full(S, 6e-4),
                                     "grad_norm": np.ones(S), "tokens_per_s": np.full(S, 1e3)})
    w.set_status(status)
    w.close()
    return run
