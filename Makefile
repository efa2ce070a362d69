# `make run` and `make test` each work on a fresh clone with nothing installed:
# they create .venv with pip, install the project (compiling its cffi extensions)
# with its test, bench and plot extras, then act.
#   make run        every available backend at a fixed rate and at saturation: table + PNG
#   make test       the whole test suite (what CI runs)
#   make paper      paper/paper.md and its figures from the pinned results
#   make reproduce  every experiment the paper cites (standard preset), then the paper
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SOURCES := pyproject.toml setup.py $(wildcard backends/*.c backends/*.h backends/*_build.py backends/uring/*.c backends/uring/*.h backends/uring/build.py experiments/loadgen/*.c experiments/loadgen/*_build.py experiments/machine/*.c experiments/machine/build.py)

.PHONY: run test install clean paper reproduce

$(STAMP): $(SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,bench,plot]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/parallelnet compare

# The suite in two passes: everything but the `serial` tests in parallel (pytest-xdist,
# three workers per CPU, at most six: most tests wait on servers and deadlines), then the
# serial ones alone (tests/conftest.py SERIAL_MODULES: checks that depend on timing).
JOBS ?= $(shell $(PYTHON) -c "import os; print(min(6, 3 * len(os.sched_getaffinity(0))))")

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(JOBS) -m "not serial"
	$(BIN)/python -m pytest -q -m serial

paper: $(STAMP)
	$(BIN)/python paper/build.py

reproduce: $(STAMP)
	$(BIN)/parallelnet reproduce --preset standard

clean:
	rm -rf $(VENV) build *.egg-info
