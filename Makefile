# The two commands of the README:  make demo   and   make test
# Both create .venv, install the pinned project, and use ../shared/data when it exists.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)/fashion-mnist),)
export MMKD_DATA ?= $(SHARED_DATA)
endif

.PHONY: install demo test test-fast bench-kd bench-kd-short bench-g2sd bench-dho bench-mst bench-losses bench-train bench-vs-torchdistill bench-view-cache bench-data clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install  ## quick start: teacher, student alone, student + KD on Fashion-MNIST
	$(PY) tools/quickstart.py

test: install  ## the whole test suite, slow end-to-end tests included (what CI runs)
	$(PY) -m pytest -m "slow or not slow"

test-fast: install  ## the default pytest run (slow tests skipped)
	$(PY) -m pytest

bench-kd: install  ## KD, DKD, FitNets vs student alone, 8 epochs, 3 seeds (~80 min) -> bench/kd_fmnist_8ep.json
	$(PY) tools/bench_kd.py --seeds 0 1 2 --methods kd dkd fitnets --teacher-epochs 8 --epochs 8 \
		--workdir runs/bench_kd8 --out bench/kd_fmnist_8ep.json

bench-kd-short: install  ## the demo's 4-epoch schedule, all five distillers, 2 seeds -> bench/kd_fmnist.json
	$(PY) tools/bench_kd.py --methods kd dkd fitnets at rkd

bench-g2sd: install  ## G2SD: MAE teacher, ViT alone, specific stage only, generic + specific, and the two without RandAugment; 2 seeds (~40 min) -> bench/g2sd_fmnist.json
	$(PY) tools/bench_g2sd.py --seeds 0 1 --ablate-augmentation

bench-dho: install  ## DHO: CLIP teacher, CE only, single-head KD, DHO fixed/searched mix; 1 % and 10 % labels, 2 seeds (~60 min) -> bench/dho_fmnist_*pct.json
	$(PY) tools/bench_dho.py --seeds 0 1

bench-mst: install  ## MST-Distill vs plain KD from each teacher on AV-MNIST, image and audio students, 2 seeds -> bench/mst_avmnist_*.json
	$(PY) tools/bench_mst.py --seeds 0 1 --single-masks

bench-losses: install  ## fused losses vs eager / torch.compile, CPU (and CUDA when there is one) -> bench/losses_*.json
	$(PY) tools/bench_losses.py
	if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then $(PY) tools/bench_losses.py --device cuda; fi

bench-train: install  ## KD step samples/s: teacher online vs cached, bf16, channels_last, compile -> bench/train_kd_cpu.json
	$(PY) tools/bench_train.py

bench-view-cache: install  ## teacher cache of recorded augmented views vs online (speed, ResNet-18/50/152 teachers) and accuracy of compressed caches -> bench/view_cache*.json
	$(PY) tools/bench_view_cache.py --part speed
	$(PY) tools/bench_view_cache.py --part accuracy --out bench/view_cache_accuracy.json

bench-vs-torchdistill: install  ## the same KD job in torchdistill 1.1.4 (own venv, from PyPI) and mmkd, interleaved (~5 min) -> bench/vs_torchdistill.json
	$(PY) tools/bench_vs_torchdistill.py

bench-data: install  ## image files: decode+crop images/s vs torchvision ImageFolder (workers 0/1/2), loader memory 20k vs 1M files (~8 min) -> bench/data_*.json
	$(PY) tools/bench_data.py

clean:
	rm -rf runs .pytest_cache
