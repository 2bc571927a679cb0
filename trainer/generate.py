"""Sample text from a run's checkpoint or weight snapshot, with the perplexity of what was
sampled.

    python -m trainer.generate --run-dir runs/tiny --prompt "ROMEO:" --max-tokens 64 \
        --temperature 0.8 --top-k 50 [--seed 1337] [--step N] [--num-samples 3] \
        [--tokenizer-file ../shared/data/gpt2.tiktoken] [--device auto] [--ids]

The model's shape comes from the run (its config.toml and checkpoint), never from flags.
`--step N` loads the checkpoint of step N when the run kept one, else the weight snapshot
of step N in the run's capture store (bf16 weights computed in float32; every snapshot step
loads, whatever checkpoint.keep_last pruned); the first line says which it used. Without
`--step`: the latest checkpoint (the latest snapshot when the run kept no checkpoint).
`--ids` also prints each sample's token ids (prompt and continuation).
`--top-k 1` (or `--temperature 0`) is greedy decoding. The perplexity printed for each sample
is exp(mean NLL) of the generated tokens, each given everything before it (the prompt and
the earlier generated tokens, cropped to the model's block_size the way sampling crops it).

Tokenizer: `--tokenizer-file`, else the run's `data.tokenizer_file`, else the BPE file the
run's data dir was prepared with, else tiktoken's own GPT-2 (downloaded once).
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings

import torch
import torch.nn.functional as F

from store.errors import ArgumentParser, UserError, run_cli


def continuation_nll(model, seq: torch.Tensor, start: int) -> torch.Tensor:
    """NLL [B, L - start] of seq[:, start:] under `model`, each token given its prefix
    cropped to the last block_size tokens (exactly the context sampling used)."""
    B, L = seq.shape
    T = model.cfg.block_size
    if not 1 <= start <= L:
        raise ValueError(f"start must be in [1, {L}], got {start}")
    out = []
    first_end = min(L, T + 1)  # targets 1..first_end-1 see their whole prefix in one window
    with torch.no_grad():
        if start < first_end:
            logits = model(seq[:, : first_end - 1])[:, start - 1 :].float()
            lp = F.log_softmax(logits, dim=-1)
            out.append(-lp.gather(-1, seq[:, start:first_end, None]).squeeze(-1))
        for t in range(max(start, first_end), L):  # beyond block_size: a sliding window each
            logits = model(seq[:, t - T : t])[:, -1].float()
            out.append(-F.log_softmax(logits, dim=-1).gather(-1, seq[:, t : t + 1]))
    return torch.cat(out, dim=1) if out else seq.new_zeros((B, 0), dtype=torch.float32)


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no CUDA device is visible")
    return name


def generate_samples(model, prompt_ids: list[int], max_tokens: int, temperature: float,
                     top_k: int | None, num_samples: int, seed: int):
    """(tokens [K, P + N], per-sample NLL [K, N]) for K samples of the same prompt."""
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=device)
    torch.manual_seed(seed)
    gen = torch.Generator(device="cpu").manual_seed(seed)  # GPT.generate samples on the CPU
    out = model.generate(idx, max_tokens, temperature=temperature, top_k=top_k, generator=gen)
    return out, continuation_nll(model, out, len(prompt_ids))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m trainer.generate",
        description="Sample text from a run's checkpoint or weight snapshot."
    )
    p.add_argument("--run-dir", required=True, help="run dir of a training run (or import_hf)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--max-tokens", type=int, default=100, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest; "
                   "1 is greedy, 0 turns top-k off")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--step", type=int, default=None,
                   help="step of a checkpoint or weight snapshot (default: latest checkpoint)")
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--tokenizer-file", default=None,
                   help="GPT-2 BPE file in tiktoken's format (default: the run's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--ids", action="store_true",
                   help="also print each sample's token ids (prompt and continuation)")
    return p


def run(args: argparse.Namespace) -> None:
    from trainer.snapshots import load_model_at
    from trainer.tokenizer import EOT, resolve

    if args.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0, got {args.top_k}")
    if args.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {args.num_samples}")

    loaded = load_model_at(args.run_dir, step=args.step, device=_device(args.device))
    model, cfg, step = loaded.model, loaded.cfg, loaded.step
    enc = resolve(args.tokenizer_file, cfg)
    prompt_ids = enc.encode(args.prompt, allowed_special={"<|endoftext|>"}) or [EOT]
    too_big = [t for t in prompt_ids if t >= cfg.model.vocab_size]
    if too_big:
        raise UserError(f"the prompt has token ids {too_big[:5]} outside this model's vocabulary "
                        f"of {cfg.model.vocab_size}")

    tokens, nll = generate_samples(model, prompt_ids, args.max_tokens, args.temperature,
                                   args.top_k or None, args.num_samples, args.seed)
    greedy = args.top_k == 1 or args.temperature == 0
    print(f"run {args.run_dir} step {step} ({loaded.where}) | "
          f"{'greedy' if greedy else 'sampling'} "
          f"temperature {args.temperature} top-k {args.top_k or 'off'} seed {args.seed}")
    for i in range(args.num_samples):
        ppl = math.exp(nll[i].mean().item())
        print(f"--- sample {i + 1}/{args.num_samples} ---")
        print(enc.decode(tokens[i].tolist()))
        if args.ids:
            print("ids: " + " ".join(map(str, tokens[i].tolist())))
        print(f"perplexity: {ppl:.4f} ({nll.shape[1]} generated tokens)")


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")  # 1 process
    return run_cli(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
