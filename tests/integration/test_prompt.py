"""Any step, any text (capture/prompt.py): a text run through the model at a snapshot step
gives what Hugging Face `transformers` gives from `capture.export --format hf` of that
step, and on the probe set's own tokens what the store captured at that step; the CLI
writes one .npz, or one error line and nothing.

The run is the session's tiny_run (tests/helpers.py TINY_ARGS: 3 layers, 32 wide,
block_size 32, 8 steps): snapshots 0, 1, 2, 3, 6, 8; full captures 0, 1, 2, 4, 8; one
checkpoint, 8 (checkpoint.every 500: the final step only). So step 6 loads from its bf16
snapshot only (what the hf export reads), step 8 from its float32 checkpoint.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from capture import prompt
from capture.prompt import cli as prompt_cli
from helpers import BPE, popen
from store.errors import UserError
from store.reader import RunStore

pytestmark = pytest.mark.integration

TEXT = "ROMEO: But soft, what light through yonder window breaks?"
SNAP = 6  # a snapshot step without a checkpoint: the hf export and run_text read the same
HOOKS = ["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern", "blocks.1.mlp.hook_post"]
# The store against our model from the same float32 weights (checkpoint step 8): float16
# storage, 2^-11 of the value's magnitude (measured: 2^-11.8 of each hook's largest
# |activation|, patterns 2.4e-4 at p ~ 1, loss exact: stored float32).
FP16_TOL = 2.0 ** -10
# From a bf16 snapshot (steps 0-2: the capture used the float32 weights): 8 significant
# bits per weight; see test_snapshots.py's BF16_TOL (measured here: 2^-8.4, loss 1e-3).
BF16_TOL = 2.0 ** -7


@pytest.fixture(scope="module")
def rs(tiny_run) -> RunStore:
    return RunStore(tiny_run / "capture.zarr")


@pytest.fixture(scope="module")
def started(tiny_run, tmp_path_factory) -> dict:
    """The module's subprocesses, started together (each mostly imports torch: on 2 cores
    side by side they take the time of one and a half): `python -m capture.export --format
    hf` of SNAP, and `python -m capture.prompt` with good and with bad input. name ->
    a function waiting for it: (CompletedProcess, its --out)."""
    d = tmp_path_factory.mktemp("prompt")
    outs = {"hf": d / "hf", "cli": d / "sub" / "p.npz", "bad": d / "bad.npz"}
    args = {
        "hf": ["-m", "capture.export", "--run-dir", str(tiny_run), "--step", str(SNAP),
               "--format", "hf", "--out", str(outs["hf"])],
        "cli": ["-m", "capture.prompt", "--run-dir", str(tiny_run), "--text", TEXT,
                "--steps", "0,8", "--hook", "blocks.0.attn.hook_pattern", "--hook",
                "blocks.*.hook_resid_post", "--lens", "--device", "cpu",
                "--out", str(outs["cli"])],
        "bad": ["-m", "capture.prompt", "--run-dir", str(tiny_run), "--text", "",
                "--out", str(outs["bad"])],
    }
    procs = {k: popen(a) for k, a in args.items()}
    done: dict = {}

    def wait(name: str):
        if name not in done:
            out, err = procs[name].communicate(timeout=300)
            done[name] = (subprocess.CompletedProcess(args[name], procs[name].returncode,
                                                      out, err), outs[name])
        return done[name]

    yield wait
    for p in procs.values():
        if p.poll() is None:
            p.kill()
        p.communicate()


@pytest.fixture(scope="module")
def hf_snap(started):
    """transformers' GPT2LMHeadModel from `python -m capture.export --format hf` of SNAP."""
    import transformers

    r, out = started("hf")
    assert r.returncode == 0, r.stderr[-3000:]
    return transformers.GPT2LMHeadModel.from_pretrained(
        out, torch_dtype=torch.float32, attn_implementation="eager").float().eval()


def test_the_run_has_what_the_tests_need(tiny_run, rs, started):
    # `started`: the subprocesses run while the in-process tests below do; the tests that
    # wait for them come last
    from trainer.checkpoint import list_complete

    assert prompt.snapshot_steps(tiny_run) == [0, 1, 2, 3, 6, 8] == rs.snapshot_steps()
    assert list_complete(tiny_run) == [8]
    assert prompt.snapshot_steps(tiny_run, checkpoints=True) == [0, 1, 2, 3, 6, 8]
    assert list(rs.steps("full")) == [0, 1, 2, 4, 8]
    # load_model: a HookedRootModule in eval mode, at a snapshot step and a checkpoint step
    from transformer_lens import HookedRootModule

    for step in (SNAP, 8):
        model = prompt.load_model(tiny_run, step)
        assert isinstance(model, HookedRootModule) and not model.training
        with torch.no_grad():
            _, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]),
                                            names_filter="blocks.2.hook_resid_post")
        assert cache["blocks.2.hook_resid_post"].shape == (1, 3, 32)


def test_probe_tokens_equal_what_the_store_captured(tiny_run, rs):
    """Steps 2 (bf16 snapshot) and 8 (float32 checkpoint), every stored hook and attention
    layer, on two probe sequences; and the induction score of the stored repeated probe."""
    from capture.dynamics import induction_score

    tokens = rs.probe_tokens()
    hooks = [*rs.act_hooks, *(f"blocks.{i}.attn.hook_pattern" for i in rs.attn_layers)]
    for seq in (0, rs.attn_seqs - 1):
        r = prompt.run_text(tiny_run, tokens[seq], steps=[8, 2, 8], hooks=hooks, top_k=0)
        assert r.steps.tolist() == [2, 8] and r.sources == ["snapshot", "checkpoint"]
        assert r.top.ids.shape == (2, rs.seq_len, 0)
        for i, (step, tol) in enumerate([(2, BF16_TOL), (8, FP16_TOL)]):
            want = rs.token_loss(step, seq)[1:]
            np.testing.assert_allclose(r.loss[i], want, atol=tol * np.abs(want).max(), rtol=0)
            if step == 8:
                np.testing.assert_allclose(r.loss[i], want, atol=1e-5, rtol=0)
            for h in rs.act_hooks:
                want = rs.activations(h, step, seq).astype(np.float32)
                err = np.abs(r[h][i] - want).max()
                assert err <= tol * np.abs(want).max(), (h, step, err)
            for layer in rs.attn_layers:
                want = rs.attention(layer, step, seq).astype(np.float32)  # [H, Ta, Ta]
                Ta = want.shape[-1]
                got = r[f"blocks.{layer}.attn.hook_pattern"][i][:, :Ta, :Ta]
                np.testing.assert_allclose(got, want, atol=tol, rtol=0)

    # the repeated-token probe, as induction_prompt draws it, scores what the store holds
    rep = rs.repeated_tokens()
    half = rep.shape[1] // 2
    seed = rs.attrs["run"]["capture"]["probe_seed"] + 1  # trainer/capture_setup.py's seed
    first = prompt.induction_prompt(rs.attrs["model"]["vocab_size"], half, seed)
    assert first.dtype == np.int64 and first.tolist() == rep[0].tolist()
    pats = [prompt.run_text(tiny_run, row, steps=[8], hooks=["blocks.*.attn.hook_pattern"],
                            top_k=0).acts for row in rep]
    ours = np.stack([induction_score(torch.from_numpy(np.concatenate(
        [p[f"blocks.{i}.attn.hook_pattern"] for p in pats])), half).numpy()
        for i in range(rs.n_layers)])
    steps, stored = rs.head_scores("induction")
    np.testing.assert_allclose(ours, stored[list(steps).index(8)], atol=1e-5, rtol=0)


def test_bad_input_raises_one_line(tiny_run, tmp_path):
    cases = [
        (dict(text=""), "the text is empty"),
        (dict(text=TEXT * 4), "more than this model's context of 32 tokens"),
        (dict(text=TEXT, steps=[5]), "no weight snapshot or checkpoint for step 5"),
        (dict(text=TEXT, steps="some"), "steps must be 'all'"),
        (dict(text=TEXT, steps=[]), "no steps asked for"),
        (dict(text=TEXT, hooks=["blocks.9.hook_resid_post"]), "unknown hook"),
        (dict(text=[1, 50257]), "outside this model's vocabulary of 50257"),
        (dict(text=[[1, 2]]), "one sequence"),
    ]
    for kw, msg in cases:
        with pytest.raises(UserError, match=msg) as e:
            prompt.run_text(tiny_run, **kw)
        assert "\n" not in str(e.value)
    bare = tmp_path / "bare"  # a run without a store: no snapshots at all
    bare.mkdir()
    shutil.copy(tiny_run / "config.toml", bare / "config.toml")
    assert prompt.snapshot_steps(bare) == []
    with pytest.raises(UserError, match="has no weight snapshots: it has no capture store"):
        prompt.run_text(bare, TEXT)


def _no_snapshots_run(tiny_run: Path, where: Path) -> Path:
    """A copy of tiny_run's config and store without its snapshots or checkpoints."""
    run = where / "nosnap"
    run.mkdir()
    shutil.copy(tiny_run / "config.toml", run / "config.toml")
    shutil.copytree(tiny_run / "capture.zarr", run / "capture.zarr",
                    ignore=lambda d, names: ["snapshots"] if Path(d).name == "capture.zarr"
                    else [])
    return run


@pytest.mark.parametrize("case", ["empty text", "too long", "no snapshots", "unknown hook",
                                  "bad steps", "negative step", "step without weights",
                                  "no text", "out is a folder"])
def test_cli_bad_input_is_one_error_line(tiny_run, tmp_path, capsys, case):
    run, text, extra = tiny_run, TEXT, []
    out = tmp_path / "out" / "p.npz"
    if case == "empty text":
        text, msg = "", "the text is empty"
    elif case == "too long":
        text, msg = TEXT * 4, "more than this model's context of 32 tokens"
    elif case == "no snapshots":
        run, msg = _no_snapshots_run(tiny_run, tmp_path), "has no weight snapshots"
    elif case == "unknown hook":
        extra, msg = ["--hook", "blocks.0.hook_nope"], "unknown hook 'blocks.0.hook_nope'"
    elif case == "bad steps":
        extra, msg = ["--steps", "1,x"], "--steps must be 'all' or comma-separated steps"
    elif case == "negative step":
        extra, msg = ["--steps", "-1"], "--steps must be"
    elif case == "step without weights":
        extra, msg = ["--steps", "4"], "no weight snapshot or checkpoint for step 4"
    elif case == "no text":
        text, msg = None, "one of the arguments --text --ids is required"
    else:
        out, msg = tmp_path, "is a folder"
    argv = ["--run-dir", str(run), *(["--text", text] if text is not None else []), *extra,
            "--out", str(out)]
    assert prompt_cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert msg in lines[0], lines[0]
    if out != tmp_path:
        assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir()))


def test_text_at_a_snapshot_step_equals_hugging_face(tiny_run, hf_snap):
    from trainer.tokenizer import get_encoding

    r = prompt.run_text(tiny_run, TEXT, steps=[SNAP], hooks=HOOKS, top_k=5, lens=True)
    ids = get_encoding(str(BPE)).encode(TEXT)
    T = len(ids)
    assert 8 < T <= 32 and r.tokens.tolist() == ids and r.tokens.dtype == np.int64
    assert "".join(r.token_strs) == TEXT and r.text == TEXT
    assert r.steps.tolist() == [SNAP] and r.sources == ["snapshot"]
    assert "weight snapshot in" in r.where[0]
    assert r.loss.shape == (1, T - 1) and r.loss.dtype == np.float32
    assert r.top.ids.shape == r.top.probs.shape == (1, T, 5)
    assert r.lens.shape == (1, 3, T - 1)
    assert r["blocks.0.attn.hook_pattern"].shape == (1, 2, T, T)
    assert r["blocks.1.hook_resid_post"].shape == (1, T, 32)
    assert r["blocks.1.mlp.hook_post"].shape == (1, T, 128)

    x = torch.tensor([ids])
    mlp = []
    handle = hf_snap.transformer.h[1].mlp.act.register_forward_hook(
        lambda _m, _i, out: mlp.append(out.detach()))
    try:
        with torch.no_grad():
            out = hf_snap(x, output_hidden_states=True, output_attentions=True)
    finally:
        handle.remove()
    logits = out.logits[0].float()
    hf_loss = F.cross_entropy(logits[:-1], x[0, 1:], reduction="none")
    close = dict(atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(r.loss[0]), hf_loss, **close)
    # hidden_states[l + 1] is block l's output (but the last, which has ln_f applied)
    torch.testing.assert_close(torch.from_numpy(r["blocks.1.hook_resid_post"][0]),
                               out.hidden_states[2][0], **close)
    torch.testing.assert_close(torch.from_numpy(r["blocks.0.attn.hook_pattern"][0]),
                               out.attentions[0][0], **close)
    torch.testing.assert_close(torch.from_numpy(r["blocks.1.mlp.hook_post"][0]), mlp[0][0],
                               **close)
    # the top-k: HF's probabilities of our ids are ours, descending, and none left out
    probs = logits.softmax(-1)
    ours = torch.from_numpy(r.top.probs[0])
    torch.testing.assert_close(probs.gather(1, torch.from_numpy(r.top.ids[0])), ours,
                               atol=1e-7, rtol=1e-4)
    assert (ours[:, :-1] >= ours[:, 1:]).all()
    assert (probs.topk(5).values[:, -1] <= ours[:, -1] * (1 + 1e-4)).all()
    # the logit lens at the last layer is the loss
    np.testing.assert_allclose(r.lens[0, -1], r.loss[0], atol=1e-5)
    # token ids in give the same numbers as the text they encode
    r2 = prompt.run_text(tiny_run, r.tokens, steps=SNAP, hooks=HOOKS, top_k=5)
    assert r2.token_strs is None and r2.text is None
    np.testing.assert_array_equal(r2.loss, r.loss)
    np.testing.assert_array_equal(r2[HOOKS[0]], r[HOOKS[0]])
    np.testing.assert_array_equal(r2.top.ids, r.top.ids)


def test_cli_writes_the_npz(tiny_run, started):
    r, out = started("cli")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == str(out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.npz"]  # no temp file left
    z = np.load(out)
    T = len(z["tokens"])
    assert z["tokens"].dtype == np.int64 and z["steps"].tolist() == [0, 8]
    shapes = {k: z[k].shape for k in z.files}
    assert shapes == {"tokens": (T,), "steps": (2,), "loss": (2, T - 1), "top_ids": (2, T, 5),
                      "top_probs": (2, T, 5), "lens": (2, 3, T - 1),
                      "blocks.0.attn.hook_pattern": (2, 2, T, T),
                      **{f"blocks.{i}.hook_resid_post": (2, T, 32) for i in range(3)}}
    want = prompt.run_text(tiny_run, TEXT, steps=[0, 8], hooks=["blocks.0.attn.hook_pattern"])
    np.testing.assert_array_equal(z["tokens"], want.tokens)
    np.testing.assert_allclose(z["loss"], want.loss, atol=1e-6, rtol=0)
    np.testing.assert_allclose(z["blocks.0.attn.hook_pattern"],
                               want["blocks.0.attn.hook_pattern"], atol=1e-6, rtol=0)
    # a bad input in a real process: exit status 2, one line, no file
    r, bad = started("bad")
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: the text is empty"), lines
    assert not bad.exists() and not any(bad.parent.glob(".bad.npz*"))


def test_a_snapshot_step_as_transformer_lens_bridge(tiny_run, tmp_path):
    """TransformerLens' own model class at a snapshot step: the bridge booted offline from
    that step's Hugging Face folder gives the Python API's loss and activations."""
    bridge = prompt.load_transformer_lens(tiny_run, SNAP, tmp_path / "hf")
    r = prompt.run_text(tiny_run, TEXT, steps=[SNAP], hooks=HOOKS[:1] + HOOKS[2:], top_k=0)
    x = torch.as_tensor(r.tokens)[None]
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(x)
    loss = F.cross_entropy(logits[0, :-1].float(), x[0, 1:], reduction="none")
    torch.testing.assert_close(loss, torch.as_tensor(r.loss[0]), atol=1e-4, rtol=0)
    for hook in HOOKS[:1] + HOOKS[2:]:
        torch.testing.assert_close(cache[hook][0].float(), torch.as_tensor(r[hook][0]),
                                   atol=1e-4, rtol=0)
