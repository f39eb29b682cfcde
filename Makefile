# The two commands of the README:  make demo   and   make test
# Both create .venv, install the pinned project, and use ../shared/data when it exists.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)/fashion-mnist),)
export MMKD_DATA ?= $(SHARED_DATA)
endif

.PHONY: install demo test test-fast bench-kd clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install  ## quick start: teacher, student alone, student + KD on Fashion-MNIST
	$(PY) tools/quickstart.py

test: install  ## the whole test suite, slow end-to-end tests included (what CI runs)
	$(PY) -m pytest -m "slow or not slow"

test-fast: install  ## the default pytest run (slow tests skipped)
	$(PY) -m pytest

bench-kd: install  ## KD, DKD, FitNets, AT, RKD vs student alone, 2 seeds -> bench/kd_fmnist.json
	$(PY) tools/bench_kd.py --methods kd dkd fitnets at rkd

clean:
	rm -rf runs .pytest_cache
