"""One command for a first run on a GPU: what a first GPU run would hit (crashes, wrong
numbers, slow paths), each check timed, each in its own process under its own
timeout, into one report. docs/gpu.md says how to run it on a machine without internet.

    python benchmarks/gpu_check.py [--quick] [--out DIR] [--work DIR] [--only a,b] [--cpu]
                                   [--budget S] [--jobs N]

Writes DIR/report.json (device, torch and CUDA versions, mode, and per check: name, status
pass|fail|skip, seconds, the error line or the reason for a skip, figures) and
DIR/summary.txt (also printed), and DIR/logs.tar.gz (every process's stdout and stderr and
each run's metrics.jsonl). Default --out: a new temporary folder (its path is printed).
Runs, data and logs go under --work (default DIR/work; its runs/, logs/ and checks/ are
cleared at the start); a run there holds checkpoints of GPT-2 124M (1.5 GB each), so keep
--work outside DIR when DIR must stay small.

The checks (benchmarks/_gpu_checks.py): bf16_loss (the chunked loss in pure bf16 against
fp64), ranks_gt_gpus (more torchrun ranks than GPUs refused in one line), nccl_capture_resume
(one rank under torchrun with capture, snapshots, checkpoints, then a resume),
cpu_offload, determinism (identical runs; meta_init against plain init), gpt2_eager,
gpt2_capture, train_speed (benchmarks/train_speed.py, bf16 and fp32), gpt2_compile,
gpt2_compile_eval (recompiles at eval), gpt2_compile_ac (with activation checkpointing) and,
time allowing, gpt2_capture_compile: GPT-2 124M at T=1024, micro-batch 16, bf16, one rank.

On CUDA the whole run keeps within --budget seconds (default 440: all of it within 8
minutes on one H200); checks that no longer fit are skipped as "out of time". The exit
status is 1 if a check failed, else 0.

Without CUDA (or with --cpu) the same checks run on CPU at tiny sizes (2 layers, 64 wide,
T=64, a 256-token vocabulary), skipping those that mean something only on CUDA
(ranks_gt_gpus, cpu_offload: "needs CUDA"). That tests the checks and the code paths, not
a GPU: the exit status is then 0 whatever failed. There two checks run at a time (--jobs),
and `--quick` takes fewer steps: about 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_checks import CHECKS, ROOT, error_line  # noqa: E402

TINY_VOCAB = 256  # CPU runs: small logits, so the capture's per-token work stays cheap
GRACE = 15  # s past a check's timeout for its worker to stop its runs and write its result

# The figures the summary shows per check (report.json has them all).
SHOWN = {
    "bf16_loss": ["worst_grad_rel_err", "unconfident_grad_w_rel_err",
                  "confident_grad_h_rel_err", "confident_grad_w_rel_err",
                  "confident_loss_rel_err"],
    "ranks_gt_gpus": ["rc", "nproc", "error_lines", "trainer_traceback"],
    "nccl_capture_resume": ["metrics_steps", "full", "snapshots", "capture_ms"],
    "cpu_offload": ["capture_on_step_ms", "capture_off_step_ms"],
    "determinism": ["plain_max_rel_diff", "plain_bitwise", "meta_step1_rel_diff",
                    "fsdp_vs_plain_step1_rel_diff"],
    "gpt2_capture": ["capture_ms", "capture_ms_max", "mem_gb", "mfu",
                     "mfu_ratio_vs_no_capture"],
    "gpt2_capture_compile": ["capture_ms", "capture_ms_max", "mem_gb", "mfu",
                             "mfu_ratio_vs_no_capture"],
    "gpt2_compile_eval": ["recompiles", "eval_stall_ms", "step_after_eval_ms", "step_ms"],
    "train_speed": ["bf16_ours_tokens_per_s", "bf16_ours_mfu", "bf16_hf_tokens_per_s",
                    "fp32_ours_tokens_per_s", "fp32_ours_mfu"],
}
# Run after: the capture's MFU is compared with the eager run's; compiles reuse the cache.
AFTER = {"gpt2_capture": "gpt2_eager", "gpt2_compile_eval": "gpt2_compile",
         "gpt2_compile_ac": "gpt2_compile", "gpt2_capture_compile": "gpt2_compile"}
GPT2_SHOWN = ["step_ms", "tokens_per_s", "mfu", "mem_gb", "first_step_ms"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps per check")
    p.add_argument("--out", type=Path, default=None,
                   help="report.json, summary.txt, logs.tar.gz (default: a new temp dir)")
    p.add_argument("--work", type=Path, default=None,
                   help="data, runs and logs (default: OUT/work)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole run (default 440 on CUDA, 1200 on CPU)")
    p.add_argument("--only", default="", help="comma-separated check names to run")
    p.add_argument("--cpu", action="store_true", help="CPU mode even where CUDA is there")
    p.add_argument("--jobs", type=int, default=0,
                   help="checks at a time (default 1 on CUDA, for clean timings; 2 on CPU)")
    a = p.parse_args(argv)
    unknown = set(filter(None, a.only.split(","))) - set(CHECKS)
    if unknown:
        p.error(f"unknown check(s) {', '.join(sorted(unknown))}; known: {', '.join(CHECKS)}")
    return a


def device_info(force_cpu: bool) -> dict:
    import torch

    cuda = torch.cuda.is_available() and not force_cpu
    return {
        "mode": "cuda" if cuda else "cpu",
        "device": torch.cuda.get_device_name(0) if cuda else (platform.processor() or
                                                             platform.machine()),
        "gpus": torch.cuda.device_count() if cuda else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }


def subprocess_env(cuda: bool) -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [x for x in e.get(
        "PYTHONPATH", "").split(os.pathsep) if x])  # the carried wheels stay found
    e.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false")
    if not cuda:
        e.setdefault("OMP_NUM_THREADS", "1")
    return e


def make_data(work: Path, cuda: bool, env: dict) -> tuple[dict, str]:
    """Synthetic token data (no corpus, no network): a small-vocabulary set for the tiny
    runs and, on CUDA, a GPT-2-vocabulary set with room for 64 steps of 16 x 1024 tokens,
    a capture's 16 probe sequences and an eval's val batches. ('', error) on failure."""
    sets = {"data_tiny": ["--vocab", str(TINY_VOCAB), "--tokens", "200000",
                          "--val-tokens", "32768"]}
    if cuda:
        sets["data_gpt2"] = ["--vocab", "50257", "--half", "256", "--tokens", "1048576",
                             "--val-tokens", "196608"]
    paths = {"data_gpt2": ""}
    for key, args in sets.items():
        out = work / "data" / key
        paths[key] = str(out)
        if (out / "manifest.json").is_file():
            continue  # a --work reused: same seed, same data
        r = subprocess.run([sys.executable, "-m", "trainer.synthetic", "--out", str(out),
                            *args], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=120)
        if r.returncode:
            return paths, f"trainer.synthetic: {error_line(r.stderr) or r.returncode}"
    return paths, ""


# Imported by the runs: a missing or mismatched carried wheel shows here first, in one line.
PREFLIGHT = """
import importlib.metadata as md, json
import zarr, numcodecs, transformer_lens, trainer.train, capture.capturer, store.reader
names = ["torch", "zarr", "numcodecs", "transformer-lens", "datasets", "transformers",
         "huggingface-hub", "numpy", "pyarrow", "fsspec"]
v = {}
for n in names:
    try:
        v[n] = md.version(n)
    except md.PackageNotFoundError:
        v[n] = None
print(json.dumps(v))
"""


def preflight(env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", PREFLIGHT], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill(p: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(12)  # the worker stops its own runs first (5 s + 5 s)
            return
        except subprocess.TimeoutExpired:
            continue


class Job:
    """One check in a worker process of its own session, killed with everything it started
    if it outlives its timeout."""

    def __init__(self, name: str, timeout: float, ctx: dict, work: Path, env: dict):
        self.name, self.timeout, self.work = name, timeout, work
        wdir = work / "checks"
        wdir.mkdir(parents=True, exist_ok=True)
        ctx_path, self.res_path = wdir / f"{name}.ctx.json", wdir / f"{name}.json"
        self.err_path = wdir / f"{name}.worker.err"
        self.res_path.unlink(missing_ok=True)
        ctx_path.write_text(json.dumps({**ctx, "deadline": time.time() + timeout}))
        self.t0 = time.time()
        with open(self.err_path, "w") as err:
            self.p = subprocess.Popen(
                [sys.executable, str(Path(__file__).parent / "_gpu_checks.py"), name,
                 str(ctx_path), str(self.res_path)], cwd=ROOT, env=env, stdout=err,
                stderr=subprocess.STDOUT, start_new_session=True)

    def poll(self) -> dict | None:
        """The check's result once its worker has ended (or was ended), else None."""
        rc = self.p.poll()
        if rc is None:
            if time.time() < self.t0 + self.timeout + GRACE:
                return None
            _kill(self.p)
        seconds = time.time() - self.t0
        worker_err = self.err_path.read_text(errors="replace")
        try:
            res = json.loads(self.res_path.read_text())
        except (OSError, ValueError):
            res = {"status": "fail", "error": "", "figures": {}, "notes": []}
        if rc is None:
            res["status"] = "fail"
            logs = sorted((self.work / "logs").glob(f"{self.name}-*.err"),
                          key=lambda f: f.stat().st_mtime)
            last = error_line(logs[-1].read_text(errors="replace")) if logs else ""
            res["error"] = f"timed out after {self.timeout:.0f} s" + \
                (f"; last: {last}" if last else "")
        elif res.get("status") != "pass" and not res.get("error"):
            # The worker itself broke (an exception in the check): its traceback's last line.
            res["error"] = error_line(worker_err) or f"worker exit {rc}"
            res["log_tail"] = worker_err.strip().splitlines()[-15:]
        return {"name": self.name, "status": res.get("status", "fail"),
                "seconds": round(seconds, 1), "error": res.get("error", ""),
                "figures": res.get("figures", {}),
                **{k: res[k] for k in ("notes", "log_tail") if res.get(k)}}


def _fmt(v) -> str:
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e5 else f"{v:.4g}"
    if isinstance(v, list) and len(v) > 8:
        return f"[{v[0]}..{v[-1]}] ({len(v)})"
    return str(v).replace(" ", "")


def summary_text(rep: dict) -> str:
    cuda = rep["mode"] == "cuda"
    pk = rep.get("packages", {})
    lines = [f"gpu_check: {rep['mode']} mode on {rep['device']}"
             f"{' (%d GPU%s)' % (rep['gpus'], 's' * (rep['gpus'] != 1)) if cuda else ''}, "
             f"torch {rep['torch']}, CUDA {rep['cuda']}, python {rep['python']}"
             f"{', --quick' if rep['quick'] else ''}, {rep['total_s']:.0f} s"]
    if pk:
        lines.append("packages: " + ", ".join(f"{k} {v}" for k, v in pk.items() if v))
    if rep.get("setup_error"):
        lines.append(f"setup: {rep['setup_error']}")
    for c in rep["checks"]:
        figs = c["figures"]
        keys = SHOWN.get(c["name"], GPT2_SHOWN if c["name"].startswith("gpt2_") else [])
        shown = " ".join(f"{k}={_fmt(figs[k])}" for k in keys if figs.get(k) is not None)
        if c["status"] == "skip":
            shown = c["error"]
        lines.append(f"{c['status'].upper():<5} {c['name']:<20} {c['seconds']:>6.1f} s  {shown}")
        if c["error"] and c["status"] != "skip":
            lines.append(f"{'':<6}{c['error']}")
        lines += [f"{'':<6}note: {n}" for n in c.get("notes", [])]
    n = {s: sum(c["status"] == s for c in rep["checks"]) for s in ("pass", "fail", "skip")}
    lines.append(f"{n['pass']} passed, {n['fail']} failed, {n['skip']} skipped")
    if not cuda:
        lines.append("ran on CPU at tiny sizes (no CUDA): the code paths and the checks "
                     "themselves were tested, not a GPU; figures say nothing of GPU speed")
    return "\n".join(lines) + "\n"


def write_logs(out: Path, work: Path) -> None:
    """The text a failure needs, in one small file: logs and per-step metrics."""
    with tarfile.open(out / "logs.tar.gz.tmp", "w:gz") as tar:
        for pattern in ("logs/*", "checks/*.json", "checks/*.err", "runs/*/metrics.jsonl",
                        "runs/*/status.json"):
            for f in sorted(work.glob(pattern)):
                if f.is_file() and f.stat().st_size < 8 << 20:
                    tar.add(f, arcname=str(f.relative_to(work)))
    os.replace(out / "logs.tar.gz.tmp", out / "logs.tar.gz")


def main(argv=None) -> int:
    t_start = time.time()
    a = parse_args(argv)
    out = a.out or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    print(f"gpu_check: writing to {out}", flush=True)
    work = (a.work or out / "work").resolve()
    for sub in ("runs", "logs", "checks"):  # a --work used before: fresh runs (data stays)
        shutil.rmtree(work / sub, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    info = device_info(a.cpu)
    cuda = info["mode"] == "cuda"
    budget = a.budget or (440.0 if cuda else 1200.0)
    end = t_start + budget
    env = subprocess_env(cuda)
    rep = {**info, "quick": a.quick, "budget_s": budget, "out": str(out), "work": str(work),
           "total_s": 0.0, "checks": []}
    imports = preflight(env)  # beside the data generation
    data, setup_error = make_data(work, cuda, env)
    try:
        out_text, err_text = imports.communicate(timeout=120)
        if imports.returncode:
            setup_error = (setup_error + "; " if setup_error else "") + \
                f"imports: {error_line(err_text)}"
        else:
            rep["packages"] = json.loads(out_text.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
        imports.kill()
        setup_error = (setup_error + "; " if setup_error else "") + f"imports: {e}"
    if setup_error:
        rep["setup_error"] = setup_error
    print(f"gpu_check: {info['mode']} on {info['device']}, torch {info['torch']}, "
          f"CUDA {info['cuda']}; data in {work / 'data'} "
          f"({time.time() - t_start:.0f} s)", flush=True)
    ctx = {"mode": info["mode"], "quick": a.quick, "work": str(work), "gpus": info["gpus"],
           "tiny_vocab": TINY_VOCAB, **data}
    only = [x for x in a.only.split(",") if x]
    names = [n for n in CHECKS if not only or n in only]

    def save() -> None:
        rep["total_s"] = round(time.time() - t_start, 1)
        (out / "report.json").write_text(json.dumps(rep, indent=1) + "\n")

    # In parallel (CPU): the long cold compile first; a check that reuses another's run or
    # its compile cache after it.
    jobs = a.jobs or (1 if cuda else max(1, min(2, os.cpu_count() or 1)))
    pending = sorted(names, key=lambda n: (jobs > 1 and n != "gpt2_compile",
                                           names.index(n)))
    running: dict[str, Job] = {}
    results: dict[str, dict] = {}

    def ready(n: str) -> bool:
        return AFTER.get(n) not in names or AFTER[n] in results

    def done(res: dict) -> None:
        results[res["name"]] = res
        rep["checks"] = [results[n] for n in names if n in results]
        print(f"[{len(results):>2}/{len(names)}] {res['name']}: {res['status']} "
              f"({res['seconds']:.1f} s){': ' + res['error'] if res['error'] else ''}",
              flush=True)
        save()  # a report so far, should the whole run be cut off

    try:
        while pending or running:
            for name in [n for n in pending if ready(n)][:max(0, jobs - len(running))]:
                pending.remove(name)
                _, t_cuda, t_cpu, needs_cuda, optional = CHECKS[name]
                own, left = (t_cuda if cuda else t_cpu), end - time.time()
                skip = {"name": name, "status": "skip", "seconds": 0.0, "figures": {}}
                if needs_cuda and not cuda:
                    done({**skip, "error": "needs CUDA"})
                elif left < (own if optional else min(own, max(10.0, own / 2))):
                    done({**skip, "error": f"out of time ({left:.0f} s of the {budget:.0f} s "
                                           f"budget left)"})
                else:
                    print(f"     {name} (timeout {min(own, left):.0f} s) ...", flush=True)
                    running[name] = Job(name, min(own, left), ctx, work, env)
            for name, job in list(running.items()):
                res = job.poll()
                if res is not None:
                    del running[name]
                    done(res)
            time.sleep(0.2)
    finally:  # Ctrl-C or a crash here: no check left running in its own session
        for job in running.values():
            _kill(job.p)

    save()
    text = summary_text(rep)
    (out / "summary.txt").write_text(text)
    try:
        write_logs(out, work)
    except OSError as e:
        print(f"warning: logs.tar.gz not written: {e}", file=sys.stderr)
    print("\n" + text + f"report: {out / 'report.json'}", flush=True)
    if not cuda:
        return 0
    return 1 if any(c["status"] == "fail" for c in rep["checks"]) else 0


if __name__ == "__main__":
    sys.exit(main())
