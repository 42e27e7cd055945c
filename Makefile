# Quick start: `make demo` and `make test`. Each bootstraps .venv (torch==2.13.0: the local CPU wheel on
# CPU machines, the same pin gives CUDA torch on a GPU machine) and installs the package editable.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.ipl-installed
EXT     := .venv/.ipl-ext-built
TORCH   := torch==2.13.0

.PHONY: demo bench-demo test test-fast bench compile-report clean

$(PY):
	python3 -m venv .venv
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) setup.py
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet setuptools wheel ninja
	IPL_NO_EXT=1 $(PIP) install --quiet --no-build-isolation -e ".[test,bench]"
	touch $(STAMP)

# ipl_layers._C, built in place next to the sources (where the editable install imports it from), and
# rebuilt when a C++ source changes (pip's editable reinstall would not rebuild it)
$(EXT): $(STAMP) $(wildcard csrc/cpu/*.cpp csrc/cpu/*.h csrc/common/*.h)
	$(PY) setup.py --quiet build_ext --inplace
	touch $(EXT)

# trains the tiny hybrid on the interpreter's stdlib bytes (runs/demo); run again, it resumes or re-evaluates
demo: $(EXT)
	$(PY) -m ipl_layers.models.train --config=demo --resume
	$(PY) -m ipl_layers.models.evaluate runs/demo

# the CPU op table with peers (T = 1024), the former `make demo`
bench-demo: $(EXT)
	$(PY) bench/run.py --demo

test: $(EXT)
	$(PY) -m pytest -q tests

test-fast: $(EXT)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(EXT)
	$(PY) bench/run.py

compile-report: $(EXT)
	$(PY) bench/compile_report.py

clean:
	rm -rf build *.egg-info ipl_layers/*.so
