# k25: `make run` serves/demos the model, `make test` runs the whole suite. Both install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.k25-installed

.PHONY: install run test lint slow clean chromium

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU wheel of torch first: anything else lets pip pick a CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

# Debian's chromium for the playground test (playwright drives it; it never downloads a browser).
chromium:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "warning: could not install chromium; the playground test will be skipped (it says why)"

# Serve a model behind the OpenAI-compatible API and the playground (http://127.0.0.1:8000/): the
# built-in k25-mini (src/k25/weights/k25-mini, served as "k25-mini"). On a checkout where its weights
# have not been generated yet, a random `tiny` checkpoint (official layout, byte-level tokenizer)
# stands in, with a warning: the whole stack works, the words are noise. PORT=... to change the port.
PORT ?= 8000
MINI := src/k25/weights/k25-mini
run: install
	$(BIN)/k25 info kimi-k2.5
	@if [ -f $(MINI)/config.json ]; then \
	  $(BIN)/k25 serve --port $(PORT); \
	else \
	  echo "warning: no k25-mini weights at $(MINI); serving a random tiny checkpoint instead (the words are noise)"; \
	  { test -f out/tiny-random/tiktoken.model || $(BIN)/k25 init tiny out/tiny-random; } && \
	  $(BIN)/k25 serve out/tiny-random --port $(PORT) --served-model-name k25-tiny-random; \
	fi

lint: install
	$(BIN)/ruff check src tests

test: install chromium lint
	$(BIN)/python -m pytest -q

slow: install
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
