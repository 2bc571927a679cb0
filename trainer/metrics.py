"""Training metrics: a line on stdout, a record per step in RUN/metrics.jsonl, Weights &
Biases when installed and switched on, and a loss-curve PNG at the end. Rank 0 only: the
caller holds the `if is_main:`."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from trainer.config import RunConfig

# Dense bf16 peak FLOP/s by GPU name, for MFU. Unknown GPUs (and CPUs) report no MFU.
PEAK_BF16_FLOPS = {
    "H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12,
    "A100": 312e12, "A10G": 125e12, "L4": 121e12, "L40S": 362e12, "4090": 165e12,
}


def peak_flops(device_name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return flops
    return None


def truncate_after(path: Path, step: int) -> None:
    """Drop records past `step` (written before a crash, redone after the resume), so the
    file holds one record per step."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            pass  # a line torn by a kill: drop it
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(x + "\n" for x in keep))
    tmp.replace(path)


class MetricsLogger:
    def __init__(self, cfg: RunConfig, resume_step: int):
        self.cfg = cfg
        self.path = Path(cfg.run_dir) / "metrics.jsonl"
        truncate_after(self.path, resume_step)
        self.file = open(self.path, "a", buffering=1)  # line-buffered: readable while live
        self.wandb = None
        if cfg.log.wandb:
            try:
                import wandb
            except ImportError:
                print("log.wandb is on but wandb is not installed; pip install wandb",
                      file=sys.stderr)
            else:
                self.wandb = wandb.init(
                    project=cfg.log.wandb_project, name=Path(cfg.run_dir).name,
                    dir=cfg.run_dir, config=cfg.to_dict(), resume="allow",
                    id=Path(cfg.run_dir).resolve().name,
                )

    def log(self, step: int, record: dict[str, Any], echo: bool = True) -> None:
        rec = {"step": step, **record}
        self.file.write(json.dumps(rec) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))},
                           step=step)
        if echo:
            print(format_line(step, self.cfg.train.max_steps, record), flush=True)

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def format_line(step: int, max_steps: int, r: dict[str, Any]) -> str:
    parts = [f"step {step:>6}/{max_steps}"]
    fmt = {
        "loss": "loss {:.4f}", "val_loss": "val_loss {:.4f}", "lr": "lr {:.2e}",
        "grad_norm": "grad {:.3f}", "tokens_per_s": "{:,.0f} tok/s", "mfu": "mfu {:.1%}",
        "hellaswag_acc_norm": "hellaswag {:.3f}", "step_ms": "{:.0f} ms",
    }
    for k, f in fmt.items():
        v = r.get(k)
        if isinstance(v, (int, float)) and math.isfinite(v):
            parts.append(f.format(v))
    return " | ".join(parts)


def plot_loss(run_dir: str | Path) -> Path | None:
    """Loss-curve PNG from metrics.jsonl."""
    run_dir = Path(run_dir)
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val", ms=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = run_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
