# Two commands do all of the set-up: `make digits` (the main job) and `make test`.
# Each creates the virtual environment in .venv first if it is missing or older
# than requirements.txt. The notebooks run headless (MIM_HEADLESS=1), so the
# slider cell also saves a static picture into the notebook.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NOTEBOOK_TIMEOUT ?= -1

# Reduced settings under which the tests run the notebooks (see README.md).
# Their figures and checkpoints go to a fresh temporary folder, so no tracked file changes.
TEST_SETTINGS := MIM_EPOCHS=1 MIM_TRAIN_SIZE=2048 MIM_TEST_SIZE=1024 MIM_HEADLESS=1 MPLBACKEND=Agg

.PHONY: setup digits fashion notebooks test benchmark clean

$(BIN)/python: requirements.txt benchmarks/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -r requirements.txt -r benchmarks/requirements.txt
	touch $(BIN)/python

setup: $(BIN)/python

# Train every model on the full MNIST training set, writing the figures to
# jepa_images/, the checkpoints to checkpoints/ and the outputs into the notebook.
digits: setup
	MIM_HEADLESS=1 $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=$(NOTEBOOK_TIMEOUT) mae_digits.ipynb

fashion: setup
	MIM_HEADLESS=1 $(BIN)/jupyter nbconvert --to notebook --execute --inplace \
		--ExecutePreprocessor.timeout=$(NOTEBOOK_TIMEOUT) mae_fashion.ipynb

notebooks: digits fashion

test: setup
	output_dir=$$(mktemp -d) && \
	$(TEST_SETTINGS) MIM_OUTPUT_DIR=$$output_dir $(BIN)/python -m pytest -q tests --nbval-lax mae_digits.ipynb mae_fashion.ipynb; \
	status=$$?; rm -rf $$output_dir; exit $$status

benchmark: setup
	$(BIN)/python benchmarks/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
