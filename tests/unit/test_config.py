"""Run config: strict loading from TOML and CLI overrides, round trip through the saved file."""

import pytest

from trainer import config as C
from trainer.config import ConfigError


def write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_toml_and_overrides_resolve_and_round_trip(tmp_path):
    path = write(tmp_path, '[model]\nn_layer = 3\nn_embd = 96\nn_head = 3\n[optim]\nlr = 1\n')
    cfg = C.load(path, ["--model.dropout=0.1", "--train.dtype", "bf16", "--log.wandb=true"])
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.dropout) == (3, 96, 0.1)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # int accepted for float
    assert cfg.train.dtype == "bf16" and cfg.log.wandb is True
    again = C.from_dict(C.tomllib.loads(cfg.to_toml()))
    assert again == cfg


@pytest.mark.parametrize("text,overrides,msg", [
    ("[model]\nn_layers = 3\n", [], "unknown config key 'model.n_layers'"),
    ("[modle]\nn_layer = 3\n", [], "unknown config section [modle]"),
    ("[model]\nn_layer = '3'\n", [], "model.n_layer expects int, got str"),
    ("[model]\nbias = 1\n", [], "model.bias expects bool, got int"),
    ("[model]\nn_layer = true\n", [], "model.n_layer expects int, got bool"),
    ("", ["--model.n_layer=four"],
     "--model.n_layer: invalid literal for int() with base 10: 'four'"),
    ("", ["--train.max_step=3"],
     "unknown option --train.max_step=3; did you mean --train.max_steps?"),
    ("", ["--parallel.compile=maybe"], "--parallel.compile: expected true or false, got 'maybe'"),
    ("", ["model.n_layer=3"], "unknown option model.n_layer=3"),
    ("", ["--optim.lr=-0.003"], "optim.lr must be positive, got -0.003"),
    ("", ["--capture.every=0"], "capture.every must be positive, got 0"),
    ("", ["--model.n_embd=100", "--model.n_head=3"], "must be divisible by model.n_head"),
    ("", ["--train.dtype=fp16"], "train.dtype must be 'fp32' or 'bf16'"),
    ("", ["--parallel.sharding=zero3"], "parallel.sharding must be one of"),
    ("", ["--model.n_layer"], "Missing value for argument '--model.n_layer'"),
    ("", ["--train.seq_len=2048"], "exceeds model.block_size"),
])
def test_bad_config_is_one_clear_error(tmp_path, text, overrides, msg):
    with pytest.raises(ConfigError) as e:
        C.load(write(tmp_path, text), overrides)
    assert msg in str(e.value)
    assert "\n" not in str(e.value)


def test_missing_and_invalid_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        C.load(str(tmp_path / "nope.toml"), [])
    with pytest.raises(ConfigError, match="not valid TOML"):
        C.load(write(tmp_path, "[model\n"), [])


def test_presets_and_param_count():
    from trainer.model import GPT
    cfg = C.preset("gpt2")
    assert cfg.num_params() == 124_439_808  # the published 124M count, tied embeddings
    tiny = C.ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=100,
                         bias=False)
    assert sum(p.numel() for p in GPT(tiny).parameters()) == tiny.num_params()
    with pytest.raises(ConfigError, match="unknown model preset"):
        C.preset("gpt3")


def test_help_lists_every_key_with_default_and_meaning(capsys):
    """`python -m trainer --help`: every config key, its default (here the config's own
    value) and the comment beside it in the dataclass."""
    cfg = C.RunConfig()
    cfg.model.n_layer = 5
    with pytest.raises(SystemExit) as e:
        C.print_help(cfg, "python -m trainer")
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    keys = ["run_dir"] + [f"{section}.{f}" for section, v in cfg.to_dict().items()
                          if isinstance(v, dict) for f in v]
    assert len(keys) > 70
    for key in keys:
        assert f"--{key} " in text, key
    assert "--model.n_layer INT transformer blocks (default: 5)" in text
    assert "--optim.lr FLOAT peak learning rate" in text


def test_lowercase_booleans_and_spellings():
    cfg = C.load(None, ["--parallel.compile=TRUE", "--log.wandb", "no", "--model.attn-only=1"])
    assert (cfg.parallel.compile, cfg.log.wandb, cfg.model.attn_only) == (True, False, True)
