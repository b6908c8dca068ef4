# Two commands do everything on a fresh machine: `make book` and `make test`. Both create .venv first.
PYTHON_BASE ?= python3
VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
SRC_HASH := _build/.src-hash
NBVAL := --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

.PHONY: book test pdf portability outputs lab clean

$(INSTALLED): pyproject.toml
	$(PYTHON_BASE) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[test,book]"
	touch $(INSTALLED)

# jupyter-cache keys a notebook on its code cells only, so an edit to revlib, or another REVLIB_SEED,
# REVLIB_SCALE, REVLIB_DATA or REVLIB_DEVICE, would not re-run the chapters: the cache is dropped whenever
# the library's source or those settings change.
book: $(INSTALLED)
	@mkdir -p _build
	@new=$$( (find src -name '*.py' | sort | xargs cat; env | grep '^REVLIB_' | sort) | sha256sum | cut -c1-16); \
	if [ "$$new" != "$$(cat $(SRC_HASH) 2>/dev/null)" ]; then rm -rf _build/.jupyter_cache; echo "$$new" > $(SRC_HASH); fi
	$(VENV)/bin/jupyter-book build . -W -n --keep-going
	@echo "The book is in _build/html/index.html"

# The built book printed to one PDF by headless Chromium (needs Chromium: apt-get install chromium).
pdf: book
	$(PYTHON) tools/print_book.py
	@echo "The printable book is _build/pdf/book.pdf"

# Unit tests in two workers; then the chapters two at a time (each notebook whole in one worker), each kernel
# on one thread (two kernels of two threads each would oversubscribe two cores and run many times slower),
# under another machine's kernels: torch's generic ones. nbval compares only outputs that do not depend on
# the kernels or the thread count, so one pass checks the stored outputs and that every assertion holds on
# a machine other than the one that stored them (book/reproducibility.md; `make portability` runs the whole
# matrix of kernels and seeds).
test: $(INSTALLED)
	$(PYTHON) -m pytest tests -n 2 -p no:cacheprovider
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 ATEN_CPU_CAPABILITY=$(CI_KERNELS) \
		$(PYTHON) -m pytest chapters $(NBVAL) -n 2 --dist loadfile -p no:cacheprovider

CI_KERNELS ?= default

# The whole portability matrix: every chapter under four kernel variants and seeds 0-2 (about five hours on
# two cores). Its report is the table in the book's Reproducibility appendix.
portability: $(INSTALLED)
	rm -f _build/portability-runs.jsonl; mkdir -p _build
	$(PYTHON) tools/portability.py --results _build/portability-runs.jsonl --report book/portability-report.md

# Re-execute every chapter (default kernels, seed 0) and store its outputs, which nbval compares.
outputs: $(INSTALLED)
	$(PYTHON) tools/portability.py --store

lab: $(INSTALLED)
	$(PYTHON) -m pip install --quiet jupyterlab
	$(VENV)/bin/jupyter lab chapters

clean:
	rm -rf _build
