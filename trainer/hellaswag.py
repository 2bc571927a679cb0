"""HellaSwag evaluation (Zellers et al. 2019), scored the standard way for a base LM.

Each example is a context and four candidate endings. Every candidate is rendered as
`ctx tokens + tokens of (" " + ending)`; the model scores the ending tokens only, and the
prediction is the candidate with the lowest loss:

  acc       argmin of the SUM of the ending's token losses (favours short endings)
  acc_norm  argmin of the MEAN of the ending's token losses (the number usually reported)

This follows the scoring of the evaluation in Karpathy's llm.c / build-nanogpt, reimplemented.
Data: the official `hellaswag_val.jsonl` (one JSON object per line with "ctx", "label",
"endings", ...). Distributed: example i is scored by rank i % world and counts are summed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from store.errors import UserError

N_ENDINGS = 4


def load_examples(path: str, limit: int = 0) -> list[dict]:
    """Read a HellaSwag .jsonl file; `limit` > 0 keeps the first `limit` examples.

    Each example must have "ctx" (str), "endings" (4 strs) and "label" (int 0-3; a digit
    string is accepted too). Problems raise `UserError` naming the file and line number.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"hellaswag: file not found: {path}")
    examples: list[dict] = []
    with p.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            examples.append(_parse_line(line, path, lineno))
            if limit > 0 and len(examples) >= limit:
                break
    if not examples:
        raise UserError(f"hellaswag: {path} holds no examples")
    return examples


def _parse_line(line: str, path: str, lineno: int) -> dict:
    where = f"hellaswag: {path}:{lineno}"
    try:
        ex = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(ex, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(ex).__name__}")
    ctx = ex.get("ctx")
    if not isinstance(ctx, str):
        raise UserError(f"{where}: 'ctx' must be a string, got {_show(ctx)}")
    endings = ex.get("endings")
    if (
        not isinstance(endings, list)
        or len(endings) != N_ENDINGS
        or not all(isinstance(e, str) for e in endings)
    ):
        raise UserError(
            f"{where}: 'endings' must be a list of {N_ENDINGS} strings, got {_show(endings)}"
        )
    label = ex.get("label")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < N_ENDINGS:
        raise UserError(
            f"{where}: 'label' must be an integer 0-{N_ENDINGS - 1}, got {_show(label)}"
        )
    out = dict(ex)
    out["label"] = label
    return out


def _show(value: object) -> str:
    s = "missing" if value is None else repr(value)
    s = s.replace("\n", " ")
    return s if len(s) <= 60 else s[:57] + "..."


def render(
    example: dict, enc, max_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """-> (tokens [4, T], mask [4, T], label), both int64.

    Row j is the context tokens followed by the tokens of " " + endings[j]; rows are
    right-padded with 0 to the longest; mask is 1 exactly over the ending tokens. With
    `max_len`, a row longer than that loses tokens from the left (context first).
    """
    ctx_tokens = enc.encode(example["ctx"])
    rows, masks = [], []
    for ending in example["endings"]:
        end_tokens = enc.encode(" " + ending)
        row = ctx_tokens + end_tokens
        m = [0] * len(ctx_tokens) + [1] * len(end_tokens)
        if max_len is not None and len(row) > max_len:
            row, m = row[-max_len:], m[-max_len:]
        rows.append(row)
        masks.append(m)
    T = max(len(r) for r in rows)
    tokens = torch.zeros((N_ENDINGS, T), dtype=torch.long)
    mask = torch.zeros((N_ENDINGS, T), dtype=torch.long)
    for j, (r, m) in enumerate(zip(rows, masks)):
        tokens[j, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[j, : len(m)] = torch.tensor(m, dtype=torch.long)
    return tokens, mask, example["label"]


def ending_losses(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor):
    """-> (sum, mean) of each row's next-token losses over its masked (ending) tokens."""
    logits = logits[:, :-1].float()
    targets = tokens[:, 1:]
    m = mask[:, 1:].to(logits.dtype)
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    losses = losses.view(targets.shape) * m
    total = losses.sum(dim=1)
    return total, total / m.sum(dim=1).clamp(min=1.0)


@torch.no_grad()
def evaluate(model, examples: list[dict], enc, device, rank: int = 0, world: int = 1) -> dict:
    """Score `examples` -> {"acc", "acc_norm", "n"} over all ranks.

    Rank r scores examples r, r + world, ... . Must be called by EVERY rank with the same
    examples: the final all_reduce is a collective, and under FSDP each forward is too (its
    parameter all-gathers), so every rank runs the same NUMBER of forwards; a rank with fewer
    examples runs dummy forwards whose results are ignored.
    """
    cfg = getattr(model, "cfg", None)
    max_len = getattr(cfg, "block_size", None)
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.long, device=device)  # correct (sum), correct (mean), n
    mine = examples[rank::world] if world > 1 else examples
    n_forwards = -(-len(examples) // world) if world > 1 else len(examples)  # ceil
    try:
        for k in range(n_forwards):
            if k < len(mine):
                tokens, mask, label = render(mine[k], enc, max_len)
            else:  # padding forward so all ranks issue the same collectives; result unused
                tokens, mask, label = render(examples[0], enc, max_len)
            tokens, mask = tokens.to(device), mask.to(device)
            logits = model(tokens)
            if k >= len(mine):
                continue
            total, mean = ending_losses(logits, tokens, mask)
            counts[0] += int(total.argmin().item() == label)
            counts[1] += int(mean.argmin().item() == label)
            counts[2] += 1
    finally:
        model.train(was_training)
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)  # collective: every rank must get here
    correct, correct_norm, n = (int(c) for c in counts.tolist())
    return {
        "acc": correct / n if n else 0.0,
        "acc_norm": correct_norm / n if n else 0.0,
        "n": n,
    }
