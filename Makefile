# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell sha256sum requirements.lock pyproject.toml | sha256sum | cut -c1-12)

.PHONY: venv demo test test-fast lint browser-deps docker-smoke clean

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Every package pinned; torch==2.13.0 is the CPU build (no torchvision, no timm).
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-* && touch $(STAMP)

venv: $(STAMP)

## Train a small model on the embedded sample (data/), evaluate it, print where the report and bundle are.
demo: venv
	$(PY) -m pipelines.cli run --config configs/demo.yaml

## The whole test suite (what .ci/run calls): installs Chromium for the browser test if it is missing.
test: venv browser-deps
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not browser and not slow"

lint: venv
	$(VENV)/bin/ruff check app pipelines models tests benchmarks

browser-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian chromium for the browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	  || echo "WARNING: could not install chromium; the browser test will fail"; }

## Build the container from a locally built base image and check it serves and predicts (needs a Docker engine).
docker-smoke:
	bash scripts/docker_smoke.sh

clean:
	rm -rf runs .pytest_cache
