"""The [capture] section of the run config, and its checks: capture validates its own
settings (`CaptureConfig.validate`), against the model's shape and the world size the
trainer hands it, so another trainer can attach the same capture."""

from __future__ import annotations

import re
from dataclasses import dataclass

from store.errors import UserError


class CaptureConfigError(UserError):
    """A capture setting that cannot work: reported as one line, never a traceback."""


@dataclass
class CaptureConfig:
    enabled: bool = True  # false: train without capture
    source: str = "probe"  # probe: a fixed held-out set | train: the live training micro-batch
    # Three tiers, each on its own schedule (capture/schedule.py): step 0 (at_init), the
    # early steps 1, 2, 4, 8, ... below the tier's cadence (log_early), every multiple of
    # it, and the final step.
    # summary, every `every` steps: per-neuron statistics and top-k of `summary_hooks` (and
    # of `hooks`), head scores, the logit lens, the per-token probe loss. KB to a few MB.
    every: int = 20
    log_early: bool = True  # also steps 1, 2, 4, 8, ... below each tier's cadence
    at_init: bool = True  # also step 0, before any update
    # Hooks whose statistics the summary tier keeps (comma-separated names or patterns).
    summary_hooks: str = "blocks.*.hook_resid_post,blocks.*.mlp.hook_post"
    # full, every `full_every` steps (0: never): also the activations of `hooks`, the
    # attention patterns and the neuron logit effects.
    full_every: int = 1000
    # Comma-separated hook names or patterns (`*` matches a layer number or a name part).
    # "default": every block's residual output and the middle block's MLP neurons.
    hooks: str = "default"
    attn_layers: str = "all"  # attention patterns of: all | none | a comma list of layers
    attn_seqs: int = 4  # ... for the first A probe sequences
    # ... their first attn_len query and key positions (0: all T). 128 of GPT-2's 1024
    # keeps 1/64 of a pattern's 2 MB per head and sequence.
    attn_len: int = 128
    # snapshot, every `snapshot_every` steps (0: never): the weights, bf16 or fp16
    # safetensors with the model config, inside the store; any snapshot step loads as a
    # model later, whatever checkpoint.keep_last kept.
    snapshot_every: int = 1000
    snapshot_dtype: str = "bf16"  # bf16 | fp16
    budget: str = "50GB"  # the whole plan (every tier and snapshot) must fit; "" = no limit
    probe_seqs: int = 16  # P: probe sequences (split across ranks: a multiple of world size)
    probe_len: int = 0  # T: tokens per probe sequence; 0 = train.seq_len
    probe_seed: int = 0  # which held-out windows form the probe set
    topk: int = 16  # top-activating tokens kept per neuron
    store: str = ""  # "" = RUN/capture.zarr; or a path or fsspec URL (s3://..., file://...)
    # Training dynamics at each capture (capture/dynamics.py): per-head attention entropy,
    # previous-token, duplicate-token and induction scores; the logit lens per layer;
    # at full captures each MLP neuron's direct logit effects.
    dynamics: bool = True
    token_loss: bool = True  # the probe's per-token loss and the in-context-learning score
    # The logit lens of the layers before the last, on this many probe tokens per rank
    # (evenly spaced): each layer costs a product with the whole unembedding.
    lens_tokens: int = 512
    repeat_seqs: int = 4  # R: repeated random-token sequences (0: no duplicate/induction)
    repeat_half: int = 0  # n: random tokens before the repeat; 0 = half the probe length
    dla_topk: int = 10  # tokens kept per neuron, promoted and suppressed (0: no logit effects)
    # Tokens per capture forward: a rank's probe slice runs in batches this large, so the
    # explicit attention patterns ([batch, heads, T, T]) stay bounded at long contexts.
    batch_tokens: int = 4096
    queue_size: int = 4  # captures in flight to the background writer before training waits

    def validate(self, block_size: int, world: int = 1) -> "CaptureConfig":
        """Checks that need only the model's context length and the world size."""
        if self.source not in ("probe", "train"):
            raise CaptureConfigError(f"capture.source must be 'probe' or 'train', got "
                                     f"{self.source!r}")
        for name in ("every", "probe_seqs", "topk", "queue_size", "batch_tokens"):
            if getattr(self, name) <= 0:
                raise CaptureConfigError(f"capture.{name} must be positive, got "
                                         f"{getattr(self, name)}")
        for name in ("repeat_seqs", "repeat_half", "dla_topk", "probe_len", "full_every",
                     "snapshot_every", "attn_len", "attn_seqs", "lens_tokens"):
            if getattr(self, name) < 0:
                raise CaptureConfigError(f"capture.{name} must be >= 0, got "
                                         f"{getattr(self, name)}")
        if self.probe_len > block_size:
            raise CaptureConfigError(f"capture.probe_len ({self.probe_len}) exceeds "
                                     f"model.block_size ({block_size})")
        if 2 * self.repeat_half > block_size:
            raise CaptureConfigError(f"capture.repeat_half ({self.repeat_half}) makes "
                                     f"sequences of {2 * self.repeat_half} tokens, more than "
                                     f"model.block_size ({block_size}); lower it")
        if self.snapshot_dtype not in ("bf16", "fp16"):
            raise CaptureConfigError(f"capture.snapshot_dtype must be bf16 or fp16, got "
                                     f"{self.snapshot_dtype!r}")
        budget_bytes(self.budget)
        if self.source == "probe" and self.probe_seqs % world:
            raise CaptureConfigError(f"capture.probe_seqs ({self.probe_seqs}) must be a "
                                     f"multiple of the world size ({world}): each rank takes "
                                     f"a slice")
        return self


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def budget_bytes(text: str) -> int | None:
    """"50GB" -> 50e9 (KB, MB, GB, TB are powers of 1000; KiB, MiB, GiB, TiB of 1024); ""
    or "none" -> None (no limit)."""
    t = str(text).strip()
    if t.lower() in ("", "none", "0"):
        return None
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([A-Za-z]*)", t)
    if not m or m.group(2).upper() not in _UNITS:
        raise CaptureConfigError(f"capture.budget must look like 50GB, 800MB or 1.5TB (or "
                                 f"\"\" for no limit), got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
