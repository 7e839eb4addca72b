# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv and install what they need first.
#
# TORCH_SPEC picks the PyTorch build. The default pins the CPU wheel this project is developed
# with; for a GPU machine use e.g. `make TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu124" demo`.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test lint typecheck pytest install system-packages clean

$(BIN)/dkdm: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(BIN)/dkdm

# System packages the project runs for real: redis-server (job metadata; the embedded default starts a
# private one), prometheus + promtool (the monitoring end-to-end test scrapes the control plane) and
# docker-compose (validates docker-compose.yml). Debian/Ubuntu packages, installed when missing.
SYSTEM_PACKAGES := redis-server prometheus docker-compose
system-packages:
	@missing=""; for c in redis-server prometheus promtool docker-compose; do \
		command -v $$c >/dev/null 2>&1 || missing=yes; done; \
	if [ -n "$$missing" ]; then \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES) >/dev/null 2>&1 || \
		{ $$SUDO apt-get update -q && $$SUDO apt-get install -y --no-install-recommends $(SYSTEM_PACKAGES); }; \
	fi

install: $(BIN)/dkdm system-packages

demo: install
	$(BIN)/dkdm distill --config configs/digits-dkdm.yaml
	$(BIN)/dkdm sample --model runs/digits-dkdm --num 1000 --out runs/digits-dkdm/samples.npz --grid runs/digits-dkdm/samples.png
	$(BIN)/dkdm eval --samples runs/digits-dkdm/samples.npz --out runs/digits-dkdm/eval.json
	@echo "demo outputs in runs/digits-dkdm: model.safetensors, samples.npz, samples.png, metrics.json, eval.json"

lint: install
	$(BIN)/ruff check dkdm_core services tests bench deploy
	$(BIN)/ruff format --check dkdm_core services tests bench deploy

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
