"""GPT-2 as single-device code, with TransformerLens hook points at the standard names.

Learned positions, pre-LN blocks, tanh-GELU MLP of 4x width, tied embeddings (unless
`tie_embeddings=false`), GPT-2 init.
Parallelism, activation checkpointing and compile are applied from outside (`parallelize`).

Hook names (TransformerLens conventions, so `run_with_cache` gives familiar keys):
  hook_embed, hook_pos_embed,
  blocks.{l}.hook_resid_pre, blocks.{l}.ln1.hook_scale|hook_normalized,
  blocks.{l}.attn.hook_q|hook_k|hook_v|hook_z        [batch, pos, head, d_head]
  blocks.{l}.attn.hook_attn_scores|hook_pattern      [batch, head, query, key]
  blocks.{l}.hook_attn_out, blocks.{l}.hook_resid_mid, blocks.{l}.ln2.hook_scale|...,
  blocks.{l}.mlp.hook_pre, blocks.{l}.mlp.hook_post  [batch, pos, 4*d_model] (the neurons)
  blocks.{l}.hook_mlp_out, blocks.{l}.hook_resid_post, ln_final.hook_scale|hook_normalized
LayerNorm hooks follow TransformerLens: hook_normalized is (x - mean) / scale, before the
weight and bias. Masked attention scores are -inf (TransformerLens' bridge writes finfo.min).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from trainer.config import ModelConfig
from trainer.loss import linear_cross_entropy


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias and TransformerLens' hooks: `hook_scale` (the std,
    [..., 1]) and `hook_normalized` ((x - mean) / scale, before weight and bias)."""

    eps = 1e-5

    def __init__(self, d: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d)) if bias else None
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.hook_normalized.has_hooks("fwd") or self.hook_scale.has_hooks("fwd")):
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)  # fused
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        x = self.hook_normalized(x / scale) * self.weight
        return x + self.bias if self.bias is not None else x


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v stacked
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        self.hook_z = HookPoint()
        self.hook_attn_scores = HookPoint()
        self.hook_pattern = HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = self.hook_q(q.view(B, T, self.n_head, self.d_head))
        k = self.hook_k(k.view(B, T, self.n_head, self.d_head))
        v = self.hook_v(v.view(B, T, self.n_head, self.d_head))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, Dh]
        p_drop = self.dropout if self.training else 0.0
        if self.hook_attn_scores.has_hooks("fwd") or self.hook_pattern.has_hooks("fwd"):
            # Explicit softmax only when someone listens: training pays nothing for these hooks.
            # In fp32 whatever the run's precision (autocast, or FSDP's bf16 parameters), so
            # that captured scores and patterns do not depend on how the run was launched.
            with torch.autocast(x.device.type, enabled=False):
                scores = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(self.d_head)
                causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
                scores = self.hook_attn_scores(scores.masked_fill(~causal, float("-inf")))
                pattern = self.hook_pattern(scores.softmax(dim=-1))
                z = (F.dropout(pattern, p_drop, self.training) @ v.float()).to(v.dtype)
        else:
            z = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop, is_causal=True)
        z = self.hook_z(z.transpose(1, 2))  # [B, T, H, Dh]
        return self.c_proj(z.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.hook_pre(self.c_fc(x))
        return self.c_proj(self.hook_post(F.gelu(pre, approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = LayerNorm(cfg.n_embd, cfg.bias)
        self.attn = Attention(cfg)
        self.attn_only = cfg.attn_only
        names = ["resid_pre", "attn_out", "resid_post"]
        if not cfg.attn_only:  # TransformerLens' attention-only models have no such hooks
            self.ln2 = LayerNorm(cfg.n_embd, cfg.bias)
            self.mlp = MLP(cfg)
            names += ["resid_mid", "mlp_out"]
        self.dropout = nn.Dropout(cfg.dropout)
        for name in names:
            setattr(self, f"hook_{name}", HookPoint())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        attn = self.hook_attn_out(self.dropout(self.attn(self.ln1(x))))
        if self.attn_only:
            return self.hook_resid_post(x + attn)
        x = self.hook_resid_mid(x + attn)
        return self.hook_resid_post(x + self.hook_mlp_out(self.dropout(self.mlp(self.ln2(x)))))


class GPT(HookedRootModule):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_final = LayerNorm(cfg.n_embd, cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.hook_embed, self.hook_pos_embed = HookPoint(), HookPoint()
        self.setup()  # HookedRootModule: names every HookPoint by its module path
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """GPT-2 init; also called after `to_empty` when the model was built on meta. Every
        draw comes from one CPU generator seeded with `seed` (default: torch.initial_seed(),
        the last torch.manual_seed), in the same order: a seed gives the same weights on
        any device, sharded (meta init under FSDP) or not, however many random numbers
        were drawn before (building the modules draws some; building them on meta none)."""
        g = torch.Generator().manual_seed(torch.initial_seed() if seed is None else seed)
        resid_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                std = resid_std if name.endswith("c_proj") else 0.02
                if not (m is self.lm_head and self.cfg.tie_embeddings):  # tied: wte's init
                    _normal_(m.weight, std, g)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                _normal_(m.weight, 0.02, g)
            elif isinstance(m, LayerNorm):
                nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        return_type: str | None = "logits",
    ) -> torch.Tensor | None:
        """idx [batch, pos] -> logits [batch, pos, vocab], or the mean loss when targets are
        given (or return_type='loss' with targets=None: next-token loss within idx), or
        None for return_type=None (hooks only: the unembedding is skipped)."""
        B, T = idx.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        # expand: a view, no copy; TransformerLens' hook_pos_embed is [batch, pos, d_model]
        x = self.hook_embed(self.wte(idx)) + self.hook_pos_embed(self.wpe(pos).expand(B, T, -1))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        x = self.ln_final(x)
        if return_type is None and targets is None:
            return None
        if targets is None and return_type == "loss":
            x, targets = x[:, :-1], idx[:, 1:]
        if targets is not None:
            # The training path: logits never materialised for the whole batch.
            return linear_cross_entropy(x.flatten(0, 1), self.lm_head.weight,
                                        targets.flatten(0, 1))
        return self.lm_head(x)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay on matrices (2-D and up: linear weights, embeddings), not on
        biases or LayerNorm gains."""
        decay, no_decay = [], []
        for p in self.parameters():  # parameters() yields a tied weight once
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12*L*d*T."""
        c = self.cfg
        n = c.num_params(embeddings=False) + c.vocab_size * c.n_embd  # unembedding matmul
        return 6 * n + 12 * c.n_layer * c.n_embd * seq_len

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample continuations; top_k=1 (or temperature 0) is greedy. Under FSDP every rank
        must call this with the same arguments (each forward is a collective)."""
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.cfg.block_size:]
            logits = self(ctx)[:, -1, :].float()
            if temperature <= 0 or top_k == 1:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                probs = logits.softmax(dim=-1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(idx.device)
            idx = torch.cat([idx, nxt], dim=1)
        return idx


def _normal_(p: torch.Tensor, std: float, g: torch.Generator) -> None:
    """p ~ N(0, std) from the CPU generator `g`. A CUDA tensor or a DTensor shard is drawn
    whole on the CPU (one parameter at a time) and this rank's part copied in: their own
    generators (CUDA's, DTensor's offset-based tracker) would give other numbers."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        full = torch.empty(p.shape).normal_(0.0, std, generator=g).to(p.dtype)
        # every rank drew the same tensor: each keeps its own shard, no communication
        p.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None))
    elif p.device.type != "cpu":
        p.copy_(torch.empty(p.shape).normal_(0.0, std, generator=g))
    else:
        p.normal_(0.0, std, generator=g)
