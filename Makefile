# Two commands that work on a fresh machine: `make test` and `make demo`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXT_SOURCES := $(wildcard cuda_ext/*)

.PHONY: test demo install ext clean gpu-check

$(STAMP): requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q -r requirements.txt
	touch $(STAMP)

# Builds autofpn._C in place (CPU kernel always, CUDA when nvcc and CUDA_HOME are found);
# AUTOFPN_NO_EXT=1 skips it and the pure PyTorch reference is used. Rebuilt (from scratch, ~2 min
# with CUDA on 2 cores) only when setup.py or cuda_ext/ change: the stamp records the last build.
EXT_STAMP := $(VENV)/.ext-built
$(EXT_STAMP): $(STAMP) setup.py $(EXT_SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(EXT_STAMP)

ext: $(EXT_STAMP)

install: ext

# a passing test's tmp_path is deleted as soon as it ends: a full run writes ~10 GB of checkpoints
# that would otherwise stay in /tmp (3 runs' worth by pytest's default) and fill a shared disk;
# the 15 slowest tests are listed at the end: the suite should stay near 15 minutes on 2 cores.
# pytest-xdist runs the test files in TEST_WORKERS processes of one thread each, a file's tests in
# one of them (its module fixtures built once). On a 2-core machine: 14 min 9 s, against 22 min
# 26 s in one process of two threads and 22 min 58 s for two processes of two threads each
# (oversubscribed OpenMP threads spin); tests that need two threads set them themselves
TEST_WORKERS ?= 2
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -o tmp_path_retention_policy=failed \
		--durations=15 tests

demo: install
	$(PY) -m autofpn.demo --out out/demo

# On a machine with a CUDA GPU: the CUDA tests, time per step and peak GPU memory (float32 and
# search.amp), a short search and training on the device (bench/gpu_check.py)
gpu-check: install
	$(PY) bench/gpu_check.py

clean:
	rm -rf build autofpn/_C*.so *.egg-info $(EXT_STAMP)
