# `make test` and `make demo` set everything up on a fresh machine (Python 3.11 + pip).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo eval pilot model world-model shape-classifier lint clean

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

model: setup
	test -f models/tiny-sdxl/model_index.json || $(PY) -m flatlora_diffusion.sdxl.default_model models/tiny-sdxl

test: setup
	$(PY) -m pytest -q tests

# The whole protocol (issue 15), two processes; see docs/EVALUATION.md. The sweep: 4 sigmas x 5 seeds x
# 6 lengths (25-800 steps), constant sigma (one resumed run per curve); then the paper's cosine ramp
# at its SDXL sigma 0.1 (one run per length) against plain LoRA, 5 seeds, the same lengths.
eval: setup
	$(PY) -m flatlora_diffusion.evaluation.dreambooth --seeds 5 --sigmas 0 0.05 0.1 0.2 --jobs 2 --out docs/eval
	$(PY) -m flatlora_diffusion.evaluation.dreambooth --seeds 5 --sigmas 0 0.1 --flat_schedule cosine --jobs 2 \
		--out docs/eval_cosine --work outputs/eval_cosine

pilot: setup
	$(PY) -m flatlora_diffusion.evaluation.pilot --task style --out docs/eval/pilot_results.json

world-model: setup
	$(PY) -m flatlora_diffusion.toyworld.pretrain --seed 0 --images 32000 --vae-steps 712 --decoder-steps 363 --unet-steps 2000

shape-classifier: setup
	$(PY) -m flatlora_diffusion.toyworld.train_shape_classifier

lint: setup
	$(VENV)/bin/ruff check .
	PYTHONPATH=. $(VENV)/bin/lint-imports

demo: setup
	$(PY) -m flatlora_diffusion.demo

clean:
	rm -rf outputs demo_data models
