# k25: `make run` serves/demos the model, `make test` runs the whole suite. Both install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.k25-installed

.PHONY: install run test lint slow clean chromium k25-mini k25-mini-train

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

# Reproduce the shipped k25-mini from nothing (about 2 hours on 2 cores; the model card,
# src/k25/weights/k25-mini/README.md, records the run). Resumable: rerun after an interruption.
MINI_OUT := out/mini
MINI_TRAIN = $(sort $(wildcard $(MINI_OUT)/data/*/train.jsonl))
MINI_HELD = $(sort $(wildcard $(MINI_OUT)/data/*/heldout.jsonl))
k25-mini: install
	test -f $(MINI_OUT)/data/stats.json || $(BIN)/k25 data generate --out $(MINI_OUT)/data --seed 0 --n-per-family 2000
	test -f $(MINI_OUT)/tokenizer/tiktoken.model || { $(BIN)/k25 data text $(MINI_OUT)/data --out $(MINI_OUT)/corpus.txt && \
	  $(BIN)/k25 vocab train --corpus $(MINI_OUT)/corpus.txt --size 4096 --out $(MINI_OUT)/tokenizer; }
	$(MAKE) k25-mini-train

k25-mini-train:
	$(BIN)/k25 train pretrain $(MINI_TRAIN) --eval-data $(MINI_HELD) --model k25-mini --tokenizer $(MINI_OUT)/tokenizer \
	  --seq-len 1024 --batch-size 8 --steps 150 --lr 0.01 --warmup-steps 15 --eval-every 50 --eval-batches 4 \
	  --save-every 25 --out $(MINI_OUT)/pretrain
	$(BIN)/k25 train sft $(MINI_TRAIN) --eval-data $(MINI_HELD) --pack --model $(MINI_OUT)/pretrain/checkpoints/step-00000150 \
	  --seq-len 1024 --batch-size 8 --steps 250 --lr 0.005 --warmup-steps 15 --eval-every 50 --eval-batches 4 \
	  --save-every 25 --out $(MINI_OUT)/sft
	$(BIN)/k25 train sft $(MINI_TRAIN) --eval-data $(MINI_HELD) --pack --qat int4 \
	  --model $(MINI_OUT)/sft/checkpoints/step-00000250 --seq-len 1024 --batch-size 8 --steps 30 --lr 0.001 \
	  --warmup-steps 3 --eval-every 10 --eval-batches 4 --save-every 10 --out $(MINI_OUT)/qat
	test -f $(MINI_OUT)/k25-mini/config.json || $(BIN)/k25 quantize $(MINI_OUT)/qat/checkpoints/step-00000030 \
	  $(MINI_OUT)/k25-mini --dtype bfloat16

lint: install
	$(BIN)/ruff check src tests

test: install chromium lint
	$(BIN)/python -m pytest -q

slow: install
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
