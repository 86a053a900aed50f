# selfsight: two commands that work on a fresh machine.
#   make demo   set up, then pre-train on Fashion-MNIST (SparK, no labels), compare with every baseline on 600 labels, write an HTML report
#   make test   set up, then run the test suite (~2-3 min on 2 cores)

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
# make demo DEMO_METHOD=simmim runs the earlier ViT demo; DEMO_STEPS=N changes the pre-training steps;
# DEMO_SEED=N repeats the whole demo with another seed (pre-training and label draws N, N+1, N+2)
DEMO_METHOD ?= spark
DEMO_STEPS ?=
DEMO_SEED ?= 0

.PHONY: setup data demo test lint clean

# torch/torchvision are pinned here (pip on Python 3.11 takes them from this machine's disk), not in pyproject
$(STAMP): pyproject.toml
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PIP) install --quiet -e ".[dev]"
	@touch $(STAMP)

setup: $(STAMP)

data:
	@if [ -f $(FMNIST)/train-images-idx3-ubyte.gz ]; then \
		echo "Fashion-MNIST found in $(FMNIST)"; \
	elif [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist', or point selfsight at"; \
		echo "your own images: .venv/bin/selfsight pretrain --data FOLDER ... (see README)"; exit 1; \
	fi

demo: setup data
	$(VENV)/bin/selfsight demo --out runs/demo --method $(DEMO_METHOD) --seed $(DEMO_SEED) $(if $(DEMO_STEPS),--steps $(DEMO_STEPS))

# the report test opens the HTML report in headless Chromium (Debian's chromium, installed here when missing)
test: setup
	@sh scripts/ensure_chromium.sh
	SELFSIGHT_REQUIRE_CHROMIUM=1 $(VENV)/bin/python -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs .pytest_cache
