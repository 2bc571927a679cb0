"""Which activations to take: hook names and patterns resolved against the model's own
TransformerLens hook points (the schedule is capture/schedule.py)."""

from __future__ import annotations

import fnmatch
import re

from capture.config import CaptureConfigError as ConfigError


def default_hooks(n_layer: int, attn_only: bool = False) -> list[str]:
    """Every block's residual output, and the neurons of the middle block's MLP."""
    resid = [f"blocks.{i}.hook_resid_post" for i in range(n_layer)]
    return resid if attn_only else resid + [f"blocks.{n_layer // 2}.mlp.hook_post"]


def resolve_hooks(spec: str, valid: list[str], n_layer: int) -> list[str]:
    """`spec`: "default", or comma-separated names and patterns (`blocks.*.hook_resid_post`,
    `blocks.4.mlp.hook_post`, `blocks.[0-3].hook_resid_post`). Order follows the model."""
    if spec.strip() == "default":
        return default_hooks(n_layer, attn_only=not any(".mlp." in n for n in valid))
    chosen: set[str] = set()
    for pat in (p.strip() for p in spec.split(",")):
        if not pat:
            continue
        hits = [n for n in valid if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError(
                f"capture.hooks: {pat!r} matches no hook of this model; valid: "
                f"{_summarise(valid)}"
            )
        chosen.update(hits)
    if not chosen:
        raise ConfigError("capture.hooks is empty; use 'default' or name at least one hook")
    return [n for n in valid if n in chosen]


def _summarise(valid: list[str]) -> str:
    """The valid names with layer numbers folded: blocks.{0..11}.hook_resid_post, ..."""
    layers = sorted({int(m.group(1)) for n in valid if (m := re.match(r"blocks\.(\d+)\.", n))})
    folded, seen = [], set()
    for n in valid:
        g = re.sub(r"^blocks\.\d+\.", "blocks.{l}.", n)
        if g not in seen:
            seen.add(g)
            folded.append(g)
    span = f" (l = {layers[0]}..{layers[-1]})" if layers else ""
    return ", ".join(folded) + span


def parse_layers(spec: str, n_layer: int) -> list[int]:
    spec = spec.strip()
    if spec == "all":
        return list(range(n_layer))
    if spec in ("none", ""):
        return []
    try:
        layers = sorted({int(x) for x in spec.split(",")})
    except ValueError:
        raise ConfigError(f"capture.attn_layers must be all, none or e.g. '0,5'; got {spec!r}") \
            from None
    bad = [x for x in layers if not 0 <= x < n_layer]
    if bad:
        raise ConfigError(
            f"capture.attn_layers: no layer {bad[0]} (the model has 0..{n_layer - 1})")
    return layers


def hook_width(name: str, n_embd: int) -> int:
    """Width D of a hook's activation per token (heads flattened for q, k, v, z)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("hook_attn_scores", "hook_pattern"):
        raise ConfigError(f"capture.hooks: {name} is an attention pattern; patterns are "
                          f"chosen with capture.attn_layers")
    if leaf == "hook_scale":
        return 1
    if name.endswith(("mlp.hook_pre", "mlp.hook_post")):
        return 4 * n_embd
    return n_embd
