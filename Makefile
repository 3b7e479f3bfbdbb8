# attnlens: `make demo` and `make test` are the whole quick start.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# A CPU build; GPU users install their own torch before the package (pyproject asks only torch>=2.4).
TORCH  := torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: demo test lint docs bench clean browser notebooks

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet -e '.[dev,docs]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/attnlens demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# Debian's chromium: the browser tests open the report and the notebooks in it, and the notebooks
# draw a PNG of each figure with it (kaleido). Without root or a package mirror it is left out,
# and those tests skip, saying so.
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: the browser tests will skip"

# re-run the notebooks and save their outputs (after a change of the embedded model, say)
notebooks: $(STAMP) browser
	$(PY) notebooks/run.py --in-place

test: lint browser
	$(PY) -m pytest
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(PY) benchmarks/capture_overhead.py

clean:
	rm -rf $(VENV) site build attnlens-demo .pytest_cache .ruff_cache .cache
