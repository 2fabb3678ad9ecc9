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

# Reproduce the shipped k25-mini from nothing (run 14: copying, pretraining, a tower aligned to the pretrained embeddings,
# then SFT with the pictures mixed in from its first step, QAT and run 6's export; then SFT with the swarm's batch form,
# QAT and run 7's export; then three more SFT + QAT rounds (runs 9, 10 and 14) with data about towns with new names, the
# last export, $(R)/k25-mini14, is the one that ships; ~5 h 5 min alone; the model card,
# src/k25/weights/k25-mini/README.md, records every phase with its time and figures; docs/k25-mini.md has the
# earlier runs). Resumable: rerun after an interruption. (The phases that changed since run 3d write to new
# directories, e.g. $(R)/esft, so a checkout that ran an earlier recipe does not resume the wrong run.)
MINI_OUT := out/mini
MINI_FAMILIES := arith_think,arith_instant,tool_calc,tool_python,tool_search,agent,swarm,swarm_sub,text,simple_text
# The SFT mixture: the first N training records of each family (+ the copy family; + copy_quoted in 4c).
MINI_MIX := tool_calc:2000 tool_search:2000 arith_think:1000 arith_instant:1000 tool_python:600 agent:800 \
  swarm:400 swarm_sub:500 simple_text:300 text:200
MINI_COMMON := --weight-decay 0.1 --qk-clip-tau 100 --no-progress
K25 := $(BIN)/k25
k25-mini: install
	test -f $(MINI_OUT)/data/stats.json || $(K25) data generate --out $(MINI_OUT)/data --seed 0 --n-per-family 2000 \
	  --families $(MINI_FAMILIES)
	test -f $(R)/cdata/stats.json || $(K25) data generate --out $(R)/cdata --families copy --seed 0 \
	  --n-per-family 6000
	test -f $(R)/qdata/stats.json || $(K25) data generate --out $(R)/qdata --families copy_quoted --seed 0 \
	  --n-per-family 3000
	test -f $(R)/vdata/stats.json || $(K25) data generate --out $(R)/vdata --families vision --seed 4 \
	  --n-per-family 10000 --n-heldout 200
	head -n 3000 $(R)/vdata/vision_read/train.jsonl > $(R)/vdata/vision_read/early3000.jsonl
	head -n 2000 $(R)/vdata/vision_count/train.jsonl > $(R)/vdata/vision_count/early2000.jsonl
	head -n 600 $(R)/vdata/vision_chart/train.jsonl > $(R)/vdata/vision_chart/early600.jsonl
	test -f $(R)/bdata/stats.json || $(K25) data generate --out $(R)/bdata --families swarm_batch,swarm_batch_sub \
	  --seed 0 --n-per-family 2000
	head -n 2000 $(R)/bdata/swarm_batch_sub/train.jsonl > $(R)/bdata/swarm_batch_sub/first2000.jsonl
	test -f $(MINI_OUT)/tokenizer/tiktoken.model || { $(K25) data text $(MINI_OUT)/data --out $(MINI_OUT)/corpus.txt && \
	  $(K25) vocab train --corpus $(MINI_OUT)/corpus.txt --size 4096 --out $(MINI_OUT)/tokenizer; }
	mkdir -p $(R)/mix
	for spec in $(MINI_MIX); do f=$${spec%%:*}; n=$${spec##*:}; \
	  head -n $$n $(MINI_OUT)/data/$$f/train.jsonl > $(R)/mix/$$f.jsonl; done
	$(MAKE) k25-mini-train

M := $(MINI_OUT)
R := $(MINI_OUT)/r3
MINI_SFT = $(sort $(wildcard $(R)/mix/*.jsonl)) $(R)/cdata/copy/train.jsonl
MINI_EVAL := $(M)/data/tool_calc/heldout.jsonl $(M)/data/tool_search/heldout.jsonl
# the pictures, mixed into every SFT phase at ~10% of the tokens (K2.5's early fusion): reading 3,000,
# counting 2,000, charts 600 (their tower is not aligned; see the card)
MINI_VISION := $(R)/vdata/vision_read/early3000.jsonl $(R)/vdata/vision_count/early2000.jsonl \
  $(R)/vdata/vision_chart/early600.jsonl
MINI_VEVAL := $(R)/vdata/vision_read/heldout.jsonl $(R)/vdata/vision_count/heldout.jsonl
# the SFT phases from 3 on: the pictures + the text mixture (+ copy_quoted from 4c), and their held-out files
MINI_EF_SFT = $(K25) train sft $(MINI_VISION) $(MINI_SFT)
MINI_EF_EVAL = --eval-data $(MINI_EVAL) $(MINI_VEVAL) $(R)/cdata/copy/heldout.jsonl --pack
# phases 6-7 (run 7): the swarm's batch form replaces the assign_task traces and their sub-agents; 1,536-token rows,
# since half the batch traces are longer than 1,024 tokens
MINI_B_SFT = $(K25) train sft $(MINI_VISION) $(filter-out $(R)/mix/swarm.jsonl $(R)/mix/swarm_sub.jsonl,$(MINI_SFT)) \
  $(R)/qdata/copy_quoted/train.jsonl $(R)/bdata/swarm_batch/train.jsonl $(R)/bdata/swarm_batch_sub/first2000.jsonl
# phases 8-9 (run 9): replay-heavier, less swarm (1,200 batch traces and sub-agents), Python and search doubled,
# the agent tasks under `k25 agent --docs`'s tools, and the extra search/agent records about towns with new names
# (seeds 1 and 2, dropping any that name a town of the seed-0 corpus the evaluation uses)
D := $(R)/ddata
MINI_N_SFT = $(K25) train sft $(MINI_VISION) $(filter-out $(R)/mix/swarm.jsonl $(R)/mix/swarm_sub.jsonl,$(MINI_SFT)) \
  $(R)/qdata/copy_quoted/train.jsonl $(R)/bdata/swarm_batch/first1200.jsonl $(R)/bdata/swarm_batch_sub/first1200.jsonl \
  $(R)/ndata1/tool_search/train.jsonl $(R)/ndata2/tool_search/train.jsonl $(D)/tool_python/second1000.jsonl \
  $(R)/ndata1/agent_docs/train.jsonl $(R)/ndata2/agent_docs/train.jsonl
# phases 10-11 (run 10): run 9's mixture + the swarm's batch form about towns with new names (seeds 1, 2: all the
# traces, 800 sub-agents each) + the calculator tasks under plain `k25 agent`'s tools (tool_calc_agent, 1,500)
MINI_W_SFT = $(MINI_N_SFT) $(R)/sdata1/swarm_batch/train.jsonl $(R)/sdata2/swarm_batch/train.jsonl \
  $(R)/sdata1/swarm_batch_sub/first800.jsonl $(R)/sdata2/swarm_batch_sub/first800.jsonl \
  $(R)/edata/tool_calc_agent/first1500.jsonl
# phases 12-13 (run 14): run 10's mixture + the search that names its hits' towns before using them
# (tool_search_check about towns with new names, seeds 1, 2) + 3,000 more reading pictures (the next ones drawn)
MINI_K_SFT = $(MINI_W_SFT) $(R)/kdata1c/tool_search_check/train.jsonl $(R)/kdata2c/tool_search_check/train.jsonl \
  $(R)/vdata/vision_read/next3000.jsonl
k25-mini-train:
	# 1. copying first, from random init: the copy family only, 300 steps, then 150 more (a second run)
	$(K25) train sft $(R)/cdata/copy/train.jsonl --eval-data $(R)/cdata/copy/heldout.jsonl --pack --model k25-mini \
	  --tokenizer $(M)/tokenizer $(MINI_COMMON) --seq-len 512 --batch-size 8 --steps 300 --lr 0.005 --warmup-steps 20 \
	  --schedule constant --eval-every 100 --eval-batches 4 --save-every 25 --out $(R)/copy
	$(K25) train sft $(R)/cdata/copy/train.jsonl --eval-data $(R)/cdata/copy/heldout.jsonl --pack \
	  --model $(R)/copy/checkpoints/step-00000300 $(MINI_COMMON) --seq-len 512 --batch-size 8 --steps 150 --lr 0.005 \
	  --warmup-steps 2 --seed 1 --schedule constant --eval-every 100 --eval-batches 4 --save-every 25 --out $(R)/copy2
	# 2. pretraining (every token a target) on the mixture + copy
	$(K25) train pretrain $(MINI_SFT) --eval-data $(MINI_EVAL) --model $(R)/copy2/checkpoints/step-00000150 $(MINI_COMMON) \
	  --seq-len 1024 --batch-size 8 --steps 60 --lr 0.005 --warmup-steps 5 --eval-every 30 --eval-batches 4 \
	  --save-every 20 --out $(R)/pretrain
	# 2b. vision, early: a new tower + projector trained alone to put on each LM position the pretrained model's
	#     token embedding of what it shows (reading, counting); the language model is frozen here
	test -f $(R)/ealigned/config.json || $(K25) train vision-align --model $(R)/pretrain/checkpoints/step-00000060 \
	  --out $(R)/ealigned --families read,count --steps 1500 --heldout $(MINI_VEVAL)
	# 3. SFT on the mixture + copy + the pictures at ~10% of the tokens, tower trained with the rest (WSD)
	$(MINI_EF_SFT) $(MINI_EF_EVAL) \
	  --model $(R)/ealigned $(MINI_COMMON) --seq-len 1024 --batch-size 4 --steps 700 --lr 0.004 --vision-lr 0.001 \
	  --warmup-steps 10 --schedule wsd --decay-fraction 0.2 --eval-every 100 --eval-batches 4 --save-every 50 --out $(R)/esft
	# 4a/4b. SFT continued at a low rate: 150 steps (cosine from 0.001, seed 1), then 400 more (seed 2)
	$(MINI_EF_SFT) $(MINI_EF_EVAL) \
	  --model $(R)/esft/checkpoints/step-00000700 $(MINI_COMMON) --seq-len 1024 --batch-size 4 --steps 150 --lr 0.001 \
	  --vision-lr 0.0003 --warmup-steps 5 --schedule cosine --seed 1 --eval-every 50 --eval-batches 4 --save-every 50 \
	  --out $(R)/esft2
	$(MINI_EF_SFT) $(MINI_EF_EVAL) \
	  --model $(R)/esft2/checkpoints/step-00000150 $(MINI_COMMON) --seq-len 1024 --batch-size 4 --steps 400 --lr 0.001 \
	  --vision-lr 0.0003 --warmup-steps 10 --schedule cosine --seed 2 --eval-every 100 --eval-batches 4 --save-every 100 \
	  --out $(R)/esft3
	# 4c. 300 more with copy_quoted added (copying into a tool call's quotes; cosine from 0.001, seed 3)
	$(MINI_EF_SFT) $(R)/qdata/copy_quoted/train.jsonl $(MINI_EF_EVAL) --model $(R)/esft3/checkpoints/step-00000400 \
	  $(MINI_COMMON) --seq-len 1024 --batch-size 4 --steps 300 --lr 0.001 --vision-lr 0.0003 --warmup-steps 10 \
	  --schedule cosine --seed 3 --eval-every 100 --eval-batches 4 --save-every 100 --out $(R)/esft4
	# 5. quantization-aware training (fake INT4 on the routed experts), then the INT4 export
	$(MINI_EF_SFT) $(R)/qdata/copy_quoted/train.jsonl --eval-data $(MINI_EVAL) --pack \
	  --qat int4 --model $(R)/esft4/checkpoints/step-00000300 $(MINI_COMMON) --seq-len 1024 --batch-size 4 --steps 30 \
	  --lr 0.0005 --vision-lr 0.0003 --warmup-steps 3 --eval-every 10 --eval-batches 4 --save-every 10 --out $(R)/qat6
	test -f $(R)/k25-mini/config.json || $(K25) quantize $(R)/qat6/checkpoints/step-00000030 $(R)/k25-mini \
	  --dtype bfloat16
	# 6. run 7: SFT from run 6's INT4 export (experts dequantized) with the swarm's batch form (400 steps, cosine
	#    from 0.001, seed 6), then 7. QAT again and its INT4 export
	$(MINI_B_SFT) --eval-data $(MINI_EVAL) $(MINI_VEVAL) $(R)/cdata/copy/heldout.jsonl $(R)/bdata/swarm_batch/heldout.jsonl \
	  --pack --model $(R)/k25-mini $(MINI_COMMON) --seq-len 1536 --batch-size 3 --steps 400 --lr 0.001 --vision-lr 0.0003 \
	  --warmup-steps 10 --schedule cosine --seed 6 --eval-every 100 --eval-batches 4 --save-every 50 --out $(R)/bsft
	$(MINI_B_SFT) --eval-data $(MINI_EVAL) $(R)/bdata/swarm_batch/heldout.jsonl --pack --qat int4 \
	  --model $(R)/bsft/checkpoints/step-00000400 $(MINI_COMMON) --seq-len 1536 --batch-size 3 --steps 30 --lr 0.0005 \
	  --vision-lr 0.0003 --warmup-steps 3 --eval-every 10 --eval-batches 4 --save-every 10 --out $(R)/qat7
	test -f $(R)/k25-mini7/config.json || $(K25) quantize $(R)/qat7/checkpoints/step-00000030 $(R)/k25-mini7 \
	  --dtype bfloat16
	# 8. run 9: SFT from run 7's INT4 export on the rebalanced mixture (300 steps, cosine from 0.0007, seed 8), then
	#    9. QAT again and its INT4 export
	test -f $(D)/stats.json || $(K25) data generate --out $(D) --seed 0 --n-per-family 4000 \
	  --families agent_docs,tool_search,tool_python
	tail -n 2000 $(D)/tool_python/train.jsonl | head -n 1000 > $(D)/tool_python/second1000.jsonl
	head -n 1200 $(R)/bdata/swarm_batch/train.jsonl > $(R)/bdata/swarm_batch/first1200.jsonl
	head -n 1200 $(R)/bdata/swarm_batch_sub/train.jsonl > $(R)/bdata/swarm_batch_sub/first1200.jsonl
	for s in 1 2; do test -f $(R)/ndata$$s/stats.json || $(K25) data generate --out $(R)/ndata$$s --seed $$s \
	  --n-per-family 1000 --n-heldout 0 --families tool_search,agent_docs --avoid-names-of $(M)/data; done
	$(MINI_N_SFT) --eval-data $(MINI_EVAL) $(R)/vdata/vision_read/heldout.jsonl $(R)/cdata/copy/heldout.jsonl \
	  $(R)/bdata/swarm_batch/heldout.jsonl $(D)/agent_docs/heldout.jsonl --pack --model $(R)/k25-mini7 $(MINI_COMMON) \
	  --seq-len 1536 --batch-size 3 --steps 300 --lr 0.0007 --vision-lr 0.0003 --warmup-steps 10 --schedule cosine \
	  --seed 8 --eval-every 100 --eval-batches 4 --save-every 50 --out $(R)/nsft
	$(MINI_N_SFT) --eval-data $(MINI_EVAL) $(R)/bdata/swarm_batch/heldout.jsonl --pack --qat int4 \
	  --model $(R)/nsft/checkpoints/step-00000300 $(MINI_COMMON) --seq-len 1536 --batch-size 3 --steps 30 --lr 0.0005 \
	  --vision-lr 0.0003 --warmup-steps 3 --eval-every 10 --eval-batches 4 --save-every 10 --out $(R)/qat9
	test -f $(R)/k25-mini9/config.json || $(K25) quantize $(R)/qat9/checkpoints/step-00000030 $(R)/k25-mini9 \
	  --dtype bfloat16
	# 10. run 10: SFT from run 9's INT4 export with the new-name swarm traces and tool_calc_agent added (300 steps,
	#     cosine from 0.0007, seed 10), then 11. QAT again and its INT4 export
	test -f $(R)/edata/stats.json || $(K25) data generate --out $(R)/edata --seed 0 --n-per-family 2000 \
	  --families tool_calc_agent
	head -n 1500 $(R)/edata/tool_calc_agent/train.jsonl > $(R)/edata/tool_calc_agent/first1500.jsonl
	for s in 1 2; do test -f $(R)/sdata$$s/stats.json || $(K25) data generate --out $(R)/sdata$$s --seed $$s \
	  --n-per-family 1000 --n-heldout 0 --families swarm_batch,swarm_batch_sub --avoid-names-of $(M)/data; \
	  head -n 800 $(R)/sdata$$s/swarm_batch_sub/train.jsonl > $(R)/sdata$$s/swarm_batch_sub/first800.jsonl; done
	$(MINI_W_SFT) --eval-data $(MINI_EVAL) $(R)/vdata/vision_read/heldout.jsonl $(R)/cdata/copy/heldout.jsonl \
	  $(R)/bdata/swarm_batch/heldout.jsonl $(D)/agent_docs/heldout.jsonl $(R)/edata/tool_calc_agent/heldout.jsonl \
	  --pack --model $(R)/k25-mini9 $(MINI_COMMON) --seq-len 1536 --batch-size 3 --steps 300 --lr 0.0007 \
	  --vision-lr 0.0003 --warmup-steps 10 --schedule cosine --seed 10 --eval-every 100 --eval-batches 4 \
	  --save-every 50 --out $(R)/wsft
	$(MINI_W_SFT) --eval-data $(MINI_EVAL) $(R)/bdata/swarm_batch/heldout.jsonl --pack --qat int4 \
	  --model $(R)/wsft/checkpoints/step-00000300 $(MINI_COMMON) --seq-len 1536 --batch-size 3 --steps 30 --lr 0.0005 \
	  --vision-lr 0.0003 --warmup-steps 3 --eval-every 10 --eval-batches 4 --save-every 10 --out $(R)/qat10
	test -f $(R)/k25-mini10/config.json || $(K25) quantize $(R)/qat10/checkpoints/step-00000030 $(R)/k25-mini10 \
	  --dtype bfloat16
	# 12. run 14: SFT from run 10's INT4 export with tool_search_check and more reading pictures added (300 steps,
	#     cosine from 0.0007, seed 14), then 13. QAT again and the INT4 export that ships
	for s in 1 2; do test -f $(R)/kdata$${s}c/stats.json || $(K25) data generate --out $(R)/kdata$${s}c --seed $$s \
	  --n-per-family 1000 --n-heldout 0 --families tool_search_check --avoid-names-of $(M)/data; done
	test -f $(R)/kdata0c/stats.json || $(K25) data generate --out $(R)/kdata0c --seed 0 --n-per-family 100 \
	  --n-heldout 100 --families tool_search_check
	sed -n 3001,6000p $(R)/vdata/vision_read/train.jsonl > $(R)/vdata/vision_read/next3000.jsonl
	$(MINI_K_SFT) --eval-data $(MINI_EVAL) $(R)/vdata/vision_read/heldout.jsonl $(R)/cdata/copy/heldout.jsonl \
	  $(R)/bdata/swarm_batch/heldout.jsonl $(D)/agent_docs/heldout.jsonl $(R)/edata/tool_calc_agent/heldout.jsonl \
	  $(R)/kdata0c/tool_search_check/heldout.jsonl --pack --model $(R)/k25-mini10 $(MINI_COMMON) --seq-len 1536 \
	  --batch-size 3 --steps 300 --lr 0.0007 --vision-lr 0.0003 --warmup-steps 10 --schedule cosine --seed 14 \
	  --eval-every 100 --eval-batches 4 --save-every 50 --out $(R)/osft
	$(MINI_K_SFT) --eval-data $(MINI_EVAL) $(R)/bdata/swarm_batch/heldout.jsonl --pack --qat int4 \
	  --model $(R)/osft/checkpoints/step-00000300 $(MINI_COMMON) --seq-len 1536 --batch-size 3 --steps 30 --lr 0.0005 \
	  --vision-lr 0.0003 --warmup-steps 3 --eval-every 10 --eval-batches 4 --save-every 10 --out $(R)/qat14
	test -f $(R)/k25-mini14/config.json || $(K25) quantize $(R)/qat14/checkpoints/step-00000030 $(R)/k25-mini14 \
	  --dtype bfloat16
	# greedy by default when served (its figures are greedy); a request's temperature still wins
	printf '{\n  "do_sample": false\n}\n' > $(R)/k25-mini14/generation_config.json

lint: install
	$(BIN)/ruff check src tests

test: install chromium lint
	$(BIN)/python -m pytest -q

slow: install
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
