"""Run configuration: one small dataclass per component, combined into `RunConfig`.

A config is read from a TOML file (`--config configs/NAME.toml`), then overridden from the
command line in one form, `--section.key=value` (or `--section.key value`), parsed by tyro
from the dataclasses' own types; `python -m trainer --help` lists every key with its default
(the config file's, when one is given) and the comment beside it here. Unknown sections,
unknown keys, values of the wrong type and values outside their meaning are errors at load
time, each reported as one `ConfigError` line naming the key and what is accepted. The
resolved config is saved in the run dir as TOML (tomli-w) and read back strictly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capture.config import CaptureConfig, CaptureConfigError
from store.errors import UserError


class ConfigError(UserError):
    """A config key, type or value that cannot work."""


@dataclass
class ModelConfig:
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block (must divide n_embd)
    n_embd: int = 768  # width of the residual stream
    block_size: int = 1024  # maximum context length (learned positions)
    vocab_size: int = 50257  # token ids 0..vocab_size-1 (GPT-2's BPE: 50257)
    dropout: float = 0.0  # in [0, 1): on attention, residual and embeddings
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2
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
    max_steps: int = 1000  # optimizer steps; raise it and --resume to train on
    seq_len: int = 0  # tokens per sequence; 0 means model.block_size
    micro_batch_size: int = 8  # sequences per rank per forward/backward
    global_batch_tokens: int = 2**19  # tokens per optimizer step, whatever the world size
    grad_clip: float = 1.0  # the global gradient norm is clipped to this
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
    lr: float = 6e-4  # peak learning rate (AdamW), reached after warmup_steps
    min_lr_ratio: float = 0.1  # floor, as a fraction of lr
    warmup_steps: int = 700  # linear warmup from 0 to lr
    decay_steps: int = 0  # cosine decay ends here, then the floor; 0 means train.max_steps
    beta1: float = 0.9  # AdamW's first-moment decay, in [0, 1)
    beta2: float = 0.95  # AdamW's second-moment decay, in [0, 1)
    eps: float = 1e-8  # AdamW's denominator floor
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
    cpu_offload: bool = False  # FSDP keeps parameters and optimizer state in host memory
    activation_checkpointing: bool = False  # recompute each block in backward: less memory
    meta_init: bool = False  # build on the meta device, allocate only each rank's shard
    compile: bool = False  # torch.compile each block (before FSDP wraps it)

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
    sample_prompt: str = "\n"  # text samples at each evaluation start from this
    sample_tokens: int = 48  # tokens per text sample (0: no samples)
    sample_temperature: float = 1.0  # 0: greedy
    sample_top_k: int = 50  # sample from the k likeliest tokens (0: all)

    def validate(self) -> None:
        check_range("eval", self, positive=("val_batches",),
                    nonnegative=("every", "hellaswag_examples", "sample_tokens",
                                 "sample_temperature", "sample_top_k"))


@dataclass
class LogConfig:
    every: int = 1  # steps between stdout lines (metrics.jsonl gets every step)
    wandb: bool = False  # also log metrics to Weights & Biases (pip install wandb)
    wandb_project: str = "gpt2-capture"  # the W&B project runs go to
    plot: bool = True  # loss-curve PNG in the run dir at the end

    def validate(self) -> None:
        check_range("log", self, positive=("every",))


@dataclass
class RunConfig:
    run_dir: str = "runs/default"  # config, checkpoints, metrics, logs and the capture store
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
        import tomli_w

        return tomli_w.dumps(self.to_dict())


# ----------------------------------------------------------------------------- loading

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


def _set(cfg: RunConfig, dotted: str, value: Any) -> None:
    if dotted == "run_dir":
        cfg.run_dir = _check_value("run_dir", value, str)
        return
    section, key = dotted.split(".", 1)
    obj = _section_obj(cfg, section)
    types = _field_types(type(obj))
    if key not in types:
        raise ConfigError(
            f"unknown config key {dotted!r}; [{section}] has: {', '.join(types)}"
        )
    setattr(obj, key, _check_value(dotted, value, types[key]))


def from_dict(d: dict[str, Any], cfg: RunConfig | None = None) -> RunConfig:
    cfg = cfg or RunConfig()
    for k, v in d.items():
        if isinstance(v, dict):
            _section_obj(cfg, k)  # fails on an unknown section
            for kk, vv in v.items():
                _set(cfg, f"{k}.{kk}", vv)
        elif k == "run_dir":
            _set(cfg, k, v)
        else:
            raise ConfigError(f"unknown config key {k!r}; keys look like section.key, e.g. "
                              f"model.n_layer")
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
    """`--section.key=VALUE` / `--section.key VALUE` over `cfg` (the leftover CLI args)."""
    if not overrides:
        return cfg
    return _tyro(cfg, overrides)


def print_help(cfg: RunConfig, prog: str) -> None:
    """Every key with its default (from `cfg`) and meaning, as tyro lays them out."""
    _tyro(cfg, ["--help"], prog=prog, quiet=False)


def _tyro(cfg: RunConfig, args: list[str], prog: str = "python -m trainer",
          quiet: bool = True) -> RunConfig:
    import tyro

    out = io.StringIO()
    # tyro reports a bad argument in a multi-line box and exits 2; the box is caught here
    # and becomes one ConfigError line, like every other bad input. A wide console keeps
    # the message from being wrapped mid-line.
    with contextlib.ExitStack() as stack:
        if quiet:
            stack.enter_context(contextlib.redirect_stderr(out))
            stack.enter_context(contextlib.redirect_stdout(out))
            stack.enter_context(_env(COLUMNS="400"))
        try:
            return tyro.cli(RunConfig, default=cfg, args=args, prog=prog, use_underscores=True,
                            config=(tyro.conf.FlagConversionOff,), registry=_registry())
        except SystemExit as e:
            if not quiet or not e.code:  # --help: printed, exit 0
                raise
            raise ConfigError(_one_line(out.getvalue(), prog)) from None


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _registry():
    import tyro
    from tyro.constructors import PrimitiveConstructorSpec

    registry = tyro.constructors.ConstructorRegistry()

    @registry.primitive_rule
    def _bool(info):  # true/false as TOML writes them, and yes/no/on/off/1/0, any case
        if info.type is not bool:
            return None
        return PrimitiveConstructorSpec(
            nargs=1, metavar="{true,false}", instance_from_str=lambda a: _parse_bool(a[0]),
            is_instance=lambda x: isinstance(x, bool),
            str_from_instance=lambda x: ["true" if x else "false"])

    return registry


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _one_line(box: str, prog: str) -> str:
    """tyro's error box -> one line: its message, and the first key it suggests.

    With stdout redirected to a StringIO (no encoding), tyro draws the box in ASCII: the
    title, then parts (message, hints, footer) each under a rule of dashes."""
    lines = [ln.strip().strip("│╭╮╰╯").strip() for ln in box.splitlines()]
    lines = [ln for ln in lines if ln]
    parts: list[list[str]] = [[]]
    for ln in lines[1:]:  # lines[0] is the title ("Value error", "Unrecognized options")
        if set(ln) <= set("-─ "):
            parts.append([])
        else:
            parts[-1].append(ln)
    parts = [p for p in parts if p]
    if not parts:
        return f"bad command-line arguments (see {prog} --help)"
    msg = " ".join(parts[0]).replace("Error parsing ", "")
    msg = msg.replace("Unrecognized options:", "unknown option")
    hints = [ln for part in parts[1:] for ln in part]
    if "Perhaps you meant:" in hints[:-1]:
        msg += f"; did you mean {hints[hints.index('Perhaps you meant:') + 1].split()[0]}?"
    return f"{msg} (see {prog} --help)"


def load(config_path: str | None, overrides: list[str]) -> RunConfig:
    cfg = RunConfig()
    if config_path:
        from_dict(load_toml(config_path), cfg)
    cfg = apply_overrides(cfg, overrides)
    return cfg.validate()


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config saved by a training run (what generate/export read)."""
    path = Path(run_dir) / "config.toml"
    if not path.is_file():
        raise UserError(f"{str(path)!r} not found: is {str(run_dir)!r} a run dir made by trainer?")
    return from_dict(load_toml(path)).validate()
