# Carousel: the two commands of the README, and what they need.
#   make demo   set up everything, prepare the KJV Bible, train jobs/lm-kjv-small.yaml on 2 Ray workers
#   make test   set up everything, run the whole test suite
# Set-up is idempotent: Debian packages are installed only when missing, the venv only when
# pyproject.toml or constraints.txt changed.

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.carousel-installed
# bible-kjv: the text corpus; flite, espeak-ng: speech synthesis; pocketsphinx-testdata: real LibriVox
# clips; libsndfile1: audio I/O; libaio-dev: lets DeepSpeed's op probe link; chromium(-driver): UI tests;
# postgresql: the throwaway server of the MLflow-on-PostgreSQL test.
DEBIAN_PACKAGES := bible-kjv libaio-dev flite espeak-ng pocketsphinx-testdata libsndfile1 chromium chromium-driver postgresql
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

DEMO_DATA := data/kjv-bpe
DEMO_JOB  := jobs/lm-kjv-small.yaml

.PHONY: setup system-packages python-packages demo test test-unit bench clean
.DEFAULT_GOAL := help

help:
	@echo "make demo   # set up, prepare KJV shards, train the demo LM (about 10 minutes)"
	@echo "make test   # set up, run the whole suite"
	@echo "make bench  # set up, run the side-by-side benchmarks (ONLY=kernel,data,... picks rows)"

setup: system-packages python-packages

system-packages:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi

python-packages: $(STAMP)

# torch is pinned to the CPU build on this machine's disk (pyproject); constraints.txt pins
# everything else to the versions the suite was run with.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[test,postgres]'
	@touch $@

$(DEMO_DATA)/manifest.json: | setup
	$(BIN)/carousel prepare text --kjv --out $(DEMO_DATA) --tokenizer bpe --vocab-size 4000

demo: setup $(DEMO_DATA)/manifest.json
	$(BIN)/carousel train $(DEMO_JOB)
	@echo
	@echo "See every run, metric and model in the MLflow UI:  $(BIN)/carousel ui   ->  http://127.0.0.1:5000"

test: setup
	$(BIN)/python -m pytest

test-unit: setup
	$(BIN)/python -m pytest tests/unit

# make bench [ONLY=kernel,data] [BENCH_ARGS="--rounds 3"]: the table is printed, bench-results/results.json
# written (rows not run keep their last figures). py-spy is for benchmarks/profile_step.py.
bench: setup
	@[ -x $(BIN)/py-spy ] || $(BIN)/pip install -q -c constraints.txt -e '.[bench]'
	$(BIN)/python benchmarks/run.py $(if $(ONLY),--only $(ONLY)) $(BENCH_ARGS)

clean:
	rm -rf runs mlflow.db mlartifacts bench-results
