"""Run configuration: one small dataclass per component, combined into `RunConfig`.

A config is read from a TOML file (`--config configs/NAME.toml`), then overridden from the
command line in one form, `--section.key=value` (or `--section.key value`). Unknown sections,
unknown keys and values of the wrong type are errors at load time, each reported as one
`ConfigError` line naming the key and what is accepted.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capture.config import CaptureConfig, CaptureConfigError


class UserError(Exception):
    """Bad input from the user: reported as one line and a non-zero exit, never a traceback."""


class ConfigError(UserError):
    pass


@dataclass
class ModelConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # maximum context length (learned positions)
    vocab_size: int = 50257
    dropout: float = 0.0
    bias: bool = True
    # Blocks without an MLP (nor its LayerNorm): the attention-only models of the induction
    # head literature (Elhage et al. 2021), where heads form fast and are easy to read.
    attn_only: bool = False
    # false: an unembedding of its own (GPT-2 ties it to the token embedding). Small models
    # then keep "which token is here" (embedding) apart from "which token comes next"
    # (unembedding), which a previous-token head's output needs to be told from the token's.
    tie_embeddings: bool = True

    def validate(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head}); "
                f"pick n_head from {_divisors(self.n_embd)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")

    @property
    def d_head(self) -> int:
        return self.n_embd // self.n_head

    def num_params(self, embeddings: bool = True) -> int:
        """Parameter count (a tied unembedding counted once)."""
        d, L = self.n_embd, self.n_layer
        b = 1 if self.bias else 0
        per_block = (
            2 * (d + b * d)  # two LayerNorms
            + d * 3 * d + b * 3 * d + d * d + b * d  # attention
            + d * 4 * d + b * 4 * d + 4 * d * d + b * d  # MLP
        )
        if self.attn_only:
            per_block -= (d + b * d) + d * 4 * d + b * 4 * d + 4 * d * d + b * d
        n = L * per_block + d + b * d  # + final LayerNorm
        if embeddings:
            n += self.vocab_size * d + self.block_size * d
            if not self.tie_embeddings:
                n += self.vocab_size * d
        return n


# The four released GPT-2 sizes (Radford et al. 2019), as Hugging Face names them.
PRESETS: dict[str, dict[str, int]] = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**PRESETS[name])


@dataclass
class DataConfig:
    dir: str = "data/tinyshakespeare"  # output folder of `python -m trainer.prepare`
    # Local GPT-2 BPE file in tiktoken's format. Empty: the one recorded by prepare, else
    # tiktoken's own (downloaded once, or found through TIKTOKEN_CACHE_DIR).
    tokenizer_file: str = ""
    seed: int = 1337  # order of the training windows


@dataclass
class TrainConfig:
    max_steps: int = 1000
    seq_len: int = 0  # tokens per sequence; 0 means model.block_size
    micro_batch_size: int = 8  # sequences per rank per forward/backward
    global_batch_tokens: int = 2**19  # tokens per optimizer step, whatever the world size
    grad_clip: float = 1.0
    dtype: str = "fp32"  # fp32 | bf16 (parameters kept in fp32, compute in bf16)
    seed: int = 1337  # weights and dropout

    def validate(self) -> None:
        if self.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"train.dtype must be 'fp32' or 'bf16', got {self.dtype!r}")
        check_range("train", self, positive=("max_steps", "micro_batch_size",
                                             "global_batch_tokens", "grad_clip"),
                    nonnegative=("seq_len",))


@dataclass
class OptimConfig:
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # floor, as a fraction of lr
    warmup_steps: int = 700
    decay_steps: int = 0  # cosine decay ends here, then the floor; 0 means train.max_steps
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices (weights, embeddings), not biases or gains
    fused: str = "auto"  # auto | true | false (fused AdamW kernels; auto = on CUDA)

    def validate(self) -> None:
        check_range("optim", self, positive=("lr", "eps"),
                    nonnegative=("warmup_steps", "decay_steps", "weight_decay"),
                    fraction=("min_lr_ratio",), below_one=("beta1", "beta2"))
        if self.fused not in ("auto", "true", "false"):
            raise ConfigError(f"optim.fused must be auto, true or false; got {self.fused!r}")


@dataclass
class ParallelConfig:
    device: str = "auto"  # auto | cuda | mps | cpu
    sharding: str = "full"  # full | grad | none | hybrid
    shard_size: int = 0  # hybrid: ranks per shard group (0 = ranks per node)
    cpu_offload: bool = False
    activation_checkpointing: bool = False
    meta_init: bool = False  # build on the meta device, allocate only each rank's shard
    compile: bool = False

    def validate(self) -> None:
        if self.sharding not in ("full", "grad", "none", "hybrid"):
            raise ConfigError(
                f"parallel.sharding must be one of full, grad, none, hybrid; got {self.sharding!r}"
            )
        if self.device not in ("auto", "cuda", "mps", "cpu"):
            raise ConfigError(
                f"parallel.device must be auto, cuda, mps or cpu; got {self.device!r}")
        check_range("parallel", self, nonnegative=("shard_size",))


@dataclass
class CheckpointConfig:
    every: int = 500  # steps; the final step is always saved
    keep_last: int = 3  # 0: keep every checkpoint

    def validate(self) -> None:
        check_range("checkpoint", self, positive=("every",), nonnegative=("keep_last",))


@dataclass
class EvalConfig:
    every: int = 250  # steps; also at the final step. 0 turns evaluation off
    val_batches: int = 20  # micro-batches per rank
    hellaswag_file: str = ""  # HellaSwag .jsonl (the official format); empty: skipped
    hellaswag_examples: int = 0  # 0 = all
    sample_prompt: str = "\n"
    sample_tokens: int = 48
    sample_temperature: float = 1.0
    sample_top_k: int = 50

    def validate(self) -> None:
        check_range("eval", self, positive=("val_batches",),
                    nonnegative=("every", "hellaswag_examples", "sample_tokens",
                                 "sample_temperature", "sample_top_k"))


@dataclass
class LogConfig:
    every: int = 1  # steps between stdout lines (metrics.jsonl gets every step)
    wandb: bool = False
    wandb_project: str = "gpt2-capture"
    plot: bool = True  # loss-curve PNG in the run dir at the end

    def validate(self) -> None:
        check_range("log", self, positive=("every",))


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)

    def validate(self) -> "RunConfig":
        for section in (self.model, self.train, self.optim, self.parallel, self.checkpoint,
                        self.eval, self.log):
            section.validate()
        try:
            self.capture.validate(self.model.block_size)  # capture checks its own settings
        except CaptureConfigError as e:
            raise ConfigError(str(e)) from None
        if self.seq_len > self.model.block_size:
            raise ConfigError(
                f"train.seq_len ({self.seq_len}) exceeds model.block_size ({self.model.block_size})"
            )
        return self

    @property
    def seq_len(self) -> int:
        return self.train.seq_len or self.model.block_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return to_toml(self.to_dict())


# ----------------------------------------------------------------------------- loading

_SCALARS = (bool, int, float, str)


def check_range(section: str, cfg, positive=(), nonnegative=(), fraction=(), below_one=()
                ) -> None:
    """Values outside their meaning, one ConfigError line each: > 0, >= 0, in [0, 1],
    in [0, 1)."""
    rules = [(positive, lambda v: v > 0, "positive"), (nonnegative, lambda v: v >= 0, ">= 0"),
             (fraction, lambda v: 0 <= v <= 1, "in [0, 1]"),
             (below_one, lambda v: 0 <= v < 1, "in [0, 1)")]
    for names, ok, what in rules:
        for name in names:
            v = getattr(cfg, name)
            if not ok(v):
                raise ConfigError(f"{section}.{name} must be {what}, got {v}")


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, min(n, 64) + 1) if n % d == 0)


def _field_types(cls) -> dict[str, Any]:
    # With `from __future__ import annotations` the types are strings; resolve the few we use.
    names = {"int": int, "float": float, "bool": bool, "str": str}
    out = {}
    for f in dataclasses.fields(cls):
        t = f.type if not isinstance(f.type, str) else names.get(f.type, f.type)
        out[f.name] = t
    return out


_SECTION_CLASSES = {
    "model": ModelConfig, "data": DataConfig, "train": TrainConfig, "optim": OptimConfig,
    "parallel": ParallelConfig, "checkpoint": CheckpointConfig, "eval": EvalConfig,
    "log": LogConfig, "capture": CaptureConfig,
}


def _check_value(key: str, value: Any, typ: Any) -> Any:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        tname = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"{key} expects {tname}, got {type(value).__name__} {value!r}")
    return value


def _parse_text(key: str, text: str, typ: Any) -> Any:
    try:
        if typ is bool:
            low = text.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            return int(text.replace("_", ""))
        if typ is float:
            return float(text)
        return text
    except ValueError:
        tname = getattr(typ, "__name__", str(typ))
        raise ConfigError(f"{key} expects {tname}, got {text!r}") from None


def _section_obj(cfg: RunConfig, section: str):
    if section not in _SECTION_CLASSES:
        raise ConfigError(
            f"unknown config section [{section}]; known sections: {', '.join(_SECTION_CLASSES)}"
        )
    obj = getattr(cfg, section, None)
    if obj is None:
        obj = _SECTION_CLASSES[section]()
        setattr(cfg, section, obj)
    return obj


def _set(cfg: RunConfig, dotted: str, value: Any, from_text: bool) -> None:
    if dotted == "run_dir":
        cfg.run_dir = str(value) if from_text else _check_value("run_dir", value, str)
        return
    if "." not in dotted:
        raise ConfigError(
            f"unknown config key {dotted!r}; keys look like section.key, e.g. model.n_layer"
        )
    section, key = dotted.split(".", 1)
    obj = _section_obj(cfg, section)
    types = _field_types(type(obj))
    if key not in types:
        raise ConfigError(
            f"unknown config key {dotted!r}; [{section}] has: {', '.join(types)}"
        )
    typ = types[key]
    value = _parse_text(dotted, value, typ) if from_text else _check_value(dotted, value, typ)
    setattr(obj, key, value)


def from_dict(d: dict[str, Any], cfg: RunConfig | None = None) -> RunConfig:
    cfg = cfg or RunConfig()
    for k, v in d.items():
        if isinstance(v, dict):
            _section_obj(cfg, k)  # fails on an unknown section
            for kk, vv in v.items():
                _set(cfg, f"{k}.{kk}", vv, from_text=False)
        else:
            _set(cfg, k, v, from_text=False)
    return cfg


def load_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} not found")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `--section.key=value` / `--section.key value` pairs (the leftover CLI args)."""
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --model.n_layer=4")
        body = arg[2:]
        if "=" in body:
            key, text = body.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise ConfigError(f"override {arg} has no value; write {arg}=VALUE")
            key, text = body, overrides[i + 1]
            i += 2
        _set(cfg, key.replace("-", "_") if "." not in key else key, text, from_text=True)
    return cfg


def load(config_path: str | None, overrides: list[str]) -> RunConfig:
    cfg = RunConfig()
    if config_path:
        from_dict(load_toml(config_path), cfg)
    apply_overrides(cfg, overrides)
    return cfg.validate()


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config saved by a training run (what generate/export read)."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise UserError(f"{str(path)!r} not found: is {str(run_dir)!r} a run dir made by trainer?")
    return from_dict(load_toml(path)).validate()


def to_toml(d: dict[str, Any]) -> str:
    top = [f"{k} = {_toml_value(v)}" for k, v in d.items() if not isinstance(v, dict)]
    out = top + [""] if top else []
    for k, v in d.items():
        if isinstance(v, dict):
            out.append(f"[{k}]")
            out += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
            out.append("")
    return "\n".join(out)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")
