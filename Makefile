# Each target sets up what it needs; a second run skips what is already satisfied.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup sysdeps demo test test-fast lint bench clean

setup: sysdeps $(STAMP)

sysdeps:
	@scripts/sysdeps.sh

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# The main job: talk to the shipped model on a shipped recording; the TUI in a terminal (it quits
# when the recording ends), printed transcripts and stats otherwise. The reply lands in demo-reply.wav.
demo: setup
	$(BIN)/duplex talk --input duplex/assets/hello.wav --output demo-reply.wav --realtime --exit-at-end

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m 'not slow'

lint: setup
	$(BIN)/ruff check duplex tests benchmarks
	$(BIN)/ruff format --check duplex tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
