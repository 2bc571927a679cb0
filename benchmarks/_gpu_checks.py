"""The checks of benchmarks/gpu_check.py, one function each, and the worker that runs one.

    python benchmarks/_gpu_checks.py NAME CTX.json RESULT.json   # gpu_check.py does this

Each check runs in a worker process of its own (so one that hangs or crashes hides none of
the others), which launches the trainer and friends as further processes with their logs
under WORK/logs, and writes RESULT.json ({status, error, figures, notes, log_tail}) after
every figure it learns, so a check killed at its timeout still reports what it measured.
"""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path

from _gpu_harness import (  # noqa: E402
    ROOT, CheckFailed, Ctx, Proc, median, on_term, error_line, expect_steps, read_metrics,
    step_figures,
)


def ranks_gt_gpus(c: Ctx) -> None:
    """More local ranks than GPUs: refused in one line, before NCCL."""
    k = c.gpus + 1
    p = c.run(f"nproc{k}", c.torchrun(k) + c.tiny("ranks_gt_gpus", 2, device=False))
    # (a "[rank0]:" prefix allowed, should torchrun be set to label its ranks' lines)
    errors = [x for x in p.err.splitlines() if re.match(r"(\[[^\]]*\]:?\s*)?error:", x)]
    c.fig(rc=p.rc, nproc=k, error_lines=len(errors), stderr_lines=len(p.err.splitlines()),
          trainer_traceback=bool(re.search(r"File \"[^\"]*(trainer|capture)/", p.err)))
    if p.rc in (0, None):
        raise CheckFailed(p.why() if p.rc is None else f"{k} ranks on {c.gpus} GPU(s) ran")
    if len(errors) != 1 or "GPU" not in errors[0]:
        c.result["log_tail"] = p.err.strip().splitlines()[-15:]
        raise CheckFailed(f"expected one 'error: ... GPU ...' line, got {len(errors)}: "
                          f"{error_line(p.err)}")
    c.fig(refusal=errors[0][:300])


def _store_summary(c: Ctx, run: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from store.reader import RunStore

    rs = RunStore(str(run / "capture.zarr"))
    tiers = rs.tiers()
    return {"captures": sorted(tiers), "full": sorted(s for s, t in tiers.items() if "full" in t),
            "snapshots": rs.snapshot_steps(), "store_status": rs.status}


def nccl_capture_resume(c: Ctx) -> None:
    """One rank under torchrun (nccl on CUDA), bf16, capture, snapshot and checkpoint every
    few steps, then a resume: the barriers, DCP, capture collectives, pinned copies."""
    run = c.work / "runs" / "nccl_capture_resume"
    common = ["--train.dtype=bf16", "--capture.every=2", "--capture.full_every=2",
              "--capture.snapshot_every=4", "--checkpoint.every=2", "--eval.every=0"]
    c.must(c.run("first", c.torchrun() + c.tiny(run.name, 6, *common)))
    c.must(c.run("resume", c.torchrun() + c.tiny(run.name, 8, *common, "--resume")))
    recs = read_metrics(run)
    capture_ms = [r["capture_ms"] for r in recs if "capture_ms" in r]
    c.fig(metrics_steps=[r["step"] for r in recs], capture_ms=median(capture_ms),
          **{k: v for k, v in step_figures(recs).items() if k in ("step_ms", "mem_gb")})
    expect_steps(recs, 8, "after the resume")
    store = _store_summary(c, run)
    c.fig(**store)
    missing = sorted({0, 2, 4, 6, 8} - set(store["full"])) + \
        sorted({0, 4, 8} - set(store["snapshots"]))
    if missing:
        raise CheckFailed(f"store lacks captures or snapshots at steps {missing}: {store}")


def cpu_offload(c: Ctx) -> None:
    """FSDP with parameters in host memory, capture on then off (gloo beside nccl)."""
    n = c.steps(4, 3)
    for label, extra in (("capture_on", ["--capture.every=2", "--capture.full_every=2"]),
                         ("capture_off", ["--capture.enabled=false"])):
        run = c.work / "runs" / f"cpu_offload_{label}"
        c.must(c.run(label, c.torchrun() + c.tiny(run.name, n, "--parallel.cpu_offload=true",
                                                   "--train.dtype=bf16", "--eval.every=0",
                                                   *extra)))
        recs = read_metrics(run)
        c.fig(**{f"{label}_step_ms": step_figures(recs, 1)["step_ms"]})
        expect_steps(recs, n, label)


def _gpt2(c: Ctx, label: str, steps: int, *extra: str, **env) -> tuple[Proc, list[dict]]:
    run = c.work / "runs" / f"{c.name}_{label}" if label else c.work / "runs" / c.name
    p = c.must(c.run(label or "run", c.gpt2(run.name, steps, *extra), **env))
    recs = read_metrics(run)
    expect_steps(recs, steps, run.name)
    return p, recs


def gpt2_eager(c: Ctx) -> None:
    _, recs = _gpt2(c, "", c.steps(6, 4))
    c.fig(**step_figures(recs))


def gpt2_compile(c: Ctx) -> None:
    """torch.compile per block, never run before the first GPU run."""
    _, recs = _gpt2(c, "", c.steps(6, 4), "--parallel.compile=true")
    c.fig(**step_figures(recs))


def gpt2_compile_eval(c: Ctx) -> None:
    """An eval inside a compiled run: recompiles at eval time stall it."""
    n = c.steps(6, 4)
    p, recs = _gpt2(c, "", n, "--parallel.compile=true", "--eval.every=3",
                    "--eval.val_batches=2", TORCH_LOGS="recompiles")
    recompiles = sum("Recompiling" in x for x in p.err.splitlines())
    by = {r["step"]: r for r in recs}
    # time is stamped when a step's training ends, before its capture and eval: the gap to
    # the next stamp, less the next step's own time, is what the eval after step 3 cost.
    eval_ms = (by[4]["time"] - by[3]["time"]) * 1e3 - by[4]["step_ms"] \
        if 3 in by and 4 in by else None
    c.fig(recompiles=recompiles, eval_stall_ms=eval_ms,
          step_after_eval_ms=by.get(4, {}).get("step_ms"),
          step_after_eval_compiled=bool(by.get(4, {}).get("compile")),
          val_loss=by.get(3, {}).get("val_loss"), **step_figures(recs))
    if "val_loss" not in by.get(3, {}):
        raise CheckFailed("no val_loss at step 3")
    if recompiles:
        c.note(f"{recompiles} 'Recompiling' lines (expected 0: eval runs eager)")


def gpt2_compile_ac(c: Ctx) -> None:
    """Compile together with activation checkpointing."""
    _, recs = _gpt2(c, "", c.steps(5, 4), "--parallel.compile=true",
                    "--parallel.activation_checkpointing=true")
    c.fig(**step_figures(recs))


def _capture(c: Ctx, *extra: str) -> None:
    # Steady-state cadence, without the log-spaced early steps (1, 2 and 4 would each take
    # a full capture, 0.4 GB at 124M, and fill the writer's queue): full captures at 0, 3,
    # 6 and the last step, snapshots at 0, 6 and the last.
    cap = ["--capture.enabled=true", "--capture.every=3", "--capture.full_every=3",
           "--capture.snapshot_every=6", "--capture.log_early=false"]
    _, recs = _gpt2(c, "", c.steps(7, 4), *cap, *extra)
    f = step_figures(recs)
    ms = [r["capture_ms"] for r in recs if "capture_ms" in r]
    c.fig(capture_ms=median(ms), capture_ms_max=max(ms, default=None),
          capture_steps=[r["step"] for r in recs if "capture_ms" in r], **f)
    # The same run without capture: gpt2_eager, or gpt2_compile for the compiled one.
    base = "gpt2_compile" if "compile" in c.name else "gpt2_eager"
    base = step_figures(read_metrics(c.work / "runs" / base))
    if f["mfu"] and base["mfu"]:
        c.fig(mfu_ratio_vs_no_capture=f["mfu"] / base["mfu"])
    if not ms:
        raise CheckFailed("no step recorded capture_ms")


def gpt2_capture(c: Ctx) -> None:
    """The tiered capture at 124M shapes: the training stall (capture_ms), the memory peak,
    MFU against gpt2_eager's run without capture."""
    _capture(c)


def gpt2_capture_compile(c: Ctx) -> None:
    """The same in a compiled run (the hooked capture forward runs eagerly beside it)."""
    _capture(c, "--parallel.compile=true")


def bf16_loss(c: Ctx) -> None:
    """trainer.loss's chunked loss in pure bf16 (no autocast, as under FSDP's mixed
    precision) against fp64, unconfident and confident tokens."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from trainer.loss import linear_cross_entropy

    dev = torch.device(c.device)
    n, d, v = (4096, 768, 50257) if c.cuda else (512, 128, 8192)
    g = torch.Generator(device="cpu").manual_seed(0)
    w = (torch.randn(v, d, generator=g) * 0.02).to(dev, torch.bfloat16)
    t = torch.randint(0, v, (n,), generator=g).to(dev)
    noise = torch.randn(n, d, generator=g).to(dev)
    c.fig(n=n, d=d, vocab=v)
    worst = 0.0
    for case in ("unconfident", "confident"):
        if case == "unconfident":
            h = noise.to(torch.bfloat16)
        else:
            # h along its target's unembedding row: the target's logit leads the others by
            # a margin, scaled until the mean p(target) is about 0.999.
            u = w[t].double()
            u = u / u.norm(dim=-1, keepdim=True)
            sub, wt = u[:256], w.double().T

            def nll(s: float) -> float:  # mean -log p(target) at scale s (256 rows)
                return float(F.cross_entropy((sub * s) @ wt, t[:256]))

            lo, hi = 0.0, 1.0
            while nll(hi) > 1e-3 and hi < 1e6:
                lo, hi = hi, hi * 2
            for _ in range(20):  # bisection: p(target) about 0.999 on average
                mid = (lo + hi) / 2
                if nll(mid) > 1e-3:
                    lo = mid
                else:
                    hi = mid
            scale = hi
            h = (u * scale + 0.01 * noise.double()).to(torch.bfloat16)
        hb, wb = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss = linear_cross_entropy(hb, wb, t)
        loss.backward()
        hd, wd = h.double().requires_grad_(), w.double().requires_grad_()
        ref = F.cross_entropy(hd @ wd.T, t)
        ref.backward()

        def rel(a, b):
            return float((a.double() - b).norm() / b.norm().clamp_min(1e-300))

        p_t = float((-F.cross_entropy(hd.detach() @ wd.detach().T, t, reduction="none"))
                    .exp().mean())
        lv, rv = float(loss.detach()), float(ref.detach())
        e = {"loss_rel_err": abs(lv - rv) / abs(rv),
             "grad_h_rel_err": rel(hb.grad, hd.grad), "grad_w_rel_err": rel(wb.grad, wd.grad),
             "mean_p_target": p_t}
        c.fig(**{f"{case}_{k}": x for k, x in e.items()})
        worst = max(worst, e["grad_h_rel_err"], e["grad_w_rel_err"])
    c.fig(worst_grad_rel_err=worst)
    if not worst < 0.05:
        raise CheckFailed(f"bf16 chunked loss: gradient relative error {worst:.3g} >= 0.05 "
                          f"against fp64")


def determinism(c: Ctx) -> None:
    """Two identical runs, and meta_init against plain init under FSDP."""
    n = c.steps(5, 3)
    base = ["--eval.every=0", "--capture.enabled=false"]
    a, b = c.run_pair(("plain_a", c.tiny("det_a", n, *base)),
                      ("plain_b", c.tiny("det_b", n, *base)))
    c.must(a), c.must(b)
    la = [r["loss"] for r in read_metrics(c.work / "runs" / "det_a")]
    lb = [r["loss"] for r in read_metrics(c.work / "runs" / "det_b")]
    if len(la) != n or len(lb) != n:
        raise CheckFailed(f"identical runs logged {len(la)} and {len(lb)} steps, not {n}")
    diff = max(abs(x - y) for x, y in zip(la, lb))
    rel = max(abs(x - y) / abs(y) for x, y in zip(la, lb))
    c.fig(plain_max_abs_diff=diff, plain_max_rel_diff=rel, plain_bitwise=la == lb)
    m, p = c.run_pair(("meta", c.torchrun() + c.tiny("det_meta", 2, *base,
                                                      "--parallel.meta_init=true")),
                      ("nometa", c.torchrun() + c.tiny("det_nometa", 2, *base)))
    c.must(m), c.must(p)
    lm = [r["loss"] for r in read_metrics(c.work / "runs" / "det_meta")]
    lp = [r["loss"] for r in read_metrics(c.work / "runs" / "det_nometa")]
    if not lm or not lp:
        raise CheckFailed("meta_init pair: no loss logged")
    mrel = abs(lm[0] - lp[0]) / abs(lp[0])
    c.fig(meta_step1_abs_diff=abs(lm[0] - lp[0]), meta_step1_rel_diff=mrel,
          fsdp_vs_plain_step1_rel_diff=abs(lp[0] - la[0]) / abs(la[0]))
    bad = []
    if rel > 1e-3:
        bad.append(f"identical runs differ by {rel:.2g} relative")
    if mrel > 1e-4:
        bad.append(f"meta_init step-1 loss differs by {mrel:.2g} relative")
    if bad:
        raise CheckFailed("; ".join(bad))


_ROW = re.compile(r"^(ours|hf \(sdpa\))\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\S+)\s+(\S+)")


def train_speed(c: Ctx) -> None:
    """benchmarks/train_speed.py, ours against Hugging Face's GPT-2, bf16 then fp32
    (MFU's peak per dtype, TF32)."""
    if c.cuda:
        shape = ["--preset", "gpt2", "--batch-size", "16"]
        steps = ["--steps", "2" if c.quick else "3", "--warmup", "1"]
    else:  # the script's own small CPU defaults, or tinier still with --quick
        shape = ["--n-layer", "2", "--n-head", "2", "--n-embd", "64", "--block-size", "64",
                 "--batch-size", "4"] if c.quick else []
        steps = ["--steps", "1", "--warmup", "1"]
    runs = [(dtype, ["benchmarks/train_speed.py", "--device", c.device, *shape, "--dtype",
                     dtype, *steps]) for dtype in ("bf16", "fp32")]
    # One after the other on a GPU (timings); at once on CPU, where only the code is tested.
    procs = [c.run(*r) for r in runs] if c.cuda else list(c.run_pair(*runs))
    for dtype, p in zip(("bf16", "fp32"), procs):
        c.must(p)
        for m in map(_ROW.match, p.out.splitlines()):
            if m:
                who = "ours" if m.group(1) == "ours" else "hf"
                mfu = m.group(5).rstrip("%")
                c.fig(**{f"{dtype}_{who}_step_ms": float(m.group(2)),
                         f"{dtype}_{who}_tokens_per_s": float(m.group(4)),
                         f"{dtype}_{who}_mfu": float(mfu) / 100 if mfu != "n/a" else None,
                         f"{dtype}_{who}_peak_gib": float(m.group(6))
                         if m.group(6) != "-" else None})
        if f"{dtype}_ours_tokens_per_s" not in c.result["figures"]:
            raise CheckFailed(f"{dtype}: no result rows in train_speed.py's output")


# name -> (function, timeout on CUDA, on CPU (s), needs CUDA, optional). The order is the
# run order: the cheap and telling first, torch.compile's (the slowest, the likeliest to
# run out of time) last. The CUDA timeouts of all but the optional add up to 7.5 minutes;
# an optional check starts only when its whole timeout is left of the budget.
CHECKS = {
    "bf16_loss": (bf16_loss, 20, 60, False, False),
    "ranks_gt_gpus": (ranks_gt_gpus, 25, 0, True, False),
    "nccl_capture_resume": (nccl_capture_resume, 30, 120, False, False),
    "cpu_offload": (cpu_offload, 30, 0, True, False),
    "determinism": (determinism, 30, 120, False, False),
    "gpt2_eager": (gpt2_eager, 25, 60, False, False),
    "gpt2_capture": (gpt2_capture, 50, 60, False, False),
    "train_speed": (train_speed, 35, 90, False, False),
    "gpt2_compile": (gpt2_compile, 90, 180, False, False),
    "gpt2_compile_eval": (gpt2_compile_eval, 45, 120, False, False),
    "gpt2_compile_ac": (gpt2_compile_ac, 70, 120, False, False),
    "gpt2_capture_compile": (gpt2_capture_compile, 50, 120, False, True),
}


def main(argv: list[str]) -> int:
    name, ctx_path, result_path = argv
    signal.signal(signal.SIGTERM, on_term)
    c = Ctx(json.loads(Path(ctx_path).read_text()), Path(result_path), name)
    c.save()
    try:
        CHECKS[name][0](c)
        c.result["status"] = "pass"
    except CheckFailed as e:
        c.result["error"] = str(e)
    finally:
        c.save()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
