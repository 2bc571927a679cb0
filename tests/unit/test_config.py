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
    ("", ["--model.n_layer=four"], "model.n_layer expects int, got 'four'"),
    ("", ["--train.max_step=3"], "unknown config key 'train.max_step'"),
    ("", ["--model.n_embd=100", "--model.n_head=3"], "must be divisible by model.n_head"),
    ("", ["--train.dtype=fp16"], "train.dtype must be 'fp32' or 'bf16'"),
    ("", ["--parallel.sharding=zero3"], "parallel.sharding must be one of"),
    ("", ["--model.n_layer"], "has no value"),
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
