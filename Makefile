# The README's two commands:
#   make reproduce   set up .venv if needed, then run the tiny pipeline (figures in figures/)
#   make test        set up .venv if needed, then run the tests
# TORCH pins the CPU wheel these machines hold locally; on a GPU box use e.g. TORCH='torch==2.13.0'
# with your CUDA index, or TORCH=torch.
PY ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install reproduce test test-ui lab lint strip bench clean-runs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q '$(TORCH)'
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

reproduce: install
	$(BIN)/python -m lnkit.runs papermill_runs/tiny.yaml

test: install
	$(BIN)/pytest -q

# The notebooks' widgets in JupyterLab, driven in Debian's chromium (apt-get install chromium); about 2 min.
test-ui: install
	$(BIN)/pytest -q -m ui tests/test_ui.py

# JupyterLab on this venv's kernel, opened at notebooks/; root (a container) needs --allow-root.
lab: install
	$(BIN)/jupyter lab --ServerApp.root_dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

lint: install
	$(BIN)/ruff check lib tests benchmarks
	$(BIN)/nbstripout --verify notebooks/*.ipynb

strip: install
	$(BIN)/nbstripout notebooks/*.ipynb

bench: install
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done   # gpu_check.sh: a GPU's own

clean-runs:
	rm -rf runs papermill_runs/output
