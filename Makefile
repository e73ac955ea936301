# The two commands (README): `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: setup demo test bench clean

# torch goes in first and alone: a plain `torch` requirement would pull a CUDA build.
$(BIN)/ftdist: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

setup: $(BIN)/ftdist

demo: setup
	$(BIN)/ftdist train jobs/configs/tiny-demo.yaml --local
	$(BIN)/ftdist generate runs/tiny-demo/final --prompt "reverse 12345 =" --prompt "reverse 9071 =" --max-new-tokens 8
	$(BIN)/ftdist report runs/tiny-demo

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/local_vs_torch.py
	$(BIN)/python bench/ray_vs_local.py
	$(BIN)/python bench/checkpoint_stall.py

clean:
	rm -rf $(VENV) runs
