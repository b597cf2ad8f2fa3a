# cnnserve: train the design-notes CNN, export it to ONNX, serve it over gRPC.
# Everything runs from the project's own virtual environment (.venv), made by `make setup`.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
CONSTRAINTS := requirements/constraints.txt

DATASET ?= mnist
EPOCHS ?= 10
# Empty: the batch follows the data (python -m training --help).
BATCH_SIZE ?=
# make demo trains a quick model when none exists yet (make train trains the full EPOCHS).
DEMO_EPOCHS ?= 3
MODELS ?= models
TRAIN_ARGS ?=
WORKERS ?= 1
COMPARE_ARGS ?=
PORT ?= 50051
METRICS_PORT ?= 8002
SERVE_ARGS ?=
PYTEST_ARGS ?=
COMPOSE ?= docker compose -f deploy/docker/compose.yaml

.DEFAULT_GOAL := help
.PHONY: help setup train compare serve demo test test-fast test-gpu lint format protos constraints clean compose-up compose-down dashboard-snapshot bench bench-cuda bench-train bench-profile fuzz soak overload

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'
	@echo "  variables: DATASET=$(DATASET) EPOCHS=$(EPOCHS) BATCH_SIZE=$(or $(BATCH_SIZE),auto) MODELS=$(MODELS) PORT=$(PORT)"

setup: $(VENV)/.installed ## create .venv with the serve, train and dev extras (idempotent)

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[serve,train,dev]'
	@touch $@

train: setup ## train and export: make train DATASET=fashion_mnist EPOCHS=10 [WORKERS=2: local MultiWorkerMirroredStrategy]
	$(PY) -m training --dataset $(DATASET) --epochs $(EPOCHS) $(if $(BATCH_SIZE),--batch-size $(BATCH_SIZE)) \
		--models-dir $(MODELS) $(if $(filter-out 1,$(WORKERS)),--workers $(WORKERS)) $(TRAIN_ARGS)

compare: setup ## CNN vs MLP, with and without augmentation: parameters, accuracy, shifted images -> $(MODELS)/compare/
	$(PY) -m training.compare --dataset $(DATASET) --epochs $(EPOCHS) $(if $(BATCH_SIZE),--batch-size $(BATCH_SIZE)) \
		--out $(MODELS)/compare $(COMPARE_ARGS)

# A model folder that does not exist yet is made by training (order-only: never retrains).
$(MODELS)/%:
	$(MAKE) --no-print-directory train DATASET=$*

serve: setup | $(MODELS)/$(DATASET) ## serve $(MODELS) on PORT (trains DATASET first when no model exists)
	$(PY) -m serving --model-repository $(MODELS) --port $(PORT) --metrics-port $(METRICS_PORT) $(SERVE_ARGS)

demo: setup ## start a server, classify real test images, print the summary, stop (trains a quick DEMO_EPOCHS model first when none exists)
	@test -d $(MODELS)/$(DATASET) || { \
		echo "demo: no $(MODELS)/$(DATASET) yet: training a quick one, $(DEMO_EPOCHS) epochs (make train trains $(EPOCHS))"; \
		$(MAKE) --no-print-directory train DATASET=$(DATASET) EPOCHS=$(DEMO_EPOCHS); }
	$(PY) scripts/demo.py --models-dir $(MODELS) --model $(DATASET)

dashboard-snapshot: setup | $(MODELS)/$(DATASET) ## ~20 s of mixed load on a server over $(MODELS), key panels drawn to docs/dashboard.png
	$(PY) scripts/dashboard_snapshot.py --models-dir $(MODELS) --out docs/dashboard.png

# Benchmarks (need h2load: apt-get install nghttp2-client). BENCH_MODELS: the models folder
# (default /tmp/shared-models when it exists, else $(MODELS)); BENCH_ARGS: more flags, e.g.
# BENCH_ARGS="--duration 10 --publish" (see bench/serving_bench.py --help).
BENCH_MODELS ?=
BENCH_ARGS ?=
PROFILE_ARGS ?=
bench: setup ## serving benchmark: unary (h2load, perf_analyzer), streaming (perf_analyzer --streaming) and REST (h2load --h1) rows vs the echo floors, in-process ONNX Runtime and a real Triton (BENCH_ARGS=--no-triton skips it), to bench/results/
	$(PY) bench/serving_bench.py $(if $(BENCH_MODELS),--models $(BENCH_MODELS)) $(BENCH_ARGS)

bench-train: setup ## training overhead: training.train epoch time against a plain model.fit (TensorFlow)
	$(PY) bench/train_overhead.py

bench-cuda: setup ## CUDA against CPU, in-process and through the server (a GPU and onnxruntime-gpu)
	$(PY) bench/cuda_bench.py $(if $(BENCH_MODELS),--models $(BENCH_MODELS)) $(BENCH_ARGS)

bench-profile: setup ## py-spy profile of the server under h2load (PROFILE_ARGS="--batch 1 --concurrency 16")
	$(PY) -m bench.profile_server $(if $(BENCH_MODELS),--models $(BENCH_MODELS)) $(PROFILE_ARGS)

overload: setup ## 1,500 concurrent 3.2 MB Predict calls under a 1 GiB pod's budget, idle memory after, goodput at 4x load (BENCH_ARGS="--publish")
	$(PY) bench/overload.py $(if $(BENCH_MODELS),--models $(BENCH_MODELS)) $(BENCH_ARGS)

# Robustness: FUZZ_CASES hostile calls on both APIs; SOAK_SECONDS of mixed valid and invalid
# traffic at concurrency 32 (each starts its own server over $(MODELS)/$(DATASET)).
FUZZ_CASES ?= 10000
FUZZ_REST_EXAMPLES ?= 200
SOAK_SECONDS ?= 300
fuzz: setup | $(MODELS)/$(DATASET) ## hypothesis + raw bytes against a live server, both gRPC APIs, unary and streaming; then the REST API from its OpenAPI document (schemathesis, no 5xx)
	$(PY) -m harness.fuzz --models-dir $(MODELS) --model $(DATASET) --cases $(FUZZ_CASES)
	$(PY) -m harness.fuzz_rest --models-dir $(MODELS) --model $(DATASET) --max-examples $(FUZZ_REST_EXAMPLES)

soak: setup | $(MODELS)/$(DATASET) ## SOAK_SECONDS (300) of mixed unary and streaming traffic: no unexpected or lost answer, RSS growth < 10%
	$(PY) -m harness.soak --models-dir $(MODELS) --model $(DATASET) --seconds $(SOAK_SECONDS)

test: setup ## the whole test suite (trains small real models once per run)
	$(PY) -m pytest $(PYTEST_ARGS)

test-gpu: setup ## the CUDA execution provider tests (a GPU and onnxruntime-gpu; skipped elsewhere)
	$(PY) -m pytest tests/gpu $(PYTEST_ARGS)

test-fast: setup ## unit tests only
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: setup ## ruff check, ruff format --check, mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup ## apply ruff's fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

protos: setup ## regenerate serving/pb from protos/
	$(PY) scripts/gen_protos.py

compose-up: | $(MODELS)/$(DATASET) ## Docker: server + Prometheus + Grafana over $(MODELS) (trains DATASET first when missing)
	CNNSERVE_MODELS="$(abspath $(MODELS))" $(COMPOSE) up --build --detach
	@echo "gRPC localhost:50051, metrics http://localhost:8002/metrics, Prometheus http://localhost:9090, Grafana http://localhost:3000"

compose-down: ## stop and remove the compose stack
	$(COMPOSE) down

constraints: setup ## re-pin requirements/constraints.txt from the current .venv
	{ sed -n '1,2p' $(CONSTRAINTS); $(BIN)/pip freeze --exclude-editable | grep -v '^cnnserve'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)

clean: ## remove caches (keeps .venv and models)
	rm -rf .pytest_cache .mypy_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
