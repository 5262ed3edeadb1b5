# Two entry points: `make demo` and `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch is pinned and installed first: a bare `torch` requirement can pull a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: demo test install bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/fedmi table2 --dataset heart-disease --out runs/demo --overwrite

test: install
	$(BIN)/python -m pytest -q

# The benchmark's own environment: fedmi, a pinned Ray and psutil.
BENCH_VENV := benchmarks/.venv

$(BENCH_VENV)/.installed: pyproject.toml benchmarks/requirements.txt
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check $(TORCH)
	$(BENCH_VENV)/bin/pip install --quiet --disable-pip-version-check -e . -r benchmarks/requirements.txt
	touch $@

bench: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python benchmarks/simulation.py $(ARGS)

clean:
	rm -rf $(VENV) $(BENCH_VENV) runs .pytest_cache
