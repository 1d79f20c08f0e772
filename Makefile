# GHM RetinaNet: Paddle reproduction aligned with mmdetection.
# `make align` and `make test` set everything up themselves on first use.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PYTHON      ?= python3
VENV        ?= .venv
PY          := $(abspath $(VENV))/bin/python
PIP         := $(PY) -m pip

# CPU defaults. A GPU machine sets, e.g.:
#   make setup TORCH_PKG=torch==2.13.0 TORCH_INDEX=https://download.pytorch.org/whl/cu126 \
#              PADDLE_PKG=paddlepaddle-gpu==3.3.1 PADDLE_INDEX=https://www.paddlepaddle.org.cn/packages/stable/cu126/ \
#              MMCV_CUDA=1
TORCH_PKG    ?= torch==2.13.0
TORCH_INDEX  ?=
PADDLE_PKG   ?= paddlepaddle==3.3.1
PADDLE_INDEX ?=
MMCV_PKG     ?= mmcv==2.1.0
MMCV_CUDA    ?= 0
MAX_JOBS     ?= 2

STAMP := $(VENV)/.installed
# mmcv 2.1.0's setup.py needs a setuptools older than torch accepts: it is built into a wheel in a
# throw-away environment (its own setuptools, the project environment's torch behind it), and only
# the wheel is installed, so the project environment never holds conflicting packages.
MMCV_ENV    := $(VENV)/.mmcv-build-env
MMCV_PY     := $(abspath $(MMCV_ENV))/bin/python
MMCV_WHEELS := $(VENV)/.mmcv-wheel
# The project itself, installed editable into the environment (pyproject.toml).
SETUP := $(VENV)/.project

# Alignment inputs: empty CKPT means the seeded default checkpoint in mmdet's format.
CKPT    ?=
SHAPE   ?=
SEED    ?= 0
PERTURB ?=
ISOLATE ?=
CACHE   ?=
FRESH   ?=
REPORTS ?= reports

ITERS   ?=
STEPS   ?=
ITERS_PER_EPOCH ?=
# Training: COCO=/path/to/coco (train2017/, val2017/, annotations/); GPUS=0,1,2,3 launches
# one process per GPU (needs PADDLE_PKG=paddlepaddle-gpu), NPROC=N N CPU processes (gloo);
# lr = 0.01 x total batch / 16. Several machines: NNODES=N NODE_RANK=r MASTER=node0-ip:port on
# each (checked by python -m paddle_impl.launch); CONNECT_TIMEOUT= seconds to wait for the master.
COCO      ?=
GPUS      ?=
NPROC     ?=
NNODES    ?=
NODE_RANK ?=
MASTER    ?=
CONNECT_TIMEOUT ?=
RESUME    ?=
RESUME_CHANGE ?=
MMDET_LOG ?=
R50       ?=
# Epoch weight files kept in WORK_DIR (empty: the program's default, 3; 0: all).
KEEP      ?=
# Library computing the COCO box metrics: pycocotools (mmdet's, the default) or faster-coco-eval.
EVAL_BACKEND ?=
# Images of the synthetic COCO evaluated by bench-coco-eval.
BENCH_IMAGES ?=
WORK_DIR  ?= work_dirs/ghm_retinanet
TINY_COCO ?= build/tiny_coco
SCALE       ?=
TRAIN_ITERS ?=
REPEATS     ?=
# Deployment: WEIGHTS= (.pdparams, .ckpt or mmdet .pth; empty: the seeded checkpoint the stages use,
# converted), EXPORT_DIR= the export folder.
WEIGHTS     ?=
EXPORT_DIR  ?= build/export
# The order of `make align` (and of the report index): each stage builds on the agreement shown
# by the ones before it; the one list is align/ghm/stages.txt.
STAGES  := $(shell awk '!/^\#/ && NF {print $$1}' align/ghm/stages.txt)

COMMON_ARGS = --reports $(REPORTS) --seed $(SEED) $(if $(CKPT),--ckpt $(CKPT)) $(if $(SHAPE),--shape $(SHAPE))

.PHONY: help setup align $(addprefix align-,$(STAGES)) align-deploy export tipc bench-infer bench-postprocess align-example align-examples bench-ghm bench-train bench-coco-eval bench-overhead bench-data train-full tiny-coco \
        test test-fast clean distclean

help:
	@echo "make align          all alignment stages (set-up included)"
	@echo "make test           the test suite (set-up included)"
	@echo "make test-fast      the tests not marked slow"
	@echo "make align-forward  forward stage; CKPT=, SHAPE=NxCxHxW, SEED=, PERTURB=param.name, ISOLATE=1 (each layer's own error), CACHE=1 (reuse mmdet's side), FRESH=1"
	@echo "make align-loss     anchors, targets, GHM losses; CKPT=, SHAPE=2x3xHxW, SEED=, ITERS="
	@echo "make align-backward training steps and the whole lr schedule; CKPT=, SHAPE=, SEED=, STEPS=, ITERS_PER_EPOCH=, ISOLATE=1"
	@echo "make align-example  ResNet-18, mmdet's vs paddle.vision's, through python -m align.pair; PERTURB="
	@echo "make align-examples torch's and Paddle's own Transformer layer, LSTM and text classifier, float64: forward, isolated, 3 lockstep AdamW steps, each perturbed once"
	@echo "make align-data | align-predict | align-metric | align-train   data pipeline, detections, COCO metric, K training iterations on the tiny COCO; SCALE=WxH, TRAIN_ITERS="
	@echo "make align-deploy   mmdet's predict vs our dynamic graph, Paddle Inference and ONNX Runtime: preprocessing, raw outputs, detections; SCALE=WxH (default 640x384), PERTURB=param.name (in the exported copy)"
	@echo "make export         the detector as Paddle inference files and ONNX into EXPORT_DIR= (default build/export); WEIGHTS= (default: the seeded checkpoint)"
	@echo "make tipc           train TRAIN_ITERS= (default 4) iterations on the tiny COCO, export, infer on Paddle Inference and ONNX Runtime: detections and 12 COCO numbers (tiny COCO and a reference from the dynamic graph) equal the dynamic graph's"
	@echo "make train-full     COCO=/path GPUS=0,1 RESUME=1 RESUME_CHANGE=1 (continue with changed options) MMDET_LOG=scalars.json R50=backbone.pdparams KEEP=3 (epoch weight files kept, 0: all) EVAL_BACKEND=faster-coco-eval; no COCO: smoke run on the tiny COCO"
	@echo "                    NPROC=2 (CPU processes); several machines: NNODES=2 NODE_RANK=0|1 MASTER=node0-ip:port CONNECT_TIMEOUT=60"
	@echo "make tiny-coco      write the tiny synthetic COCO to $(TINY_COCO)"
	@echo "make bench-ghm      GHM-C / GHM-R speed, mmdet vs Paddle"
	@echo "make bench-train    training-step speed, mmdet vs Paddle, batch of 2 at two sizes; CKPT="
	@echo "make bench-coco-eval COCO box evaluation speed, pycocotools vs faster-coco-eval, same numbers; BENCH_IMAGES= (default 5000)"
	@echo "make bench-overhead share of a training iteration outside the network, Paddle (as train-full) vs mmdet, one batch; SCALE=WxH (default 1333x800), REPEATS=, CKPT="
	@echo "make bench-infer    per-image latency, batch 1 and 2: mmdet, our dynamic graph, Paddle Inference (oneDNN), ONNX Runtime, as ratios to mmdet; SCALE=WxH (default 1333x800), REPEATS=, CKPT="
	@echo "make bench-postprocess  post-processing alone (score filter, top-k, decode, NMS): mmdet predict_by_feat vs our predict_boxes on the same head outputs, as ratios; SCALE=, REPEATS="
	@echo "make bench-data     share of a training iteration waiting for data, the training program with 0 and 2 DataLoader workers; SCALE=WxH, TRAIN_ITERS= (default 24)"
	@echo "make setup          create $(VENV) and install the pinned dependencies"

setup: $(SETUP)

$(STAMP): requirements/build.txt requirements/reference.txt requirements/lock.txt
	@echo "==> [1/5] virtual environment $(VENV)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"
	@echo "==> [2/5] $(TORCH_PKG)"
	$(PIP) install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_PKG)"
	@echo "==> [3/5] $(PADDLE_PKG)"
	$(PIP) install -q -c requirements/lock.txt $(if $(PADDLE_INDEX),--extra-index-url $(PADDLE_INDEX)) "$(PADDLE_PKG)"
	@echo "==> [4/5] $(MMCV_PKG) with compiled ops (first build about 9 minutes on 2 cores; cached afterwards)"
	rm -rf $(MMCV_ENV) $(MMCV_WHEELS) && $(PYTHON) -m venv $(MMCV_ENV)
	$(MMCV_PY) -m pip install -q --upgrade "pip>=24"
	$(MMCV_PY) -m pip install -q -r requirements/build.txt
	$(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib']); print(sysconfig.get_paths()['platlib'])" \
	  > "$$($(MMCV_PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/project-env.pth"
	PATH="$(abspath $(MMCV_ENV))/bin:$$PATH" MMCV_WITH_OPS=1 FORCE_CUDA=$(MMCV_CUDA) MAX_JOBS=$(MAX_JOBS) \
	  $(MMCV_PY) -m pip wheel -v --no-build-isolation --no-deps -w $(MMCV_WHEELS) "$(MMCV_PKG)" 2>&1 \
	  | tee $(VENV)/mmcv-build.log \
	  | { grep --line-buffered -E '^ *\[[0-9]+/[0-9]+\]|Using cached|Saved |ERROR|error:' || true; } \
	  | sed -u -E 's/^ *(\[[0-9]+\/[0-9]+\]).*/  mmcv build \1/'
	$(PIP) install -q -c requirements/lock.txt $(MMCV_WHEELS)/mmcv-*.whl
	rm -rf $(MMCV_ENV) $(MMCV_WHEELS)
	$(PY) -c "import mmcv.ops; print('  mmcv', mmcv.__version__, 'ops ok')"
	@echo "==> [5/5] mmengine, mmdet, reprod_log, pycocotools, faster-coco-eval, paddle2onnx, onnxruntime, tools"
	$(PIP) install -q -r requirements/reference.txt -c requirements/lock.txt "$(TORCH_PKG)" "$(PADDLE_PKG)" "$(MMCV_PKG)"
	$(PY) -W ignore -c "import torch, paddle, mmcv, mmdet, mmengine, reprod_log; print('  torch', torch.__version__, '| paddle', paddle.__version__, '| mmcv', mmcv.__version__, '| mmdet', mmdet.__version__)"
	$(PIP) check
	touch $@

$(SETUP): $(STAMP) pyproject.toml
	PYTHONWARNINGS=ignore $(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

# Every stage runs even when an earlier one fails; the exit status reports any failure.
align: $(SETUP)
	@status=0; for stage in $(STAGES); do \
	  $(MAKE) --no-print-directory align-$$stage || status=1; \
	done; echo "reports: $(REPORTS)/index.html"; exit $$status

align-forward: $(SETUP)
	$(PY) -m align.forward $(COMMON_ARGS) $(if $(PERTURB),--perturb $(PERTURB)) $(if $(ISOLATE),--isolate) \
	  $(if $(CACHE),--cache) $(if $(FRESH),--fresh)

align-loss: $(SETUP)
	$(PY) -m align.loss $(COMMON_ARGS) $(if $(ITERS),--iters $(ITERS))

align-backward: $(SETUP)
	$(PY) -m align.backward $(COMMON_ARGS) $(if $(STEPS),--steps $(STEPS)) \
	  $(if $(ITERS_PER_EPOCH),--iters-per-epoch $(ITERS_PER_EPOCH)) $(if $(ISOLATE),--isolate) \
	  $(if $(CACHE),--cache) $(if $(FRESH),--fresh)

# A second model pair through the same engine: mmdet's ResNet-18 against paddle.vision's.
align-example: $(SETUP)
	$(PY) -m align.pair --torch align.examples.resnet18:build_torch --paddle align.examples.resnet18:build_paddle \
	  --map align/examples/resnet18_map.json --isolate --backward --reports $(REPORTS) --seed $(SEED) \
	  --name example $(if $(PERTURB),--perturb $(PERTURB))

# One example pair: forward, every layer isolated and every gradient in float64 (report
# example_<name>), 3 lockstep AdamW steps in float64 through the same map and inputs (report
# example_<name>_train), then one parameter perturbed, which must be named as the first divergence.
# $(1) the example, $(2) its inputs, $(3) the parameter, $(4) the layer that must be named.
define align_pair_example
	$(PY) -m align.pair --torch align.examples.$(1):build_torch --paddle align.examples.$(1):build_paddle \
	  --map align/examples/$(1)_map.json $(2) --isolate --backward --dtype float64 --reports $(REPORTS) \
	  --seed $(SEED) --name example_$(1)
	$(PY) -m align.backward --torch align.examples.$(1):build_torch --paddle align.examples.$(1):build_paddle \
	  --map align/examples/$(1)_map.json $(2) --train-steps 3 --optimizer adamw --dtype float64 \
	  --reports $(REPORTS) --seed $(SEED) --name example_$(1)_train
	@status=0; out=$$($(PY) -m align.pair --torch align.examples.$(1):build_torch --paddle align.examples.$(1):build_paddle \
	  --map align/examples/$(1)_map.json $(2) --dtype float64 --perturb $(3) --reports $(REPORTS) --seed $(SEED) \
	  --name example_$(1)_perturbed 2>&1) || status=$$?; echo "$$out" | grep -v -i warn || true; \
	if [ $$status -eq 1 ] && echo "$$out" | grep -qxF "first divergence: $(4)"; then \
	  echo "perturbed $(3): named at $(4)"; \
	else echo "perturbed $(3): expected exit 1 and first divergence $(4)"; exit 1; fi
endef

align-examples: $(SETUP)
	$(call align_pair_example,transformer,--shape 2x16x64,self_attn.q_proj.weight,self_attn)
	$(call align_pair_example,lstm,--shape 2x12x16,lstm.weight_hh_l1_reverse,lstm[0])
	$(call align_pair_example,text_classifier,--input ids:int64:2x16:0..1000 --input mask:bool:2x16,embed.weight,embed)

align-data: $(SETUP)
	$(PY) -m align.data --reports $(REPORTS) --seed $(SEED) $(if $(SCALE),--scale $(SCALE))

align-predict: $(SETUP)
	$(PY) -m align.predict --reports $(REPORTS) --seed $(SEED) $(if $(CKPT),--ckpt $(CKPT)) $(if $(SCALE),--scale $(SCALE))

align-deploy: $(SETUP)
	$(PY) -m align.deploy --reports $(REPORTS) --seed $(SEED) $(if $(CKPT),--ckpt $(CKPT)) $(if $(SCALE),--scale $(SCALE)) \
	  $(if $(PERTURB),--perturb $(PERTURB))

# Train a few iterations on the tiny COCO, export, infer on both engines: their COCO numbers and
# detections equal the dynamic graph's. TRAIN_ITERS= (default 4), SCALE= (default 320x192).
tipc: $(SETUP)
	$(PY) -m align.deploy.tipc --seed $(SEED) $(if $(TRAIN_ITERS),--iters $(TRAIN_ITERS)) $(if $(SCALE),--scale $(SCALE))

# Without WEIGHTS= the seeded checkpoint of the alignment stages, made and converted once under build/.
export: $(SETUP)
	$(PY) -m paddle_impl.export --out $(EXPORT_DIR) --weights "$(if $(WEIGHTS),$(WEIGHTS),$$($(PY) -W ignore -c \
	  'from align.ghm.pair import prepare_checkpoints; print(prepare_checkpoints(None, $(SEED)).paddle_path)'))"

align-metric: $(SETUP)
	$(PY) -m align.metric --reports $(REPORTS) --seed $(SEED)

align-train: $(SETUP)
	$(PY) -m align.train --reports $(REPORTS) --seed $(SEED) $(if $(CKPT),--ckpt $(CKPT)) \
	  $(if $(TRAIN_ITERS),--iters $(TRAIN_ITERS)) $(if $(SCALE),--scale $(SCALE))

TRAIN_ARGS = --work-dir $(WORK_DIR) --reports $(REPORTS) $(if $(COCO),--coco $(COCO)) \
  $(if $(R50),--init-backbone $(R50)) $(if $(RESUME),--resume) $(if $(RESUME_CHANGE),--allow-config-change) \
  $(if $(MMDET_LOG),--mmdet-log $(MMDET_LOG)) \
  $(if $(KEEP),--keep-checkpoints $(KEEP)) \
  $(if $(EVAL_BACKEND),--eval-backend $(EVAL_BACKEND))

LAUNCH_ARGS = $(if $(GPUS),--gpus $(GPUS)) $(if $(NPROC),--nproc $(NPROC)) $(if $(NNODES),--nnodes $(NNODES)) \
  $(if $(NODE_RANK),--node-rank $(NODE_RANK)) $(if $(MASTER),--master $(MASTER)) \
  $(if $(CONNECT_TIMEOUT),--connect-timeout $(CONNECT_TIMEOUT))

# Without COCO= this is a short smoke schedule on the tiny synthetic COCO, labelled as such.
# Any launch variable goes through paddle_impl.launch (paddle.distributed.launch), which checks them all.
train-full: $(SETUP)
	$(if $(strip $(LAUNCH_ARGS)),$(PY) -m paddle_impl.launch $(LAUNCH_ARGS) --,$(PY) -m paddle_impl.train) $(TRAIN_ARGS)

tiny-coco: $(SETUP)
	$(PY) -m paddle_impl.data.tiny_coco $(TINY_COCO) --force

bench-ghm: $(SETUP)
	$(PY) -m bench.bench_ghm --out $(REPORTS)/bench_ghm.json

bench-train: $(SETUP)
	$(PY) -m bench.bench_train --out $(REPORTS)/bench_train.json $(if $(CKPT),--ckpt $(CKPT))

bench-coco-eval: $(SETUP)
	$(PY) -m bench.bench_coco_eval --out $(REPORTS)/bench_coco_eval.json $(if $(BENCH_IMAGES),--images $(BENCH_IMAGES))

bench-overhead: $(SETUP)
	$(PY) -m bench.overhead --out $(REPORTS)/bench_overhead.json $(if $(CKPT),--ckpt $(CKPT)) \
	  $(if $(SCALE),--size $(SCALE)) $(if $(REPEATS),--repeats $(REPEATS))

# Per-image latency at 1333x800, batch 1 and 2: mmdet, our dynamic graph, Paddle Inference (oneDNN), ONNX Runtime.
bench-infer: $(SETUP)
	$(PY) -m bench.bench_infer --out $(REPORTS)/bench_infer.json $(if $(CKPT),--ckpt $(CKPT)) \
	  $(if $(SCALE),--size $(SCALE)) $(if $(REPEATS),--repeats $(REPEATS))

bench-postprocess: $(SETUP)
	$(PY) -m bench.bench_postprocess --out $(REPORTS)/bench_postprocess.json $(if $(SCALE),--size $(SCALE)) \
	  $(if $(REPEATS),--repeats $(REPEATS))

bench-data: $(SETUP)
	$(PY) -m bench.data_wait --out $(REPORTS)/bench_data.json $(if $(SCALE),--size $(SCALE)) \
	  $(if $(TRAIN_ITERS),--iters $(TRAIN_ITERS))

test: $(SETUP)
	$(PY) -m pytest -q tests

# Everything but the tests marked slow (full-size ResNet-50, launched processes, whole stages).
test-fast: $(SETUP)
	$(PY) -m pytest -q -m "not slow" tests

clean:
	rm -rf $(REPORTS) build .pytest_cache

distclean: clean
	rm -rf $(VENV)
