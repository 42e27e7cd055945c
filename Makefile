# Quick start: `make demo` and `make test`. Each bootstraps .venv (torch==2.13.0: the local CPU wheel on
# CPU machines, the same pin gives CUDA torch on a GPU machine) and installs the package editable.
PY      := .venv/bin/python
PIP     := $(PY) -m pip
STAMP   := .venv/.ipl-installed
TORCH   := torch==2.13.0

.PHONY: demo test test-fast bench compile-report clean

$(PY):
	python3 -m venv .venv
	$(PIP) install --quiet --upgrade pip

# reinstalled (and ipl_layers._C rebuilt) when setup.py or a C++ source of the extension changes
$(STAMP): $(PY) setup.py $(wildcard csrc/cpu/*.cpp csrc/cpu/*.h csrc/common/*.h)
	$(PIP) install --quiet $(TORCH)
	$(PIP) install --quiet setuptools wheel ninja
	$(PIP) install --quiet --no-build-isolation -e ".[test,bench]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) bench/run.py --demo

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) bench/run.py

compile-report: $(STAMP)
	$(PY) bench/compile_report.py

clean:
	rm -rf build *.egg-info ipl_layers/*.so
