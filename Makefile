# Every target installs what it needs into .venv first, so a fresh clone works with one command.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The one command line (bert_recsys/cli.py): the targets below are shortcuts to its subcommands (but `loadtest`, which
# serves and runs Locust's venv, and `bench-gpu`, which runs on the device's Python without a venv).
BR := $(VENV)/bin/bert-recsys
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

RUNTIME ?= embedded
# RUNTIME=torch serves a torch variant: FP16 where nvidia-smi sees a GPU, FP32 otherwise.
TORCH_VARIANT = $(shell nvidia-smi -L >/dev/null 2>&1 && echo torch-fp16 || echo torch-fp32)
# `make tune` measures every gated ONNX and OpenVINO variant on this machine and records the fastest: used unless VARIANT= is
# given, and only on the machine it was measured on (same CPU model, flags, cores).
ifeq ($(origin VARIANT),undefined)
  ifeq ($(RUNTIME),torch)
    VARIANT := $(TORCH_VARIANT)
  else
    VARIANT := $(or $(shell test -x $(BR) && $(BR) tune --print-choice),onnx-int8)
  endif
endif
EXPORT_ARGS ?=

.PHONY: venv loadtest-venv monitoring-tools export repository serve gateway demo test test-slow finetune bench bench-peers bench-ceiling bench-serving bench-gpu bench-gpu-pack bench-trace tune distill evaluate loadtest report soak experiment-sim bench-gateway bench-rollout rollout rollout-status clean

venv: $(STAMP)
# The checkout itself is installed editable: `bert_recsys.client` is client/ (pyproject.toml's package-dir).
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-compile -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

LOADTEST_VENV := .venv-loadtest
LOADTEST_STAMP := $(LOADTEST_VENV)/.installed
loadtest-venv: $(LOADTEST_STAMP)
$(LOADTEST_STAMP): loadtest/requirements.txt pyproject.toml
	$(PYTHON) -m venv $(LOADTEST_VENV)
	$(LOADTEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOADTEST_VENV)/bin/python -m pip install --quiet --no-compile -r loadtest/requirements.txt 'setuptools>=68'
	$(LOADTEST_VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(LOADTEST_STAMP)

export: venv                     ## ONNX variants (+ TensorRT where present), each gated against PyTorch
	$(BR) export $(EXPORT_ARGS)

repository: venv                 ## render build/model_repository from the exported variant
	$(BR) export --variants $(VARIANT) $(EXPORT_ARGS)
	$(BR) repository build --variant $(VARIANT) --runtime $(RUNTIME)

serve: repository                ## tritonserver on loopback: HTTP 8000, gRPC 8001, metrics 8002
	$(BR) serve

gateway: venv                    ## HTTP gateway beside `make serve`: 127.0.0.1:$${GATEWAY_PORT:-8080}, keys from GATEWAY_API_KEYS or GATEWAY_KEY_FILE
	$(BR) gateway

demo: venv                       ## the data (DATA=dir, ../shared, the cache, or a verified download) first, then export, build, start Triton, recommend, stop
	$(BR) demo --variant $(VARIANT) --runtime $(RUNTIME) $(if $(filter-out file,$(origin DATA)),--data $(DATA))

monitoring-tools:                ## Debian's prometheus and promtool where missing (the monitoring tests skip, saying why, where apt cannot run)
	@scripts/install-monitoring-tools.sh

test: venv loadtest-venv monitoring-tools  ## the whole suite against a real tritonserver
	$(PY) -m pytest -q tests

test-slow: venv loadtest-venv monitoring-tools  ## the long scenarios left out of `make test` (3 rollouts under load, scale-out, crash recovery, a real Prometheus's alerts)
	$(PY) -m pytest -q -m slow tests

# Every runtime and precision a CPU can serve (ov-bf16 and ov-int8-bf16 only where it computes BF16): what bench and
# tune export; export.variants.CPU_VARIANTS is the same list (a unit test keeps them equal).
CPU_VARIANTS := onnx-fp32,onnx-fp16,onnx-int8,ov-fp32,ov-int8,ov-bf16,ov-int8-bf16
bench: venv                      ## export benchmark: PyTorch FP32 vs each gated ONNX and OpenVINO variant and the torch runtime's FP32; refused ones listed
	$(BR) export --keep-going --variants $(CPU_VARIANTS),torch-fp32 $(EXPORT_ARGS)
	$(BR) bench export

CEILING_GOAL ?= 2.5
bench-ceiling: venv              ## the most INT8 can speed the encoder up on this CPU: its GEMMs FP32 vs INT8, the rest as is
	$(BR) export --variants onnx-fp32,onnx-int8 $(EXPORT_ARGS)
	$(BR) bench ceiling --goal $(CEILING_GOAL)

bench-serving: venv              ## perf_analyzer: embed / encoder through Triton vs the bare encoder
	$(BR) export --variants $(VARIANT) $(EXPORT_ARGS)
	$(BR) bench serving --variant $(VARIANT)

# Where the catalog comes from (demo_data): DATA=dir, else ../shared's MovieLens with its TMDB overviews linked in.
DATA_DIR = $$($(BR) data $(if $(filter-out file,$(origin DATA)),--data $(DATA)))
EVAL_SPLITS ?=
evaluate: repository             ## warm, item cold start (3 seeds) and temporal; TF-IDF, EASE^R, base and fine-tuned encoders: make evaluate DATA=dir [EVAL_SPLITS=none]
	@data="$(DATA_DIR)" && $(BR) evaluate full "$$data" --variant $(VARIANT) $(if $(EVAL_SPLITS),--splits $(EVAL_SPLITS))

FINETUNE_ARGS ?=
finetune: venv                   ## the recommendation encoder: fine-tuned on DATA's interactions, gated against the base model, exported to build/export-rec (served as rec_embed)
	@data="$(DATA_DIR)" && $(BR) train finetune "$$data" --out build/finetuned/rec $(FINETUNE_ARGS)
	$(BR) export --model build/finetuned/rec --out build/export-rec --variants $(VARIANT) $(EXPORT_ARGS)

RUNS ?= 400
DATA ?= ../shared/data/movielens-latest-small
experiment-sim: venv             ## A/A + injected-lift simulations and a real A/B/n replay on MovieLens: make experiment-sim DATA=dir (stdout: one JSON object)
	@$(MAKE) --no-print-directory repository >&2
	@$(BR) serve --free-ports -- $(BR) experiments simulate $(DATA) --runs $(RUNS)

USERS ?= 8
DURATION ?= 30
PROTOCOL ?= http
LOADTEST_ARGS ?=
loadtest: repository loadtest-venv  ## Locust headless against a local server: make loadtest USERS=8 DURATION=30 PROTOCOL=grpc
	$(BR) serve --free-ports -- $(LOADTEST_VENV)/bin/python -m loadtest.run --protocol $(PROTOCOL) \
		--users $(USERS) --duration $(DURATION) $(LOADTEST_ARGS)

report: loadtest-venv venv       ## every benchmark in one run -> build/reports/REPORT.md with plots
	$(BR) export --keep-going --variants $(CPU_VARIANTS),torch-fp32 $(EXPORT_ARGS)
	$(BR) bench report --variant $(VARIANT)

SOAK_MINUTES ?= 10
soak: venv                       ## soak benchmark: steady load, RSS of tritonserver and its stubs must grow <= 10%
	$(BR) export --variants onnx-int8 $(EXPORT_ARGS)
	$(BR) bench soak --minutes $(SOAK_MINUTES)

# On the GPU machine there is no .venv: BENCH_PY=python3 uses its Python (docs/gpu.md has the device calls).
BENCH_PY ?= $(PY)
GPU_OUT ?= build/reports/gpu
GPU_BENCH_ARGS ?=
bench-gpu: $(if $(filter $(PY),$(BENCH_PY)),venv)  ## torch runtime on a GPU: encoder sweep, embed end to end, b1, FP16 gate, sentence-transformers peer -> $(GPU_OUT)
	$(BENCH_PY) -m bench.gpu run --out $(GPU_OUT) $(GPU_BENCH_ARGS)

LAYERS ?= 3
distill: venv                    ## a student keeping LAYERS of the teacher's layers, trained on CPU, exported in every CPU variant + gated vs the teacher -> build/export-student
	$(BR) train distill --layers $(LAYERS) $(DISTILL_ARGS)
	$(BR) export --keep-going --model build/students/student-l$(LAYERS) --out build/export-student --variants $(CPU_VARIANTS) $(EXPORT_ARGS)

tune: venv                       ## export every CPU variant, measure the gated ones through Triton here; make serve/demo then serve the fastest (build/tune.json)
	$(BR) export --keep-going --variants $(CPU_VARIANTS) $(EXPORT_ARGS)
	$(BR) tune

PEERS_ARGS ?=
bench-peers: venv                ## the peers users pick (sentence-transformers backends, fastembed, infinity-emb), each in its own venv under build/peers, beside our variants, embed and the gateway -> build/reports/peers.json + peers.png
	$(BR) export --keep-going --variants $(CPU_VARIANTS) $(EXPORT_ARGS)
	$(BR) bench peers $(PEERS_ARGS)

bench-trace: venv                ## embed b1 broken into steps by Triton's trace API (queue, input, compute, output per model; gRPC; client)
	$(BR) export --variants $(VARIANT) $(EXPORT_ARGS)
	$(BR) bench trace --variant $(VARIANT)

bench-gpu-pack: venv             ## here, before a device call: build/device/bench (torch-fp16 repository, references) and build/device/triton.tar.xz
	$(BR) export --variants torch-fp16 $(EXPORT_ARGS)
	$(BR) bench gpu pack
	$(BR) bench gpu pack-triton

bench-gateway: venv                ## the HTTP gateway vs direct gRPC embed: b1 overhead, b32 throughput, rate limiter
	$(BR) export --variants onnx-int8 $(EXPORT_ARGS)
	$(BR) bench gateway

bench-rollout: venv loadtest-venv  ## 3 rollouts under 20 Locust users -> build/reports/rollout.json + rollout.png
	$(BR) export --variants onnx-fp32,onnx-int8 $(EXPORT_ARGS)
	$(BR) bench rollout

NEW ?= build/export/onnx-fp32
# ROLLOUT_GLOBAL_ARGS go before `run` (--family, --index-store, --replica, --repository); ROLLOUT_ARGS after it.
ROLLOUT_GLOBAL_ARGS ?=
ROLLOUT_ARGS ?=
rollout: venv                    ## roll an export (NEW=build/export/<variant>) out to the server `make serve` runs
	$(BR) rollout $(ROLLOUT_GLOBAL_ARGS) run $(NEW) $(ROLLOUT_ARGS)

rollout-status: venv             ## what the server `make serve` runs is serving: versions, manifests, shares
	$(BR) rollout status

clean:
	rm -rf build .test-build
