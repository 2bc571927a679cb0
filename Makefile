# The two quick-start commands: `make demo` and `make test`. Both set up .venv first.
PY ?= python3
VENV ?= .venv
SHARED ?= ../shared
# Offline settings for the demo: the local corpus and GPT-2 BPE file when they are there.
TEXT ?= $(SHARED)/data/tinyshakespeare.txt
TOKENIZER_FILE ?= $(wildcard $(SHARED)/data/gpt2.tiktoken)
NPROC ?= 2
# GPUs when the node has one per rank; else gloo on CPU (NCCL refuses two ranks on one GPU).
GPUS := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')
DEVICE ?= $(shell [ "$(GPUS)" -ge "$(NPROC)" ] 2>/dev/null && echo cuda || echo cpu)
DASHBOARD ?= 1
BIN := $(VENV)/bin

.PHONY: setup browser cluster-tools test test-unit demo bench clean

setup: $(VENV)/.installed

# torch first and pinned: on CPU-only machines this is the local CPU build; elsewhere pip
# takes the CUDA build from PyPI.
$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# The dashboard's browser test drives Debian's Chromium through its chromedriver.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	    { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }

# The batch script's tests run on a real single-node SLURM cluster (slurm/local_cluster.sh)
# and launch PBS-style with MPICH's mpiexec.
cluster-tools:
	slurm/local_cluster.sh install
	@command -v mpiexec >/dev/null || { apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends mpich >/dev/null; }

test: setup browser cluster-tools
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q --durations=15 tests

test-unit: setup
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q tests/unit

demo: setup
	test -d runs/data/tinyshakespeare || $(BIN)/python -m trainer.prepare --text $(TEXT) \
	    --out runs/data/tinyshakespeare --val-fraction 0.05 \
	    $(if $(TOKENIZER_FILE),--tokenizer-file $(TOKENIZER_FILE))
	$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m trainer --config configs/tiny.toml \
	    --data runs/data/tinyshakespeare --run-dir runs/tiny --parallel.device=$(DEVICE) $(if $(wildcard runs/tiny/checkpoints),--resume)
ifneq ($(DASHBOARD),0)
	@echo "dashboard: http://localhost:8501 (Ctrl-C to stop)"
	$(BIN)/streamlit run dashboard/app.py --server.headless true -- --run-dir runs/tiny
endif

bench: setup
	$(BIN)/python benchmarks/train_speed.py

clean:
	rm -rf $(VENV) runs
