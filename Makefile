# Two commands on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel of torch first: installed after the project, pip would pull several GB of CUDA packages.
# Elsewhere add e.g. TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" (or a CUDA index on GPU hosts).
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
LAKE ?= lake
DEMO_PHOTOS = $$($(BIN)/python -c "import os, skimage.data; print(os.path.dirname(skimage.data.__file__))")

.PHONY: demo test install lint bench clean-demo

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

install: $(BIN)/.installed

# The main job on the embedded default: a lake in ./lake, MLflow in ./mlflow.db, a local Ray instance.
demo: $(BIN)/.installed
	$(BIN)/recolor ingest folder "$(DEMO_PHOTOS)" --dataset demo-photos --lake $(LAKE) --size 128
	$(BIN)/recolor lake show demo-photos --lake $(LAKE)
	$(BIN)/recolor train configs/demo.yaml --lake $(LAKE) --workers 2
	$(BIN)/recolor evaluate --model models:/colorizer@candidate --dataset demo-photos --lake $(LAKE) --promote
	$(BIN)/recolor evaluate --model models:/colorizer@champion --dataset demo-photos --lake $(LAKE) --split train
	photos=$(DEMO_PHOTOS); $(BIN)/recolor colorize --model models:/colorizer@champion "$$photos/coffee.png" \
		"$$photos/astronaut.png" "$$photos/chelsea.png" "$$photos/camera.png" -o outputs/colorized \
		--overwrite --side-by-side outputs/colorized/side-by-side.png
	@echo
	@echo "lake:        $(LAKE)/demo-photos   (recolor lake show demo-photos)"
	@echo "checkpoints: ray_results/demo"
	@echo "colorized:   outputs/colorized; gray input | colorized | photo: outputs/colorized/side-by-side.png"
	@echo "             coffee, astronaut and chelsea are in the demo model's training set (it learned them: the FID"
	@echo "             and colorfulness above, --split train); camera.png is a gray photo it never saw"
	@echo "MLflow UI:   $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000   then open http://127.0.0.1:5000"

# Two pytest workers, a test file each at a time, the longest first (tests/fixtures/schedule.py): one alone leaves a
# core idle while it waits on Ray starts, servers and outages, three are slower (19.0 vs 18.1 min, 2026-12-07).
test: $(BIN)/.installed
	$(BIN)/pytest -q -n 2

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(BIN)/.installed
	$(BIN)/python bench/ingest.py

clean-demo:
	rm -rf $(LAKE) mlflow.db mlartifacts ray_results outputs
