"""Weight exchange with Hugging Face's `GPT2LMHeadModel` (both directions, same numbers).

Our modules are `nn.Linear` (weight [out, in]); Hugging Face's GPT-2 uses `Conv1D` (weight
[in, out]), so every matrix is transposed on the way. Hugging Face's GPT-2 always has biases:
a model built with `bias=False` is exported with zero biases (the same function).

`transformers` is an optional dependency (`pip install .[hf]`): it is imported inside the
functions, and its absence is reported as a `UserError` (one line, no traceback).

- `to_hf(model)` -> `transformers.GPT2LMHeadModel` with the same weights (fp32, eval mode)
- `save_hf(model, out_dir, encoding=None)` -> a folder `GPT2LMHeadModel.from_pretrained`
  loads (config.json + model.safetensors), plus tokenizer files when a tiktoken encoding is
  given (what `AutoTokenizer` and TransformerLens' `TransformerBridge.boot_transformers` read)
- `from_hf(model_or_dir_or_name)` -> our `GPT` (a local folder, a hub name, or a model object)
- `load_pretrained(name_or_dir)` -> our `GPT`, e.g. `load_pretrained("gpt2")`
- `hf_tokenizer(encoding)` -> a `GPT2TokenizerFast` equal to a tiktoken GPT-2 encoding
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from trainer.config import ModelConfig, UserError
from trainer.model import GPT

if TYPE_CHECKING:  # pragma: no cover
    import tiktoken
    import transformers

# Hugging Face GPT-2 activations that are the tanh approximation our MLP computes.
_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError(
            "Hugging Face transformers is not installed; install it with "
            "`pip install transformers safetensors` (or `pip install .[hf]`)"
        ) from None
    return transformers


def quiet_cli() -> None:
    """For our command-line tools: no progress bars or advisory warnings from transformers,
    and no DCP note about running without a process group (a single process is the point)."""
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def hf_config(cfg: ModelConfig):
    """The `transformers.GPT2Config` for one of our model shapes."""
    if cfg.attn_only:
        raise UserError("an attention-only model (model.attn_only) has no Hugging Face GPT-2 "
                        "equivalent; use the run's checkpoints and store instead")
    if not cfg.tie_embeddings:
        raise UserError("model.tie_embeddings=false has no export to Hugging Face GPT-2 here "
                        "(it ties lm_head to wte); use the run's checkpoints and store instead")
    t = _transformers()
    eot = 50256 if cfg.vocab_size > 50256 else None  # <|endoftext|> when it is in the vocab
    return t.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=None,  # 4 * n_embd
        activation_function="gelu_new",
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=1e-5,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        tie_word_embeddings=True,
        bos_token_id=eot,
        eos_token_id=eot,
        architectures=["GPT2LMHeadModel"],
    )


def model_config_from_hf(hf_cfg: Any) -> ModelConfig:
    """Our `ModelConfig` for a `GPT2Config`; errors (one line) on variants our model lacks."""
    problems = []
    if getattr(hf_cfg, "model_type", "gpt2") != "gpt2":
        problems.append(f"model_type {hf_cfg.model_type!r} (only 'gpt2' converts)")
    if hf_cfg.activation_function not in _TANH_GELUS:
        problems.append(f"activation_function {hf_cfg.activation_function!r}")
    if hf_cfg.n_inner not in (None, 4 * hf_cfg.n_embd):
        problems.append(f"n_inner {hf_cfg.n_inner} (ours is 4 * n_embd)")
    if abs(hf_cfg.layer_norm_epsilon - 1e-5) > 1e-12:
        problems.append(f"layer_norm_epsilon {hf_cfg.layer_norm_epsilon} (ours is 1e-5)")
    if not getattr(hf_cfg, "scale_attn_weights", True):
        problems.append("scale_attn_weights=False")
    if getattr(hf_cfg, "scale_attn_by_inverse_layer_idx", False):
        problems.append("scale_attn_by_inverse_layer_idx=True")
    if not getattr(hf_cfg, "tie_word_embeddings", True):
        problems.append("tie_word_embeddings=False (ours ties lm_head to wte)")
    if problems:
        raise UserError("cannot convert this GPT-2 variant: " + "; ".join(problems))
    cfg = ModelConfig(
        n_layer=hf_cfg.n_layer,
        n_head=hf_cfg.n_head,
        n_embd=hf_cfg.n_embd,
        block_size=hf_cfg.n_positions,
        vocab_size=hf_cfg.vocab_size,
        dropout=float(hf_cfg.resid_pdrop),
        bias=True,
    )
    cfg.validate()
    return cfg


# (our name, Hugging Face name, is a Conv1D matrix) for block parameters.
_BLOCK_PARAMS = [
    ("ln1.weight", "ln_1.weight", False),
    ("ln1.bias", "ln_1.bias", False),
    ("attn.c_attn.weight", "attn.c_attn.weight", True),
    ("attn.c_attn.bias", "attn.c_attn.bias", False),
    ("attn.c_proj.weight", "attn.c_proj.weight", True),
    ("attn.c_proj.bias", "attn.c_proj.bias", False),
    ("ln2.weight", "ln_2.weight", False),
    ("ln2.bias", "ln_2.bias", False),
    ("mlp.c_fc.weight", "mlp.c_fc.weight", True),
    ("mlp.c_fc.bias", "mlp.c_fc.bias", False),
    ("mlp.c_proj.weight", "mlp.c_proj.weight", True),
    ("mlp.c_proj.bias", "mlp.c_proj.bias", False),
]
_TOP_PARAMS = [
    ("wte.weight", "transformer.wte.weight"),
    ("wpe.weight", "transformer.wpe.weight"),
    ("ln_final.weight", "transformer.ln_f.weight"),
    ("ln_final.bias", "transformer.ln_f.bias"),
]


def _pairs(n_layer: int):
    """(our key, HF key, transpose) for every parameter."""
    for ours, theirs in _TOP_PARAMS:
        yield ours, theirs, False
    for layer in range(n_layer):
        for ours, theirs, t in _BLOCK_PARAMS:
            yield f"blocks.{layer}.{ours}", f"transformer.h.{layer}.{theirs}", t


def _bias_shape(key: str, cfg: ModelConfig) -> tuple[int, ...]:
    d = cfg.n_embd
    if key.endswith("c_attn.bias"):
        return (3 * d,)
    if key.endswith("c_fc.bias"):
        return (4 * d,)
    return (d,)


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face's GPT-2 names and layouts (fp32, CPU, contiguous)."""
    cfg = model.cfg
    ours = {k: v.detach() for k, v in model.state_dict().items()}
    out = {}
    for our_key, hf_key, transpose in _pairs(cfg.n_layer):
        if our_key in ours:
            t = ours[our_key]
            if hasattr(t, "full_tensor"):  # a DTensor (FSDP2-sharded model): gather it
                t = t.full_tensor()
            t = t.t() if transpose else t
        elif our_key.endswith(".bias"):  # bias=False: HF GPT-2 has biases, zero is the same
            t = torch.zeros(_bias_shape(our_key, cfg))
        else:
            raise KeyError(f"our model has no parameter {our_key!r}")
        out[hf_key] = t.to(device="cpu", dtype=torch.float32).contiguous()
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def to_hf(model: GPT) -> "transformers.GPT2LMHeadModel":
    """A `GPT2LMHeadModel` with our weights, fp32 on CPU, in eval mode."""
    t = _transformers()
    hf = t.GPT2LMHeadModel(hf_config(model.cfg))
    missing, unexpected = hf.load_state_dict(hf_state_dict(model), strict=False)
    # Only non-persistent buffers may be missing (older transformers keep a causal-mask
    # buffer); every parameter must have been written.
    params = {k for k, _ in hf.named_parameters(remove_duplicate=False)}
    if set(missing) & params or unexpected:
        raise RuntimeError(f"conversion to HF left missing={missing} unexpected={unexpected}")
    return hf.eval()


def save_hf(model: GPT, out_dir: str | Path, encoding: "tiktoken.Encoding | None" = None) -> Path:
    """Write a Hugging Face GPT-2 folder (config.json, generation_config.json,
    model.safetensors) that `GPT2LMHeadModel.from_pretrained(out_dir)` loads with our
    numbers; with a tiktoken GPT-2 `encoding`, also the tokenizer files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = to_hf(model)
    hf.save_pretrained(out, safe_serialization=True)
    if encoding is not None:
        write_tokenizer_files(encoding, out, model.cfg.block_size)
    return out


def from_hf(hf_model_or_dir: Any, dropout: float | None = None) -> GPT:
    """Our `GPT` (fp32, CPU, eval mode) from a `GPT2LMHeadModel`, a local folder holding
    one, or a hub name such as "gpt2" (downloaded by transformers; the default, online path).
    `dropout` overrides the dropout read from the Hugging Face config."""
    hf = hf_model_or_dir
    if isinstance(hf_model_or_dir, (str, Path)):
        hf = _load_hf_model(str(hf_model_or_dir))
    cfg = model_config_from_hf(hf.config)
    if dropout is not None:
        cfg.dropout = float(dropout)
    sd = hf.state_dict()
    if "transformer.wte.weight" not in sd:
        raise UserError(f"{type(hf).__name__} has no transformer.wte: not a GPT2LMHeadModel")
    wte = sd["transformer.wte.weight"]
    if "lm_head.weight" in sd and not torch.equal(sd["lm_head.weight"], wte):
        raise UserError("this model's lm_head is not tied to its embedding; ours must be")
    ours = {}
    for our_key, hf_key, transpose in _pairs(cfg.n_layer):
        t = sd[hf_key].detach()
        ours[our_key] = (t.t() if transpose else t).to(dtype=torch.float32, device="cpu")
    with torch.device("meta"):
        model = GPT(cfg)  # no init: every weight is written next
    # clone: our model must not share storage with the Hugging Face one
    missing, unexpected = model.load_state_dict(
        {k: v.contiguous().clone() for k, v in ours.items()}, strict=False, assign=True
    )
    if set(missing) != {"lm_head.weight"} or unexpected:
        raise RuntimeError(f"conversion from HF left missing={missing} unexpected={unexpected}")
    model.lm_head.weight = model.wte.weight  # assign=True replaced wte's Parameter: re-tie
    return model.eval()


def load_pretrained(name_or_dir: str | Path, dropout: float | None = None) -> GPT:
    """`GPT.from_pretrained`: our model with released weights, e.g. "gpt2", "gpt2-medium",
    "openai-community/gpt2-xl", or a local Hugging Face GPT-2 folder."""
    return from_hf(str(name_or_dir), dropout=dropout)


def _load_hf_model(name_or_dir: str):
    t = _transformers()
    path = Path(name_or_dir).expanduser()
    looks_local = (path.exists() or name_or_dir.startswith((".", "/", "~"))
                   or name_or_dir.count("/") > 1)
    if looks_local and not (path / "config.json").is_file():
        raise UserError(f"{name_or_dir!r} is not a Hugging Face model folder (no config.json)")
    try:
        hf = t.GPT2LMHeadModel.from_pretrained(str(path) if looks_local else name_or_dir)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load Hugging Face model {name_or_dir!r}: {first}") from None
    return hf.float().eval()  # from_hf copies into fp32 anyway; released GPT-2 is fp32


# ----------------------------------------------------------------------------- tokenizer


def _bpe_split(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair merge `token` using only merges of rank < max_rank (tiktoken's algorithm);
    for a token of rank r, max_rank=r leaves exactly the two parts its merge joined."""
    parts = [bytes([b]) for b in token]
    while True:
        best, best_i = None, None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best):
                best, best_i = r, i
        if best is None:
            return parts
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (its vocab.json alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def gpt2_vocab_and_merges(encoding: "tiktoken.Encoding") -> tuple[dict[str, int], list[str]]:
    """GPT-2's vocab.json and merges.txt contents recovered from a tiktoken encoding.

    Why not transformers' TikTokenConverter: measured with transformers 5.24 on GPT-2's
    ranks, it gives the same ids on ordinary text but 108,299 merges, not the released
    50,000 (each token's one merge of lower ranks), and no <|endoftext|> special token;
    merges.txt must be the released one for the slow tokenizer and TransformerLens."""
    ranks: dict[bytes, int] = encoding._mergeable_ranks  # bytes -> rank (tiktoken's table)
    enc = _bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab = {s(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(tok) == 1:
            continue
        parts = _bpe_split(ranks, tok, rank)
        if len(parts) != 2:
            raise ValueError(f"token {tok!r} (rank {rank}) is not one merge of lower ranks")
        merges.append(f"{s(parts[0])} {s(parts[1])}")
    for name, idx in encoding._special_tokens.items():
        vocab[name] = idx
    return vocab, merges


def hf_tokenizer(encoding: "tiktoken.Encoding", model_max_length: int = 1024):
    """A `transformers.GPT2TokenizerFast` that encodes like the tiktoken GPT-2 `encoding`
    (built offline from its ranks: vocab + merges, GPT-2's byte-level pre-tokenizer)."""
    t = _transformers()
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab, merges = gpt2_vocab_and_merges(encoding)
    merge_pairs = [tuple(m.split(" ")) for m in merges]
    tok = Tokenizer(BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    eot = "<|endoftext|>"
    out = t.GPT2TokenizerFast(
        tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot,
        model_max_length=model_max_length, add_prefix_space=False,
    )
    return out


def write_tokenizer_files(
    encoding: "tiktoken.Encoding", out_dir: str | Path, model_max_length: int = 1024
) -> None:
    """vocab.json + merges.txt (the original GPT-2 release format) plus the fast-tokenizer
    files, so both old and new `transformers` and TransformerLens find a tokenizer."""
    out = Path(out_dir)
    vocab, merges = gpt2_vocab_and_merges(encoding)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    hf_tokenizer(encoding, model_max_length).save_pretrained(out)
