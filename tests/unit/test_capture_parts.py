"""Capture's parts on their own: hook patterns, schedule, on-device statistics, writer."""

import numpy as np
import pytest
import torch

from capture.async_writer import AsyncWriter
from capture.config import CaptureConfigError as ConfigError
from capture.forward import ForwardResult, _Stats, reduce_stats
from capture.hooks import parse_layers, resolve_hooks
from capture.schedule import Schedule, cadence_steps
from trainer.config import ModelConfig
from trainer.dist import DistInfo
from trainer.model import GPT


@pytest.fixture(scope="module")
def names():
    return list(GPT(ModelConfig(n_layer=6, n_head=2, n_embd=16, block_size=8,
                                vocab_size=50)).hook_dict)


def test_hook_patterns(names):
    assert resolve_hooks("default", names, 6) == [
        *(f"blocks.{i}.hook_resid_post" for i in range(6)), "blocks.3.mlp.hook_post"]
    assert resolve_hooks("blocks.*.hook_resid_post", names, 6) == [
        f"blocks.{i}.hook_resid_post" for i in range(6)]
    assert resolve_hooks("blocks.4.mlp.hook_post, blocks.[0-1].hook_resid_pre", names, 6) == [
        "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.4.mlp.hook_post"]
    with pytest.raises(ConfigError) as e:
        resolve_hooks("blocks.9.hook_resid_post", names, 6)
    msg = str(e.value)
    assert "matches no hook" in msg and "blocks.{l}.mlp.hook_post" in msg and "0..5" in msg


def test_layers_and_schedule():
    assert parse_layers("all", 3) == [0, 1, 2] and parse_layers("none", 3) == []
    assert parse_layers("2,0", 3) == [0, 2]
    with pytest.raises(ConfigError, match="no layer 3"):
        parse_layers("3", 3)
    assert cadence_steps(20, 70, log_early=True, at_init=True) == [0, 1, 2, 4, 8, 16, 20, 40,
                                                                    60, 70]
    assert cadence_steps(20, 60, log_early=False, at_init=False) == [20, 40, 60]
    assert cadence_steps(0, 60, log_early=True, at_init=True) == []


def test_tier_schedule_is_pythia_like_and_full_implies_summary():
    s = Schedule(every=20, full_every=1000, snapshot_every=500, max_steps=2500)
    assert s.steps("full") == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 2500]
    assert s.steps("snapshot") == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 500, 1000, 1500,
                                   2000, 2500]
    summary = s.steps("summary")
    assert set(s.steps("full")) <= set(summary)
    # 0; 1, 2, 4, 8, 16; 125 multiples of 20; and the full tier's 32, 64, 128, 256, 512
    assert summary[:8] == [0, 1, 2, 4, 8, 16, 20, 32] and len(summary) == 1 + 5 + 125 + 5
    off = Schedule(every=5, full_every=0, snapshot_every=0, max_steps=10)
    assert off.steps("full") == [] and off.steps("snapshot") == []
    assert off.steps("summary") == [0, 1, 2, 4, 5, 10]


def test_statistics_over_batches_match_numpy():
    torch.manual_seed(0)
    a = torch.randn(3, 7, 5)
    acc = _Stats(5, 4, torch.device("cpu"))
    acc.add(a[:2], first_row=2 * 7)  # this rank's slice starts at sequence 2 of the capture
    acc.add(a[2:], first_row=4 * 7)  # ... its second batch at sequence 4
    st, v, idx = reduce_stats(ForwardResult(stats={"h": acc}), ["h"], DistInfo())["h"]
    flat = a.reshape(-1, 5).numpy()
    np.testing.assert_allclose(st["mean"], flat.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st["std"], flat.std(0), rtol=1e-5)
    np.testing.assert_allclose(st["min"], flat.min(0))
    np.testing.assert_allclose(st["max"], flat.max(0))
    np.testing.assert_allclose(st["frac_active"], (flat > 0).mean(0))
    assert v.shape == idx.shape == (5, 4)
    np.testing.assert_allclose(v, -np.sort(-flat.T, axis=1)[:, :4])
    local = idx - 2 * 7  # this slice started at sequence 2 of the capture
    np.testing.assert_allclose(flat[local, np.arange(5)[:, None]], v)


def test_async_writer_reports_an_error_and_keeps_going():
    w = AsyncWriter(maxsize=2)
    out = []
    w.submit(lambda: out.append(1))
    w.submit(lambda: 1 / 0)
    w.submit(lambda: out.append(3))  # after a failure: skipped, never half-applied
    w.drain()
    assert out == [1] and isinstance(w.error, ZeroDivisionError)
    w.close()
