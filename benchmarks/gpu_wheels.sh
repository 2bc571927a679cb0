#!/usr/bin/env bash
# Download the wheels a GPU machine without internet access lacks, for benchmarks/gpu_check.py
# (and training with capture) to run there with the machine's own torch: into .whl/.
#
#     benchmarks/gpu_wheels.sh            # from the repo root, on a machine that reaches PyPI
#
# Then, on the GPU machine, from the repo root (docs/gpu.md):
#
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#     PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_check.py --out OUT
#
# The list: what a training run with capture, `capture.export --list` and store.reader
# import at runtime (traced on a CPU run), less what that machine's image already has
# (Python 3.12 with torch, transformers, huggingface-hub, numpy, pandas, pyarrow, xxhash,
# pyyaml, einops, jaxtyping, safetensors, tiktoken, matplotlib, rich, tqdm, ...):
#   zarr 3 and its needs numcodecs, donfig, google-crc32c (the store);
#   transformer-lens (capture's hook points) and datasets, which transformer_lens.utils
#   imports eagerly, with datasets' needs dill and multiprocess.
# transformer-lens's other declared needs (beartype, typeguard, fancy-einsum, wandb,
# transformers-stream-generator, accelerate) are not imported by what we run, or are there.
# Versions: those of this repo's .venv, so the GPU run reads and writes the same store
# format the tests here check. --no-deps: pip must not pull a second torch or numpy.
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEST=${DEST:-.whl}

WHEELS=(
  zarr==3.1.6
  numcodecs==0.16.6
  donfig==0.8.1.post1
  google-crc32c==1.9.0
  transformer-lens==4.3.0
  datasets==5.2.0
  dill==0.4.1
  multiprocess==0.70.19
  tyro==1.0.17
  docstring-parser==0.18.0
  typeguard==4.6.1
  tomli-w==1.2.0
)

# Warn (not fail) when .venv moved on: the pins above should follow it.
if [ -x .venv/bin/pip ]; then
  for spec in "${WHEELS[@]}"; do
    name=${spec%%==*} want=${spec##*==}
    have=$(.venv/bin/pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    if [ -n "$have" ] && [ "$have" != "$want" ]; then
      echo "warning: .venv has $name $have, this script pins $want" >&2
    fi
  done
fi

mkdir -p "$DEST"
# The machine's python is 3.12 on x86-64 (manylinux); pure-Python wheels match any of these.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$DEST" "${WHEELS[@]}"

ls -1 "$DEST"/*.whl
du -ch "$DEST"/*.whl | tail -1
