# Entry points: `make demo` and `make test` work on a fresh machine (they create .venv themselves).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)
DEMO_DIR ?= demo_run
PYTEST_WORKERS ?= 2

.PHONY: setup test demo lint bench clean

setup: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

test: setup
	OMP_NUM_THREADS=1 MPLBACKEND=Agg $(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --durations=15

lint: setup
	$(BIN)/ruff check .

demo: setup
	MPLBACKEND=Agg bash bench/demo.sh $(DEMO_DIR)

bench: setup
	$(BIN)/python bench/bench_synthetic.py
	$(BIN)/python bench/bench_eval.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_inference.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
