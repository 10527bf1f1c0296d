# make demo: train a tiny TRM on the built-in corpus for a few minutes, generate, show kernel status.
# make test: the test suite, then the benchmarks as smoke tests (what CI runs).
# Both install what is missing first: torch (the CPU wheel unless one is installed), the test tools,
# Triton (on CPU its interpreter runs the kernel tests; 3.9+ there, as 3.6's breaks with numpy >= 2.4),
# and trm_fast itself in editable mode, which builds trm_fast._C.
PYTHON ?= python3
PIP = $(PYTHON) -m pip install -q --disable-pip-version-check

.PHONY: install test bench demo doctor

install:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) torch==2.13.0
	@$(PYTHON) -c "import ninja, numpy, pytest, pytest_benchmark" 2>/dev/null || $(PIP) ninja numpy pytest pytest-benchmark
	@$(PYTHON) -c "import triton" 2>/dev/null || $(PIP) "triton>=3.9"
	@$(PYTHON) -c "import sentencepiece" 2>/dev/null || $(PIP) sentencepiece
	$(PIP) -e . --no-build-isolation --no-deps

test: install
	$(PYTHON) -m pytest tests -q
	$(PYTHON) -m pytest benchmarks -q --benchmark-disable

bench: install
	$(PYTHON) -m pytest benchmarks --benchmark-only

demo: install
	$(PYTHON) -m trm_fast demo --seconds 180

doctor: install
	$(PYTHON) -m trm_fast doctor
