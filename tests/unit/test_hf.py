"""Our GPT against Hugging Face's GPT2LMHeadModel and TransformerLens' TransformerBridge,
as independent references for the model's numbers (fp32, CPU, offline)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / huggingface_hub import

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from helpers import BPE, CORPUS  # noqa: E402
from trainer import hf  # noqa: E402
from trainer.config import ModelConfig, UserError  # noqa: E402
from trainer.model import GPT  # noqa: E402

TINY = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, vocab_size=50257)
ATOL = 1e-4


def _perturb_vectors(module: torch.nn.Module, seed: int) -> None:
    """Random LayerNorm gains and biases (init makes them 1 and 0, which would hide a
    swapped or dropped bias)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=g))


def _tiny(seed: int = 0, **over) -> GPT:
    torch.manual_seed(seed)
    m = GPT(ModelConfig(**{**TINY, **over}))
    _perturb_vectors(m, seed)
    return m.eval()


def _idx(vocab: int, B: int = 2, T: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny() -> GPT:
    return _tiny()


@pytest.fixture(scope="module")
def encoding(shared):
    from trainer.tokenizer import get_encoding

    return get_encoding(str(BPE))


@pytest.fixture(scope="module")
def exported(tiny, encoding, tmp_path_factory) -> Path:
    return hf.save_hf(tiny, tmp_path_factory.mktemp("hf") / "tiny", encoding=encoding)


def test_to_hf_same_logits(tiny):
    h = hf.to_hf(tiny)
    assert not h.training
    assert h.lm_head.weight.data_ptr() == h.transformer.wte.weight.data_ptr()  # still tied
    idx = _idx(tiny.cfg.vocab_size)
    with torch.no_grad():
        ours, theirs = tiny(idx), h(idx).logits
    torch.testing.assert_close(theirs, ours, atol=ATOL, rtol=0)


def test_from_hf_same_logits():
    cfg = hf.hf_config(ModelConfig(**{**TINY, "vocab_size": 1000}))
    torch.manual_seed(3)
    h = transformers.GPT2LMHeadModel(cfg).eval()  # HF's own random init
    _perturb_vectors(h, 3)
    m = hf.from_hf(h)
    assert m.cfg == ModelConfig(**{**TINY, "vocab_size": 1000, "dropout": 0.0})
    assert m.lm_head.weight is m.wte.weight and not m.training
    assert all(p.requires_grad for p in m.parameters())  # trainable, and its own storage
    assert m.wte.weight.data_ptr() != h.transformer.wte.weight.data_ptr()
    idx = _idx(1000)
    with torch.no_grad():
        torch.testing.assert_close(m(idx), h(idx).logits, atol=ATOL, rtol=0)
    # and the loss our training computes equals HF's
    with torch.no_grad():
        ours = m(idx[:, :-1], idx[:, 1:])
        theirs = h(idx, labels=idx).loss
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_bias_free_model_exports_zero_biases():
    m = _tiny(seed=5, bias=False)
    h = hf.to_hf(m)
    assert torch.count_nonzero(h.transformer.h[0].attn.c_attn.bias) == 0
    assert torch.count_nonzero(h.transformer.ln_f.bias) == 0
    idx = _idx(m.cfg.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(h(idx).logits, m(idx), atol=ATOL, rtol=0)


def test_saved_folder_loads_in_transformers(tiny, exported):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= names
    h = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    idx = _idx(tiny.cfg.vocab_size, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(h(idx).logits, tiny(idx), atol=ATOL, rtol=0)
    back = hf.load_pretrained(exported)  # folder -> ours: bit-identical round trip
    sd, sd_back = tiny.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys()
    for k in sd:
        assert torch.equal(sd[k], sd_back[k]), k


def test_exported_tokenizer_matches_tiktoken(exported, encoding):
    tok = transformers.AutoTokenizer.from_pretrained(exported)
    text = CORPUS.read_text()[:5000]
    text += " Hello world<|endoftext|>  don't \n\n ünïcode 日本語 123456"
    ids = encoding.encode(text, allowed_special="all")
    assert tok(text)["input_ids"] == ids
    assert tok.decode(ids) == text
    assert tok.eos_token_id == 50256


def test_transformer_lens_bridge_hooks(tiny, exported):
    """TransformerLens' bridge on the exported folder sees the same activations at the
    standard hook names, with the same shapes."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(exported), device="cpu")
    bridge.eval()
    idx = _idx(tiny.cfg.vocab_size, T=20, seed=11)
    with torch.no_grad():
        logits_tl, tl = bridge.run_with_cache(idx)
        logits, ours = tiny.run_with_cache(idx)
    torch.testing.assert_close(logits_tl, logits, atol=ATOL, rtol=0)
    same = [
        "hook_embed",
        "hook_pos_embed",
        "blocks.0.hook_resid_pre",
        "blocks.0.ln1.hook_scale",
        "blocks.0.ln1.hook_normalized",
        "blocks.1.ln2.hook_normalized",
        "ln_final.hook_scale",
        "ln_final.hook_normalized",
        "blocks.1.attn.hook_pattern",
        "blocks.0.attn.hook_q",
        "blocks.0.attn.hook_k",
        "blocks.0.attn.hook_v",
        "blocks.1.attn.hook_z",
        "blocks.0.hook_attn_out",
        "blocks.0.hook_resid_mid",
        "blocks.1.mlp.hook_pre",
        "blocks.1.mlp.hook_post",
        "blocks.1.hook_mlp_out",
        "blocks.1.hook_resid_post",
    ]
    for name in same:
        assert tl[name].shape == ours[name].shape, name
        torch.testing.assert_close(tl[name], ours[name], atol=ATOL, rtol=0, msg=name)

    # attention scores: equal where causal; the masked entries are -inf here, HF eager's
    # finfo.min there
    T = idx.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    a, b = ours["blocks.0.attn.hook_attn_scores"], tl["blocks.0.attn.hook_attn_scores"]
    torch.testing.assert_close(b[..., causal], a[..., causal], atol=ATOL, rtol=0)
    assert torch.isneginf(a[..., ~causal]).all() and (b[..., ~causal] < -1e30).all()

    # With nothing listening, the fused kernels give the same logits as the hooked paths.
    torch.testing.assert_close(tiny(idx), logits, atol=ATOL, rtol=0)


def test_unsupported_variant_is_one_line_error():
    cfg = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16,
                                  vocab_size=100, activation_function="relu")
    with pytest.raises(UserError, match="activation_function 'relu'"):
        hf.from_hf(transformers.GPT2LMHeadModel(cfg))


def test_missing_folder_and_unknown_name_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not a Hugging Face model folder"):
        hf.load_pretrained(tmp_path / "nope")
    with pytest.raises(UserError, match="could not load"):
        hf.load_pretrained("bad name!!")


def test_import_then_export_cli_round_trip(tiny, exported, tmp_path, capsys):
    from trainer import export_hf, import_hf

    run, out = tmp_path / "run", tmp_path / "out"
    assert import_hf.main(["--hf", str(exported), "--run-dir", str(run)]) == 0
    assert (run / "config.toml").is_file()
    # a second import into the same run dir refuses rather than overwrite
    assert import_hf.main(["--hf", str(exported), "--run-dir", str(run)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: ")
    assert export_hf.main(["--run-dir", str(run), "--out", str(out),
                           "--tokenizer-file", str(BPE)]) == 0
    assert (out / "vocab.json").is_file()
    h = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = _idx(tiny.cfg.vocab_size, seed=13)
    with torch.no_grad():
        torch.testing.assert_close(h(idx).logits, tiny(idx), atol=ATOL, rtol=0)


def test_export_cli_errors(tmp_path, capsys):
    from trainer import export_hf

    assert export_hf.main(["--run-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not found" in err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.toml").write_text("[model]\nn_layer = 1\n")
    assert export_hf.main(["--run-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "checkpoint" in err


def test_export_without_transformers_is_one_line_error(tmp_path, capsys, monkeypatch):
    from trainer import export_hf

    monkeypatch.setitem(__import__("sys").modules, "transformers", None)  # import fails
    assert export_hf.main(["--run-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "transformers" in err
