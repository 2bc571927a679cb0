"""Training metrics: a line on stdout, a record per step in RUN/metrics.jsonl, Weights &
Biases when installed and switched on, and a loss-curve PNG at the end. Rank 0 only: the
caller holds the `if is_main:`."""

from __future__ import annotations

import functools
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

from trainer.config import RunConfig

# Dense tensor-core peaks from NVIDIA's datasheets, in FLOP/s: (pattern on
# torch.cuda.get_device_name, bf16, tf32). fp32 runs are measured against the TF32 peak
# (the trainer turns TF32 on for CUDA). The first pattern that matches wins, so the PCIe and
# NVL parts (lower clocks and power) come before their SXM names. Unknown GPUs, and CPUs,
# report no MFU rather than a wrong one.
PEAKS: list[tuple[str, float, float]] = [
    (r"H100.*PCIe", 756e12, 378e12),
    (r"H100.*NVL", 835e12, 418e12),
    (r"H200.*NVL", 835e12, 418e12),
    (r"GH200", 989e12, 495e12),
    (r"H100|H200", 989e12, 495e12),  # SXM
    (r"A100", 312e12, 156e12),  # SXM and PCIe alike
    (r"L40S", 362e12, 183e12),
    (r"\bL4\b", 121e12, 60e12),
]


@functools.cache  # asked once per step with the same device: the table is read once
def peak_flops(device_name: str, dtype: str = "bf16") -> float | None:
    """Dense peak FLOP/s of one GPU for a run in `dtype` (bf16 | fp32), None if unknown."""
    for pattern, bf16, tf32 in PEAKS:
        if re.search(pattern, device_name):
            return bf16 if dtype == "bf16" else tf32
    return None


def graphs_compiled() -> int:
    """How many graphs torch.compile has compiled in this process so far: a step during
    which it grew spent part of its time compiling (its speed is not the run's)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # a torch without dynamo
        return 0
    return int(counters["stats"]["unique_graphs"])


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
