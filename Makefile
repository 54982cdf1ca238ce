# Entry points: `make demo` and `make test` work on a fresh machine (they create .venv themselves).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | cksum | cut -d' ' -f1)
DEMO_DIR ?= demo_run
PYTEST_WORKERS ?= 2

.PHONY: setup test demo lint bench clean gpu-wheels

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

# Wheels for the GPU machine (Python 3.12, x86-64, no package index): the pins of bench/gpu_wheels.txt into .whl/,
# which bench/gpu_check.sh installs when the device run carries it. Fails when they exceed GPU_WHEELS_MAX_MIB, so
# the wheels and the working tree stay well under the 64 MiB a device run may carry.
GPU_WHEEL_PLATFORMS := $(foreach n,2_17 2_24 2_27 2_28 2_31 2_34 2_35,--platform manylinux_$(n)_x86_64) \
	--platform manylinux2014_x86_64 --platform manylinux1_x86_64
GPU_WHEELS_MAX_MIB ?= 40
gpu-wheels: setup
	rm -rf .whl
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_WHEEL_PLATFORMS) -d .whl -r bench/gpu_wheels.txt
	@mib=$$(du -sm .whl | cut -f1); echo "gpu-wheels: $$(ls .whl/*.whl | wc -l) wheels, $$mib MiB in .whl/"; \
		test $$mib -le $(GPU_WHEELS_MAX_MIB) || { echo "error: .whl/ is $$mib MiB, over $(GPU_WHEELS_MAX_MIB)"; exit 1; }

# The whole pipeline on synthetic plates, sized for a CPU laptop (about 3 minutes on 2 cores):
# plates -> DINO/MAE/SimCLR training (the small_cpu recipes of docs/LEARNING.md, shortened) -> tiled inference ->
# handcrafted baseline -> evaluation -> the supervised bioactivity baseline (the paper's two commands, then a
# comparison of every representation). "Random" is DINO's own weights before its first step (--save_init), the
# baseline every trained model has to beat; summary.md states each method's gain over Random and CellProfiler.
DEMO_PLATES := $(DEMO_DIR)/plates/dataset.csv
DEMO_EMB := $(DEMO_DIR)/embeddings/demo
DEMO_TRAIN := --preset small_cpu --path_df $(DEMO_PLATES) --num_workers 2
DEMO_INFER := --valset $(DEMO_PLATES) --size 128 --stride 128 --batch_size 8 --num_workers 0 --arch vit_tiny
DEMO_EPOCHS ?= 6
# The paper's two supervised commands on the repo's configs (which point at demo_run/); the overrides only matter
# when DEMO_DIR is not demo_run.
SUPERVISED_CFG := supervised_baseline/hti-cnn-master/configs
SUPERVISED_PATHS = --data.features $(DEMO_EMB)/DINO/well_features.csv --data.labels $(DEMO_PLATES) --output_dir $(DEMO_DIR)/supervised/fnn_dino/split1
SUPERVISED_EPOCHS ?= 30

demo: setup
	rm -rf $(DEMO_DIR)
	$(BIN)/python -m data.synthetic --out $(DEMO_DIR)/plates --plates 2 --batches 2 --wells 32 --sites 2 --size 256 --seed 0
	$(BIN)/python train_dino.py $(DEMO_TRAIN) --epochs $(DEMO_EPOCHS) --save_init --output_dir $(DEMO_DIR)/checkpoints/DINO
	$(BIN)/python train_mae.py $(DEMO_TRAIN) --epochs $(DEMO_EPOCHS) --output_dir $(DEMO_DIR)/checkpoints/MAE
	$(BIN)/python train_simclr.py $(DEMO_TRAIN) --max_epochs $(DEMO_EPOCHS) --ckpt_path $(DEMO_DIR)/checkpoints/SimCLR
	$(BIN)/python inference.py --model dino --ckpt $(DEMO_DIR)/checkpoints/DINO/checkpoint0000.pth $(DEMO_INFER) -o $(DEMO_EMB)/Random
	$(BIN)/python inference.py --model dino --ckpt $(DEMO_DIR)/checkpoints/DINO/checkpoint.pth $(DEMO_INFER) -o $(DEMO_EMB)/DINO
	$(BIN)/python inference.py --model mae --ckpt $(DEMO_DIR)/checkpoints/MAE/checkpoint.pth $(DEMO_INFER) -o $(DEMO_EMB)/MAE
	$(BIN)/python inference.py --model simclr --ckpt $(DEMO_DIR)/checkpoints/SimCLR/checkpoint.pth $(DEMO_INFER) -o $(DEMO_EMB)/SimCLR
	$(BIN)/python -m utils.handcrafted --valset $(DEMO_PLATES) --workers 2 -o $(DEMO_EMB)/CellProfiler
	MPLBACKEND=Agg $(BIN)/python evaluate.py -i demo -b $(DEMO_DIR)/embeddings --compare-to Random CellProfiler
	$(BIN)/python supervised_baseline/hti-cnn-master/main_supervised.py --config $(SUPERVISED_CFG)/fnn_dino.json --g 1 --j 2 --training.batchsize 128 $(SUPERVISED_PATHS)
	$(BIN)/python supervised_baseline/hti-cnn-master/eval.py --config $(SUPERVISED_CFG)/fnn_dino_test.json --g 4 --j 2 $(SUPERVISED_PATHS) --checkpoint $(DEMO_DIR)/supervised/fnn_dino/split1/model_best.pt
	MPLBACKEND=Agg $(BIN)/python -m supervised_baseline compare -b $(DEMO_DIR)/embeddings -i demo --labels $(DEMO_PLATES) --set training.epochs=$(SUPERVISED_EPOCHS) -o $(DEMO_DIR)/supervised/compare
	@echo "demo done: results in $(DEMO_EMB)/summary.md, $(DEMO_EMB)/figures/ and $(DEMO_DIR)/supervised/compare/"
	@cat $(DEMO_EMB)/summary.md
	@cat $(DEMO_DIR)/supervised/compare/comparison.md

bench: setup
	$(BIN)/python bench/bench_synthetic.py
	$(BIN)/python bench/bench_eval.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_inference.py

clean:
	rm -rf $(DEMO_DIR) .pytest_cache .ruff_cache
