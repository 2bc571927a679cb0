"""Write one captured step out of a run's store as plain files.

    python -m capture.export --step N [--run-dir RUN | --store URL] [--hook NAME ...]
                             [--format pt|npy|safetensors|saelens|hf] [--out DIR] [--list]

Where the store is: `--store` takes a path or an fsspec URL (s3://..., file://...);
`--run-dir RUN` reads RUN/capture.zarr (or the run's `capture.store` from RUN/config.toml
when it was trained with one, e.g. on s3://); with neither, the most recently modified folder
under ./runs that holds a capture.zarr (the one picked is named on stderr).

`--list` prints what the store holds (captured steps and the tier of each: F marks a full
capture, with activations and attention, the others are summary captures, statistics only;
the weight snapshot steps; hooks with their shapes; attention layers; source, status) and
needs no `--step`.

The activation formats read a full capture: a step with a summary capture only is refused
(one line naming the nearest full steps). `--format hf` reads the weight snapshot instead.

What an export of step N writes (default --out: RUN/exports, or ./exports with --store),
for every hook chosen (default all; `--hook` repeats and takes fnmatch patterns such as
'blocks.*.hook_resid_post'). P = probe sequences, T = tokens per sequence, D = the hook's
width; in every format but saelens (SAELens's float32 and int32), activations stay float16
as stored and token ids are int64:

  pt           {out}/step_{N}/{hook}.pt = torch.save({"activations": float16 [P, T, D],
                 "tokens": int64 [P, T], "hook": str, "step": int, "source": str})
  npy          {out}/step_{N}/{hook}.npy (float16 [P, T, D]) and {out}/step_{N}/tokens.npy
                 (int64 [P, T])
  safetensors  {out}/step_{N}/{hook}.safetensors with tensors "activations" (F16 [P, T, D])
                 and "tokens" (I64 [P, T]); metadata (strings): hook, step, source
  saelens      {out}/step_{N}/saelens_{hook}/, a Hugging Face `datasets` folder
                 (Dataset.save_to_disk) in SAELens's cached-activations layout, for its
                 `cached_activations_path`: one row per sequence, columns {hook}
                 (Array2D float32 [T, D]) and "token_ids" (int32 [T]); exactly one --hook
                 (a name, or a pattern matching one hook); see capture/interop.py

  hf           the model's weights at step N (a weight snapshot step, see --list) as a
                 Hugging Face GPT-2 folder: {out}/config.json, generation_config.json,
                 model.safetensors (float32, from the bf16/fp16 snapshot) and the GPT-2
                 tokenizer files when the run's tokenizer can be found (--tokenizer-file,
                 else the run's; else the weights only, with a warning), which
                 `transformers.GPT2LMHeadModel.from_pretrained(out)` loads. Here --out is
                 the model folder itself (default: RUN/exports/step_{N}/hf, or
                 ./exports/step_{N}/hf with --store); --hook does not apply. Attention-only
                 and untied (model.tie_embeddings=false) models have no such export.

and, whenever `blocks.4.hook_resid_post` (the block-4 output) is among the hooks exported,
whatever the format (but saelens, which writes its folder only), the seeds' file

  {out}/act_block4_output_step_{N}.pt = torch.save({"activations": float16 [P, T, D],
                                                    "input_ids": int64 [P, T]})

"tokens" / "input_ids" are the inputs of that capture's forward: the probe set's token ids
(source "probe"), or the live training micro-batch (source "train").

Every file is written under a temporary name in its final folder and renamed into place
(the saelens folder is built in a hidden sibling folder and renamed; the hf folder is built
in a hidden sibling folder, each file then renamed into --out), so an interrupted
export never leaves a partial file under a final name. Activations are read one chunk of
the store at a time (one sequence, in schema 1) into a file-backed staging array next to
the outputs (saelens: into the dataset writer), so memory stays bounded however large the
capture; a progress bar over hooks x sequences shows when the export is large.

Bad input (uncaptured step, a summary-only step for activations, a step without a weight
snapshot for hf, unknown hook, missing run dir or store, a store of a newer schema, a
corrupt store): one line `error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from capture.export_files import make_dirs, save_npy, save_torch, write_safetensors
from store.errors import ArgumentParser, UserError, run_cli
from store.runs import STORE_DIR, configured_store, store_may_exist, store_url

SEEDS_HOOK = "blocks.4.hook_resid_post"
PROGRESS_MIN_BYTES = 64 << 20  # show a progress bar from this many activation bytes on


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__ or ""
    files = doc[doc.find("What an export"):doc.find("Every file is written")].strip()
    p = ArgumentParser(prog="python -m capture.export",
                description="Write one captured step of a run's activation store as files.",
                epilog=files, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--step", type=int,
                   help="training step to export (a full capture; a snapshot step for hf)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--run-dir", type=Path,
                       help="run folder holding capture.zarr (default: the most recently "
                            "modified one under ./runs)")
    where.add_argument("--store", help="the store itself: a path or an fsspec URL")
    p.add_argument("--hook", action="append", default=None, metavar="NAME",
                   help="hook name or fnmatch pattern; repeatable (default: every stored hook)")
    p.add_argument("--format", choices=("pt", "npy", "safetensors", "saelens", "hf"),
                   default="pt", help="file format (default: pt); saelens needs exactly one "
                   "--hook; hf writes the model's weights at a snapshot step")
    p.add_argument("--out", type=Path,
                   help="output folder (default: RUN/exports, or ./exports with --store); "
                        "for hf, the model folder itself")
    p.add_argument("--tokenizer-file", default=None, metavar="PATH",
                   help="hf: GPT-2 BPE file in tiktoken's format (default: the run's)")
    p.add_argument("--list", action="store_true",
                   help="list the captured steps with their tiers, the snapshot steps, hooks "
                        "and attention layers, and exit")
    return p


# ----------------------------------------------------------------------------- locating


def _latest_run(root: Path) -> Path:
    if not root.is_dir():
        raise UserError(f"no run dir given and no {root}/ folder here; "
                        f"pass --run-dir RUN or --store URL")
    runs = [d for d in root.iterdir() if (d / STORE_DIR).is_dir()]
    if not runs:
        raise UserError(f"no run with a {STORE_DIR} under {root}/; "
                        f"pass --run-dir RUN or --store URL")
    return max(runs, key=lambda d: (d.stat().st_mtime, d.name))


def locate(args) -> tuple[str, Path | None, str | None]:
    """(store URL, run dir or None, a note for stderr on what was picked, or None)."""
    if args.store:
        url = args.store
        if not store_may_exist(url):
            raise UserError(f"store {url} not found")
        return url, None, None
    note = None
    run = args.run_dir
    if run is None:
        run = _latest_run(Path("runs"))
        note = f"export: using run dir {run} (the most recently modified under ./runs)"
    if not run.exists():
        raise UserError(f"run dir {run} not found")
    if not run.is_dir():
        raise UserError(f"run dir {run} is not a folder")
    # A run trained with capture.store elsewhere (s3://..., a path) has its store there.
    url = store_url(run, configured_store(run))
    if not store_may_exist(url):
        raise UserError(f"run dir {run} has no capture store ({url} missing); "
                        f"was it trained with capture enabled?")
    return url, run, note


def open_store(url: str):
    from store.errors import SchemaVersionError, StoreError, StoreNotFound
    from store.reader import RunStore

    try:
        return RunStore(url)
    except SchemaVersionError as e:
        msg = str(e)
        if "upgrade" not in msg.lower():
            msg += "; upgrade this project to read it"
        raise UserError(msg) from None
    except StoreNotFound as e:
        raise UserError(str(e)) from None
    except StoreError as e:
        raise UserError(str(e)) from None
    except (OSError, ValueError, KeyError, TypeError) as e:  # zarr/json on a broken store
        if not _raised_by_storage(e):
            raise
        raise UserError(f"cannot open store {url}: {type(e).__name__}: {_one_line(e)}"
                        ) from None


def _raised_by_storage(e: BaseException) -> bool:
    """Whether an exception came out of the storage stack (zarr, its codecs, json, fsspec,
    the store package) or the file system: what a corrupt or unreadable store raises."""
    if isinstance(e, OSError):
        return True
    tb = e.__traceback__
    last = None
    while tb is not None:
        last = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    parts = Path(last or "").parts
    return any(p in ("zarr", "numcodecs", "json", "fsspec", "store") for p in parts)


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


# ----------------------------------------------------------------------------- listing


def _fmt_steps(steps: np.ndarray, full: np.ndarray | None = None, short: int = 12) -> str:
    """The captured steps in one line; with `full` (the full captures' steps) each full
    step is marked F: "5 captured (3 full): 0F, 1F, 2F, 3, 6"."""
    n = len(steps)
    if n == 0:
        return "0 captured (none committed yet)"
    if full is None:
        if n <= short:
            return f"{n} captured: {', '.join(str(int(s)) for s in steps)}"
        return f"{n} captured, first {int(steps[0])}, last {int(steps[-1])}"
    is_full = set(int(s) for s in full)

    def mark(s) -> str:
        return f"{int(s)}{'F' if int(s) in is_full else ''}"

    head = f"{n} captured ({len(is_full)} full)"
    if n <= short:
        return f"{head}: {', '.join(mark(s) for s in steps)}"
    return (f"{head}: {', '.join(mark(s) for s in steps[:8])}, ..., "
            f"{', '.join(mark(s) for s in steps[-3:])}")


def _fmt_snapshots(steps: list[int], short: int = 12) -> str:
    if not steps:
        return "none (capture.snapshot_every was 0, or none was written yet)"
    if len(steps) <= short:
        return ", ".join(map(str, steps))
    return (f"{len(steps)}: {', '.join(map(str, steps[:8]))}, ..., "
            f"{', '.join(map(str, steps[-3:]))}")


def list_store(rs, url: str) -> None:
    P, T = rs.n_seqs, rs.seq_len
    print(f"store: {url}")
    print(f"schema: {rs.schema_version}  status: {rs.status}  source: {rs.source}")
    steps = np.asarray(rs.steps())
    print(f"steps: {_fmt_steps(steps, np.asarray(rs.steps('full')))}")
    if len(steps):
        print("  (F: full capture, with activations and attention; unmarked: summary "
              "capture, statistics only)")
    print(f"snapshots: {_fmt_snapshots(list(rs.snapshot_steps()))} (model weights: "
          f"--format hf)")
    print(f"sequences: {P} x {T} tokens per capture")
    hooks = rs.act_hooks
    print(f"hooks ({len(hooks)}), activations per full capture [P, T, D] float16:")
    width = max((len(h) for h in hooks), default=0)
    for h, d in hooks.items():
        print(f"  {h:<{width}}  [{P}, {T}, {d}]")
    stat_only = {h: d for h, d in rs.hooks.items() if h not in hooks}
    if stat_only:
        print(f"statistics only ({len(stat_only)}): "
              f"{', '.join(f'{h} [{d}]' for h, d in stat_only.items())}")
    layers = list(rs.attn_layers)
    if layers:
        print(f"attention: layers {', '.join(str(x) for x in layers)} "
              f"({rs.n_heads} heads, {rs.attn_seqs} sequences, [H, T, T] each)")
    else:
        print("attention: none")


# ----------------------------------------------------------------------------- choosing


def check_step(rs, step: int) -> None:
    """`step` is a full capture (the activation formats read one); a one-line UserError
    naming the nearest captured steps, or the nearest full ones for a summary capture."""
    steps = np.asarray(rs.steps())
    if step in set(int(s) for s in steps):
        rs.slot(step, "full")  # StoreError (reported as one line) when summary only
        return
    if len(steps) == 0:
        raise UserError(f"step {step} was not captured: the store has no committed "
                        f"captures yet")
    before, after = rs.nearest_steps(step)
    near = []
    if before is not None:
        near.append(f"before: {before}")
    if after is not None:
        near.append(f"after: {after}")
    raise UserError(f"step {step} was not captured; nearest captured steps "
                    f"{', '.join(near)} (--list shows all {len(steps)})")


def choose_hooks(stored: list[str], wanted: list[str] | None,
                 stat_only: list[str] = ()) -> list[str]:
    """The hooks (with stored activations) `wanted` names or matches, in order; `stat_only`:
    hooks with statistics only, named in the error when a pattern matches only those."""
    if not wanted:
        return list(stored)
    chosen: list[str] = []
    for pat in wanted:
        hits = [h for h in stored if fnmatch.fnmatchcase(h, pat)]
        if not hits and any(fnmatch.fnmatchcase(h, pat) for h in stat_only):
            raise UserError(f"hook {pat!r} has statistics only (full captures keep the "
                            f"activations of capture.hooks); hooks with activations: "
                            f"{', '.join(stored) or '(none)'}")
        if not hits:
            raise UserError(f"hook {pat!r} is not in the store; stored hooks: "
                            f"{', '.join(stored) or '(none)'}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


# ----------------------------------------------------------------------------- writing


def _seqs_per_chunk(rs, hook: str) -> int:
    """Sequences in one chunk of acts/<hook> (one, in schema 1): the unit the export reads."""
    try:
        return max(1, int(rs.act_chunks(hook)[1]))
    except Exception:  # noqa: BLE001 - advisory only; the read itself reports a broken array
        return 1


def export_step(rs, step: int, hooks: list[str], fmt: str, out: Path) -> list[Path]:
    from tqdm import tqdm

    P, T = rs.n_seqs, rs.seq_len
    dims = rs.hooks
    source = str(rs.source)
    tokens = np.asarray(rs.tokens(step)).astype(np.int64)
    step_dir = out / f"step_{step}"
    made = make_dirs(step_dir)
    written: list[Path] = []
    total_bytes = sum(P * T * dims[h] * 2 for h in hooks)
    bar = tqdm(total=len(hooks) * P, unit="seq", desc=f"export step {step}", file=sys.stderr,
               disable=total_bytes < PROGRESS_MIN_BYTES, dynamic_ncols=True)
    torch = None
    if fmt == "pt" or SEEDS_HOOK in hooks:
        import torch
    try:
        if fmt == "npy":
            path = step_dir / "tokens.npy"
            save_npy(tokens, path)
            written.append(path)
        for hook in hooks:
            D = dims[hook]
            bar.set_postfix_str(hook, refresh=False)
            final = step_dir / f"{hook}.{fmt}"
            # stage the activations in a file-backed array next to the outputs
            if fmt == "npy":
                stage_path = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            else:
                stage_path = step_dir / f".{hook}.stage-{os.getpid()}"
            try:
                acts = np.lib.format.open_memmap(stage_path, mode="w+", dtype=np.float16,
                                                 shape=(P, T, D))
                n = _seqs_per_chunk(rs, hook)
                for lo in range(0, P, n):  # chunk by chunk: each chunk is decoded once
                    hi = min(P, lo + n)
                    acts[lo:hi] = rs.activations(hook, step, seq=lo if n == 1 else
                                                 slice(lo, hi))
                    bar.update(hi - lo)
                acts.flush()
                if fmt == "pt":
                    save_torch({"activations": torch.from_numpy(acts),
                                "tokens": torch.from_numpy(tokens), "hook": hook,
                                "step": step, "source": source}, final)
                elif fmt == "safetensors":
                    write_safetensors(final, {"activations": acts, "tokens": tokens},
                                      {"hook": hook, "step": str(step), "source": source})
                if hook == SEEDS_HOOK:
                    seeds = out / f"act_block4_output_step_{step}.pt"
                    save_torch({"activations": torch.from_numpy(acts),
                                "input_ids": torch.from_numpy(tokens)}, seeds)
                if fmt == "npy":
                    del acts
                    os.replace(stage_path, final)
                written.append(final)
                if hook == SEEDS_HOOK:
                    written.append(seeds)
            finally:
                acts = None
                stage_path.unlink(missing_ok=True)
    except BaseException:
        # A failed (or interrupted) export leaves nothing: no step folder with some hooks.
        for path in written:
            path.unlink(missing_ok=True)
        if made:  # the outermost folder this call created, with what is inside
            shutil.rmtree(made[0], ignore_errors=True)
        raise
    finally:
        bar.close()
    return written


# ----------------------------------------------------------------------------- hf


def export_hf(rs, run_dir: Path | None, step: int, out: Path,
              tokenizer_file: str | None) -> Path:
    """The weight snapshot at `step` as a Hugging Face GPT-2 folder at `out`."""
    # The export CLI reads the store and needs no trainer; the model class (in the trainer)
    # is needed for this format only, so the trainer is imported here, not at the top.
    try:
        from trainer.snapshots import save_snapshot_hf
    except ImportError as e:  # capture installed without this project's trainer
        raise UserError(f"--format hf needs this project's trainer package: {e}") from None
    return save_snapshot_hf(rs, run_dir, step, out, tokenizer_file)


# ----------------------------------------------------------------------------- main


def run(args) -> int:
    if not args.list and args.step is None:
        raise UserError("--step N is required (or --list to see the captured steps)")
    if not args.list and args.format == "hf" and args.hook:
        raise UserError("--hook does not apply to --format hf: it exports the model's "
                        "weights (a snapshot step), not activations")
    if not args.list and args.format == "saelens" and len(args.hook or []) != 1:
        raise UserError(f"--format saelens writes one hook: pass exactly one --hook NAME "
                        f"(got {len(args.hook or [])}; --list shows the stored hooks)")
    url, run_dir, note = locate(args)
    rs = open_store(url)
    from store.errors import StoreError

    try:
        if args.list:
            if note:
                print(note, file=sys.stderr)
            list_store(rs, url)
            return 0
        if args.format == "hf":
            out = args.out or ((run_dir / "exports") if run_dir is not None
                               else Path("exports")) / f"step_{args.step}" / "hf"
            if note:
                print(note, file=sys.stderr)
            print(export_hf(rs, run_dir, args.step, out, args.tokenizer_file))
            return 0
        check_step(rs, args.step)
        hooks = choose_hooks(list(rs.act_hooks), args.hook,
                             [h for h in rs.hooks if h not in rs.act_hooks])
        if args.format == "saelens" and len(hooks) != 1:
            raise UserError(f"--format saelens writes one hook, and --hook chose "
                            f"{len(hooks)}: {', '.join(hooks)}; pass exactly one --hook NAME")
        out = args.out or ((run_dir / "exports") if run_dir is not None else Path("exports"))
        if note:
            print(note, file=sys.stderr)
        if args.format == "saelens":
            from capture.interop import write_saelens_dataset

            written = [write_saelens_dataset(rs, hooks[0], args.step,
                                             out / f"step_{args.step}" / f"saelens_{hooks[0]}")]
        else:
            written = export_step(rs, args.step, hooks, args.format, out)
    except StoreError as e:
        raise UserError(str(e)) from None
    except (ValueError, KeyError, TypeError, OSError) as e:
        if not _raised_by_storage(e):  # a bug here, not a broken store: keep the traceback
            raise
        raise UserError(f"cannot read store {url}: {type(e).__name__}: {_one_line(e)}") from None
    for p in written:
        print(p)
    print(f"exported step {args.step}: {len(hooks)} hook(s), {args.format}, to "
          f"{out / f'step_{args.step}'}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        return run_cli(lambda: run(build_parser().parse_args(argv)))
    except KeyboardInterrupt:
        print("error: interrupted; no partial file was left under a final name",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
