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

# Reproduce the shipped k25-mini from nothing (run 2; the model card, src/k25/weights/k25-mini/README.md,
# records every phase with its time and figures). Resumable: rerun after an interruption.
MINI_OUT := out/mini
MINI_FAMILIES := arith_think,arith_instant,tool_calc,tool_python,tool_search,agent,swarm,swarm_sub,text,simple_text
# The rebalanced SFT mixture (phases 4 and 6): the first N training records of each family.
MINI_MIX := tool_calc:2000 tool_search:2000 arith_think:1000 arith_instant:1000 tool_python:600 agent:300 \
  swarm:200 swarm_sub:300 simple_text:300 text:200
MINI_TRAIN = $(sort $(wildcard $(MINI_OUT)/data/*/train.jsonl))
MINI_HELD = $(sort $(wildcard $(MINI_OUT)/data/*/heldout.jsonl))
MINI_COMMON := --seq-len 1024 --weight-decay 0.1 --qk-clip-tau 100 --no-progress
K25 := $(BIN)/k25
k25-mini: install
	test -f $(MINI_OUT)/data/stats.json || $(K25) data generate --out $(MINI_OUT)/data --seed 0 --n-per-family 2000 \
	  --families $(MINI_FAMILIES)
	test -f $(MINI_OUT)/cdata/stats.json || $(K25) data generate --out $(MINI_OUT)/cdata --families copy --seed 0 \
	  --n-per-family 6000
	test -f $(MINI_OUT)/tokenizer/tiktoken.model || { $(K25) data text $(MINI_OUT)/data --out $(MINI_OUT)/corpus.txt && \
	  $(K25) vocab train --corpus $(MINI_OUT)/corpus.txt --size 4096 --out $(MINI_OUT)/tokenizer; }
	mkdir -p $(MINI_OUT)/mix $(MINI_OUT)/warmup
	for spec in $(MINI_MIX); do f=$${spec%%:*}; n=$${spec##*:}; \
	  head -n $$n $(MINI_OUT)/data/$$f/train.jsonl > $(MINI_OUT)/mix/$$f.jsonl; done
	$(BIN)/python recipes/k25_mini_copy_warmup.py $(MINI_OUT)/corpus.txt $(MINI_OUT)/warmup/copydata.jsonl
	$(MAKE) k25-mini-train

M := $(MINI_OUT)
k25-mini-train:
	# 1. pretraining on the whole curriculum, from random init
	$(K25) train pretrain $(MINI_TRAIN) --eval-data $(MINI_HELD) --model k25-mini --tokenizer $(M)/tokenizer $(MINI_COMMON) \
	  --batch-size 8 --steps 150 --lr 0.01 --warmup-steps 15 --ns-dtype bfloat16 --eval-every 50 --eval-batches 4 \
	  --save-every 25 --out $(M)/pretrain
	# 2. SFT on the whole curriculum
	$(K25) train sft $(MINI_TRAIN) --eval-data $(MINI_HELD) --pack --model $(M)/pretrain/checkpoints/step-00000150 \
	  $(MINI_COMMON) --batch-size 8 --steps 250 --lr 0.005 --warmup-steps 15 --ns-dtype bfloat16 --eval-every 50 \
	  --eval-batches 4 --save-every 25 --out $(M)/sft
	# 3. SFT on tool arithmetic, arithmetic and search (5% split off for evaluation)
	$(K25) train sft $(M)/data/tool_calc/train.jsonl $(M)/data/arith_instant/train.jsonl \
	  $(M)/data/arith_think/train.jsonl $(M)/data/tool_search/train.jsonl --pack \
	  --model $(M)/sft/checkpoints/step-00000250 $(MINI_COMMON) --batch-size 8 --steps 90 --lr 0.005 --warmup-steps 5 \
	  --ns-dtype bfloat16 --eval-every 0 --save-every 30 --out $(M)/focus
	# 4. SFT on the rebalanced mixture (an 800-step WSD schedule, stopped at step 400)
	$(K25) train sft $(sort $(wildcard $(M)/mix/*.jsonl)) --eval-data $(M)/data/tool_calc/heldout.jsonl \
	  $(M)/data/tool_search/heldout.jsonl $(M)/data/arith_think/heldout.jsonl --pack \
	  --model $(M)/focus/checkpoints/step-00000090 $(MINI_COMMON) --batch-size 4 --steps 800 --stop-after 400 \
	  --lr 0.005 --warmup-steps 20 --schedule wsd --decay-fraction 0.2 --ns-dtype float32 --eval-every 100 \
	  --eval-batches 4 --save-every 50 --out $(M)/sftmix
	# 5. the copy warm-up, in two runs (120 + 200 steps, Instant)
	$(K25) train sft $(M)/warmup/copydata.jsonl --pack --instant --model $(M)/sftmix/checkpoints/step-00000400 \
	  --seq-len 512 --batch-size 8 --steps 120 --ns-dtype float32 --lr 0.003 --warmup-steps 5 --schedule constant --eval-every 0 \
	  --save-every 40 --out $(M)/warmup/copyrun --no-progress
	$(K25) train sft $(M)/warmup/copydata.jsonl --pack --instant --model $(M)/warmup/copyrun/checkpoints/step-00000120 \
	  --seq-len 512 --batch-size 8 --steps 200 --ns-dtype float32 --lr 0.003 --warmup-steps 2 --schedule constant --eval-every 0 \
	  --save-every 25 --seed 1 --out $(M)/warmup/copyrun2 --no-progress
	# 6. SFT on the rebalanced mixture + the copy family
	$(K25) train sft $(sort $(wildcard $(M)/mix/*.jsonl)) $(M)/cdata/copy/train.jsonl \
	  --eval-data $(M)/data/tool_calc/heldout.jsonl $(M)/data/tool_search/heldout.jsonl $(M)/cdata/copy/heldout.jsonl \
	  --pack --model $(M)/warmup/copyrun2/checkpoints/step-00000200 $(MINI_COMMON) --batch-size 4 --steps 300 --ns-dtype float32 \
	  --lr 0.003 --warmup-steps 10 --schedule wsd --decay-fraction 0.2 --eval-every 100 --eval-batches 4 \
	  --save-every 50 --out $(M)/final
	# 7. quantization-aware training (fake INT4 on the routed experts), then the INT4 export
	$(K25) train sft $(sort $(wildcard $(M)/mix/*.jsonl)) $(M)/cdata/copy/train.jsonl \
	  --eval-data $(M)/data/tool_calc/heldout.jsonl $(M)/data/tool_search/heldout.jsonl --pack --qat int4 \
	  --model $(M)/final/checkpoints/step-00000300 $(MINI_COMMON) --batch-size 4 --steps 30 --ns-dtype float32 --lr 0.0005 \
	  --warmup-steps 3 --eval-every 10 --eval-batches 4 --save-every 10 --out $(M)/fqat
	test -f $(M)/k25-mini/config.json || $(K25) quantize $(M)/fqat/checkpoints/step-00000030 $(M)/k25-mini \
	  --dtype bfloat16

lint: install
	$(BIN)/ruff check src tests

test: install chromium lint
	$(BIN)/python -m pytest -q

slow: install
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
