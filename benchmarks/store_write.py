"""Write throughput of StoreWriter.write_acts against numpy.tofile of the same bytes.

    python benchmarks/store_write.py                    # ~1-2 min on 2 cores
    python benchmarks/store_write.py --rounds 9 --captures 8 --dir /scratch/somewhere
    python benchmarks/store_write.py --store s3://bucket/prefix   # also onto object storage

GPT-2 124M shapes: a capture is P=16 sequences x T=256 tokens, hooks 768 wide (plus one MLP
hook 3072 wide); each call writes one rank's slice ([P/world, T, D] float16, world 2), as
the capture writer does. In one script, into the same folder (so the same file system):

- tofile/call:   numpy.tofile of each call's [n, T, D] into one new file (the baseline)
- tofile/chunk:  numpy.tofile of each sequence into its own file (same file count as zarr)
- StoreWriter:   write_acts, whole chunks written concurrently by `threads` threads
- zarr slice:    plain zarr-python, one assignment per call (zarr writes the slice's
                 chunks concurrently, up to async.concurrency), same array
- zarr loop:     plain zarr-python, one chunk per assignment (the naive way), same array

Each round writes every variant once, in a rotating order, after `sync` (untimed) so no
variant pays for another's dirty pages; fresh files and stores every round. We report each
variant's median MB/s over the rounds and the ratio of medians to tofile/call. A second
part times the durability barrier (mark_done: syncfs) for one capture against os.fsync of
the tofile files, and rank 0's commit of that capture (schema 2: captures/tier, then
captures/step, each behind a syncfs). Stores are schema 2: rank 0 reserves each slot
before it is written. No assertions: the figures are printed.

`--store URL` (an fsspec URL: s3://bucket/prefix, gs://..., or another folder) adds the
StoreWriter variant writing into a fresh store under URL each round, timed the same way
beside the local ones, then prints their MB/s against the local StoreWriter and against
numpy.tofile, and the time of one capture's mark_done and commit there. For s3:// the
endpoint and credentials come from the environment as s3fs (botocore) reads them
(AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...). What it writes under
URL is deleted at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zarr  # noqa: E402

from store.schema import FULL, SUMMARY, Layout  # noqa: E402
from store.writer import StoreWriter  # noqa: E402

P, T, WORLD = 16, 256, 2


def layout(captures: int, hooks: dict[str, int]) -> Layout:
    return Layout(n_seqs=P, seq_len=T, act_hooks=hooks, topk=8, attn_layers=[], n_heads=12,
                  attn_seqs=0, max_steps=10, world=WORLD, source="train", attrs={})


def calls(captures: int, hooks: dict[str, int], data: dict[int, np.ndarray]):
    n = P // WORLD
    for slot in range(captures):
        for hook, D in hooks.items():
            for rank in range(WORLD):
                yield slot, hook, rank * n, data[D]


def run_tofile_call(d: Path, captures, hooks, data) -> int:
    total = 0
    for i, (slot, hook, start, a) in enumerate(calls(captures, hooks, data)):
        a.tofile(d / f"{i}.bin")
        total += a.nbytes
    return total


def run_tofile_chunk(d: Path, captures, hooks, data) -> int:
    total = 0
    for i, (slot, hook, start, a) in enumerate(calls(captures, hooks, data)):
        for j in range(a.shape[0]):
            a[j].tofile(d / f"{i}.{j}.bin")
        total += a.nbytes
    return total


def make_writer(d: Path | str, captures, hooks, threads: int) -> StoreWriter:
    """A new store (in folder `d`, or at the URL `d` when a str) with its `captures` slots
    reserved (rank 0's part, untimed: a metadata write once every SLOT_BLOCK captures)."""
    url = d if isinstance(d, str) else str(d / "s.zarr")
    w = StoreWriter.create_or_open(url, layout(captures, hooks), threads=threads)
    for slot in range(captures):
        w.reserve(slot)
    return w


def run_writer(w: StoreWriter, captures, hooks, data) -> int:
    total = 0
    for slot, hook, start, a in calls(captures, hooks, data):
        w.write_acts(hook, slot, start, a)
        total += a.nbytes
    return total


def run_zarr_slice(arrays: dict, captures, hooks, data) -> int:
    total = 0
    for slot, hook, start, a in calls(captures, hooks, data):
        arrays[hook][slot, start:start + a.shape[0]] = a
        total += a.nbytes
    return total


def run_zarr_loop(arrays: dict, captures, hooks, data) -> int:
    total = 0
    for slot, hook, start, a in calls(captures, hooks, data):
        arr = arrays[hook]
        for j in range(a.shape[0]):
            arr[slot, start + j] = a[j]
        total += a.nbytes
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="folder to write in (default: a temp folder "
                    "under runs/, on the project's disk)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--captures", type=int, default=6, help="captures per round")
    ap.add_argument("--hooks", type=int, default=4, help="hooks 768 wide (plus one 3072 wide)")
    ap.add_argument("--threads", default="1,2,4", help="StoreWriter thread counts to try")
    ap.add_argument("--no-zarr-loop", action="store_true")
    ap.add_argument("--store", default=None, metavar="URL",
                    help="also write with StoreWriter into a store under this fsspec URL "
                    "(e.g. s3://bucket/prefix), beside the local variants")
    args = ap.parse_args()
    remote = None
    if args.store:
        from fsspec.core import url_to_fs

        # a prefix of its own under URL, deleted at the end
        remote = f"{args.store.rstrip('/')}/bench-store-write-{os.getpid()}-{int(time.time())}"
        try:
            rfs, rpath = url_to_fs(remote)
        except (ImportError, ValueError) as e:
            sys.exit(f"error: --store {args.store}: {e}")

    base = Path(args.dir or Path(__file__).resolve().parents[1] / "runs")
    base.mkdir(parents=True, exist_ok=True)
    top = Path(tempfile.mkdtemp(prefix="bench-store-write-", dir=base))
    hooks = {f"blocks.{i}.hook_resid_post": 768 for i in range(args.hooks)}
    hooks["blocks.0.mlp.hook_post"] = 3072
    rng = np.random.default_rng(0)
    data = {D: rng.standard_normal((P // WORLD, T, D)).astype(np.float16)
            for D in set(hooks.values())}
    threads = [int(x) for x in args.threads.split(",")]
    per_round = sum(P * T * D * 2 for D in hooks.values()) * args.captures
    print(f"writing {args.captures} captures x {len(hooks)} hooks ({P} x {T} x 768, one 3072) "
          f"= {per_round / 1e6:.0f} MB per variant per round, {args.rounds} rounds, in {top}")
    print(f"calls of [{P // WORLD}, {T}, D] float16 (one rank's slice, world {WORLD}); "
          f"chunks of one sequence [1, 1, {T}, D]; zarr async.concurrency "
          f"{zarr.config.get('async.concurrency')}")

    variants = ["tofile/call", "tofile/chunk"] + [f"StoreWriter threads={t}" for t in threads]
    variants.append("zarr slice (1 assign/call)")
    if not args.no_zarr_loop:
        variants.append("zarr loop (1 chunk/assign)")
    # one variant: on an object store the writer runs at least 8 threads whatever it is
    # given (store/_chunks.py make_sink: latency, not a disk, bounds it)
    remote_vs = ["StoreWriter@store threads=8"] if remote else []
    variants += remote_vs
    if remote:
        print(f"StoreWriter@store: the same writes into a new store under {remote} "
              f"(creating it, untimed, is many small requests)")
    speeds: dict[str, list[float]] = {v: [] for v in variants}
    try:
        for r in range(args.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                d = top / f"r{r}-{variants.index(v)}"
                d.mkdir()
                # untimed setup: create the store (preallocation is metadata only)
                if v in remote_vs:
                    w = make_writer(f"{remote}/r{r}-{variants.index(v)}/s.zarr",
                                    args.captures, hooks, int(v.split("=")[1]))
                    fn = lambda: run_writer(w, args.captures, hooks, data)  # noqa: E731
                elif v.startswith("StoreWriter"):
                    w = make_writer(d, args.captures, hooks, int(v.split("=")[1]))
                    fn = lambda: run_writer(w, args.captures, hooks, data)  # noqa: E731
                elif v.startswith("zarr"):
                    w = make_writer(d, args.captures, hooks, 1)
                    arrays = {h: zarr.open_array(str(d / "s.zarr"), path=f"acts/{h}", mode="r+")
                              for h in hooks}
                    run = run_zarr_slice if "slice" in v else run_zarr_loop
                    fn = lambda: run(arrays, args.captures, hooks, data)  # noqa: E731
                elif v == "tofile/call":
                    fn = lambda: run_tofile_call(d, args.captures, hooks, data)  # noqa: E731
                else:
                    fn = lambda: run_tofile_chunk(d, args.captures, hooks, data)  # noqa: E731
                os.sync()
                t0 = time.perf_counter()
                nbytes = fn()
                speeds[v].append(nbytes / 1e6 / (time.perf_counter() - t0))
                if v.startswith(("StoreWriter", "zarr")):
                    w.close()
            shutil.rmtree(top)
            top.mkdir()
            if remote and rfs.exists(rpath):
                rfs.rm(rpath, recursive=True)
        base_mb = statistics.median(speeds["tofile/call"])
        print(f"\n{'variant':<30} {'median MB/s':>12} {'ratio':>7}   per round MB/s")
        for v in variants:
            m = statistics.median(speeds[v])
            print(f"{v:<30} {m:>12.0f} {m / base_mb:>7.2f}   "
                  f"{' '.join(f'{x:.0f}' for x in speeds[v])}")
        best = max((v for v in variants if v.startswith("StoreWriter")
                    and v not in remote_vs),
                   key=lambda v: statistics.median(speeds[v]))
        paired = [a / b for a, b in zip(speeds[best], speeds["tofile/call"])]
        chunk_mb = statistics.median(speeds["tofile/chunk"])
        print(f"\nStoreWriter.write_acts / numpy.tofile (same bytes, same disk): "
              f"{statistics.median(speeds[best]) / base_mb:.2f} against one file per call "
              f"(ratio of medians, {best}; median of per-round ratios "
              f"{statistics.median(paired):.2f}); "
              f"{statistics.median(speeds[best]) / chunk_mb:.2f} against one file per sequence "
              f"(the same file count as the store); target >= 0.8")
        zs = statistics.median(speeds["zarr slice (1 assign/call)"])
        print(f"zarr's own slice write / numpy.tofile: {zs / base_mb:.2f} (one file per call), "
              f"{zs / chunk_mb:.2f} (one file per sequence); StoreWriter / zarr slice: "
              f"{statistics.median(speeds[best]) / zs:.2f}")
        if chunk_mb > base_mb:
            print("(here numpy.tofile of one few-MB file per call is slower than of one ~0.4 MB "
                  "file per sequence: the file system's doing, hence both baselines)")

        # durability: one capture written then made durable, both ways
        d = top / "durable"
        d.mkdir()
        t_done, t_commit = time_one_capture(make_writer(d, 1, hooks, 2), hooks, data)
        files = []
        for i, (_, _, _, a) in enumerate(calls(1, hooks, data)):
            a.tofile(d / f"{i}.bin")
            files.append(d / f"{i}.bin")
        t0 = time.perf_counter()
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        t_fsync = time.perf_counter() - t0
        print(f"durability of one capture ({per_round / args.captures / 1e6:.0f} MB): "
              f"mark_done x{WORLD} (syncfs) {t_done * 1e3:.0f} ms; fsync of the tofile files "
              f"{t_fsync * 1e3:.0f} ms (in the capture's background thread, not training's); "
              f"commit (captures/tier + captures/step, 2 syncfs) {t_commit * 1e3:.0f} ms")
        if remote:
            report_remote(remote, remote_vs, speeds, best, base_mb, hooks, data, per_round,
                          args.captures)
    finally:
        shutil.rmtree(top, ignore_errors=True)
        if remote:
            try:
                if rfs.exists(rpath):
                    rfs.rm(rpath, recursive=True)
            except Exception as e:  # noqa: BLE001 - the figures are printed already
                print(f"could not delete {remote}: {type(e).__name__}: {e}")


def time_one_capture(w, hooks, data) -> tuple[float, float]:
    """One capture written with `w`, then the seconds of every rank's mark_done and of rank
    0's commit; closes `w`."""
    run_writer(w, 1, hooks, data)
    t0 = time.perf_counter()
    for rank in range(WORLD):
        w.mark_done(0, rank)
    t_done = time.perf_counter() - t0
    t0 = time.perf_counter()
    w.commit(0, 0, SUMMARY | FULL)
    t_commit = time.perf_counter() - t0
    w.close()
    return t_done, t_commit


def report_remote(remote: str, remote_vs: list[str], speeds: dict, best: str, base_mb: float,
                  hooks, data, per_round: int, captures: int) -> None:
    """The store URL's StoreWriter against the local one and numpy.tofile, and one capture's
    mark_done and commit there (no syncfs on an object store: a PUT is durable once it
    returns, so these are the requests themselves)."""
    rbest = max(remote_vs, key=lambda v: statistics.median(speeds[v]))
    rm, lm = statistics.median(speeds[rbest]), statistics.median(speeds[best])
    paired = [a / b for a, b in zip(speeds[rbest], speeds[best])]
    print(f"\nStoreWriter on {remote.rsplit('/', 1)[0]}: {rm:.1f} MB/s ({rbest.split('@')[1]})"
          f" vs {lm:.0f} MB/s local ({best.split(' ', 1)[1]}): {rm / lm:.3f} of the local "
          f"StoreWriter (median of per-round ratios {statistics.median(paired):.3f}), "
          f"{rm / base_mb:.3f} of numpy.tofile to local disk ({base_mb:.0f} MB/s)")
    t_done, t_commit = time_one_capture(
        make_writer(f"{remote}/durable/s.zarr", 1, hooks, int(rbest.split("=")[1])), hooks, data)
    print(f"on the store URL, one capture ({per_round / captures / 1e6:.0f} MB): mark_done "
          f"x{WORLD} {t_done * 1e3:.0f} ms; commit (captures/tier, then captures/step: one "
          f"whole-object PUT each, no rename) {t_commit * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
